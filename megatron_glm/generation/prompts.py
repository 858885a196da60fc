"""Prompts with blanks, and GLM's layout of a prompt whose blanks are being answered.

A prompt is Part A: ``[CLS] text [eos]`` with its ``[MASK]``/``[sMASK]``/``[gMASK]`` blanks as they
are (THUDM/GLM's ``generate_samples.py``); a text without a blank gets a ``[gMASK]`` appended instead
of the ``[eos]``, which asks for a continuation. Blanks are answered left to right: Part B holds
``[sop] answer`` for each blank answered so far, then ``[sop] generated`` for the blank being filled,
every token of blank i at the Part-A position of its blank token with block positions ``1, 2, ...``,
so later blanks see earlier answers.

``part_b`` writes those tokens directly (the cached decoder feeds them); ``recompute_layout`` builds the
same sequence with the pretraining layout builder (``data_tools.layout``), which the uncached decoder
runs and against which the cached one is tested.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data_tools.layout import GLMLayout, build_glm_layout
from data_tools.objectives import Objective
from data_tools.tokenizer import CommandTokens, GLMTokenizer
from megatron_glm.errors import GLMError


class GenerationError(GLMError):
    """A prompt or setting the model cannot serve (too long for its position table, no blank, ...)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Part A token ids and the indices of its blank tokens (in order)."""

    ids: tuple[int, ...]
    blanks: tuple[int, ...]


def prompt_from_ids(ids: Sequence[int], command: CommandTokens) -> Prompt:
    blanks = tuple(i for i, t in enumerate(ids) if t in command.mask_ids())
    if not blanks:
        raise GenerationError("a prompt needs at least one [MASK], [sMASK] or [gMASK] blank")
    return Prompt(tuple(int(t) for t in ids), blanks)


def prompt_from_text(text: str, tokenizer: GLMTokenizer) -> Prompt:
    """``[CLS] text [eos]``, or ``[CLS] text [gMASK]`` for a text without a blank."""
    command = tokenizer.command
    ids = [command.cls, *tokenizer.encode_with_commands(text)]
    mask_ids = set(command.mask_ids())
    ids.append(command.eos if any(t in mask_ids for t in ids) else command.gmask)
    return prompt_from_ids(ids, command)


def check_fits(prompt: Prompt, max_tokens: int, max_position_embeddings: int, where: str) -> None:
    """Raise unless positions (Part A) and block positions (the longest answer) fit the position tables."""
    if len(prompt.ids) > max_position_embeddings:
        raise GenerationError(
            f"{where}: {len(prompt.ids)} tokens, the model's position table holds "
            f"max_position_embeddings={max_position_embeddings}; shorten the text"
        )
    if max_tokens + 1 > max_position_embeddings:
        raise GenerationError(
            f"max_tokens={max_tokens}: an answer's block positions reach max_tokens + 1, the model's table "
            f"holds max_position_embeddings={max_position_embeddings}; lower max_tokens"
        )


def part_b(
    prompt: Prompt,
    answers: Sequence[Sequence[int]],
    generated: Sequence[int],
    sop: int,
    block_positions: bool,
) -> list[tuple[int, int, int]]:
    """Part B as ``(token, position, block position)``: ``[sop] answer`` per answered blank, then
    ``[sop] generated`` for blank ``len(answers)``."""
    pieces = []
    for blank, content in zip(prompt.blanks, [*answers, generated]):
        for k, token in enumerate([sop, *content]):
            pieces.append((int(token), blank, k + 1 if block_positions else 1))
    return pieces


def assemble(prompt: Prompt, contents: Sequence[Sequence[int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """The "original" token sequence whose spans are ``contents`` at the first blanks, and those spans."""
    tokens: list[int] = []
    spans = []
    previous = 0
    for blank, content in zip(prompt.blanks, contents):
        tokens.extend(prompt.ids[previous:blank])
        spans.append((len(tokens), len(content)))
        tokens.extend(content)
        previous = blank + 1
    tokens.extend(prompt.ids[previous:])
    return tokens, spans


def recompute_layout(
    prompt: Prompt,
    answers: Sequence[Sequence[int]],
    generated: Sequence[int],
    command: CommandTokens,
    block_positions: bool,
) -> GLMLayout:
    """The pretraining layout of the prompt with ``answers`` and ``generated + [x]`` as its spans in order.

    The last input x (an ``[eop]``) is a placeholder: the output at the token before it predicts the next
    token, and causal attention keeps x out of that.
    """
    # The builder takes spans of at least one token: an empty answer ([eop] came first) is laid out with
    # one stand-in token, removed again below, so its Part B is the bare [sop].
    contents = [list(a) or [command.eop] for a in answers] + [[*generated, command.eop]]
    tokens, spans = assemble(prompt, contents)
    layout = build_glm_layout(
        np.asarray(tokens),
        spans,
        Objective.TOKEN,
        command,
        span_order=list(range(len(spans))),
        block_positions=block_positions,
    )
    # Part A is the prompt itself: keep its own blank tokens ([sMASK], [gMASK]) where the builder wrote [MASK].
    layout.tokens[: layout.sep] = prompt.ids
    piece_starts = layout.sep + np.cumsum([0] + [len(c) + 1 for c in contents[:-1]])
    stand_ins = [int(start) + 1 for start, answer in zip(piece_starts, answers) if not answer]
    if stand_ins:
        keep = np.ones(len(layout), dtype=bool)
        keep[stand_ins] = False
        layout = GLMLayout(
            layout.tokens[keep],
            layout.targets[keep],
            layout.loss_mask[keep],
            layout.position_ids[:, keep],
            layout.sep,
        )
    return layout


def filled_text(prompt: Prompt, answers: Sequence[Sequence[int]], tokenizer: GLMTokenizer) -> str:
    """The prompt's text with every blank replaced by its answer."""
    command = tokenizer.command
    pieces = []
    previous = 1
    for blank, answer in zip(prompt.blanks, answers):
        pieces.append(tokenizer.decode(prompt.ids[previous:blank], skip_command_tokens=False))
        pieces.append(tokenizer.decode(answer, skip_command_tokens=True))
        previous = blank + 1
    tail = [t for t in prompt.ids[previous:] if t not in (command.eos, command.gmask)]
    pieces.append(tokenizer.decode(tail))
    return " ".join(p.strip() for p in pieces if p.strip())
