"""In-kernel dropout of the GLM attention's probabilities: the keep decisions, drawn from Philox or read back
from the bits the forward stored. Called by the kernels of ``triton_attention_kernels`` and
``triton_attention_backward_kernels``.

Dropout: one Philox call (``tl.philox``, 7 rounds, keyed by the seed) with the counter ``(c, i, b * H + h, 0)``
yields four 32-bit numbers ``r0 .. r3``, i.e. eight 16-bit uniforms: the keep decisions of query i against the
eight keys of call c. A key is kept iff its uniform is ``>= round(p * 65536)``, so p is quantized to 1/65536 as
in ``kernels.dropout``. Philox is the costly part of in-kernel dropout (one 10-round call per element cost several
times the tile's two matmuls); eight elements per call with 7 rounds (Philox4x32-7, the fewest rounds Salmon et
al. 2011 found to pass BigCrush, as FlashAttention uses) cut it ~11x.

Which keys a call decides: in each block of 32 keys, key ``32 b + 8 i + 2 t + e`` takes the low (e = 0) or high (e
= 1) half of ``r<i>`` of call ``4 b + t``. That is the order in which a matrix-multiply accumulator (Hopper's
wgmma, Ampere's mma) holds a row: each thread has two adjacent columns of every eight (``2 t + e`` for its lane t
in the quad), so one thread holds all eight keys of a call, and the decisions reach the probabilities without
moving between threads. With eight consecutive keys per call (until 2026-11), each call's decisions went through
shared memory to the four threads that hold them (a 64 x 64 tile's forward loop: 761 instructions in SASS, now
518). The mask depends on nothing but the seed and the coordinates, and every tile starts at a multiple of 32 keys,
so the backward kernels (other tilings, other loop orders) replay exactly the forward's mask.

Up to a size they need not (``KEEP_BITS``, ``triton_support.DROPOUT_MASK_MAX_BYTES``): the forward also stores
each Philox call's eight keep decisions as one byte (bit ``2 i + e``) in ``KeepBits`` (``[B * H, Tq, 16 ceil(Tk
/ 128)]`` uint8, 1/16 of the bf16 score matrix; byte c of a row is call c), and dQ and dK/dV read them back
instead of drawing them twice more. A query's row of bytes is padded to whole 128-key tiles (KEEP_BITS_ROW_KEYS):
a tile's bytes are then aligned words inside the row, tested by row only, which the backward loops copy
asynchronously (cp.async) with their other tiles; unpadded, each thread stopped the loop for four single-byte
loads per tile. Philox on the CUDA cores is what in-kernel dropout costs, and the backward kernels would otherwise
run it twice (dQ and dK/dV are separate kernels). The bits of a tile the forward never visits (invisible to all
its rows) stay unwritten: the backward reads them only where the probabilities are exactly 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_support import DROPOUT_GROUP, PHILOX_ROUNDS

# The stored keep bits' rows cover the keys rounded up to this (the widest key tile of any candidate, which it
# must stay a multiple of): a row is a multiple of 16 bytes, every tile's bytes lie inside it.
KEEP_BITS_ROW_KEYS = tl.constexpr(128)
# The keys of four Philox calls, which the decisions interleave (see ``_in_key_order``): key tiles are multiples.
KEY_BLOCK = tl.constexpr(32)


@triton.jit
def _decisions(seed, query_index, calls, bh, threshold):
    """The keep decisions ``k<i><e>`` ``[len(query_index), calls]`` of Philox calls ``calls`` (``[1 or rows,
    calls]``) of each query: call c of query i has the counter (c, i, b * H + h, 0); output i's low (e = 0) or
    high (e = 1) 16-bit half is kept iff ``>= threshold``. The high half compares as ``r >= threshold * 65536``,
    with no shift."""
    r0, r1, r2, r3 = tl.philox(seed, calls, query_index[:, None], bh, 0, PHILOX_ROUNDS)
    limit = threshold.to(tl.uint32)
    high = limit << 16
    return (
        (r0 & 0xFFFF) >= limit, r0 >= high, (r1 & 0xFFFF) >= limit, r1 >= high,
        (r2 & 0xFFFF) >= limit, r2 >= high, (r3 & 0xFFFF) >= limit, r3 >= high,
    )  # fmt: skip


@triton.jit
def _tile_calls(start_n, BLOCK_N: tl.constexpr):
    """``[1, BLOCK_N // 8]``: the Philox calls of keys ``start_n .. start_n + BLOCK_N - 1`` (start_n a multiple of
    32), each query's; ``[rows, BLOCK_N // 8]`` where start_n is a tensor of them."""
    return tl.arange(0, BLOCK_N // DROPOUT_GROUP)[None, :] + start_n // DROPOUT_GROUP


@triton.jit
def _in_key_order(k00, k01, k10, k11, k20, k21, k30, k31, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[ROWS, BLOCK_N]`` of the eight per-call values ``k<i><e>`` (each ``[ROWS, BLOCK_N // 8]``): key ``32 b + 8
    i + 2 t + e`` of the tile takes ``k<i><e>`` of its call ``4 b + t``."""
    tl.static_assert(BLOCK_N // KEY_BLOCK * KEY_BLOCK == BLOCK_N, "key tiles must be multiples of 32 keys")
    w = tl.join(tl.join(tl.join(k00, k01), tl.join(k10, k11)), tl.join(tl.join(k20, k21), tl.join(k30, k31)))
    w = tl.reshape(w, [ROWS, BLOCK_N // KEY_BLOCK, 4, 2, 2, 2])  # [row, b, t, e, i % 2, i // 2]
    return tl.reshape(tl.permute(w, [0, 1, 5, 4, 2, 3]), [ROWS, BLOCK_N])


@triton.jit
def _zeros_laid_out_as(scores, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Zeros ``[ROWS, BLOCK_N // 8]``, one per Philox call of the tile, each taken from one of the call's keys in
    ``scores`` (``[ROWS, BLOCK_N]``, the accumulator's layout): ``x != x``, false for any finite or infinite
    score (a NaN, whose row's output is NaN anyway, would move its call). Added to the calls, they make Triton
    compute Philox in the layout the scores' thread order gives it (see ``dropout_keep_and_bits``)."""
    w = tl.permute(
        tl.reshape(scores, [ROWS, BLOCK_N // KEY_BLOCK, 4, 4, 2]), [0, 1, 3, 2, 4]
    )  # [row, b, t, i, e]
    w, _ = tl.split(tl.reshape(w, [ROWS, BLOCK_N // DROPOUT_GROUP, 4, 2]))  # e = 0
    w, _ = tl.split(tl.reshape(w, [ROWS, BLOCK_N // DROPOUT_GROUP, 2, 2]))  # i // 2 = 0
    one, _ = tl.split(w)  # i = 0
    return (one != one).to(tl.int32)


@triton.jit
def dropout_keep(seed, query_index, start_n, bh, threshold, BLOCK_N: tl.constexpr):
    """Keep decisions ``[len(query_index), BLOCK_N]`` of queries ``query_index`` against keys ``start_n ..
    start_n + BLOCK_N - 1`` (``start_n`` a multiple of 32), as the module's docstring draws them."""
    k00, k01, k10, k11, k20, k21, k30, k31 = _decisions(
        seed, query_index, _tile_calls(start_n, BLOCK_N), bh, threshold
    )
    return _in_key_order(k00, k01, k10, k11, k20, k21, k30, k31, query_index.shape[0], BLOCK_N)


@triton.jit
def dropout_keep_and_bits(seed, query_index, start_n, bh, threshold, scores, BLOCK_N: tl.constexpr):
    """``dropout_keep``'s decisions, and the same as bytes ``[len(query_index), BLOCK_N // 8]`` (int32) to store:
    bit ``2 i + e`` of a call's byte is ``k<i><e>``.

    The decisions have two users laid out differently: the probabilities (the accumulator's layout) and the store
    of the bytes (coalesced). Left alone, Triton computed Philox once for each, twice in all; with the calls
    tied to ``scores`` it computes Philox once, as the scores lie, and moves only the bytes (one per 8 keys) to
    the store's layout."""
    ROWS: tl.constexpr = query_index.shape[0]
    calls = _tile_calls(start_n + _zeros_laid_out_as(scores, ROWS, BLOCK_N), BLOCK_N)
    k00, k01, k10, k11, k20, k21, k30, k31 = _decisions(seed, query_index, calls, bh, threshold)
    keep = _in_key_order(k00, k01, k10, k11, k20, k21, k30, k31, ROWS, BLOCK_N)
    bits = k00.to(tl.int32) | (k01.to(tl.int32) << 1) | (k10.to(tl.int32) << 2) | (k11.to(tl.int32) << 3)
    bits |= (
        (k20.to(tl.int32) << 4) | (k21.to(tl.int32) << 5) | (k30.to(tl.int32) << 6) | (k31.to(tl.int32) << 7)
    )
    return keep, bits


@triton.jit
def keep_of_loaded_bits(b, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep decisions ``[ROWS, BLOCK_N]`` from the tile's bytes ``[ROWS, BLOCK_N // 8]`` (int32, as
    ``dropout_keep_and_bits`` makes them): key ``32 b + 8 i + 2 t + e`` takes byte ``4 b + t`` by broadcasting and
    reads its bit ``2 i + e``. Triton expands the bytes in the layout of the scores they meet, the forward's or
    the transposed one of dK/dV alike."""
    tl.static_assert(BLOCK_N // KEY_BLOCK * KEY_BLOCK == BLOCK_N, "key tiles must be multiples of 32 keys")
    calls = tl.reshape(b, [ROWS, BLOCK_N // KEY_BLOCK, 1, 4, 1])
    wide = tl.reshape(tl.broadcast_to(calls, [ROWS, BLOCK_N // KEY_BLOCK, 4, 4, 2]), [ROWS, BLOCK_N])
    column = tl.arange(0, BLOCK_N)
    bit = 1 << (((column >> 2) & 6) | (column & 1))
    return (wide & bit[None, :]) != 0


@triton.jit
def keep_bits_row_bytes(key_length):
    """Bytes per query row of the stored keep bits: the keys rounded up to a multiple of KEEP_BITS_ROW_KEYS."""
    return (key_length + KEEP_BITS_ROW_KEYS - 1) // KEEP_BITS_ROW_KEYS * (KEEP_BITS_ROW_KEYS // DROPOUT_GROUP)


@triton.jit
def keep_bits_pointers(KeepBits, query_index, start_n, key_length, query_length, BLOCK_N: tl.constexpr):
    """Addresses ``[len(query_index), BLOCK_N // 8]`` of the keep bytes of a tile in one head's rows, and which of
    them exist: the rows of existing queries. Every tile lies within the rows' padded length, so no column is
    tested, and the bytes of a row of a tile are contiguous and aligned: they load (and store) as words."""
    tl.static_assert(KEEP_BITS_ROW_KEYS % BLOCK_N == 0, "a key tile must divide KEEP_BITS_ROW_KEYS")
    groups = start_n // DROPOUT_GROUP + tl.arange(0, BLOCK_N // DROPOUT_GROUP)
    pointers = KeepBits + query_index[:, None] * keep_bits_row_bytes(key_length) + groups[None, :]
    return pointers, (query_index < query_length)[:, None]


@triton.jit
def stored_keep(KeepBits, query_index, start_n, key_length, query_length, BLOCK_N: tl.constexpr):
    """The forward's keep decisions ``[len(query_index), BLOCK_N]`` of a tile, read back from its bytes."""
    pointers, exists = keep_bits_pointers(KeepBits, query_index, start_n, key_length, query_length, BLOCK_N)
    return keep_of_loaded_bits(
        tl.load(pointers, mask=exists, other=0).to(tl.int32), query_index.shape[0], BLOCK_N
    )
