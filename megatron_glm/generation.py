"""Blank filling with a trained GLM: every [MASK]/[sMASK]/[gMASK] of a text is filled left to right.

The input is ``[CLS] text [eos]`` (THUDM/GLM's ``generate_samples.py``); a text without a blank gets a
``[gMASK]`` appended (then no ``[eos]``), which asks for a continuation. Each step is the pretraining
layout of ``data_tools.layout.build_glm_layout``: the blanks answered so far are spans ``[sop] answer``
in Part B, and the blank being filled is the span ``[sop] generated x`` whose last input x is a
placeholder: the model's prediction at the position before it is the next token (causal attention keeps x
out of it). Decoding is greedy and stops at ``[eop]`` (or eos) or after ``max_tokens``. Later blanks see
earlier answers, as in the reference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from data_tools.layout import build_glm_layout
from data_tools.objectives import Objective
from data_tools.tokenizer import GLMTokenizer
from megatron_glm.model import GLMModel
from megatron_glm.parallel import gather_from_tensor_parallel


@dataclasses.dataclass
class FilledText:
    text: str  # the input with every blank replaced by its answer
    answers: list[str]
    answer_ids: list[list[int]]


def _assemble(
    ids: list[int], blanks: list[int], contents: list[list[int]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """The "original" token sequence whose spans are ``contents`` at the blank positions, and the spans."""
    tokens: list[int] = []
    spans = []
    previous = 0
    for blank, content in zip(blanks, contents):
        tokens.extend(ids[previous:blank])
        spans.append((len(tokens), len(content)))
        tokens.extend(content)
        previous = blank + 1
    tokens.extend(ids[previous:])
    return tokens, spans


@torch.no_grad()
def fill_blanks(model: GLMModel, tokenizer: GLMTokenizer, text: str, *, max_tokens: int = 32) -> FilledText:
    """Fill every blank of ``text`` greedily; ``model`` may be tensor-parallel (every rank calls this)."""
    command = tokenizer.command
    ids = [command.cls, *tokenizer.encode_with_commands(text)]
    mask_ids = set(command.mask_ids())
    if not any(t in mask_ids for t in ids):
        ids.append(command.gmask)
    else:
        ids.append(command.eos)
    blanks = [i for i, t in enumerate(ids) if t in mask_ids]
    limit = model.config.max_position_embeddings
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[list[int]] = []
    for _ in blanks:
        generated: list[int] = []
        while len(generated) < max_tokens:
            contents = [*answers, generated + [command.eop]]
            tokens, spans = _assemble(ids, blanks[: len(contents)], contents)
            layout = build_glm_layout(
                np.asarray(tokens), spans, Objective.TOKEN, command, span_order=list(range(len(spans)))
            )
            # Part A is the prompt itself (each span collapses back to one blank): keep the prompt's own
            # blank tokens ([sMASK], [gMASK]) where the builder wrote [MASK].
            layout.tokens[: layout.sep] = ids
            if len(layout) > limit:
                break
            hidden = model(
                torch.from_numpy(layout.tokens).unsqueeze(0).to(device),
                torch.from_numpy(layout.position_ids).unsqueeze(0).to(device),
                torch.tensor([layout.sep], device=device),
            )
            logits = gather_from_tensor_parallel(model.logits(hidden[0, -2]).float())
            next_token = int(logits[: tokenizer.num_tokens].argmax())
            if next_token in (command.eop, command.eos):
                break
            generated.append(next_token)
        answers.append(generated)
    model.train(was_training)
    decoded = [tokenizer.decode(a, skip_command_tokens=True).strip() for a in answers]
    pieces = []
    previous = 1
    for blank, answer in zip(blanks, answers):
        pieces.append(tokenizer.decode(ids[previous:blank], skip_command_tokens=False))
        pieces.append(tokenizer.decode(answer, skip_command_tokens=True))
        previous = blank + 1
    tail = [t for t in ids[previous:] if t not in (command.eos, command.gmask)]
    pieces.append(tokenizer.decode(tail))
    return FilledText(" ".join(p.strip() for p in pieces if p.strip()), decoded, answers)
