"""The Part A / Part B layout against the reference's worked examples (outputs of THUDM/GLM's make_block_data in blocklm_utils.py), token by token."""

import random

import numpy as np
import pytest

from data_tools.layout import build_glm_layout, pad_layout
from data_tools.objectives import Objective
from data_tools.tokenizer import CommandTokens

# Toy ids: command tokens below 20, word w_i = 100 + i (as the reference's toy tokenizer example).
C = CommandTokens(pad=0, eos=0, cls=1, mask=2, sep=3, unk=4, sop=5, eop=6, gmask=7, smask=8, dblock=9)
CLS, EOS, MASK, SOP, EOP, GMASK, SMASK, DBLOCK = (
    C.cls,
    C.eos,
    C.mask,
    C.sop,
    C.eop,
    C.gmask,
    C.smask,
    C.dblock,
)


def w(*indices: int) -> list[int]:
    return [100 + i for i in indices]


TEXT = [CLS] + w(*range(20)) + [EOS]  # [CLS] w0..w19 [eos]


def test_worked_example_token_mode():
    # Spans w5 w6 (positions 6-7) and w10 w11 w12 (11-13); Part B holds the later span first.
    layout = build_glm_layout(TEXT, [(6, 2), (11, 3)], Objective.TOKEN, C, task_mask=True, span_order=[1, 0])
    part_a = [CLS] + w(0, 1, 2, 3, 4) + [MASK] + w(7, 8, 9) + [MASK] + w(*range(13, 20)) + [EOS]
    assert layout.tokens.tolist() == part_a + [SOP] + w(10, 11, 12) + [SOP] + w(5, 6)
    assert layout.targets.tolist() == part_a + w(10, 11, 12) + [EOP] + w(5, 6) + [EOP]
    assert layout.position_ids[0].tolist() == list(range(19)) + [10] * 4 + [6] * 3
    assert layout.position_ids[1].tolist() == [0] * 19 + [1, 2, 3, 4, 1, 2, 3]
    assert layout.loss_mask.tolist() == [0.0] * 19 + [1.0] * 7
    assert layout.sep == 19
    assert len(layout) == len(TEXT) + 2 * 2
    assert layout.tokens.dtype == np.int64 and layout.loss_mask.dtype == np.float32


def test_worked_example_generation_suffix_layout():
    layout = build_glm_layout(TEXT, [(9, 13)], Objective.DOCUMENT, C, suffix=True, task_mask=True)
    assert layout.tokens.tolist() == [CLS] + w(*range(8)) + [GMASK, SOP] + w(*range(8, 20))
    assert layout.targets.tolist() == [CLS] + w(*range(8)) + [GMASK] + w(*range(8, 20)) + [EOS]
    assert layout.position_ids[0].tolist() == list(range(10)) + [9] * 13
    assert layout.position_ids[1].tolist() == [0] * 10 + list(range(1, 14))
    assert layout.loss_mask.tolist() == [0.0] * 10 + [1.0] * 13
    assert layout.sep == 10
    assert len(layout) == len(TEXT) + 1


def test_worked_example_sentence_mode():
    layout = build_glm_layout(TEXT, [(1, 7)], Objective.SENTENCE, C, task_mask=True)
    assert layout.tokens.tolist() == [CLS, SMASK] + w(*range(7, 20)) + [EOS, SOP] + w(*range(7))
    assert layout.position_ids[0].tolist() == list(range(16)) + [1] * 8
    assert layout.position_ids[1].tolist() == [0] * 16 + list(range(1, 9))
    assert layout.targets.tolist()[16:] == w(*range(7)) + [EOP]
    assert layout.sep == 16


def test_mask_token_follows_objective_and_task_mask():
    for objective, with_task_mask in (
        (Objective.TOKEN, MASK),
        (Objective.SENTENCE, SMASK),
        (Objective.DOCUMENT, GMASK),
    ):
        on = build_glm_layout(TEXT, [(3, 2)], objective, C, task_mask=True)
        off = build_glm_layout(TEXT, [(3, 2)], objective, C, task_mask=False)
        assert on.tokens[3] == with_task_mask
        assert off.tokens[3] == MASK


def test_suffix_layout_masks_the_loss_on_packed_document_starts():
    text = [CLS] + w(0, 1, 2) + [EOS, CLS] + w(3, 4) + [EOS]
    layout = build_glm_layout(text, [(2, 7)], Objective.DOCUMENT, C, suffix=True, task_mask=True)
    # Target part: w1 w2 [eos] [CLS] w3 w4 [eos]; the [CLS] carries no loss, the eos tokens do.
    assert layout.targets[3:].tolist() == w(1, 2) + [EOS, CLS] + w(3, 4) + [EOS]
    assert layout.loss_mask[3:].tolist() == [1, 1, 1, 0, 1, 1, 1]


def test_shuffled_order_comes_from_the_rng_and_is_reproducible():
    spans = [(1, 2), (5, 1), (8, 3), (13, 2)]
    first = build_glm_layout(TEXT, spans, Objective.TOKEN, C, rng=random.Random(3))
    again = build_glm_layout(TEXT, spans, Objective.TOKEN, C, rng=random.Random(3))
    ordered = build_glm_layout(TEXT, spans, Objective.TOKEN, C)
    unshuffled = build_glm_layout(TEXT, spans, Objective.TOKEN, C, rng=random.Random(3), shuffle_spans=False)
    assert np.array_equal(first.tokens, again.tokens)
    assert np.array_equal(ordered.tokens, unshuffled.tokens)
    orders = {
        tuple(build_glm_layout(TEXT, spans, Objective.TOKEN, C, rng=random.Random(s)).position_ids[0, 15:])
        for s in range(20)
    }
    assert len(orders) > 1
    # Whatever the order, Part B is the same multiset of (position, token) pairs.
    for layout in (first, ordered):
        pairs = sorted(
            zip(layout.position_ids[0, layout.sep :].tolist(), layout.targets[layout.sep :].tolist())
        )
        assert pairs == sorted(
            zip(ordered.position_ids[0, ordered.sep :].tolist(), ordered.targets[ordered.sep :].tolist())
        )


def test_without_block_positions_part_b_block_ids_are_one():
    layout = build_glm_layout(TEXT, [(6, 2), (11, 3)], Objective.TOKEN, C, block_positions=False)
    assert layout.position_ids[1].tolist() == [0] * 19 + [1] * 7
    suffix = build_glm_layout(TEXT, [(9, 13)], Objective.DOCUMENT, C, suffix=True, block_positions=False)
    assert suffix.position_ids[1].tolist() == [0] * 10 + [1] * 13


def test_block_mask_replaces_part_b_span_inputs_in_token_mode_only():
    spans = [(6, 2), (11, 3)]
    layout = build_glm_layout(
        TEXT, spans, Objective.TOKEN, C, span_order=[0, 1], rng=random.Random(0), block_mask_prob=1.0
    )
    assert layout.tokens[19:].tolist() == [SOP, DBLOCK, DBLOCK, SOP, DBLOCK, DBLOCK, DBLOCK]
    assert layout.targets[19:].tolist() == w(5, 6) + [EOP] + w(10, 11, 12) + [EOP]
    sentence = build_glm_layout(
        TEXT, spans, Objective.SENTENCE, C, span_order=[0, 1], rng=random.Random(0), block_mask_prob=1.0
    )
    assert DBLOCK not in sentence.tokens.tolist()


def test_padding_appends_zeros_after_part_b():
    layout = build_glm_layout(TEXT, [(6, 2)], Objective.TOKEN, C, pad_to=32)
    assert len(layout) == 32 and layout.sep == 21
    assert not layout.tokens[24:].any() and not layout.targets[24:].any()
    assert not layout.loss_mask[24:].any() and not layout.position_ids[:, 24:].any()
    with pytest.raises(ValueError, match="does not fit"):
        pad_layout(layout, 20)


def test_no_spans_is_part_a_only():
    layout = build_glm_layout(TEXT, np.zeros((0, 2), np.int64), Objective.TOKEN, C)
    assert layout.tokens.tolist() == TEXT and layout.sep == len(TEXT) and not layout.loss_mask.any()


@pytest.mark.parametrize("spans", [[(3, 3), (5, 2)], [(20, 3)], [(2, 0)]])
def test_invalid_spans_are_rejected(spans):
    with pytest.raises(ValueError):
        build_glm_layout(TEXT, spans, Objective.TOKEN, C)


def test_suffix_layout_needs_one_final_span():
    with pytest.raises(ValueError, match="suffix"):
        build_glm_layout(TEXT, [(3, 4)], Objective.DOCUMENT, C, suffix=True)
