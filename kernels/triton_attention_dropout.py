"""In-kernel dropout of the GLM attention's probabilities: the keep decisions, drawn from Philox or read back
from the bits the forward stored. Called by the kernels of ``triton_attention_kernels``.

Dropout: one Philox call (``tl.philox``, 7 rounds, keyed by the seed) with the counter ``(j // 8, i, b * H + h,
0)`` yields four 32-bit numbers, i.e. eight 16-bit uniforms: the keep decisions of query i against keys
``8 * (j // 8) .. 8 * (j // 8) + 7``. Key j takes uniform ``rev3(j % 8)``, its three bits reversed: the order in
which ``tl.join`` interleaves the eight. A key is kept iff its uniform is ``>= round(p * 65536)``, so p is
quantized to 1/65536 as in ``kernels.dropout``. Philox is the costly part of in-kernel dropout (one 10-round
call per element cost several times the tile's two matmuls); eight elements per call with 7 rounds (Philox4x32-7,
the fewest rounds Salmon et al. 2011 found to pass BigCrush, as FlashAttention uses) cut it ~11x. The mask
depends on nothing but the seed and the coordinates, and every tile starts at a multiple of 8 keys, so the
backward kernels (other tilings, other loop orders) can replay exactly the forward's mask.

Up to a size they need not (``KEEP_BITS``, ``triton_support.DROPOUT_MASK_MAX_BYTES``): the forward also stores
each Philox call's eight keep decisions as one byte (bit ``rev3(j % 8)`` for key j) in ``KeepBits`` (``[B * H,
Tq, 16 ceil(Tk / 128)]`` uint8, 1/16 of the bf16 score matrix), and dQ and dK/dV read them back instead of drawing
them twice more. A query's row of bytes is padded to whole 128-key tiles (KEEP_BITS_ROW_KEYS): a tile's bytes are
then aligned words inside the row, tested by row only, which the backward loops copy asynchronously (cp.async)
with their other tiles; unpadded, each thread stopped the loop for four single-byte loads per tile. Philox on the
CUDA cores is what in-kernel dropout costs, and the backward kernels would otherwise run it twice (dQ and dK/dV are separate kernels). The bits of a tile the forward never visits
(invisible to all its rows) stay unwritten: the backward reads them only where the probabilities are exactly 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_support import DROPOUT_GROUP, PHILOX_ROUNDS, philox_uniforms16

# The stored keep bits' rows cover the keys rounded up to this (the widest key tile of any candidate, which it
# must stay a multiple of): a row is a multiple of 16 bytes, every tile's bytes lie inside it.
KEEP_BITS_ROW_KEYS = tl.constexpr(128)


@triton.jit
def dropout_keep(seed, query_index, start_n, bh, threshold, BLOCK_N: tl.constexpr):
    """Keep decisions ``[len(query_index), BLOCK_N]`` of queries ``query_index`` against keys ``start_n ..
    start_n + BLOCK_N - 1`` (``start_n`` a multiple of 8): one Philox call per query and group of 8 keys,
    counter (key group, query, b * H + h, 0), its outputs split into eight 16-bit uniforms; a key is kept
    iff its uniform is ``>= threshold`` (``round(p * 65536)``)."""
    groups = start_n // DROPOUT_GROUP + tl.arange(0, BLOCK_N // DROPOUT_GROUP)
    uniforms = philox_uniforms16(seed, groups[None, :], query_index[:, None], bh)
    return tl.reshape(uniforms, [query_index.shape[0], BLOCK_N]) >= threshold


@triton.jit
def _keep_bit(uniform, threshold, BIT: tl.constexpr):
    return (uniform.to(tl.int32, bitcast=True) >= threshold).to(tl.int32) << BIT


@triton.jit
def dropout_bits(seed, query_index, start_n, bh, threshold, BLOCK_N: tl.constexpr):
    """``dropout_keep``'s decisions as bytes ``[len(query_index), BLOCK_N // 8]`` (int32): bit n of one is the
    decision from uniform n of the group's Philox call, which is key ``8 * group + rev3(n)``."""
    groups = start_n // DROPOUT_GROUP + tl.arange(0, BLOCK_N // DROPOUT_GROUP)
    r0, r1, r2, r3 = tl.philox(seed, groups[None, :], query_index[:, None], bh, 0, PHILOX_ROUNDS)
    low = 0xFFFF
    bits = _keep_bit(r0 & low, threshold, 0) | _keep_bit(r0 >> 16, threshold, 1)
    bits |= _keep_bit(r1 & low, threshold, 2) | _keep_bit(r1 >> 16, threshold, 3)
    bits |= _keep_bit(r2 & low, threshold, 4) | _keep_bit(r2 >> 16, threshold, 5)
    bits |= _keep_bit(r3 & low, threshold, 6) | _keep_bit(r3 >> 16, threshold, 7)
    return bits


@triton.jit
def keep_of_bits(b, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep decisions ``[ROWS, BLOCK_N]`` from their bytes ``[ROWS, BLOCK_N // 8]`` (int32): bit n of a byte is
    key ``8 * group + rev3(n)``, in the join order of ``triton_support.philox_uniforms16``."""
    low = tl.join(tl.join(b & 1, b & 2), tl.join(b & 4, b & 8))
    high = tl.join(tl.join(b & 16, b & 32), tl.join(b & 64, b & 128))
    return tl.reshape(tl.join(low, high), [ROWS, BLOCK_N]) != 0


@triton.jit
def keep_of_loaded_bits(b, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``keep_of_bits`` for bytes loaded from memory: each key takes its group's byte by broadcasting and reads
    bit rev3(j % 8) of it (rev3 is its own inverse). Triton then expands the loaded bytes directly in the layout
    of the scores, where the joins of ``keep_of_bits`` would leave a [ROWS, BLOCK_N] mask to move through shared
    memory. (Not for bytes just computed from Philox: Triton would recompute Philox in that layout, 4x.)"""
    groups: tl.constexpr = BLOCK_N // DROPOUT_GROUP
    wide = tl.reshape(tl.broadcast_to(b[:, :, None], [ROWS, groups, DROPOUT_GROUP]), [ROWS, BLOCK_N])
    column = tl.arange(0, BLOCK_N) % DROPOUT_GROUP
    bit = ((column & 1) << 2) | (column & 2) | (column >> 2)
    return ((wide >> bit[None, :]) & 1) != 0


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
