"""How one tensor is cut into tensor-parallel shards and put back together.

A tensor partitioned along ``dim`` with ``stride`` s over p ranks is cut into ``s * p`` equal chunks
along ``dim``; rank r keeps chunks ``r, r + p, ..., r + (s - 1) p`` in that order. ``stride=1`` is a
plain contiguous split. ``stride=3`` is the fused query/key/value weight: the full ``[Q; K; V]`` rows
become ``[Q_r; K_r; V_r]`` on rank r, so each rank holds its own heads' queries, keys and values.
The parallel layers initialize their master weights through ``shard`` and the checkpoint converter
uses both functions, so the layout is defined here only.
"""

from __future__ import annotations

import torch


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """``numerator / denominator``, which must be exact."""
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by {denominator}")
    return numerator // denominator


def shard(full: torch.Tensor, dim: int, rank: int, world_size: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` (a view when ``stride`` is 1)."""
    if full.shape[dim] % (stride * world_size):
        raise ValueError(
            f"dimension {dim} of size {full.shape[dim]} cannot be split into "
            f"{stride} x {world_size} equal chunks"
        )
    mine = full.chunk(stride * world_size, dim=dim)[rank::world_size]
    return mine[0] if stride == 1 else torch.cat(mine, dim=dim)


def unshard(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from all ranks' shards (the inverse of ``shard``)."""
    world_size = len(shards)
    sizes = {tuple(s.shape) for s in shards}
    if len(sizes) != 1 or shards[0].shape[dim] % stride:
        raise ValueError(
            f"shards of shapes {[tuple(s.shape) for s in shards]} cannot be merged along dimension "
            f"{dim} with stride {stride}: they must be equal and divisible by the stride"
        )
    if stride == 1:
        return torch.cat(shards, dim=dim)
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[rank][i] for i in range(stride) for rank in range(world_size)], dim=dim)
