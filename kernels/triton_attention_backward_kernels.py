"""Triton kernels of GLM attention's backward: the ``delta`` preprocess, dQ, dK/dV, and the atomic dQ's conversion.

They recompute the forward's probabilities from the log-sum-exp it stored (``triton_attention_kernels``, whose
block helpers they share: the mask rule, the tile loads), under the same prefix (``sep``) mask and the same
dropout decisions (replayed from Philox, or read from the bits the forward or dQ stored:
``triton_attention_dropout``). dQ and dK/dV run as separate kernels, each owning its rows (deterministic); with
``ATOMIC_DQ`` the dK/dV kernel also adds dQ into an fp32 accumulator with atomics, converted afterwards.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_attention_dropout import (
    dropout_keep,
    dropout_keep_and_bits,
    keep_bits_pointers,
    keep_bits_row_bytes,
    stored_keep,
)
from kernels.triton_attention_kernels import (
    LOG2_E,
    is_visible,
    load_own_block,
    load_tile,
    sample_limits,
    tile_source,
)
from kernels.triton_attention_tuning import (
    _DKDV_CONFIGS,
    _DKDV_TUNING_KEY,
    _DQ_CONFIGS,
    _DQ_TUNING_KEY,
    _PRUNING,
)
from kernels.triton_support import (
    AUTOTUNED,
    dot_operand,
    time_candidate,
    to_dtype,
)


@triton.jit
def _row_block(num_heads, query_length, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """The (batch, head, query rows) of a program of the row-wise backward kernels: ``(b, h, b * H + h, rows,
    columns, mask of the real [rows, HEAD_DIM])``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < query_length)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return b, h, b * num_heads + h, offs_m, offs_d, mask


@triton.jit
def _dq_accumulator_rows(DQAccum, bh, query_length, offs_m, HEAD_DIM: tl.constexpr):
    """Row addresses of the fp32 dQ accumulator (``[B * H, Tq, HEAD_DIM]``) of the atomic backward."""
    return DQAccum + bh.to(tl.int64) * query_length * HEAD_DIM + offs_m[:, None] * HEAD_DIM


@triton.jit
def attention_backward_preprocess_kernel(
    Out, DOut, Delta, DQAccum, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
    num_heads, query_length,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):  # fmt: skip
    """``delta[i] = sum_d dO[i, d] * O[i, d]``: the row term of the softmax gradient, one read of O and dO. With
    ``ATOMIC_DQ`` it also zeroes the rows' fp32 dQ accumulator (``[B * H, Tq, HEAD_DIM]``)."""
    b, h, bh, offs_m, offs_d, mask = _row_block(num_heads, query_length, HEAD_DIM, BLOCK_D, BLOCK_M)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_ot
    do_ptrs = DOut + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None] * stride_dt
    o = tl.load(o_ptrs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(
        Delta + bh.to(tl.int64) * query_length + offs_m, tl.sum(o * do, axis=1), mask=offs_m < query_length
    )
    if ATOMIC_DQ:
        rows = _dq_accumulator_rows(DQAccum, bh, query_length, offs_m, HEAD_DIM)
        tl.store(rows + offs_d[None, :], tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=mask)


@triton.jit
def attention_backward_dq_convert_kernel(
    DQAccum, DQ, stride_dqb, stride_dqh, stride_dqt, num_heads, query_length, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, EMULATE_BF16: tl.constexpr,
):  # fmt: skip
    """dQ from the fp32 accumulator the dK/dV kernel added into (``ATOMIC_DQ``): scaled, rounded to dQ's dtype."""
    b, h, bh, offs_m, offs_d, mask = _row_block(num_heads, query_length, HEAD_DIM, BLOCK_D, BLOCK_M)
    rows = _dq_accumulator_rows(DQAccum, bh, query_length, offs_m, HEAD_DIM)
    dq = tl.load(rows + offs_d[None, :], mask=mask, other=0.0)
    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    tl.store(
        DQ + offs_m[:, None] * stride_dqt + offs_d[None, :],
        to_dtype(dq * softmax_scale, DQ.dtype.element_ty, EMULATE_BF16),
        mask=mask,
    )


@triton.jit
def _dq_block(
    dq, q, do, lse, delta, query_index, query_position, K, V, KeepBits, start_n, stride_kt, stride_vt,
    sep, key_limit, query_length, key_length, qk_scale, seed, bh, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    DTYPE: tl.constexpr, KEEP_BITS: tl.constexpr, STORE_BITS: tl.constexpr,
):  # fmt: skip
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(K, start_n, offs_n, stride_kt, key_length, HEAD_DIM, BLOCK_D, MASKED, EMULATE_BF16, TMA)
    v = load_tile(V, start_n, offs_n, stride_vt, key_length, HEAD_DIM, BLOCK_D, MASKED, EMULATE_BF16, TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        visible = is_visible(query_position[:, None], offs_n[None, :], sep, key_limit)
        qk = tl.where(visible, qk, float("-inf"))
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        if KEEP_BITS:
            keep = stored_keep(KeepBits, query_index, start_n, key_length, query_length, BLOCK_N)
        elif STORE_BITS:
            # For the dK/dV kernel after this one (the forward kept none): drawn as the forward draws them.
            keep, bits = dropout_keep_and_bits(seed, query_index, start_n, bh, dropout_threshold, p, BLOCK_N)
            pointers, exists = keep_bits_pointers(
                KeepBits, query_index, start_n, key_length, query_length, BLOCK_N
            )
            tl.store(pointers, bits.to(tl.uint8), mask=exists)
        else:
            keep = dropout_keep(seed, query_index, start_n, bh, dropout_threshold, BLOCK_N)
        # dP through the mask, minus delta: a fused multiply-add where kept, -delta where dropped.
        ds = p * tl.where(keep, dp * dropout_scale - delta[:, None], -delta[:, None])
    else:
        ds = p * (dp - delta[:, None])
    return tl.dot(dot_operand(ds, DTYPE, EMULATE_BF16), k, dq, input_precision=DOT_PRECISION)


@triton.autotune(
    configs=_DQ_CONFIGS,
    key=_DQ_TUNING_KEY,
    prune_configs_by=_PRUNING,
    cache_results=True,
    do_bench=time_candidate,
)
@triton.jit
def attention_backward_dq_kernel(
    Q, K, V, DOut, DQ, Lse, Delta, Sep, Lengths, Seed, KeepBits,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    num_heads, query_length, key_length, softmax_scale, dropout_threshold, dropout_scale,
    query_length_bucket, key_length_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA_POSSIBLE: tl.constexpr, KEEP_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, STORE_BITS: tl.constexpr = False,
):  # fmt: skip
    """dQ of one query block, visiting the same key blocks as the forward: no atomics, deterministic. With
    ``STORE_BITS`` (dropout, the forward kept no bits) it also stores the keep decisions it draws in ``KeepBits``,
    for the dK/dV kernel launched after it."""
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
    DOut += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    DTYPE: tl.constexpr = Q.dtype.element_ty  # q's, k's, v's and dO's
    TMA: tl.constexpr = USE_TMA and TMA_POSSIBLE
    # No warp-specialized candidate (DQ_WS_SHAPES): q and dO by pointers.
    q = load_own_block(
        Q, start_m, offs_m, stride_qt, query_length, HEAD_DIM, BLOCK_M, BLOCK_D, EMULATE_BF16, False
    )
    do = load_own_block(
        DOut, start_m, offs_m, stride_dot, query_length, HEAD_DIM, BLOCK_M, BLOCK_D, EMULATE_BF16, False
    )
    K = tile_source(K, key_length, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    V = tile_source(V, key_length, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    row_mask = offs_m < query_length
    lse = tl.load(Lse + bh.to(tl.int64) * query_length + offs_m, mask=row_mask, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * query_length + offs_m, mask=row_mask, other=0.0)
    KeepBits += bh.to(tl.int64) * query_length * keep_bits_row_bytes(key_length)
    qk_scale = softmax_scale * LOG2_E
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    rows_end = tl.minimum(start_m + BLOCK_M, query_limit)
    hi = tl.minimum(tl.maximum(sep, rows_end + offset), key_limit)
    full_end = tl.minimum(tl.maximum(sep, start_m + offset + 1), key_limit) // BLOCK_N * BLOCK_N
    hi = tl.where(rows_end > start_m, hi, 0)
    full_end = tl.where(rows_end > start_m, full_end, 0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, offs_m, query_position, K, V, KeepBits, start_n, stride_kt, stride_vt,
            sep, key_limit, query_length, key_length, qk_scale, seed, bh, dropout_threshold, dropout_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_DROPOUT, EMULATE_BF16, DOT_PRECISION, TMA, DTYPE, KEEP_BITS,
            STORE_BITS,
        )  # fmt: skip
    for start_n in range(full_end, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _dq_block(
            dq, q, do, lse, delta, offs_m, query_position, K, V, KeepBits, start_n, stride_kt, stride_vt,
            sep, key_limit, query_length, key_length, qk_scale, seed, bh, dropout_threshold, dropout_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_DROPOUT, EMULATE_BF16, DOT_PRECISION, TMA, DTYPE, KEEP_BITS,
            STORE_BITS,
        )  # fmt: skip
    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    dq_mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(
        DQ + offs_m[:, None] * stride_dqt + offs_d[None, :],
        to_dtype(dq * softmax_scale, DQ.dtype.element_ty, EMULATE_BF16),
        mask=dq_mask,
    )


@triton.jit
def _dkdv_block(
    dk, dv, k, v, start_n, key_position, Q, DOut, Lse, Delta, KeepBits, DQAccum, start_m, stride_qt, stride_dot,
    sep, key_limit, query_length, key_length, offset, qk_scale, seed, bh, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
    DTYPE: tl.constexpr, KEEP_BITS: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):  # fmt: skip
    # Transposed tiles ([keys, queries]) so dK and dV accumulate without transposing the probabilities.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = load_tile(Q, start_m, offs_m, stride_qt, query_length, HEAD_DIM, BLOCK_D, True, EMULATE_BF16, TMA)
    do = load_tile(
        DOut, start_m, offs_m, stride_dot, query_length, HEAD_DIM, BLOCK_D, True, EMULATE_BF16, TMA
    )
    row_mask = offs_m < query_length
    lse = tl.load(Lse + offs_m, mask=row_mask, other=float("inf"))
    delta = tl.load(Delta + offs_m, mask=row_mask, other=0.0)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    if MASKED:
        visible = is_visible((offs_m + offset)[None, :], key_position[:, None], sep, key_limit)
        qk_t = tl.where(visible, qk_t, float("-inf"))
    p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        # Drawn (or read) as [queries, keys], as the other kernels draw it, then transposed to this tile's layout.
        if KEEP_BITS:
            keep = tl.trans(stored_keep(KeepBits, offs_m, start_n, key_length, query_length, BLOCK_N))
        else:
            keep = tl.trans(dropout_keep(seed, offs_m, start_n, bh, dropout_threshold, BLOCK_N))
        # dV sums the kept probabilities; the scale 1 / (1 - p) is applied once, where dV is stored.
        kept = tl.where(keep, p_t, 0.0)
        dv = tl.dot(dot_operand(kept, DTYPE, EMULATE_BF16), do, dv, input_precision=DOT_PRECISION)
        # dS from the kept probabilities (the dQ kernel's p * (dP * scale - delta) where kept, -p * delta where
        # not, rounded otherwise): with ``kept`` used in fp32 here, the select stays before the rounding to the
        # matmul's dtype, where LLVM would move it after and select 16-bit halves (SASS: 601 -> 555 instructions
        # in the 64 x 64 loop).
        ds_t = kept * (dp_t * dropout_scale) - p_t * delta[None, :]
    else:
        dv = tl.dot(dot_operand(p_t, DTYPE, EMULATE_BF16), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
    ds_t = dot_operand(ds_t, DTYPE, EMULATE_BF16)
    dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:
        # This key block's share of dQ for these query rows, added into the fp32 accumulator (FlashAttention-2's
        # way): two matmuls and one exp per pair fewer than the separate dQ kernel, in a summation order that
        # varies from run to run.
        offs_d = tl.arange(0, BLOCK_D)
        dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
        tl.atomic_add(
            DQAccum + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
            dq,
            mask=row_mask[:, None] & (offs_d < HEAD_DIM)[None, :],
            sem="relaxed",
        )
    return dk, dv


# The autotuner runs each candidate several times on the real arguments: with ATOMIC_DQ each run adds into the dQ
# accumulator, so its zeroed content is restored after every timing run (``restore_value``; the copy is timed with
# each run, the same for every candidate). Not ``reset_to_zero``: without ATOMIC_DQ, delta (which the kernel reads)
# stands in for the accumulator.
@triton.autotune(
    configs=_DKDV_CONFIGS,
    key=_DKDV_TUNING_KEY,
    prune_configs_by=_PRUNING,
    cache_results=True,
    do_bench=time_candidate,
    restore_value=["DQAccum"],
)
@triton.jit
def attention_backward_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse, Delta, Sep, Lengths, Seed, KeepBits, DQAccum,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    num_heads, query_length, key_length, softmax_scale, dropout_threshold, dropout_scale,
    query_length_bucket, key_length_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMULATE_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA_POSSIBLE: tl.constexpr, KEEP_BITS: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, USE_TMA: tl.constexpr,
    WS: tl.constexpr = False,
):  # fmt: skip
    """dK and dV of one key block, visiting only the query blocks that can see it (and with ``ATOMIC_DQ`` adding
    its share of their dQ into ``DQAccum``)."""
    start_n = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * num_heads + h
    offset = key_length - query_length
    sep, key_limit, query_limit = sample_limits(Sep, Lengths, b, query_length, key_length, HAS_LENGTHS)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    DOut += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    DTYPE: tl.constexpr = Q.dtype.element_ty  # q's, k's, v's and dO's
    TMA: tl.constexpr = USE_TMA and TMA_POSSIBLE
    SPECIALIZED: tl.constexpr = WS and TMA
    k = load_own_block(
        K, start_n, offs_n, stride_kt, key_length, HEAD_DIM, BLOCK_N, BLOCK_D, EMULATE_BF16, SPECIALIZED
    )
    v = load_own_block(
        V, start_n, offs_n, stride_vt, key_length, HEAD_DIM, BLOCK_N, BLOCK_D, EMULATE_BF16, SPECIALIZED
    )
    Q = tile_source(Q, query_length, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
    DOut = tile_source(DOut, query_length, stride_dot, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
    Lse += bh.to(tl.int64) * query_length
    Delta += bh.to(tl.int64) * query_length
    KeepBits += bh.to(tl.int64) * query_length * keep_bits_row_bytes(key_length)
    DQAccum += bh.to(tl.int64) * query_length * HEAD_DIM
    qk_scale = softmax_scale * LOG2_E
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)

    # Prefix keys are seen by every query; a causal key j only from query position j on.
    block_end = start_n + BLOCK_N
    lo = tl.where(start_n < sep, 0, tl.maximum(start_n - offset, 0)) // BLOCK_M * BLOCK_M
    hi = tl.where(start_n < key_limit, query_limit, 0)
    # Query blocks from masked_end on see the whole key block: past the diagonal, or the block is all prefix.
    diagonal_end = tl.maximum(block_end - 1 - offset + BLOCK_M - 1, 0) // BLOCK_M * BLOCK_M
    masked_end = tl.where(block_end <= sep, lo, diagonal_end)
    masked_end = tl.where(block_end > key_limit, hi, masked_end)
    masked_end = tl.minimum(tl.maximum(masked_end, lo), hi)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if SPECIALIZED:  # one loop, every block masked (see FORWARD_WS_SHAPES)
        for start_m in tl.range(lo, hi, BLOCK_M, warp_specialize=True):
            dk, dv = _dkdv_block(
                dk, dv, k, v, start_n, offs_n, Q, DOut, Lse, Delta, KeepBits, DQAccum, start_m, stride_qt, stride_dot,
                sep, key_limit, query_length, key_length, offset, qk_scale, seed, bh, dropout_threshold,
                dropout_scale, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_M, True, HAS_DROPOUT, EMULATE_BF16, DOT_PRECISION,
                TMA, DTYPE, KEEP_BITS, ATOMIC_DQ,
            )  # fmt: skip
    else:
        for start_m in range(lo, masked_end, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv = _dkdv_block(
                dk, dv, k, v, start_n, offs_n, Q, DOut, Lse, Delta, KeepBits, DQAccum, start_m, stride_qt, stride_dot,
                sep, key_limit, query_length, key_length, offset, qk_scale, seed, bh, dropout_threshold,
                dropout_scale, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_M, True, HAS_DROPOUT, EMULATE_BF16, DOT_PRECISION,
                TMA, DTYPE, KEEP_BITS, ATOMIC_DQ,
            )  # fmt: skip
        for start_m in range(masked_end, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv = _dkdv_block(
                dk, dv, k, v, start_n, offs_n, Q, DOut, Lse, Delta, KeepBits, DQAccum, start_m, stride_qt, stride_dot,
                sep, key_limit, query_length, key_length, offset, qk_scale, seed, bh, dropout_threshold,
                dropout_scale, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_M, False, HAS_DROPOUT, EMULATE_BF16, DOT_PRECISION,
                TMA, DTYPE, KEEP_BITS, ATOMIC_DQ,
            )  # fmt: skip
    mask = (offs_n < key_length)[:, None] & (offs_d < HEAD_DIM)[None, :]
    DK += b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh
    DV += b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
    tl.store(
        DK + offs_n[:, None] * stride_dkt + offs_d[None, :],
        to_dtype(dk * softmax_scale, DK.dtype.element_ty, EMULATE_BF16),
        mask=mask,
    )
    if HAS_DROPOUT:
        dv = dv * dropout_scale
    tl.store(
        DV + offs_n[:, None] * stride_dvt + offs_d[None, :],
        to_dtype(dv, DV.dtype.element_ty, EMULATE_BF16),
        mask=mask,
    )


# Their tile choices go into checkpoints (``kernels.tile_choices``), with the forward's.
AUTOTUNED.update(
    {
        "attention_backward_dq": attention_backward_dq_kernel,
        "attention_backward_dkdv": attention_backward_dkdv_kernel,
    }
)
