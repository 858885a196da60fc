"""Seq2seq finetuning (THUDM/GLM ``tasks/seq2seq``): the target generated at a blank after the source.

Each example is a source and a target text, laid out as THUDM's custom seq2seq task with the pretraining
builder: Part A ``[CLS] source [gMASK] [eos]`` (``[MASK]`` with ``mask="MASK"``), Part B ``[sop] target``
at the mask's position with block positions ``1 .. len + 1``, the loss on ``target [eop]`` only. Training
takes the token mean over the targets, optionally label-smoothed as THUDM does
(``(1 - eps) CE + eps mean_vocab(-log softmax)``), on ``TrainingEngine`` (``finetune.common``). After each
epoch the dev sources are decoded by beam search (``megatron_glm.generation``, KV-cached) and the outputs
scored against the references by ROUGE-1/2/L F1 on words (``evaluation.rouge``); the epoch with the best
ROUGE-L keeps its weights in ``<output>/best``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from data_tools.errors import DataError
from data_tools.layout import GLMLayout, build_glm_layout
from data_tools.objectives import Objective
from data_tools.tokenizer import GLMTokenizer
from megatron_glm.config import ConfigError, GLMConfig
from megatron_glm.evaluation.rouge import rouge_scores
from megatron_glm.finetune.common import FinetuneResult, HiddenStates, check_finetune_config, finetune
from megatron_glm.generation import GenerationConfig, Prompt, generate_ids
from megatron_glm.model import GLMModel

# The blank the target is generated at: its objective in the layout builder (with task masks).
MASKS = {"gMASK": Objective.DOCUMENT, "MASK": Objective.TOKEN}
BEST_METRIC = "rouge-l"


@dataclasses.dataclass
class Seq2SeqExample:
    where: str  # file:line
    layout: GLMLayout  # Part A: the source with the blank; Part B: [sop] target; loss on target [eop]
    target: list[int]  # the reference's token ids

    @property
    def prompt(self) -> Prompt:
        """Part A with its one blank, for the decoders."""
        part_a = self.layout.tokens[: self.layout.sep]
        return Prompt(tuple(int(t) for t in part_a), (int(self.layout.position_ids[0, self.layout.sep]),))


def seq2seq_example(
    record: dict,
    where: str,
    tokenizer: GLMTokenizer,
    *,
    mask: str = "gMASK",
    source_field: str = "source",
    target_field: str = "target",
) -> Seq2SeqExample:
    """One JSON-lines record laid out for training; ``where`` (file:line) names it in errors."""
    if mask not in MASKS:
        raise ConfigError(f"mask {mask!r} is not one of {', '.join(MASKS)}")
    for name in (source_field, target_field):
        if name not in record:
            raise DataError(f"{where}: no {name!r} field (the line has {sorted(record)})")
        if not isinstance(record[name], str):
            raise DataError(f"{where}: {name!r} must be a string, got {type(record[name]).__name__}")
    source = tokenizer.encode(record[source_field])
    # THUDM prefixes the target with a space: a BPE then encodes its first word as it does mid-text.
    target = tokenizer.encode(" " + record[target_field])
    if not target:
        raise DataError(f"{where}: the {target_field!r} text encodes to no token; give a non-empty target")
    command = tokenizer.command
    tokens = [command.cls, *source, *target, command.eos]
    layout = build_glm_layout(
        np.asarray(tokens), [(1 + len(source), len(target))], MASKS[mask], command, task_mask=True
    )
    return Seq2SeqExample(where, layout, list(target))


def check_fits(example: Seq2SeqExample, max_position_embeddings: int) -> None:
    """Positions (Part A) and block positions (the target and its [eop]) must fit the position tables."""
    source_length = example.layout.sep
    if source_length > max_position_embeddings:
        raise DataError(
            f"{example.where}: the source lays out to {source_length} tokens ([CLS] source blank [eos]), "
            f"the model's position table holds max_position_embeddings={max_position_embeddings}; "
            "shorten the source"
        )
    if len(example.target) + 1 > max_position_embeddings:
        raise DataError(
            f"{example.where}: the target has {len(example.target)} tokens, its block positions reach "
            f"{len(example.target) + 1} > max_position_embeddings={max_position_embeddings}; shorten the target"
        )


def check_inputs(cfg: GLMConfig, examples: list[Seq2SeqExample], generation: GenerationConfig) -> None:
    """Everything ``finetune_seq2seq`` refuses, checked before any process group or engine exists."""
    check_finetune_config(cfg)
    generation.check()
    limit = cfg.model.max_position_embeddings
    if generation.max_tokens + 1 > limit:
        raise ConfigError(
            f"max target tokens {generation.max_tokens}: block positions reach it + 1, the model's table "
            f"holds max_position_embeddings={limit}"
        )
    for example in examples:
        check_fits(example, limit)


@torch.no_grad()
def seq2seq_predictions(
    model: GLMModel,
    examples: list[Seq2SeqExample],
    tokenizer: GLMTokenizer,
    generation: GenerationConfig,
    batch_size: int = 16,
) -> list[list[int]]:
    """The decoded answer (token ids) for each example's source. ``model`` may be the engine's module."""
    decoder = HiddenStates(model) if type(model).forward is not GLMModel.forward else model
    answers = []
    for start in range(0, len(examples), batch_size):
        prompts = [example.prompt for example in examples[start : start + batch_size]]
        for ids in generate_ids(decoder, prompts, tokenizer.command, tokenizer.num_tokens, generation):
            answers.append(ids[0])
    return answers


def seq2seq_rouge(
    model: GLMModel, examples: list[Seq2SeqExample], tokenizer: GLMTokenizer, generation: GenerationConfig
) -> dict[str, float]:
    """ROUGE-1/2/L F1 of the decoded answers against the references (both decoded to words)."""
    answers = seq2seq_predictions(model, examples, tokenizer, generation)
    hypotheses = [tokenizer.decode(ids, skip_command_tokens=True) for ids in answers]
    references = [tokenizer.decode(example.target, skip_command_tokens=True) for example in examples]
    return rouge_scores(hypotheses, references)


def finetune_seq2seq(
    cfg: GLMConfig,
    train: list[Seq2SeqExample],
    dev: list[Seq2SeqExample],
    tokenizer: GLMTokenizer,
    generation: GenerationConfig,
    *,
    epochs: int,
    output_dir: str | Path,
    label_smoothing: float = 0.0,
) -> FinetuneResult:
    """Train on ``train`` for ``epochs`` (the process group must be up); after each epoch decode ``dev`` with
    ``generation`` and keep the best ROUGE-L weights. ``result.dev`` holds rouge-1, rouge-2, rouge-l."""
    check_inputs(cfg, [*train, *dev], generation)
    return finetune(
        cfg,
        [example.layout for example in train],
        lambda model: seq2seq_rouge(model, dev, tokenizer, generation),
        BEST_METRIC,
        epochs=epochs,
        output_dir=output_dir,
        label_smoothing=label_smoothing,
    )
