"""The model learns blank infilling from context through GLM's layout and 2D positions.

A copy task: each text is ``[CLS] a [SEP] a [eos]`` for a random string ``a``, with one or two spans of the
second copy blanked and predicted in shuffled order. Each answer is only in Part A, at a fixed offset
from its blank, so the model must read Part A bidirectionally from Part B and locate each span by its
position id (the blank's position) and block position (the offset inside the span). A wrong position,
block position, mask or target alignment anywhere in layout, model or loss leaves the copies at chance.
"""

import math
import random

import numpy as np
import pytest
import torch

from data_tools.layout import build_glm_layout
from data_tools.objectives import Objective
from data_tools.tokenizer import CommandTokens
from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel, glm_loss
from megatron_glm.parallel import destroy_parallel, initialize_parallel

COMMAND = CommandTokens(pad=0, eos=0, cls=1, mask=2, sep=3, unk=4, sop=5, eop=6, gmask=7, smask=8, dblock=9)
SYMBOLS = range(10, 42)
COPY_LENGTH = 8
SEQUENCE = 2 * COPY_LENGTH + 3 + 2 * 2  # the text plus [sop]/[eop] per span, two spans at most
# Tiny models escape the copy task's plateau far sooner from a larger init than the reference's 0.02.
CONFIG = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=32,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.1,
)

pytestmark = pytest.mark.slow  # an end-to-end run; `make test-fast` leaves it out


def copy_batch(rng: random.Random, size: int) -> tuple[torch.Tensor, ...]:
    layouts = []
    second = COPY_LENGTH + 2  # where the second copy starts
    for _ in range(size):
        string = [rng.choice(SYMBOLS) for _ in range(COPY_LENGTH)]
        text = [COMMAND.cls, *string, COMMAND.sep, *string, COMMAND.eos]
        if rng.random() < 0.5:
            length = rng.randint(1, 3)
            spans = [(rng.randint(second, second + COPY_LENGTH - length), length)]
        else:  # two spans, one in each half of the second copy
            half = COPY_LENGTH // 2
            spans = [
                (rng.randint(second, second + half - 2), 2),
                (rng.randint(second + half, second + half + 2), 1),
            ]
        layouts.append(
            build_glm_layout(np.asarray(text), spans, Objective.TOKEN, COMMAND, rng=rng, pad_to=SEQUENCE)
        )

    def stack(field: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(layout, field) for layout in layouts]))

    sep = torch.tensor([layout.sep for layout in layouts])
    return stack("tokens"), stack("position_ids"), sep, stack("targets"), stack("loss_mask")


def answer_accuracy(model: GLMModel, batch: tuple[torch.Tensor, ...]) -> float:
    """Teacher-forced accuracy on the span tokens (the copies; ``[eop]`` targets excluded)."""
    tokens, position_ids, sep, targets, loss_mask = batch
    with torch.no_grad():
        predicted = model.logits(model(tokens, position_ids, sep)).argmax(-1)
    answers = (loss_mask > 0) & (targets != COMMAND.eop)
    return (predicted[answers] == targets[answers]).float().mean().item()


def test_blanks_are_copied_from_part_a_after_training():
    initialize_parallel(1, 1)
    try:
        torch.manual_seed(0)
        model = GLMModel(CONFIG, 64, seed=3)
        held_out = copy_batch(random.Random(99), 256)
        assert answer_accuracy(model, held_out) < 0.2  # chance is 1/32

        steps = 500
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + math.cos(math.pi * i / steps))
        )
        rng = random.Random(0)
        for _ in range(steps):
            tokens, position_ids, sep, targets, loss_mask = copy_batch(rng, 32)
            loss = glm_loss(model, model(tokens, position_ids, sep), targets, loss_mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        assert answer_accuracy(model, held_out) > 0.95
    finally:
        destroy_parallel()
