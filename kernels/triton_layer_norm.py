"""LayerNorm on Triton, optionally fused with the residual add that precedes it in a pre-LN transformer block.

Forward: one program per row keeps the whole row in registers (rows up to ``MAX_WIDTH``), so the input is read
once; mean and 1/std are computed in fp32 (two passes over the registers, not E[x^2] - E[x]^2) and saved.
Backward: each program owns a contiguous run of rows, writes dx row by row and accumulates its share of dweight
and dbias in fp32 registers; the per-program partial sums are added in a fixed order afterwards, so gradients
are deterministic (no atomics) and x and dy are each read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.errors import KernelError
from kernels.triton_support import (
    Launcher,
    cdiv,
    device_guard,
    emulate_bf16,
    multiprocessor_count,
    next_power_of_2,
    to_dtype,
)

MAX_WIDTH = 16384
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def layer_norm_forward_kernel(
    X, Residual, Summed, Y, W, B, Mean, Rstd,
    stride_x, stride_r, stride_s, stride_y, width, eps,
    HAS_RESIDUAL: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < width
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the stored dtype before normalising it, exactly as LN(x + residual) does in torch.
        summed = to_dtype(x + residual, Summed.dtype.element_ty, EMULATE_BF16)
        tl.store(Summed + row * stride_s + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    mean = tl.sum(x, axis=0) / width
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / width + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        Y + row * stride_y + cols,
        to_dtype(centered * rstd * w + b, Y.dtype.element_ty, EMULATE_BF16),
        mask=mask,
    )


@triton.jit
def layer_norm_backward_kernel(
    X, W, DY, DSummed, DX, Mean, Rstd, PartialDW, PartialDB,
    stride_x, stride_dy, stride_ds, stride_dx, rows, width, rows_per_program,
    HAS_DSUMMED: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < width
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    # int64 bounds make the row index (and row * stride) 64-bit inside the loop.
    first_row = program.to(tl.int64) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, rows)
    for row in range(first_row, last_row):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
        w_dy = w * dy
        # d/dx of (x - mean) * rstd applied to g = w * dy: rstd * (g - mean(g) - x_hat * mean(g * x_hat)).
        c_hat = tl.sum(x_hat * w_dy, axis=0) / width
        c_dy = tl.sum(w_dy, axis=0) / width
        dx = (w_dy - (x_hat * c_hat + c_dy)) * rstd
        if HAS_DSUMMED:
            dx += tl.load(DSummed + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, to_dtype(dx, DX.dtype.element_ty, EMULATE_BF16), mask=mask)
        dw += dy * x_hat
        db += dy
    tl.store(PartialDW + program * width + cols, dw, mask=mask)
    tl.store(PartialDB + program * width + cols, db, mask=mask)


# The tensor parameters come first: 8 in the forward (X ... Rstd), 9 in the backward (X ... PartialDB).
_forward = Launcher(layer_norm_forward_kernel, tensor_args=8)
_backward = Launcher(layer_norm_backward_kernel, tensor_args=9)


def _num_warps(block_n: int, backward: bool) -> int:
    # About 8-16 fp32 values of each row vector per thread: enough work per thread, few spills. The backward
    # of 16K-wide rows holds five row vectors (x, dy, w and the dweight/dbias sums), more than 16 warps'
    # registers: ptxas spills least with 32 warps there.
    if block_n > 8192:
        return 32 if backward else 16
    return min(max(block_n // 256, 1), 8)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual):
        shape = x.shape
        width = shape[-1]
        x2 = _rows(x, width)
        rows = x2.shape[0]
        y = torch.empty((rows, width), device=x.device, dtype=x.dtype)
        mean = torch.empty(rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        has_residual = residual is not None
        residual2 = _rows(residual, width) if has_residual else x2
        summed = torch.empty((rows, width), device=x.device, dtype=x.dtype) if has_residual else x2
        block_n = next_power_of_2(width)
        if rows > 0:
            with device_guard(x.device):
                _forward(
                    (rows,), x2, residual2, summed, y, weight, bias, mean, rstd,
                    x2.stride(0), residual2.stride(0), summed.stride(0), y.stride(0), width, eps,
                    HAS_RESIDUAL=has_residual, EMULATE_BF16=emulate_bf16(x.dtype), BLOCK_N=block_n, num_warps=_num_warps(block_n, backward=False),
                )  # fmt: skip
        ctx.save_for_backward(summed, weight, mean, rstd)
        ctx.has_residual = has_residual
        ctx.bias_dtype = bias.dtype
        ctx.set_materialize_grads(False)
        if has_residual:
            return y.view(shape), summed.view(shape)
        return y.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_summed=None):
        summed, weight, mean, rstd = ctx.saved_tensors
        width = summed.shape[-1]
        rows = summed.shape[0]
        shape = grad_y.shape if grad_y is not None else grad_summed.shape
        dy = _rows(grad_y, width) if grad_y is not None else torch.zeros_like(summed)
        has_dsummed = grad_summed is not None
        dsummed = _rows(grad_summed, width) if has_dsummed else dy
        dx = torch.empty((rows, width), device=summed.device, dtype=summed.dtype)
        # About two programs per SM; every program owns at least one row and writes its whole partial row.
        rows_per_program = max(1, cdiv(rows, 2 * multiprocessor_count(summed.device)))
        programs = cdiv(rows, rows_per_program)
        # dweight's and dbias's partial sums in one buffer, so that one reduction (and one cast) finishes both.
        partials = torch.empty((2, programs, width), device=summed.device, dtype=torch.float32)
        partial_dw, partial_db = partials[0], partials[1]
        block_n = next_power_of_2(width)
        if rows > 0:
            with device_guard(summed.device):
                _backward(
                    (programs,), summed, weight, dy, dsummed, dx, mean, rstd, partial_dw, partial_db,
                    summed.stride(0), dy.stride(0), dsummed.stride(0), dx.stride(0), rows, width, rows_per_program,
                    HAS_DSUMMED=has_dsummed, EMULATE_BF16=emulate_bf16(summed.dtype), BLOCK_N=block_n, num_warps=_num_warps(block_n, backward=True),
                )  # fmt: skip
        sums = partials.sum(1)
        if weight.dtype == ctx.bias_dtype:
            dweight, dbias = sums.to(weight.dtype).unbind(0)
        else:
            dweight, dbias = sums[0].to(weight.dtype), sums[1].to(ctx.bias_dtype)
        dx = dx.view(shape)
        # x and residual enter only through their sum, so they share one gradient, as with torch's add.
        return dx, dweight, dbias, None, dx if ctx.has_residual else None


def _check_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None
) -> None:
    where = "kernels.layer_norm(backend='triton')"
    width = x.shape[-1] if x.dim() else 0
    if x.dtype not in _SUPPORTED_DTYPES:
        raise KernelError(f"{where}: x must be fp16, bf16 or fp32; got {x.dtype}")
    if not 0 < width <= MAX_WIDTH:
        raise KernelError(
            f"{where}: rows must be 1..{MAX_WIDTH} wide; got {width}; use backend='torch' for wider rows"
        )
    if weight.shape != (width,) or bias.shape != (width,):
        raise KernelError(
            f"{where}: weight and bias must be [{width}]; got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise KernelError(
            f"{where}: residual must match x ({x.dtype} {tuple(x.shape)}); got {residual.dtype} {tuple(residual.shape)}"
        )


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton counterpart of ``kernels.reference.layer_norm_torch`` (same arguments, same result)."""
    _check_inputs(x, weight, bias, residual)
    return LayerNormFunction.apply(x, weight.contiguous(), bias.contiguous(), float(eps), residual)
