"""The pretraining loss, in one place: the rows that carry a loss, the token mean for training, and the
per-objective sums for evaluation.

Only rows with ``loss_mask > 0`` (Part B) get logits: Part A carries no loss, so this skips most of the
output-head matmul. ``loss_row_index`` gives those rows as int64 indices, computed by the data loader on the
host (``batch["loss_index"]``), so that a GPU selects them with ``index_select`` instead of a boolean mask
that makes the host wait. Training: ``sum(CE * w) / sum(w)``, the token mean over the micro-batch
(THUDM/GLM). Evaluation: ``[CE sum, token count]`` per objective (token, sentence, document), to be summed
over batches and ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from data_tools.objectives import Objective
from megatron_glm.data.loader import loss_row_index
from megatron_glm.parallel import vocab_parallel_cross_entropy

if TYPE_CHECKING:
    from megatron_glm.model.glm import GLMModel

OBJECTIVE_NAMES = tuple(o.name.lower() for o in Objective)


def loss_rows(hidden: torch.Tensor, loss_index: torch.Tensor) -> torch.Tensor:
    """The ``[N, h]`` rows of ``hidden`` at ``loss_index`` (see ``loss_row_index``)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, loss_index)


def masked_token_mean(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_index: torch.Tensor,
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``sum(CE * loss_mask) / sum(loss_mask)`` (fp32) from the logits of the ``loss_rows`` only.

    ``targets`` and ``loss_mask`` are the full ``[B, T]`` tensors; a micro-batch without any loss
    position gives 0 (and zero gradients) rather than 0/0. ``label_smoothing`` (finetuning only) and
    ``backend`` (``model.kernels``) as in ``vocab_parallel_cross_entropy``.
    """
    weights = loss_mask.reshape(-1).float()
    losses = vocab_parallel_cross_entropy(
        logits, targets.reshape(-1).index_select(0, loss_index), label_smoothing, backend
    )
    return (losses * weights.index_select(0, loss_index)).sum() / weights.sum().clamp(min=1.0)


def glm_loss(
    model: GLMModel,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pretraining loss, the token mean over the micro-batch (THUDM/GLM).

    Logits are computed only at positions with ``loss_mask > 0`` (Part B): Part A carries no loss, so
    this skips most of the output-head matmul; the zero-weighted positions contribute nothing anyway.
    ``loss_index`` (the batch's, from the loader) is derived from ``loss_mask`` when not given.
    """
    if loss_index is None:
        loss_index = loss_row_index(loss_mask)
    logits = model.logits(loss_rows(hidden, loss_index))
    return masked_token_mean(logits, targets, loss_mask, loss_index, backend=model.config.kernels)


class GLMLoss:
    """The loss function the DeepSpeed engines call with ``(logits, labels)``, ``labels`` being
    ``(targets, loss_mask, objective, loss_index)``: the token mean in training, and the per-objective sums
    inside ``per_objective_sums()`` (DeepSpeed's pipeline engine takes a single loss function, so evaluation
    switches this one's mode for its duration). ``label_smoothing`` applies to the training loss only
    (seq2seq finetuning sets it on the engine's loss; pretraining leaves it 0, as THUDM/GLM does)."""

    def __init__(self, label_smoothing: float = 0.0, kernels: str = "auto") -> None:
        self._per_objective = False
        self.label_smoothing = label_smoothing
        self.kernels = kernels  # the cross entropy's backend (model.kernels)

    @contextlib.contextmanager
    def per_objective_sums(self) -> Iterator[None]:
        """Within the block, a call returns ``[CE sum per objective, token count per objective]``."""
        self._per_objective = True
        try:
            yield
        finally:
            self._per_objective = False

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        targets, loss_mask, objective, loss_index = labels
        if not self._per_objective:
            return masked_token_mean(
                logits, targets, loss_mask, loss_index, self.label_smoothing, self.kernels
            )
        weights = loss_mask.reshape(-1).float().index_select(0, loss_index)
        wanted = targets.reshape(-1).index_select(0, loss_index)
        losses = vocab_parallel_cross_entropy(logits, wanted, backend=self.kernels) * weights
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
