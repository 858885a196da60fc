"""LayerNorm on Triton, optionally fused with the residual add that precedes it in a pre-LN transformer block
and with a dropout before that add; and the dropout-add after the MLP. The autograd functions and their launches;
the kernels, and how they are tuned, are in ``triton_layer_norm_kernels``.
"""

from __future__ import annotations

import torch

from kernels.errors import KernelError
from kernels.triton_layer_norm_kernels import (
    DWDB_PROGRAMS_PER_SM,
    DWDB_TILE,
    dropout_add_kernel,
    dropout_backward_kernel,
    layer_norm_backward_dwdb_kernel,
    layer_norm_backward_dx_kernel,
    layer_norm_backward_kernel,
    layer_norm_forward_kernel,
    num_warps_for,
    programs_per_sm,
)
from kernels.triton_support import (
    AUTOTUNED,
    Launcher,
    cdiv,
    device_guard,
    dropout_arguments,
    dropout_seed,
    emulate_bf16,
    multiprocessor_count,
    next_power_of_2,
)

MAX_WIDTH = 16384
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Rows wider than this get the split backward: one row per program for dx, then dweight and dbias by column
# blocks. The fused backward keeps a row of x, dy and w and the program's two fp32 partial sums in registers,
# which at 16384 columns spills on any number of warps (ptxas, sm_90: 300 bytes per thread on 32 warps, 1.5 KB
# on 16); the split reads x and dy twice, with nothing spilled.
FUSED_BACKWARD_MAX_WIDTH = 8192

# The tensor parameters come first: 10 in the forward (X ... Seed), 12 in the backward (X ... Seed), 9 and 8
# in the split backward's kernels, 5 and 3 in the dropout-add's.
_forward = Launcher(layer_norm_forward_kernel, tensor_args=10)
_backward = Launcher(layer_norm_backward_kernel, tensor_args=12)
_backward_dx = Launcher(layer_norm_backward_dx_kernel, tensor_args=9)
_backward_dwdb = Launcher(layer_norm_backward_dwdb_kernel, tensor_args=8)
_dropout_add = Launcher(dropout_add_kernel, tensor_args=5)
_dropout_backward = Launcher(dropout_backward_kernel, tensor_args=3)
AUTOTUNED.update(
    {
        "layer_norm_forward": layer_norm_forward_kernel,
        "layer_norm_backward": layer_norm_backward_kernel,
        "layer_norm_backward_dx": layer_norm_backward_dx_kernel,
    }
)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_n(width: int, dropout: bool) -> int:
    # Dropout draws 8 columns per Philox call: at least two calls' worth of columns per row block.
    return max(next_power_of_2(width), 16) if dropout else next_power_of_2(width)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual, dropout_p, x_bias):
        shape = x.shape
        width = shape[-1]
        x2 = _rows(x, width)
        rows = x2.shape[0]
        y = torch.empty((rows, width), device=x.device, dtype=x.dtype)
        mean = torch.empty(rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        has_residual = residual is not None
        has_dropout = dropout_p > 0.0
        has_x_bias = x_bias is not None
        residual2 = _rows(residual, width) if has_residual else x2
        summed = torch.empty((rows, width), device=x.device, dtype=x.dtype) if has_residual else x2
        seed = dropout_seed(x.device) if has_dropout else mean  # without dropout the kernels never read it
        if rows > 0:
            with device_guard(x.device):
                _forward(
                    (rows,), x2, x_bias if has_x_bias else weight, residual2, summed, y, weight, bias, mean,
                    rstd, seed, x2.stride(0), residual2.stride(0), summed.stride(0), y.stride(0), width, eps,
                    *dropout_arguments(dropout_p),
                    HAS_X_BIAS=has_x_bias, HAS_RESIDUAL=has_residual, HAS_DROPOUT=has_dropout,
                    EMULATE_BF16=emulate_bf16(x.dtype), BLOCK_N=_block_n(width, has_dropout),
                )  # fmt: skip
        ctx.save_for_backward(summed, weight, mean, rstd, seed)
        ctx.has_residual = has_residual
        ctx.dropout_p = dropout_p
        ctx.bias_dtype = bias.dtype
        ctx.x_bias_dtype = x_bias.dtype if has_x_bias else None
        ctx.set_materialize_grads(False)
        if has_residual:
            return y.view(shape), summed.view(shape)
        return y.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_summed=None):
        summed, weight, mean, rstd, seed = ctx.saved_tensors
        width = summed.shape[-1]
        rows = summed.shape[0]
        shape = grad_y.shape if grad_y is not None else grad_summed.shape
        dy = _rows(grad_y, width) if grad_y is not None else torch.zeros_like(summed)
        has_dsummed = grad_summed is not None
        has_dropout = ctx.dropout_p > 0.0
        has_x_bias = ctx.x_bias_dtype is not None
        dsummed = _rows(grad_summed, width) if has_dsummed else dy
        dx = torch.empty((rows, width), device=summed.device, dtype=summed.dtype)
        # x's gradient through the dropout, where there is one (else dx is x's gradient too).
        dxd = torch.empty_like(dx) if has_dropout else dx
        block_n = _block_n(width, has_dropout)
        flags = {
            "HAS_DROPOUT": has_dropout,
            "EMULATE_BF16": emulate_bf16(summed.dtype),
            "BLOCK_N": block_n,
        }
        dropout = (seed, *dropout_arguments(ctx.dropout_p))
        # Partial sums of dweight, dbias and (with an input bias) x's gradient: one buffer, so that one
        # reduction (and one cast) finishes all of them.
        sums_of = 3 if has_x_bias else 2
        if block_n > FUSED_BACKWARD_MAX_WIDTH:
            partials = _split_backward(
                summed, weight, dy, dsummed, dx, dxd, mean, rstd, has_dsummed, dropout, flags, sums_of
            )
        else:
            # PROGRAMS_PER_SM x SMs programs (the autotuner's choice), each owning a contiguous run of rows and
            # writing one row of partial sums. The buffer has room for the most any candidate launches.
            sms = multiprocessor_count(summed.device)
            most = max(1, min(rows, max(programs_per_sm(block_n)) * sms))
            partials = torch.empty((sums_of, most, width), device=summed.device, dtype=torch.float32)
            programs = 0
            if rows > 0:

                def grid(meta):
                    return (min(rows, meta["PROGRAMS_PER_SM"] * sms),)

                with device_guard(summed.device):
                    meta = _backward(
                        grid, summed, weight, dy, dsummed, dx, dxd, mean, rstd, partials[0], partials[1],
                        partials[sums_of - 1], dropout[0], summed.stride(0), dy.stride(0), dsummed.stride(0),
                        dx.stride(0), rows, width, *dropout[1:], HAS_DSUMMED=has_dsummed, HAS_X_BIAS=has_x_bias,
                        **flags,
                    )  # fmt: skip
                programs = grid(meta)[0]
            partials = partials[:, :programs]
        sums = partials.sum(1)
        dtypes = (weight.dtype, ctx.bias_dtype, ctx.x_bias_dtype)[:sums_of]
        if all(dtype == weight.dtype for dtype in dtypes):
            grads = sums.to(weight.dtype).unbind(0)
        else:
            grads = tuple(part.to(dtype) for part, dtype in zip(sums.unbind(0), dtypes))
        dweight, dbias = grads[0], grads[1]
        dx_bias = grads[2] if has_x_bias else None
        dx = dx.view(shape)
        # x and residual enter only through their sum, so they share one gradient, as with torch's add (x's
        # passes through the dropout first, where there is one).
        return dxd.view(shape), dweight, dbias, None, dx if ctx.has_residual else None, None, dx_bias


class DropoutAddFunction(torch.autograd.Function):
    """``residual + dropout(x + x_bias)``, the mask drawn in the kernel and drawn again in the backward (nothing
    stored)."""

    @staticmethod
    def forward(ctx, x, residual, dropout_p, x_bias):
        shape = x.shape
        width = shape[-1]
        x2, residual2 = _rows(x, width), _rows(residual, width)
        rows = x2.shape[0]
        out = torch.empty((rows, width), device=x.device, dtype=x.dtype)
        seed = dropout_seed(x.device)
        block_n = _block_n(width, True)
        has_x_bias = x_bias is not None
        if rows > 0:
            with device_guard(x.device):
                _dropout_add(
                    (rows,), x2, x_bias if has_x_bias else x2, residual2, out, seed, x2.stride(0),
                    residual2.stride(0), out.stride(0), width, *dropout_arguments(dropout_p),
                    HAS_X_BIAS=has_x_bias, EMULATE_BF16=emulate_bf16(x.dtype), BLOCK_N=block_n,
                    num_warps=num_warps_for(block_n, backward=False),
                )  # fmt: skip
        ctx.save_for_backward(seed)
        ctx.dropout_p = dropout_p
        ctx.has_x_bias = has_x_bias
        return out.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (seed,) = ctx.saved_tensors
        shape = grad_out.shape
        width = shape[-1]
        dout = _rows(grad_out, width)
        rows = dout.shape[0]
        dx = torch.empty((rows, width), device=dout.device, dtype=dout.dtype)
        block_n = _block_n(width, True)
        if rows > 0:
            with device_guard(dout.device):
                _dropout_backward(
                    (rows,), dout, dx, seed, dout.stride(0), dx.stride(0), width,
                    *dropout_arguments(ctx.dropout_p), EMULATE_BF16=emulate_bf16(dout.dtype), BLOCK_N=block_n,
                    num_warps=num_warps_for(block_n, backward=False),
                )  # fmt: skip
        # The bias's gradient is x's summed over the rows, as autograd sums a broadcast add's.
        dx_bias = dx.sum(0) if ctx.has_x_bias else None
        # The residual enters the sum as it is: its gradient is the output's.
        return dx.view(shape), grad_out, None, dx_bias


def _split_backward(
    summed,
    weight,
    dy,
    dsummed,
    dx,
    dxd,
    mean,
    rstd,
    has_dsummed: bool,
    dropout: tuple,
    flags: dict,
    sums_of: int,
) -> torch.Tensor:
    """Rows wider than ``FUSED_BACKWARD_MAX_WIDTH``: dx one row per program, then the partial sums of dweight,
    dbias and (``sums_of`` 3) x's gradient (``[sums_of, groups, width]``) by column blocks over runs of rows."""
    rows, width = summed.shape
    block_r, block_c, _ = DWDB_TILE
    column_blocks = cdiv(width, block_c)
    groups = max(
        1,
        min(
            cdiv(rows, block_r),
            cdiv(DWDB_PROGRAMS_PER_SM * multiprocessor_count(summed.device), column_blocks),
        ),
    )
    rows_per_group = max(1, cdiv(rows, groups))
    groups = max(1, cdiv(rows, rows_per_group))
    partials = torch.empty((sums_of, groups, width), device=summed.device, dtype=torch.float32)
    if rows == 0:
        return partials.zero_()
    with device_guard(summed.device):
        _backward_dx(
            (rows,), summed, weight, dy, dsummed, dx, dxd, mean, rstd, dropout[0],
            summed.stride(0), dy.stride(0), dsummed.stride(0), dx.stride(0), width, *dropout[1:],
            HAS_DSUMMED=has_dsummed, **flags,
        )  # fmt: skip
        _backward_dwdb(
            (column_blocks, groups), summed, dy, dxd, mean, rstd, partials[0], partials[1], partials[sums_of - 1],
            summed.stride(0), dy.stride(0), dxd.stride(0), rows, width, rows_per_group,
            HAS_X_BIAS=sums_of == 3, BLOCK_R=block_r, BLOCK_C=block_c,
        )  # fmt: skip
    return partials


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None,
    x_bias: torch.Tensor | None,
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
    _check_x_bias(where, x, x_bias)


def _check_x_bias(where: str, x: torch.Tensor, x_bias: torch.Tensor | None) -> None:
    if x_bias is not None and (x_bias.shape != x.shape[-1:] or x_bias.dtype != x.dtype):
        raise KernelError(
            f"{where}: x_bias must be [{x.shape[-1]}] in x's dtype {x.dtype}; got {x_bias.dtype} "
            f"{tuple(x_bias.shape)}"
        )


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton counterpart of ``kernels.layer_norm``'s torch path (same arguments, same result): with
    ``x_bias`` and ``dropout_p`` x is biased and dropped before the residual add, in the kernel (both need
    ``residual``)."""
    _check_inputs(x, weight, bias, residual, x_bias)
    if (dropout_p > 0.0 or x_bias is not None) and residual is None:
        raise KernelError(
            "kernels.layer_norm(backend='triton'): dropout_p (as x_bias) needs a residual: "
            "LN(residual + dropout(x + x_bias))"
        )
    return LayerNormFunction.apply(
        x,
        weight.contiguous(),
        bias.contiguous(),
        float(eps),
        residual,
        float(dropout_p),
        None if x_bias is None else x_bias.contiguous(),
    )


def dropout_add_triton(
    x: torch.Tensor, residual: torch.Tensor, dropout_p: float, x_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``residual + dropout(x + x_bias)`` in one kernel, forward and backward; the mask is not stored."""
    where = "kernels.dropout_add(backend='triton')"
    if x.dtype not in _SUPPORTED_DTYPES or residual.dtype != x.dtype or residual.shape != x.shape:
        raise KernelError(
            f"{where}: x and residual must share one shape and one dtype of fp16, bf16, fp32; got "
            f"{x.dtype} {tuple(x.shape)} and {residual.dtype} {tuple(residual.shape)}"
        )
    if x.dim() == 0 or not 0 < x.shape[-1] <= MAX_WIDTH:
        raise KernelError(f"{where}: rows must be 1..{MAX_WIDTH} wide; got shape {tuple(x.shape)}")
    _check_x_bias(where, x, x_bias)
    return DropoutAddFunction.apply(
        x, residual, float(dropout_p), None if x_bias is None else x_bias.contiguous()
    )
