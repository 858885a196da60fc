"""GLM's Part A / Part B input layout: the one builder used by training, evaluation and generation.

Given tokens ``x`` (starting with ``[CLS]``) and blanked spans:

* Part A is ``x`` with every span replaced by one mask token, in original order. Its positions are
  ``0 .. sep-1``; block positions are 0.
* Part B is, per span in the chosen order, ``[sop] + span``; every token of span i (its ``[sop]`` too)
  has the Part-A position of span i's mask token and block positions ``1 .. len + 1``.
* Targets are already aligned with the inputs: Part A targets copy the Part A tokens (loss 0); span i's
  targets are ``span + [eop]`` (loss 1). ``sep`` is the length of Part A; ``T = len(x) + 2 x spans``.
* The document suffix (prefix-LM) layout instead blanks the last L tokens with one ``[gMASK]``: inputs
  ``source + [gMASK] + [sop] + target[:-1]``, targets ``source + [gMASK] + target`` (no ``[eop]``), loss on
  the target except on ``[CLS]`` tokens of packed documents, all Part-B positions equal to the ``[gMASK]``
  position, block positions ``0`` on ``[gMASK]`` then ``1 .. L``; ``T = len(x) + 1``.

The mask token is ``[MASK]`` for the token objective; ``[sMASK]`` (sentence) and ``[gMASK]`` (document)
when ``task_mask`` is set, ``[MASK]`` otherwise. Padding (``pad_to``) appends zeros to every row: token 0,
loss 0, positions 0, which sit after Part B and so never reach a real token through attention.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np

from data_tools.objectives import Objective
from data_tools.tokenizer import CommandTokens


@dataclasses.dataclass
class GLMLayout:
    """One laid-out sequence: ``tokens``, ``targets`` int64 [T]; ``loss_mask`` float32 [T];
    ``position_ids`` int64 [2, T] (positions, block positions); ``sep`` = length of Part A."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    sep: int

    def __len__(self) -> int:
        return self.tokens.shape[0]


def mask_token(objective: Objective, command: CommandTokens, task_mask: bool) -> int:
    if task_mask and objective == Objective.SENTENCE:
        return command.smask
    if task_mask and objective == Objective.DOCUMENT:
        return command.gmask
    return command.mask


def _checked_spans(spans: np.ndarray | Sequence[tuple[int, int]], length: int) -> np.ndarray:
    array = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    array = array[np.argsort(array[:, 0], kind="stable")]
    starts, lengths = array[:, 0], array[:, 1]
    if np.any(lengths < 1) or np.any(starts < 0) or np.any(starts + lengths > length):
        raise ValueError(f"spans {array.tolist()} must have positive lengths and lie inside {length} tokens")
    if np.any(starts[1:] < starts[:-1] + lengths[:-1]):
        raise ValueError(f"spans {array.tolist()} overlap")
    return array


def _suffix_layout(
    tokens: np.ndarray, spans: np.ndarray, command: CommandTokens, mask_id: int, block_positions: bool
) -> GLMLayout:
    if len(spans) != 1 or spans[0, 0] + spans[0, 1] != len(tokens):
        raise ValueError(
            f"the suffix layout needs exactly one span ending at the last token, got {spans.tolist()}"
        )
    division = int(spans[0, 0])
    source, target = tokens[:division], tokens[division:]
    generated = len(target)
    inputs = np.concatenate((source, [mask_id, command.sop], target[:-1]))
    targets = np.concatenate((source, [mask_id], target))
    loss_mask = np.concatenate(
        (np.zeros(division + 1, np.float32), (target != command.cls).astype(np.float32))
    )
    positions = np.arange(len(inputs), dtype=np.int64)
    positions[division + 1 :] = division
    if block_positions:
        block = np.concatenate((np.zeros(division, np.int64), np.arange(generated + 1, dtype=np.int64)))
    else:
        block = np.concatenate((np.zeros(division + 1, np.int64), np.ones(generated, np.int64)))
    return GLMLayout(
        inputs.astype(np.int64),
        targets.astype(np.int64),
        loss_mask,
        np.stack((positions, block)),
        division + 1,
    )


def _infill_layout(
    tokens: np.ndarray,
    spans: np.ndarray,
    objective: Objective,
    command: CommandTokens,
    mask_id: int,
    order: np.ndarray,
    block_positions: bool,
    rng: random.Random | None,
    block_mask_prob: float,
) -> GLMLayout:
    length = len(tokens)
    starts, lengths = spans[:, 0], spans[:, 1]
    # Part A: drop every span token but the first, which becomes the mask token.
    inside = np.zeros(length + 1, np.int64)
    np.add.at(inside, starts + 1, 1)
    np.add.at(inside, starts + lengths, -1)
    keep = np.cumsum(inside[:length]) == 0
    part_a = tokens.copy()
    part_a[starts] = mask_id
    part_a = part_a[keep]
    sep = len(part_a)
    # Position of span i's mask token: its start minus the tokens removed by earlier spans.
    mask_positions = starts - (np.cumsum(lengths - 1) - (lengths - 1))

    piece = lengths[order] + 1
    piece_first = np.cumsum(piece) - piece
    within = np.arange(int(piece.sum()), dtype=np.int64) - np.repeat(piece_first, piece)
    source_index = np.repeat(starts[order], piece) + within
    is_sop = within == 0
    part_b = np.where(is_sop, command.sop, tokens[np.maximum(source_index - 1, 0)])
    is_eop = within == np.repeat(lengths[order], piece)
    part_b_targets = np.where(is_eop, command.eop, tokens[np.minimum(source_index, length - 1)])
    if block_mask_prob > 0 and objective == Objective.TOKEN and rng is not None:
        # Span tokens (not [sop]) of the Part-B input are replaced by [dBLOCK]; their targets stay.
        replaced = np.array(
            [not first and rng.random() < block_mask_prob for first in is_sop.tolist()], dtype=bool
        )
        part_b = np.where(replaced, command.dblock, part_b)
    block = within + 1 if block_positions else np.ones_like(within)
    return GLMLayout(
        tokens=np.concatenate((part_a, part_b)).astype(np.int64),
        targets=np.concatenate((part_a, part_b_targets)).astype(np.int64),
        loss_mask=np.concatenate((np.zeros(sep, np.float32), np.ones(len(part_b), np.float32))),
        position_ids=np.stack(
            (
                np.concatenate((np.arange(sep, dtype=np.int64), np.repeat(mask_positions[order], piece))),
                np.concatenate((np.zeros(sep, np.int64), block)),
            )
        ),
        sep=sep,
    )


def pad_layout(layout: GLMLayout, length: int) -> GLMLayout:
    """Right-pad every row with zeros to ``length``."""
    extra = length - len(layout)
    if extra < 0:
        raise ValueError(f"a layout of {len(layout)} tokens does not fit in {length}")
    if extra == 0:
        return layout
    return GLMLayout(
        tokens=np.pad(layout.tokens, (0, extra)),
        targets=np.pad(layout.targets, (0, extra)),
        loss_mask=np.pad(layout.loss_mask, (0, extra)),
        position_ids=np.pad(layout.position_ids, ((0, 0), (0, extra))),
        sep=layout.sep,
    )


def build_glm_layout(
    tokens: np.ndarray | Sequence[int],
    spans: np.ndarray | Sequence[tuple[int, int]],
    objective: Objective,
    command: CommandTokens,
    *,
    suffix: bool = False,
    task_mask: bool = False,
    span_order: Sequence[int] | None = None,
    rng: random.Random | None = None,
    shuffle_spans: bool = True,
    block_positions: bool = True,
    block_mask_prob: float = 0.0,
    pad_to: int | None = None,
) -> GLMLayout:
    """Lay out ``tokens`` with ``spans`` ((start, length) pairs) blanked, as the GLM pretraining batch.

    Part-B order: ``span_order`` (indices into the spans sorted by start) when given; else a shuffle drawn
    from ``rng`` when ``rng`` is given and ``shuffle_spans``; else left to right. ``rng`` also draws the
    ``[dBLOCK]`` replacements (token objective, ``block_mask_prob``), after the shuffle.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    checked = _checked_spans(spans, len(tokens))
    mask_id = mask_token(objective, command, task_mask)
    if suffix:
        layout = _suffix_layout(tokens, checked, command, mask_id, block_positions)
    else:
        if span_order is not None:
            order = np.asarray(span_order, dtype=np.int64)
            if sorted(order.tolist()) != list(range(len(checked))):
                raise ValueError(f"span_order {order.tolist()} is not a permutation of {len(checked)} spans")
        else:
            order_list = list(range(len(checked)))
            if rng is not None and shuffle_spans:
                rng.shuffle(order_list)
            order = np.asarray(order_list, dtype=np.int64)
        layout = _infill_layout(
            tokens, checked, objective, command, mask_id, order, block_positions, rng, block_mask_prob
        )
    return layout if pad_to is None else pad_layout(layout, pad_to)
