"""THUDM/GLM's weight layout: the one place that says how each parameter is split over tensor ranks.

Our parameter names are the reference's state-dict keys, so the name mapping is the identity: at
tensor-parallel size 1, ``GLMModel.state_dict()`` is a THUDM ``'module'`` dict. At size p each rank
holds a shard, cut as THUDM's ``mpu`` layers (and ``change_mp.py``) cut it:

| key (suffix)                                   | shard on rank r of p                                |
|------------------------------------------------|-----------------------------------------------------|
| ``word_embeddings.weight``                     | rows ``[r V/p, (r+1) V/p)`` (contiguous vocab range) |
| ``attention.query_key_value.weight`` / ``.bias`` | rows ``[Q_r; K_r; V_r]``: dim 0, stride 3           |
| ``mlp.dense_h_to_4h.weight`` / ``.bias``       | dim 0, contiguous                                    |
| ``attention.dense.weight``                     | dim 1, contiguous                                    |
| ``mlp.dense_4h_to_h.weight``                   | dim 1, contiguous                                    |
| everything else (position tables, LayerNorms, ``attention.dense.bias``, ``mlp.dense_4h_to_h.bias``) | replicated |

"Stride 3" means: cut the ``[Q; K; V]`` rows into 3p chunks and keep chunks r, r+p, r+2p; merging
interleaves the thirds of every shard back (``change_mp.py``'s rule). A pipeline wrapper that renames
modules maps its names onto these keys by prefix (the embedding stage's tables are ``word_embeddings``
and ``transformer.{block_,}position_embeddings``, layer i is ``transformer.layers.{i}``, the last stage
has ``transformer.final_layernorm``); the rules then apply unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_glm.parallel.sharding import shard, unshard

WORD_EMBEDDINGS = "word_embeddings.weight"


@dataclasses.dataclass(frozen=True)
class Partition:
    """How a tensor is split: along ``dim`` (None: replicated) with ``stride`` (see parallel.sharding)."""

    dim: int | None
    stride: int = 1

    @property
    def replicated(self) -> bool:
        return self.dim is None


REPLICATED = Partition(None)

_RULES: tuple[tuple[str, Partition], ...] = (
    (WORD_EMBEDDINGS, Partition(0)),
    ("attention.query_key_value.weight", Partition(0, stride=3)),
    ("attention.query_key_value.bias", Partition(0, stride=3)),
    ("mlp.dense_h_to_4h.weight", Partition(0)),
    ("mlp.dense_h_to_4h.bias", Partition(0)),
    ("attention.dense.weight", Partition(1)),
    ("mlp.dense_4h_to_h.weight", Partition(1)),
)


def partition_of(key: str) -> Partition:
    """The partition of THUDM key ``key`` (matched by suffix, so prefixed names work too)."""
    for suffix, partition in _RULES:
        if key == suffix or key.endswith("." + suffix):
            return partition
    return REPLICATED


def split_tensor(full: torch.Tensor, key: str, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s shard of the full tensor stored under ``key``."""
    partition = partition_of(key)
    if partition.replicated:
        return full
    return shard(full, partition.dim, rank, world_size, partition.stride)


def merge_shards(shards: list[torch.Tensor], key: str) -> torch.Tensor:
    """The full tensor of ``key`` from every rank's shard (replicated tensors: the first shard)."""
    partition = partition_of(key)
    if partition.replicated:
        return shards[0]
    return unshard(shards, partition.dim, partition.stride)


def full_shape(local_shape: torch.Size, key: str, world_size: int) -> tuple[int, ...]:
    """The unsharded shape of ``key`` given one rank's shard shape."""
    partition = partition_of(key)
    shape = list(local_shape)
    if not partition.replicated:
        shape[partition.dim] *= world_size
    return tuple(shape)
