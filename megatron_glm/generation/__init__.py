"""Blank infilling with a trained GLM: every [MASK]/[sMASK]/[gMASK] of a text filled left to right.

prompts    Part A from a text, Part B of the answers so far, the pretraining layout of both
steppers   next-token logits with a KV cache (``CachedStepper``) or by full recomputation
search     greedy, sampling (temperature, top-k, top-p) and beam search, blank by blank

``generate`` is the text-level entry point (``glm-generate``); ``generate_ids`` works on token ids.
"""

from __future__ import annotations

import dataclasses

import torch

from data_tools.tokenizer import CommandTokens, GLMTokenizer
from megatron_glm.generation.prompts import (
    GenerationError,
    Prompt,
    check_fits,
    filled_text,
    prompt_from_ids,
    prompt_from_text,
)
from megatron_glm.generation.search import STRATEGIES, GenerationConfig, generate_answers
from megatron_glm.generation.steppers import CachedStepper, RecomputeStepper
from megatron_glm.model import GLMModel


@dataclasses.dataclass
class FilledText:
    text: str  # the input with every blank replaced by its answer
    answers: list[str]
    answer_ids: list[list[int]]


@torch.no_grad()
def generate_ids(
    model: GLMModel,
    prompts: list[Prompt],
    command: CommandTokens,
    vocab_limit: int,
    config: GenerationConfig,
    *,
    use_cache: bool = True,
) -> list[list[list[int]]]:
    """``answers[prompt][blank]``: the token ids filling each blank. ``model`` may be tensor-parallel
    (every rank calls this and gets the same answers); ``vocab_limit`` is the tokenizer's size (the
    padded rows of the embedding table are never generated)."""
    config.check()
    for i, prompt in enumerate(prompts):
        check_fits(prompt, config.max_tokens, model.config.max_position_embeddings, f"prompt {i}")
    was_training = model.training
    model.eval()
    try:
        stepper_type = CachedStepper if use_cache else RecomputeStepper
        stepper = stepper_type(model, prompts, command, vocab_limit)
        return generate_answers(stepper, prompts, config, [command.eop, command.eos])
    finally:
        model.train(was_training)


def generate(
    model: GLMModel,
    tokenizer: GLMTokenizer,
    texts: list[str],
    config: GenerationConfig,
    *,
    use_cache: bool = True,
) -> list[FilledText]:
    """Fill the blanks of ``texts`` (decoded together as one batch)."""
    prompts = [prompt_from_text(text, tokenizer) for text in texts]
    answers = generate_ids(
        model, prompts, tokenizer.command, tokenizer.num_tokens, config, use_cache=use_cache
    )
    return [
        FilledText(
            filled_text(prompt, ids, tokenizer),
            [tokenizer.decode(a, skip_command_tokens=True).strip() for a in ids],
            ids,
        )
        for prompt, ids in zip(prompts, answers)
    ]


def fill_blanks(model: GLMModel, tokenizer: GLMTokenizer, text: str, *, max_tokens: int = 32) -> FilledText:
    """Greedy answers for every blank of one text."""
    return generate(model, tokenizer, [text], GenerationConfig(max_tokens=max_tokens))[0]


__all__ = [
    "STRATEGIES",
    "FilledText",
    "GenerationConfig",
    "GenerationError",
    "Prompt",
    "fill_blanks",
    "generate",
    "generate_ids",
    "prompt_from_ids",
    "prompt_from_text",
]
