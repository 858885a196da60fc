"""The pretraining loss from the logits of the loss-carrying rows, and its per-objective evaluation form.

Only rows with ``loss_mask > 0`` (Part B) get logits; ``labels = (targets, loss_mask, objective,
loss_index)``: the full ``[B, T]`` / ``[B]`` tensors, selected at the batch's ``loss_index`` (row-major).
Training: ``sum(CE * w) / sum(w)``, the token mean over the micro-batch (THUDM/GLM). Evaluation:
``[CE sum, token count]`` per objective (token, sentence, document), to be summed over batches and ranks.
"""

from __future__ import annotations

import torch

from data_tools.objectives import Objective
from megatron_glm.model import masked_token_mean
from megatron_glm.parallel import vocab_parallel_cross_entropy

OBJECTIVE_NAMES = tuple(o.name.lower() for o in Objective)


class GLMLoss:
    def __init__(self) -> None:
        self.per_objective = False

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        targets, loss_mask, objective, loss_index = labels
        if not self.per_objective:
            return masked_token_mean(logits, targets, loss_mask, loss_index)
        weights = loss_mask.reshape(-1).float().index_select(0, loss_index)
        losses = (
            vocab_parallel_cross_entropy(logits, targets.reshape(-1).index_select(0, loss_index)) * weights
        )
        row_objective = objective.view(-1, 1).expand_as(loss_mask).reshape(-1).index_select(0, loss_index)
        sums = torch.zeros(2 * len(Objective), dtype=torch.float32, device=logits.device)
        sums[: len(Objective)].index_add_(0, row_objective, losses.detach())
        sums[len(Objective) :].index_add_(0, row_objective, weights)
        return sums


def per_objective_means(sums: torch.Tensor) -> dict[str, float]:
    """``{"token": mean CE, ...}`` for the objectives that had tokens, plus ``"all"``."""
    count = len(Objective)
    means = {
        name: (sums[i] / sums[count + i]).item()
        for i, name in enumerate(OBJECTIVE_NAMES)
        if sums[count + i] > 0
    }
    means["all"] = (sums[:count].sum() / sums[count:].sum().clamp(min=1.0)).item()
    return means
