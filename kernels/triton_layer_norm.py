"""LayerNorm on Triton, optionally fused with the residual add that precedes it in a pre-LN transformer block.

Forward: each program normalises a tile of whole rows held in registers (several rows when they are narrow, one
when they are wide; rows up to ``MAX_WIDTH``), so the input is read once; mean and 1/std are computed in fp32 per
row (two passes over the registers, not E[x^2] - E[x]^2) and saved.
Backward: each program owns a contiguous run of row tiles, writes dx tile by tile and accumulates its share of
dweight and dbias in fp32 registers; the per-program partial sums are added in a fixed order afterwards, so
gradients are deterministic (no atomics) and x and dy are each read once. Tile sizes and warp counts are fixed
per width (no autotuning), chosen to keep about 64 registers per thread on sm_90 so that several programs share
each SM."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.errors import KernelError
from kernels.triton_support import device_guard, emulate_bf16, multiprocessor_count, to_dtype

MAX_WIDTH = 16384
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def layer_norm_forward_kernel(
    X, Residual, Summed, Y, W, B, Mean, Rstd,
    stride_x, stride_r, stride_s, stride_y, rows, width, eps,
    HAS_RESIDUAL: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_mask = row_ids < rows
    col_mask = cols < width
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + row_ids[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual_ptrs = Residual + row_ids[:, None] * stride_r + cols[None, :]
        residual = tl.load(residual_ptrs, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the stored dtype before normalising it, exactly as LN(x + residual) does in torch.
        summed = to_dtype(x + residual, Summed.dtype.element_ty, EMULATE_BF16)
        tl.store(Summed + row_ids[:, None] * stride_s + cols[None, :], summed, mask=mask)
        x = summed.to(tl.float32)
    mean = tl.sum(x, axis=1) / width
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / width + eps)
    tl.store(Mean + row_ids, mean, mask=row_mask)
    tl.store(Rstd + row_ids, rstd, mask=row_mask)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(
        Y + row_ids[:, None] * stride_y + cols[None, :],
        to_dtype(y, Y.dtype.element_ty, EMULATE_BF16),
        mask=mask,
    )


@triton.jit
def layer_norm_backward_kernel(
    X, W, DY, DSummed, DX, Mean, Rstd, PartialDW, PartialDB,
    stride_x, stride_dy, stride_ds, stride_dx, rows, width, tiles_per_program,
    HAS_DSUMMED: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < width
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    # int64 bounds make the tile index (and row * stride) 64-bit inside the loop.
    first_tile = program.to(tl.int64) * tiles_per_program
    last_tile = tl.minimum(first_tile + tiles_per_program, tl.cdiv(rows, BLOCK_R))
    for tile in range(first_tile, last_tile):
        row_ids = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = row_ids < rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + row_ids[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row_ids[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row_ids, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + row_ids, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        # The weight and bias gradients take dy first, so that dy is dead once w * dy exists.
        dw += tl.sum(dy * x_hat, axis=0)
        db += tl.sum(dy, axis=0)
        w_dy = w[None, :] * dy
        # d/dx of (x - mean) * rstd applied to g = w * dy: rstd * (g - mean(g) - x_hat * mean(g * x_hat)).
        c_hat = tl.sum(x_hat * w_dy, axis=1) / width
        c_dy = tl.sum(w_dy, axis=1) / width
        dx = (w_dy - (x_hat * c_hat[:, None] + c_dy[:, None])) * rstd[:, None]
        if HAS_DSUMMED:
            dsummed_ptrs = DSummed + row_ids[:, None] * stride_ds + cols[None, :]
            dx += tl.load(dsummed_ptrs, mask=mask, other=0.0).to(tl.float32)
        dx_ptrs = DX + row_ids[:, None] * stride_dx + cols[None, :]
        tl.store(dx_ptrs, to_dtype(dx, DX.dtype.element_ty, EMULATE_BF16), mask=mask)
    tl.store(PartialDW + program * width + cols, dw, mask=col_mask)
    tl.store(PartialDB + program * width + cols, db, mask=col_mask)


def _forward_tile(block_n: int) -> tuple[int, int]:
    """(rows per program, num_warps) of the forward. Tiles of about 4K elements: a single 1024-wide row is too
    little work for a program, while rows of 4K and more are one per program. About 8 values of the tile per
    thread keep it at 64 registers or fewer on sm_90 (no spills), so several programs share each SM."""
    rows_per_tile = max(1, 4096 // block_n)
    return rows_per_tile, min(max(rows_per_tile * block_n // 256, 1), 32)


def _backward_tile(block_n: int) -> tuple[int, int]:
    """(rows per loop iteration, num_warps) of the backward. It holds more per element than the forward (x_hat,
    w * dy, and the dweight and dbias sums across the loop), so tiles of about 2K elements at about 8 values per
    thread: 64 registers on sm_90 up to 8K-wide rows. 16K-wide rows cannot go below that within 32 warps; ptxas
    spills some of them there."""
    rows_per_tile = max(1, 2048 // block_n)
    return rows_per_tile, min(max(rows_per_tile * block_n // 256, 1), 32)


def _backward_programs(tiles: int, num_warps: int, device: torch.device) -> int:
    """Programs of the backward: enough to fill the 64 warp slots of every SM (the tiles use about 64 registers
    per thread, so the register file allows that too), which hides the latency of the row reductions. Each
    program also writes one fp32 partial row of dweight and of dbias: at the sizes training uses (rows of 1K-16K
    and about 64M elements) that is at most about 10% more traffic, at 16K-wide rows."""
    return max(1, min(tiles, max(1, 64 // num_warps) * multiprocessor_count(device)))


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
        block_n = triton.next_power_of_2(width)
        rows_per_tile, num_warps = _forward_tile(block_n)
        if rows > 0:
            with device_guard(x.device):
                layer_norm_forward_kernel[(triton.cdiv(rows, rows_per_tile),)](
                    x2, residual2, summed, y, weight, bias, mean, rstd,
                    x2.stride(0), residual2.stride(0), summed.stride(0), y.stride(0), rows, width, eps,
                    HAS_RESIDUAL=has_residual, EMULATE_BF16=emulate_bf16(x.dtype), BLOCK_R=rows_per_tile, BLOCK_N=block_n, num_warps=num_warps,
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
        block_n = triton.next_power_of_2(width)
        rows_per_tile, num_warps = _backward_tile(block_n)
        # Every program owns a contiguous run of whole tiles, at least one, and writes its whole partial rows.
        tiles = triton.cdiv(rows, rows_per_tile)
        tiles_per_program = max(1, triton.cdiv(tiles, _backward_programs(tiles, num_warps, summed.device)))
        programs = triton.cdiv(tiles, tiles_per_program)
        partial_dw = torch.empty((programs, width), device=summed.device, dtype=torch.float32)
        partial_db = torch.empty((programs, width), device=summed.device, dtype=torch.float32)
        if rows > 0:
            with device_guard(summed.device):
                layer_norm_backward_kernel[(programs,)](
                    summed, weight, dy, dsummed, dx, mean, rstd, partial_dw, partial_db,
                    summed.stride(0), dy.stride(0), dsummed.stride(0), dx.stride(0), rows, width, tiles_per_program,
                    HAS_DSUMMED=has_dsummed, EMULATE_BF16=emulate_bf16(summed.dtype), BLOCK_R=rows_per_tile, BLOCK_N=block_n, num_warps=num_warps,
                )  # fmt: skip
        dweight = partial_dw.sum(0).to(weight.dtype)
        dbias = partial_db.sum(0).to(ctx.bias_dtype)
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
