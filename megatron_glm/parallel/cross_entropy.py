"""Cross entropy over logits whose vocabulary is split over the tensor-parallel ranks.

The full ``[N, V]`` logits never exist on one rank: each rank holds ``[N, V / tp]`` (its contiguous
vocab range) and three small all-reduces over ``[N]`` vectors give the loss:

    m      = max over ranks of the local row maxima        (for a stable exp)
    S      = sum over ranks of sum_j exp(logit_j - m)
    z_t    = the target's logit, found on the one rank that holds it (zeros elsewhere, summed)
    loss   = log S - (z_t - m)

The gradient is ``softmax - one_hot(target)`` restricted to the local range. All math is fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_glm.parallel import state
from megatron_glm.parallel.layers import vocab_range


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    if state.get_tensor_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=state.get_tensor_parallel_group())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.logits_dtype = logits.dtype
        logits = logits.float()
        row_max = logits.max(dim=-1).values
        _all_reduce(row_max, dist.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)

        start, end = vocab_range(
            logits.shape[-1] * state.get_tensor_parallel_world_size(),
            state.get_tensor_parallel_rank(),
            state.get_tensor_parallel_world_size(),
        )
        outside = (targets < start) | (targets >= end)
        local_targets = (targets - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _all_reduce(target_logit)

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_targets, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        softmax, local_targets, outside = ctx.saved_tensors
        grad = softmax.clone()
        inside = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), -inside.unsqueeze(-1))
        return grad.mul_(grad_loss.unsqueeze(-1)).to(ctx.logits_dtype), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross entropy ``[...]`` (fp32) of vocab-parallel ``logits [..., V / tp]``.

    ``targets`` hold global token ids in ``[0, V)``. The gradient flows back in the logits' dtype.
    """
    return _VocabParallelCrossEntropy.apply(logits, targets)
