"""Cross entropy over a whole vocabulary on Triton: one read of the logits forward, one read and one write back.

The torch implementation (``megatron_glm.parallel.cross_entropy``, which also serves vocabularies split over
tensor ranks) widens the ``[N, V]`` logits to fp32 and passes over them about ten times, keeping the fp32
softmax for the backward: at GLM-Large's loss rows (18% of 16 x 512 positions, V 30592) some 2.8 GB of traffic
per step. Here one program per row streams the row in blocks, keeping a running maximum and sum of
exponentials in fp32, and saves only those two numbers per row; the backward streams the row again and
writes ``(softmax - target) * dloss`` in the logits' dtype. Label smoothing eps (as ``F.cross_entropy``): loss
``(1 - eps) (lse - z_t) + eps (lse - mean_v z_v)``, gradient ``softmax - (1 - eps) one_hot - eps / V``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.errors import KernelError
from kernels.triton_support import INTERPRET, Launcher, device_guard, emulate_bf16, to_dtype

# Vocabulary columns per step of a row's loop, and warps: 4096 bf16 logits per step on 8 warps keep 16 fp32
# values per thread in flight. The interpreter takes small blocks.
BLOCK_V = 256 if INTERPRET else 4096
NUM_WARPS = 8


@triton.jit
def cross_entropy_forward_kernel(
    Logits, Targets, Loss, RowMax, LogSum, stride_row, vocab, smoothing,
    HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    running_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    # Label smoothing sums the logits relative to the row's first: the sum keeps the precision of their spread,
    # not of their magnitude.
    reference = tl.load(base).to(tl.float32)
    # Per lane: each of the BLOCK_V lanes keeps its own maximum and sum over its columns, combined at the end.
    for start in range(0, vocab, BLOCK_V):
        mask = start + cols < vocab
        x = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        # Lanes that have seen only -inf so far keep a sum of 0 (exp(-inf - -inf) would be NaN).
        scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        running_sum = running_sum * scale + tl.where(mask, tl.exp(x - new_max), 0.0)
        running_max = new_max
        if HAS_SMOOTHING:
            total += tl.where(mask, x - reference, 0.0)
    row_max = tl.max(running_max, axis=0)
    lanes = tl.where(running_max == float("-inf"), 0.0, running_sum * tl.exp(running_max - row_max))
    log_sum = tl.log(tl.sum(lanes, axis=0))
    # lse - z as (max - z) + log(sum): the log-sum-exp itself is never formed, whose absolute precision is
    # that of the largest logit's magnitude.
    target = tl.load(Targets + row)
    loss = (row_max - tl.load(base + target).to(tl.float32)) + log_sum
    if HAS_SMOOTHING:
        mean_below_max = (row_max - reference) - tl.sum(total, axis=0) / vocab
        loss = (1.0 - smoothing) * loss + smoothing * (mean_below_max + log_sum)
    tl.store(Loss + row, loss)
    tl.store(RowMax + row, row_max)
    tl.store(LogSum + row, log_sum)


@triton.jit
def cross_entropy_backward_kernel(
    Logits, Targets, RowMax, LogSum, DLoss, DLogits, stride_row, stride_grad_row, vocab, smoothing,
    HAS_SMOOTHING: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    grad_base = DLogits + row * stride_grad_row
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(Targets + row)
    row_max = tl.load(RowMax + row)
    log_sum = tl.load(LogSum + row)
    dloss = tl.load(DLoss + row)
    for start in range(0, vocab, BLOCK_V):
        index = start + cols
        mask = index < vocab
        x = tl.load(base + index, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp((x - row_max) - log_sum) - tl.where(index == target, 1.0 - smoothing, 0.0)
        if HAS_SMOOTHING:
            grad -= smoothing / vocab
        tl.store(grad_base + index, to_dtype(grad * dloss, DLogits.dtype.element_ty, EMULATE_BF16), mask=mask)


_forward = Launcher(cross_entropy_forward_kernel, tensor_args=5)
_backward = Launcher(cross_entropy_backward_kernel, tensor_args=6)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, label_smoothing):
        rows, vocab = logits.shape
        loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
        stats = torch.empty((2, rows), device=logits.device, dtype=torch.float32)  # row max, log of the sum
        if rows > 0:
            with device_guard(logits.device):
                _forward(
                    (rows,), logits, targets, loss, stats[0], stats[1], logits.stride(0), vocab, label_smoothing,
                    HAS_SMOOTHING=label_smoothing > 0.0, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
                )  # fmt: skip
        ctx.save_for_backward(logits, targets, stats)
        ctx.label_smoothing = label_smoothing
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        logits, targets, stats = ctx.saved_tensors
        rows, vocab = logits.shape
        grad_loss = grad_loss.float().contiguous()
        grad = torch.empty((rows, vocab), device=logits.device, dtype=logits.dtype)
        if rows > 0:
            with device_guard(logits.device):
                _backward(
                    (rows,), logits, targets, stats[0], stats[1], grad_loss, grad, logits.stride(0), grad.stride(0),
                    vocab,
                    ctx.label_smoothing, HAS_SMOOTHING=ctx.label_smoothing > 0.0,
                    EMULATE_BF16=emulate_bf16(logits.dtype), BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
                )  # fmt: skip
        return grad, None, None


def cross_entropy_triton(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-row cross entropy (fp32) of ``logits [N, V]`` (any float dtype) against ``targets [N]`` in ``[0, V)``."""
    where = "kernels.cross_entropy(backend='triton')"
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise KernelError(
            f"{where}: logits must be [N, V] and targets [N]; got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if not logits.is_floating_point() or targets.is_floating_point():
        raise KernelError(
            f"{where}: float logits and integer targets; got {logits.dtype} and {targets.dtype}"
        )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return CrossEntropyFunction.apply(logits, targets.to(torch.int64), float(label_smoothing))
