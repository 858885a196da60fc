"""The LayerNorm and dropout-add kernels on Triton, and how they are tuned; ``triton_layer_norm`` launches them.

LayerNorm, optionally fused with the residual add that precedes it in a pre-LN transformer block, and with a
dropout of its input before that add.
Forward: one program per row keeps the whole row in registers (rows up to ``triton_layer_norm.MAX_WIDTH``), so
the input is read once; mean and 1/std are computed in fp32 (two passes over the registers, not E[x^2] - E[x]^2)
and saved.
Backward: each program owns a contiguous run of rows, writes dx row by row and accumulates its share of dweight
and dbias in fp32 registers; the per-program partial sums are added in a fixed order afterwards, so gradients
are deterministic (no atomics) and x and dy are each read once. Rows wider than
``triton_layer_norm.FUSED_BACKWARD_MAX_WIDTH`` do not fit in registers that way: there dx is written one row per
program (``layer_norm_backward_dx_kernel``), and dweight and dbias are summed by a second kernel over blocks of
columns (``layer_norm_backward_dwdb_kernel``; x and dy read twice).
Warps per program: a width heuristic, and on GPUs the autotuner's choice between it and its neighbours.
The dropout-add (``residual + dropout(x + x_bias)``) draws the same Philox mask as the LayerNorm's dropout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_support import (
    AUTOTUNE,
    DROPOUT_GROUP,
    INTERPRET,
    philox_uniforms16,
    time_candidate,
    to_dtype,
)


def num_warps_for(block_n: int, backward: bool) -> int:
    """Warps per row program by width: about 8-16 fp32 values of each row vector per thread, enough work per
    thread and few spills. The backward of 16K-wide rows holds five row vectors (x, dy, w and the dweight/dbias
    sums), more than 16 warps' registers: ptxas spills least with 32 warps there."""
    if block_n > 8192:
        return 32 if backward else 16
    if backward and block_n == 8192:
        return (
            16  # on 8 warps it needs all 255 registers per thread and spills; the H200's autotuner chose 16
        )
    return min(max(block_n // 256, 1), 8)


# Tuning. The warps per program: on GPUs the autotuner times ``num_warps_for``'s choice and its neighbours (half and
# twice as many) once per width, dtype and variant, and keeps the fastest in Triton's cache (and in checkpoints,
# as the attention's tiles); with GLM_KERNELS_AUTOTUNE=0 it runs the heuristic's choice alone. The fused
# backward also tunes its programs per SM (each program owns a run of rows and writes one row of partial sums):
# two per SM keep the partial sums small, more keep more rows' loads in flight. Each of these also comes with its
# row loop pipelined (``ROW_STAGES`` 2: the next row's loads in flight while this one is worked on, through shared
# memory, with about the same registers). Rows up to 2048 wide also come 2 or 4 at a time per step of the loop
# (``ROWS_PER_STEP``, where each thread then holds at most 16 values of each tile): more loads in flight, and the
# row sums' cross-thread reductions, with their barriers, shared by the step's rows (sm_90 SASS at width 1024: 3
# barriers per row instead of 6). The heuristic's choice comes first, with two programs per SM and the loop as it
# is; it alone runs with GLM_KERNELS_AUTOTUNE=0. The interpreter has one config of its own.
WARPS = (1, 2, 4, 8, 16, 32)


def programs_per_sm(block_n: int) -> tuple[int, ...]:
    """The fused backward's candidate programs per SM at this width (its partial sums grow with them)."""
    return (2, 4, 8) if block_n <= 2048 else (2, 4)


# The fused backward's multi-row candidates (``ROWS_PER_STEP``): rows up to this wide, each tile (x, dy, x_hat, dx:
# ROWS_PER_STEP x BLOCK_N fp32 values) at most this many values per thread.
ROWS_PER_STEP_MAX_WIDTH = 2048
ROWS_PER_STEP_VALUES_PER_THREAD = 16


def fits_rows_per_step(config, block_n: int) -> bool:
    """Whether a fused-backward candidate's ``ROWS_PER_STEP`` (1 when unnamed) suits rows ``block_n`` wide."""
    rows = config.kwargs.get("ROWS_PER_STEP", 1)
    if rows == 1:
        return True
    per_thread = rows * block_n // (32 * config.num_warps)
    return block_n <= ROWS_PER_STEP_MAX_WIDTH and per_thread <= ROWS_PER_STEP_VALUES_PER_THREAD


def warps_candidates(backward: bool):
    def prune(configs: list, named_args: dict, **kwargs) -> list:
        if len(configs) == 1:
            return configs
        block_n = kwargs["BLOCK_N"]
        preferred = num_warps_for(block_n, backward)
        window = {preferred // 2, preferred, preferred * 2} if AUTOTUNE else {preferred}
        programs = set(programs_per_sm(block_n)) if AUTOTUNE else {2}
        stages = {1, 2} if AUTOTUNE else {1}
        chosen = [
            c
            for c in configs
            if c.num_warps in window
            and c.kwargs.get("PROGRAMS_PER_SM", 2) in programs
            and c.kwargs.get("ROW_STAGES", 1) in stages
            and (AUTOTUNE or c.kwargs.get("ROWS_PER_STEP", 1) == 1)
            and fits_rows_per_step(c, block_n)
        ]
        return sorted(
            chosen,
            key=lambda c: (
                c.num_warps != preferred,
                c.kwargs.get("ROWS_PER_STEP", 1),
                c.kwargs.get("PROGRAMS_PER_SM", 2),
                c.kwargs.get("ROW_STAGES", 1),
            ),
        )

    return {"early_config_prune": prune}


CONFIGS = [triton.Config({}, num_warps=4)] if INTERPRET else [triton.Config({}, num_warps=w) for w in WARPS]
BACKWARD_CONFIGS = (
    [triton.Config({"PROGRAMS_PER_SM": 2}, num_warps=4)]
    if INTERPRET
    else [
        # Only the pipelined tiles name ROW_STAGES: the others keep the names checkpoints recorded as tile choices.
        triton.Config({"PROGRAMS_PER_SM": p, **({"ROW_STAGES": stages} if stages > 1 else {})}, num_warps=w)
        for w in WARPS
        for p in (2, 4, 8)
        for stages in (1, 2)
    ]
    # Several rows per step of the row loop (narrow rows; see layer_norm_backward_kernel), unpipelined.
    + [
        triton.Config({"PROGRAMS_PER_SM": p, "ROWS_PER_STEP": rows}, num_warps=w)
        for w in WARPS
        for p in (2, 4, 8)
        for rows in (2, 4)
    ]
)


@triton.jit
def _keep_row(Seed, row, threshold, BLOCK_N: tl.constexpr):
    """Keep decisions of the dropout before the residual add, for row ``row``'s ``BLOCK_N`` columns: one Philox
    call per row and group of 8 columns, counter (column group, row, 0, 0), as the attention's dropout draws
    its own; an element is kept iff its uniform is ``>= threshold`` (``round(p * 65536)``). The backward
    regenerates the same decisions."""
    groups = tl.arange(0, BLOCK_N // DROPOUT_GROUP)
    uniforms = philox_uniforms16(tl.load(Seed), groups, tl.cast(row, tl.int32), 0)
    return tl.reshape(uniforms, [BLOCK_N]) >= threshold


@triton.jit
def _keep_rows(Seed, rows, threshold, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``_keep_row``'s decisions for the ``ROWS`` rows ``rows`` at once: ``[ROWS, BLOCK_N]``, row by row the same
    bits (counters (column group, row, 0, 0))."""
    groups = tl.arange(0, BLOCK_N // DROPOUT_GROUP)
    uniforms = philox_uniforms16(tl.load(Seed), groups[None, :], tl.cast(rows, tl.int32)[:, None], 0)
    return tl.reshape(uniforms, [ROWS, BLOCK_N]) >= threshold


@triton.jit
def _dropped(x, keep, scale, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``dropout(x)`` rounded to ``DTYPE`` (as torch's dropout stores it), back in fp32."""
    return to_dtype(tl.where(keep, x * scale, 0.0), DTYPE, EMULATE_BF16).to(tl.float32)


@triton.autotune(
    configs=CONFIGS,
    key=["BLOCK_N", "HAS_X_BIAS", "HAS_RESIDUAL", "HAS_DROPOUT"],
    prune_configs_by=warps_candidates(backward=False),
    cache_results=True,
    do_bench=time_candidate,
)
@triton.jit
def layer_norm_forward_kernel(
    X, XBias, Residual, Summed, Y, W, B, Mean, Rstd, Seed,
    stride_x, stride_r, stride_s, stride_y, width, eps, dropout_threshold, dropout_scale,
    HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < width
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:  # the bias a linear layer left out, added and rounded to the dtype as torch's add does
        x_bias = tl.load(XBias + cols, mask=mask, other=0.0).to(tl.float32)
        x = to_dtype(x + x_bias, Summed.dtype.element_ty, EMULATE_BF16).to(tl.float32)
    if (
        HAS_DROPOUT
    ):  # LN(residual + dropout(x)): the dropped x rounded to the dtype, as torch's dropout stores it
        keep = _keep_row(Seed, row, dropout_threshold, BLOCK_N)
        x = _dropped(x, keep, dropout_scale, Summed.dtype.element_ty, EMULATE_BF16)
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
def _store_dx_row(
    x, dy, w, Mean, Rstd, DSummed, DX, DXD, Seed, row, cols, mask, stride_ds, stride_dx, width,
    dropout_threshold, dropout_scale,
    HAS_DSUMMED: tl.constexpr, HAS_DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Store row ``row`` of dx (plus dsummed's row), and with dropout dx through the forward's dropout mask
    (into DXD, same strides); return the row's x_hat for dweight and x's gradient as stored (for the sums of an
    input bias's gradient)."""
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
    dx = to_dtype(dx, DX.dtype.element_ty, EMULATE_BF16)
    tl.store(DX + row * stride_dx + cols, dx, mask=mask)
    if HAS_DROPOUT:  # torch's dropout backward: the stored gradient times the mask and the scale, rounded
        keep = _keep_row(Seed, row, dropout_threshold, BLOCK_N)
        dxd = _dropped(dx.to(tl.float32), keep, dropout_scale, DXD.dtype.element_ty, EMULATE_BF16)
        tl.store(DXD + row * stride_dx + cols, dxd.to(DXD.dtype.element_ty), mask=mask)
        x_grad = dxd
    else:
        x_grad = dx.to(tl.float32)
    return x_hat, x_grad


@triton.jit
def _store_dx_rows(
    x, dy, w, Mean, Rstd, DSummed, DX, DXD, Seed, rows, cols, row_mask, mask, stride_ds, stride_dx, width,
    dropout_threshold, dropout_scale, HAS_DSUMMED: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMULATE_BF16: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``_store_dx_row`` for the ``ROWS`` rows ``rows`` at once (``x``, ``dy``: ``[ROWS, BLOCK_N]``; rows off
    ``row_mask`` are neither read nor written and give zeros)."""
    mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    both = row_mask[:, None] & mask[None, :]
    x_hat = tl.where(both, (x - mean[:, None]) * rstd[:, None], 0.0)
    w_dy = w[None, :] * dy
    c_hat = tl.sum(x_hat * w_dy, axis=1) / width
    c_dy = tl.sum(w_dy, axis=1) / width
    dx = (w_dy - (x_hat * c_hat[:, None] + c_dy[:, None])) * rstd[:, None]
    if HAS_DSUMMED:
        dx += tl.load(DSummed + rows[:, None] * stride_ds + cols[None, :], mask=both, other=0.0).to(
            tl.float32
        )
    dx = to_dtype(dx, DX.dtype.element_ty, EMULATE_BF16)
    offsets = rows[:, None] * stride_dx + cols[None, :]
    tl.store(DX + offsets, dx, mask=both)
    if HAS_DROPOUT:
        keep = _keep_rows(Seed, rows, dropout_threshold, ROWS, BLOCK_N)
        dxd = _dropped(dx.to(tl.float32), keep, dropout_scale, DXD.dtype.element_ty, EMULATE_BF16)
        tl.store(DXD + offsets, dxd.to(DXD.dtype.element_ty), mask=both)
        x_grad = tl.where(both, dxd, 0.0)
    else:
        x_grad = tl.where(both, dx.to(tl.float32), 0.0)
    return x_hat, x_grad


@triton.autotune(
    configs=BACKWARD_CONFIGS,
    key=["BLOCK_N", "HAS_DSUMMED", "HAS_DROPOUT", "HAS_X_BIAS"],
    prune_configs_by=warps_candidates(backward=True),
    cache_results=True,
    do_bench=time_candidate,
)
@triton.jit
def layer_norm_backward_kernel(
    X, W, DY, DSummed, DX, DXD, Mean, Rstd, PartialDW, PartialDB, PartialDXB, Seed,
    stride_x, stride_dy, stride_ds, stride_dx, rows, width, dropout_threshold, dropout_scale,
    HAS_DSUMMED: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_X_BIAS: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr, ROW_STAGES: tl.constexpr = 1,
    ROWS_PER_STEP: tl.constexpr = 1,
):  # fmt: skip
    # The grid is min(rows, PROGRAMS_PER_SM x SMs) programs (see LayerNormFunction.backward), each a contiguous run
    # of rows. (Program p taking rows p, p + programs, ... instead ran 4K- and 8K-wide rows at ~60% of the speed
    # on an H200: the loop's step is then no constant.) With ROW_STAGES 2 Triton pipelines the row loop: the
    # loads of the next row's x, dy (and dsummed) are issued as asynchronous copies into shared memory while
    # this row is worked on; ROW_STAGES 1 compiles to the unpipelined loop.
    program = tl.program_id(0)
    rows_per_program = tl.cdiv(rows, tl.num_programs(0))
    cols = tl.arange(0, BLOCK_N)
    mask = cols < width
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    dxb = tl.zeros([BLOCK_N], dtype=tl.float32)
    # int64 bounds make the row index (and row * stride) 64-bit inside the loop.
    first_row = program.to(tl.int64) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, rows)
    if ROWS_PER_STEP == 1:
        for row in tl.range(first_row, last_row, num_stages=ROW_STAGES):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x_hat, x_grad = _store_dx_row(
                x, dy, w, Mean, Rstd, DSummed, DX, DXD, Seed, row, cols, mask, stride_ds, stride_dx, width,
                dropout_threshold, dropout_scale, HAS_DSUMMED, HAS_DROPOUT, EMULATE_BF16, BLOCK_N,
            )  # fmt: skip
            dw += dy * x_hat
            db += dy
            if HAS_X_BIAS:
                dxb += x_grad
    else:
        # Narrow rows, ROWS_PER_STEP at a time: more loads in flight per program, and each step's row sums (a
        # reduction across the program's threads) done for all its rows at once.
        offsets = tl.arange(0, ROWS_PER_STEP)
        for start in range(first_row, last_row, ROWS_PER_STEP):
            rows_now = start + offsets
            row_mask = rows_now < last_row
            both = row_mask[:, None] & mask[None, :]
            x = tl.load(X + rows_now[:, None] * stride_x + cols[None, :], mask=both, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows_now[:, None] * stride_dy + cols[None, :], mask=both, other=0.0).to(
                tl.float32
            )
            x_hat, x_grad = _store_dx_rows(
                x, dy, w, Mean, Rstd, DSummed, DX, DXD, Seed, rows_now, cols, row_mask, mask, stride_ds,
                stride_dx, width, dropout_threshold, dropout_scale, HAS_DSUMMED, HAS_DROPOUT, EMULATE_BF16,
                ROWS_PER_STEP, BLOCK_N,
            )  # fmt: skip
            dw += tl.sum(dy * x_hat, axis=0)
            db += tl.sum(dy, axis=0)
            if HAS_X_BIAS:
                dxb += tl.sum(x_grad, axis=0)
    tl.store(PartialDW + program * width + cols, dw, mask=mask)
    tl.store(PartialDB + program * width + cols, db, mask=mask)
    if HAS_X_BIAS:
        tl.store(PartialDXB + program * width + cols, dxb, mask=mask)


# dweight/dbias tiles of the split backward: rows x columns per step, warps; about four programs per SM.
DWDB_TILE = (16, 64, 4) if INTERPRET else (32, 128, 4)
DWDB_PROGRAMS_PER_SM = 4


@triton.autotune(
    configs=CONFIGS,
    key=["BLOCK_N", "HAS_DSUMMED", "HAS_DROPOUT"],
    # x, dy and w per row, as the forward holds x, w and b: the forward's warps.
    prune_configs_by=warps_candidates(backward=False),
    cache_results=True,
    do_bench=time_candidate,
)
@triton.jit
def layer_norm_backward_dx_kernel(
    X, W, DY, DSummed, DX, DXD, Mean, Rstd, Seed,
    stride_x, stride_dy, stride_ds, stride_dx, width, dropout_threshold, dropout_scale,
    HAS_DSUMMED: tl.constexpr, HAS_DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dx of one row (the split backward's first kernel)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < width
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    _store_dx_row(
        x, dy, w, Mean, Rstd, DSummed, DX, DXD, Seed, row, cols, mask, stride_ds, stride_dx, width,
        dropout_threshold, dropout_scale, HAS_DSUMMED, HAS_DROPOUT, EMULATE_BF16, BLOCK_N,
    )  # fmt: skip


def dwdb_stages(configs: list, named_args: dict, **kwargs) -> list:
    """The split backward's dweight/dbias kernel: its loop as it is, and pipelined over 2 and 3 stages, timed on
    GPUs; with GLM_KERNELS_AUTOTUNE=0 the loop as it is."""
    return configs if AUTOTUNE else configs[:1]


# The tile is fixed (DWDB_TILE: it decides the order of the sums); the autotuner only picks how many of the loop's
# row blocks are in flight (ROW_STAGES), which leaves every sum as it is: nothing for checkpoints to record.
@triton.autotune(
    configs=[triton.Config({}, num_warps=DWDB_TILE[2])]
    + ([] if INTERPRET else [triton.Config({"ROW_STAGES": s}, num_warps=DWDB_TILE[2]) for s in (2, 3)]),
    key=["BLOCK_R", "BLOCK_C", "HAS_X_BIAS"],
    prune_configs_by={"early_config_prune": dwdb_stages},
    cache_results=True,
    do_bench=time_candidate,
)
@triton.jit
def layer_norm_backward_dwdb_kernel(
    X, DY, DXD, Mean, Rstd, PartialDW, PartialDB, PartialDXB,
    stride_x, stride_dy, stride_dxd, rows, width, rows_per_program,
    HAS_X_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROW_STAGES: tl.constexpr = 1,
):  # fmt: skip
    """The split backward's second kernel: dweight's and dbias's sums over one run of rows, for one block of
    columns, in a fixed order (deterministic); with an input bias also the sums of x's gradient (DXD). With
    ROW_STAGES 2 or 3 Triton pipelines the loop (the next row blocks' loads as asynchronous copies into shared
    memory): a few programs per SM keep more loads in flight."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < width
    group = tl.program_id(1)
    first_row = group.to(tl.int64) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, rows)
    dw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    dxb = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in tl.range(first_row, last_row, BLOCK_R, num_stages=ROW_STAGES):
        rows_here = start + tl.arange(0, BLOCK_R)
        row_mask = rows_here < last_row
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows_here[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows_here[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows_here, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows_here, mask=row_mask, other=0.0)
        dw += dy * ((x - mean[:, None]) * rstd[:, None])
        db += dy
        if HAS_X_BIAS:
            dxd_ptrs = DXD + rows_here[:, None] * stride_dxd + cols[None, :]
            dxb += tl.load(dxd_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(PartialDW + group * width + cols, tl.sum(dw, axis=0), mask=col_mask)
    tl.store(PartialDB + group * width + cols, tl.sum(db, axis=0), mask=col_mask)
    if HAS_X_BIAS:
        tl.store(PartialDXB + group * width + cols, tl.sum(dxb, axis=0), mask=col_mask)


@triton.jit
def dropout_add_kernel(
    X, XBias, Residual, Out, Seed, stride_x, stride_r, stride_o, width, dropout_threshold, dropout_scale,
    HAS_X_BIAS: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``residual + dropout(x + x_bias)`` for one row, the biased and the dropped x each rounded to the dtype (as
    torch computes them)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < width
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        x_bias = tl.load(XBias + cols, mask=mask, other=0.0).to(tl.float32)
        x = to_dtype(x + x_bias, Out.dtype.element_ty, EMULATE_BF16).to(tl.float32)
    residual = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    keep = _keep_row(Seed, row, dropout_threshold, BLOCK_N)
    out = _dropped(x, keep, dropout_scale, Out.dtype.element_ty, EMULATE_BF16) + residual
    tl.store(Out + row * stride_o + cols, to_dtype(out, Out.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit
def dropout_backward_kernel(
    DOut, DX, Seed, stride_do, stride_dx, width, dropout_threshold, dropout_scale,
    EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The gradient of ``dropout(x)`` for one row: the output gradient through the forward's mask and scale."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < width
    dout = tl.load(DOut + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    keep = _keep_row(Seed, row, dropout_threshold, BLOCK_N)
    dx = _dropped(dout, keep, dropout_scale, DX.dtype.element_ty, EMULATE_BF16)
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
