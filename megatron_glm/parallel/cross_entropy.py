"""Cross entropy over logits whose vocabulary is split over the tensor-parallel ranks.

The full ``[N, V]`` logits never exist on one rank: each rank holds ``[N, V / tp]`` (its contiguous
vocab range) and three small all-reduces over ``[N]`` vectors give the loss:

    m      = max over ranks of the local row maxima        (for a stable exp)
    S      = sum over ranks of sum_j exp(logit_j - m)
    z_t    = the target's logit, found on the one rank that holds it (zeros elsewhere, summed)
    loss   = log S - (z_t - m)

The gradient is ``softmax - one_hot(target)`` restricted to the local range. All math is fp32.

Label smoothing eps (THUDM/GLM's seq2seq ``--label-smoothing``, as ``torch.nn.functional.cross_entropy``):
``(1 - eps) CE + eps mean_v(-log softmax_v)``, the mean over the whole (padded) vocabulary V. With
``mean_v(-log softmax_v) = log S + m - mean_v(logit_v)`` it needs one more all-reduce, of the row sums; the
gradient becomes ``softmax - (1 - eps) one_hot(target) - eps / V``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import kernels
from megatron_glm.parallel import state
from megatron_glm.parallel.layers import vocab_range


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    if state.get_tensor_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=state.get_tensor_parallel_group())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        ctx.logits_dtype = logits.dtype
        ctx.label_smoothing = label_smoothing
        logits = logits.float()
        row_max = logits.max(dim=-1).values
        _all_reduce(row_max, dist.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)
        vocab = logits.shape[-1] * state.get_tensor_parallel_world_size()
        ctx.vocab = vocab
        mean_shifted = None
        if label_smoothing:
            mean_shifted = shifted.sum(dim=-1)
            _all_reduce(mean_shifted)
            mean_shifted /= vocab

        start, end = vocab_range(
            vocab,
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
        loss = sum_exp.log() - target_logit
        if mean_shifted is not None:
            loss = (1 - label_smoothing) * loss + label_smoothing * (sum_exp.log() - mean_shifted)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, local_targets, outside = ctx.saved_tensors
        grad = softmax.clone()
        eps = ctx.label_smoothing
        inside = (~outside).to(grad.dtype) * (1 - eps)
        grad.scatter_add_(-1, local_targets.unsqueeze(-1), -inside.unsqueeze(-1))
        if eps:
            grad.sub_(eps / ctx.vocab)
        return grad.mul_(grad_loss.unsqueeze(-1)).to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, backend: str = "auto"
) -> torch.Tensor:
    """Per-position cross entropy ``[...]`` (fp32) of vocab-parallel ``logits [..., V / tp]``.

    ``targets`` hold global token ids in ``[0, V)``; ``label_smoothing`` eps mixes in the mean over the
    vocabulary of ``-log softmax`` (see the module docstring). The gradient flows back in the logits' dtype.
    With the whole vocabulary on this rank (tensor-parallel size 1) and ``backend`` resolving to Triton
    (``kernels.resolve_backend``: CUDA tensors under ``"auto"``), the fused kernels of
    ``kernels.cross_entropy`` compute it, which read the logits once each way instead of passing over an fp32
    copy about ten times; otherwise the all-reduce form above, in torch.
    """
    if (
        state.get_tensor_parallel_world_size() == 1
        and kernels.resolve_backend(backend, logits.device) == "triton"
    ):
        shape = logits.shape[:-1]
        flat = kernels.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), label_smoothing, backend="triton"
        )
        return flat.view(shape)
    return _VocabParallelCrossEntropy.apply(logits, targets, label_smoothing)
