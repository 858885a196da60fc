"""THUDM/GLM's ``AnnealingLR``: linear warmup, then cosine or linear decay to a fraction of the peak.

With ``r = (step - warmup) / (decay - warmup)`` and ``R = 1 / min_lr_ratio``:
cosine ``lr / R * ((cos(pi * min(r, 1)) + 1) * (R - 1) / 2 + 1)`` (ends at ``lr * min_lr_ratio`` and stays);
linear ``lr * (1 - (1 - min_lr_ratio) * r)`` (not clamped, as in the reference: it keeps decreasing past
``decay_steps``, floored at 0 here). Skipped steps do not advance it, as in the reference: DeepSpeed does not
step it after an fp16 overflow, and the training engine takes it back a step when the optimizer's verdict on a
non-finite step arrives (before the next update uses the learning rate).
"""

from __future__ import annotations

import math

import torch

from megatron_glm.config import LRScheduleConfig


def lr_at(step: int, peak_lr: float, schedule: LRScheduleConfig, train_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based). As in THUDM/GLM and Megatron, warmup rises
    linearly from 0 at step 0 to the peak at step ``warmup``."""
    decay_steps = schedule.decay_steps or train_steps
    warmup_steps = int(schedule.warmup_fraction * decay_steps)
    if warmup_steps > 0 and step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if schedule.style == "constant":
        return peak_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    ratio = schedule.min_lr_ratio
    if schedule.style == "linear":
        return max(0.0, peak_lr * (1.0 - (1.0 - ratio) * progress))
    if ratio <= 0.0:
        return peak_lr * (math.cos(math.pi * min(progress, 1.0)) + 1.0) / 2.0
    inverse = 1.0 / ratio
    return peak_lr / inverse * ((math.cos(math.pi * min(progress, 1.0)) + 1.0) * (inverse - 1.0) / 2.0 + 1.0)


class AnnealingLR:
    """Sets every param group's ``lr`` from ``lr_at``; its state is the step count (saved in checkpoints)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, peak_lr: float, schedule: LRScheduleConfig, train_steps: int
    ):
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.schedule = schedule
        self.train_steps = train_steps
        self.num_steps = 0
        self._apply()

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_lr(self) -> float:
        return lr_at(self.num_steps, self.peak_lr, self.schedule, self.train_steps)

    def get_last_lr(self) -> list[float]:
        return [self.get_lr()]

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "peak_lr": self.peak_lr}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()
