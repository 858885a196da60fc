"""Triton kernels of GLM attention: the flash-attention forward under the prefix (``sep``) mask, and the block
helpers it shares with the backward kernels (``triton_attention_backward_kernels``).

Key j is visible to query i (absolute position ``i + Tk - Tq``) iff ``(j < sep[b] or j <= i) and j < length[b]``.
The mask is never materialised: each program derives, from ``sep`` and the block coordinates, which key blocks
it must visit at all and which of those lie wholly inside the visible region (no mask test), and tests the
rule element-wise only in the remaining border blocks.

Softmax runs in the log2 domain (``exp2`` of scores pre-multiplied by ``scale * log2(e)``) with fp32 statistics
and accumulators. The forward stores the per-row log-sum-exp (log2 units); padding rows store ``+inf`` so that
the recomputed probabilities of those rows are exactly 0 in the backward and they pass no gradient.

Dropout: the keep decisions come from Philox, drawn in the forward and, up to a size, stored as bits for the
backward (``triton_attention_dropout``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_attention_dropout import (
    dropout_keep,
    dropout_keep_and_bits,
    keep_bits_pointers,
    keep_bits_row_bytes,
)
from kernels.triton_attention_tuning import _FORWARD_CONFIGS, _PRUNING, _TUNING_KEY
from kernels.triton_support import (
    AUTOTUNED,
    dot_operand,
    opaque_zeros,
    time_candidate,
    to_dtype,
)

LOG2_E = tl.constexpr(1.4426950408889634)


@triton.jit
def sample_limits(Sep, Lengths, b, query_length, key_length, HAS_LENGTHS: tl.constexpr):
    """``(sep, key_limit, query_limit)``: keys ``< key_limit`` exist, query rows ``< query_limit`` are real."""
    sep = tl.load(Sep + b)
    if HAS_LENGTHS:
        length = tl.load(Lengths + b)
        key_limit = tl.minimum(tl.maximum(length, 0), key_length)
        query_limit = tl.minimum(tl.maximum(length - (key_length - query_length), 0), query_length)
    else:
        key_limit = key_length
        query_limit = query_length
    return sep, key_limit, query_limit


@triton.jit
def is_visible(query_position, key_position, sep, key_limit):
    """GLM visibility of broadcastable query/key absolute positions: key j is visible to query i iff (j < sep or
    j <= i) and j < key_limit, that is iff j < min(max(sep, i + 1), key_limit). The bound is formed once per
    query (``query_position`` is a row or a column), leaving one comparison per pair."""
    return key_position < tl.minimum(tl.maximum(sep, query_position + 1), key_limit)


@triton.jit
def _load_rows(
    Base, rows, stride, row_limit,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr, EMULATE_BF16: tl.constexpr,
):  # fmt: skip
    """Load rows ``rows`` (``[len(rows), BLOCK_D]``) testing only the bounds that can be crossed. bf16 is widened
    (exactly) to fp32 where the interpreter emulates it, and stays 16-bit for the tensor cores on GPUs."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = Base + rows[:, None] * stride + cols[None, :]
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=(rows < row_limit)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < row_limit)[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
    if EMULATE_BF16:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def tile_source(
    Base, length, stride, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr
):  # fmt: skip
    """Where a loop's tiles of ``[length, HEAD_DIM]`` rows at ``Base`` come from: a TMA tensor descriptor of
    ``[BLOCK_ROWS, BLOCK_D]`` blocks, or the pointer itself."""
    if TMA:
        source = tl.make_tensor_descriptor(
            Base, shape=[length, HEAD_DIM], strides=[stride, 1], block_shape=[BLOCK_ROWS, BLOCK_D]
        )
    else:
        source = Base
    return source


@triton.jit
def load_tile(
    Source, start, rows, stride, row_limit,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr, EMULATE_BF16: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """Rows ``rows`` (= ``start + arange``) of a ``tile_source``: by the descriptor (rows past the tensor and columns
    past HEAD_DIM read as zeros, as the masked pointer load reads them) or by ``_load_rows``."""
    if TMA:
        tile = Source.load([start, 0])
        if EMULATE_BF16:
            tile = tile.to(tl.float32)
    else:
        tile = _load_rows(Source, rows, stride, row_limit, HEAD_DIM, BLOCK_D, CHECK_ROWS, EMULATE_BF16)
    return tile


@triton.jit
def load_own_block(
    Base, start, rows, stride, length,
    HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr,
    DESCRIPTOR: tl.constexpr,
):  # fmt: skip
    """The block of rows a program owns (rows ``start + arange``), loaded once before its loop: through a TMA
    descriptor in the warp-specialized kernels (a pointer load before the loop keeps Triton from specializing it),
    else by pointers."""
    source = tile_source(Base, length, stride, HEAD_DIM, BLOCK_ROWS, BLOCK_D, DESCRIPTOR)
    return load_tile(source, start, rows, stride, length, HEAD_DIM, BLOCK_D, True, EMULATE_BF16, DESCRIPTOR)


@triton.jit
def _forward_block(
    acc, l_i, m_i, q, query_index, query_position, K, V, KeepBits, start_n, stride_kt, stride_vt,
    sep, key_limit, query_length, key_length, qk_scale, seed, bh, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    DTYPE: tl.constexpr, KEEP_BITS: tl.constexpr,
):  # fmt: skip
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(K, start_n, offs_n, stride_kt, key_length, HEAD_DIM, BLOCK_D, MASKED, EMULATE_BF16, TMA)
    v = load_tile(V, start_n, offs_n, stride_vt, key_length, HEAD_DIM, BLOCK_D, MASKED, EMULATE_BF16, TMA)
    # The scores unscaled: the scale goes into exp2's argument, one fused multiply-add per pair (the row maximum
    # of the scaled scores is the scaled row maximum, bit for bit: the scale is positive).
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        visible = is_visible(query_position[:, None], offs_n[None, :], sep, key_limit)
        qk = tl.where(visible, qk, float("-inf"))
    # Every row sees key 0 (or has an empty key range), and key block 0 is always visited first, so the
    # running maximum is finite from the first block on and exp2(-inf - m) never meets -inf - -inf.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        if KEEP_BITS:
            keep, bits = dropout_keep_and_bits(seed, query_index, start_n, bh, dropout_threshold, p, BLOCK_N)
        else:
            keep = dropout_keep(seed, query_index, start_n, bh, dropout_threshold, BLOCK_N)
        # The kept probabilities' scale 1 / (1 - p) is applied once to the output (the kernel's end). Zeros LLVM
        # cannot see through keep the select in fp32 (SASS of the 64 x 64 loop: 636 -> 584 instructions).
        p = tl.where(keep, p, opaque_zeros(query_index)[:, None])
    acc = tl.dot(dot_operand(p, DTYPE, EMULATE_BF16), v, acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT and KEEP_BITS:
        pointers, exists = keep_bits_pointers(
            KeepBits, query_index, start_n, key_length, query_length, BLOCK_N
        )
        tl.store(pointers, bits.to(tl.uint8), mask=exists)
    return acc, l_i, m_new


@triton.autotune(
    configs=_FORWARD_CONFIGS,
    key=_TUNING_KEY,
    prune_configs_by=_PRUNING,
    cache_results=True,
    do_bench=time_candidate,
)
@triton.jit
def attention_forward_kernel(
    Q, K, V, Out, Lse, Sep, Lengths, Seed, KeepBits,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    num_heads, query_length, key_length, softmax_scale, dropout_threshold, dropout_scale,
    query_length_bucket, key_length_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA_POSSIBLE: tl.constexpr, KEEP_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, WS: tl.constexpr = False,
):  # fmt: skip
    # Later query blocks see more keys: launch them first so the short blocks fill the tail of the grid.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * num_heads + h
    offset = key_length - query_length
    sep, key_limit, query_limit = sample_limits(Sep, Lengths, b, query_length, key_length, HAS_LENGTHS)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    query_position = offs_m + offset
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    DTYPE: tl.constexpr = Q.dtype.element_ty  # q's, k's and v's
    TMA: tl.constexpr = USE_TMA and TMA_POSSIBLE
    SPECIALIZED: tl.constexpr = WS and TMA
    q = load_own_block(
        Q, start_m, offs_m, stride_qt, query_length, HEAD_DIM, BLOCK_M, BLOCK_D, EMULATE_BF16, SPECIALIZED
    )
    K = tile_source(K, key_length, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    V = tile_source(V, key_length, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    KeepBits += bh.to(tl.int64) * query_length * keep_bits_row_bytes(key_length)
    qk_scale = softmax_scale * LOG2_E
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    # Keys >= hi are invisible to every real row of this block; keys < full_end are visible to all of them.
    rows_end = tl.minimum(start_m + BLOCK_M, query_limit)
    hi = tl.minimum(tl.maximum(sep, rows_end + offset), key_limit)
    full_end = tl.minimum(tl.maximum(sep, start_m + offset + 1), key_limit) // BLOCK_N * BLOCK_N
    hi = tl.where(rows_end > start_m, hi, 0)
    full_end = tl.where(rows_end > start_m, full_end, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SPECIALIZED:  # one loop, every block masked (see FORWARD_WS_SHAPES)
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _forward_block(
                acc, l_i, m_i, q, offs_m, query_position, K, V, KeepBits, start_n, stride_kt, stride_vt,
                sep, key_limit, query_length, key_length, qk_scale, seed, bh, dropout_threshold, dropout_scale,
                HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_DROPOUT, EMULATE_BF16, DOT_PRECISION, TMA, DTYPE, KEEP_BITS,
            )  # fmt: skip
    else:
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _forward_block(
                acc, l_i, m_i, q, offs_m, query_position, K, V, KeepBits, start_n, stride_kt, stride_vt,
                sep, key_limit, query_length, key_length, qk_scale, seed, bh, dropout_threshold, dropout_scale,
                HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_DROPOUT, EMULATE_BF16, DOT_PRECISION, TMA, DTYPE, KEEP_BITS,
            )  # fmt: skip
        for start_n in range(full_end, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _forward_block(
                acc, l_i, m_i, q, offs_m, query_position, K, V, KeepBits, start_n, stride_kt, stride_vt,
                sep, key_limit, query_length, key_length, qk_scale, seed, bh, dropout_threshold, dropout_scale,
                HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_DROPOUT, EMULATE_BF16, DOT_PRECISION, TMA, DTYPE, KEEP_BITS,
            )  # fmt: skip

    row_real = offs_m < query_limit
    l_safe = tl.where(row_real, l_i, 1.0)
    # One division per row and a multiply per element (a full-range division per element is ~4 instructions);
    # with dropout the kept probabilities' scale 1 / (1 - p) comes in here, once.
    row_scale = 1.0 / l_safe
    if HAS_DROPOUT:
        row_scale = row_scale * dropout_scale
    out = tl.where(row_real[:, None], acc * row_scale[:, None], 0.0)
    lse = tl.where(row_real, m_i + tl.math.log2(l_safe), float("inf"))
    Out += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    out_mask = (offs_m < query_length)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(
        Out + offs_m[:, None] * stride_ot + offs_d[None, :],
        to_dtype(out, Out.dtype.element_ty, EMULATE_BF16),
        mask=out_mask,
    )
    tl.store(Lse + bh.to(tl.int64) * query_length + offs_m, lse, mask=offs_m < query_length)


# Its tile choices go into checkpoints (``kernels.tile_choices``), with the backward kernels'.
AUTOTUNED["attention_forward"] = attention_forward_kernel
