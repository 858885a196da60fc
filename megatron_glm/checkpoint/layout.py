"""THUDM/GLM's weight layout: which keys exist, how each is split over tensor ranks, how the pipeline
stages name them, and how the vocabulary is padded.

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
modules maps its names onto these keys (``pipeline_key_to_thudm``); the rules then apply unchanged.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from megatron_glm.checkpoint.files import CheckpointError
from megatron_glm.log import get_logger
from megatron_glm.parallel.sharding import shard, unshard

logger = get_logger("checkpoint")

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


def shard_shape(full: tuple[int, ...], key: str, world_size: int) -> tuple[int, ...]:
    """The shape of one rank's shard of ``key`` given the full shape (the sizes must divide)."""
    partition = partition_of(key)
    shape = list(full)
    if not partition.replicated:
        shape[partition.dim] //= world_size
    return tuple(shape)


def pipeline_key_to_thudm(pipeline_key: str, num_layers: int) -> str:
    """The THUDM key of a state-dict key of our DeepSpeed ``PipelineModule`` (``training/pipeline.py``).

    Its layer list is: 0 word embeddings (tied with L+3, the output head), 1 position tables,
    2..L+1 the transformer layers, L+2 the final LayerNorm. DeepSpeed names a stage's layers by their
    global index and keeps tied modules under ``tied_modules.<tie key>.``.
    """
    head, _, rest = pipeline_key.partition(".")
    if head == "tied_modules":
        return rest.partition(".")[2]
    index = int(head)
    if index == 1 or index == num_layers + 2:
        return "transformer." + rest
    if 2 <= index <= num_layers + 1:
        return f"transformer.layers.{index - 2}.{rest}"
    return rest


_LAYER_KEY = re.compile(r"transformer\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the weights themselves say about the model (the head count is not among it)."""

    num_layers: int
    hidden_size: int
    vocab_rows: int  # the padded embedding table
    max_position_embeddings: int
    block_position_encoding: bool


def model_shape(shapes: dict[str, tuple[int, ...]], where: str) -> ModelShape:
    """The ``ModelShape`` of a full (MP=1) THUDM state dict given as ``{key: shape}``."""
    if WORD_EMBEDDINGS not in shapes or "transformer.position_embeddings.weight" not in shapes:
        raise CheckpointError(
            f"{where}: no {WORD_EMBEDDINGS} / transformer.position_embeddings.weight: not a GLM language "
            "model state dict with THUDM/GLM's keys"
        )
    layers = {int(m.group(1)) for key in shapes if (m := _LAYER_KEY.match(key))}
    if layers != set(range(len(layers))):
        raise CheckpointError(f"{where}: transformer layers {sorted(layers)} are not 0..{len(layers) - 1}")
    block = "transformer.block_position_embeddings.weight" in shapes
    rows = shapes["transformer.position_embeddings.weight"][0]
    vocab, hidden = shapes[WORD_EMBEDDINGS]
    return ModelShape(len(layers), hidden, vocab, rows - 1 if block else rows, block)


def expected_keys(num_layers: int, block_position_encoding: bool = True) -> list[str]:
    """Every key of THUDM's ``GLMModel`` state dict, in its order."""
    keys = [WORD_EMBEDDINGS, "transformer.position_embeddings.weight"]
    if block_position_encoding:
        keys.append("transformer.block_position_embeddings.weight")
    per_layer = [
        "input_layernorm.weight",
        "input_layernorm.bias",
        "attention.query_key_value.weight",
        "attention.query_key_value.bias",
        "attention.dense.weight",
        "attention.dense.bias",
        "post_attention_layernorm.weight",
        "post_attention_layernorm.bias",
        "mlp.dense_h_to_4h.weight",
        "mlp.dense_h_to_4h.bias",
        "mlp.dense_4h_to_h.weight",
        "mlp.dense_4h_to_h.bias",
    ]
    for i in range(num_layers):
        keys += [f"transformer.layers.{i}.{name}" for name in per_layer]
    return keys + ["transformer.final_layernorm.weight", "transformer.final_layernorm.bias"]


def check_tensor_parallel_size(
    shape: ModelShape, num_attention_heads: int | None, size: int, where: str
) -> None:
    """Raise unless a model of ``shape`` can be split over ``size`` tensor ranks (heads, 4h, vocab rows)."""
    problems = []
    if num_attention_heads is not None and num_attention_heads % size:
        problems.append(f"{num_attention_heads} attention heads")
    if (4 * shape.hidden_size) % size or shape.hidden_size % size:
        problems.append(f"hidden size {shape.hidden_size}")
    if shape.vocab_rows % size:
        problems.append(f"{shape.vocab_rows} vocabulary rows")
    if problems:
        raise CheckpointError(
            f"{where}: model-parallel size {size} does not divide {' and '.join(problems)}; choose a size "
            "that divides them"
        )


def fit_vocab(table: torch.Tensor, rows: int, max_parallel: int, multiple: int, where: str) -> torch.Tensor:
    """Pad (zeros) or trim the embedding table when two sides padded the same vocabulary differently.

    Each side rounds the tokenizer's size up to ``multiple x its parallel size``, so two paddings of one
    vocabulary differ by less than ``multiple x max(sizes)`` rows, all of them beyond the tokenizer.
    """
    have = table.shape[0]
    if have == rows:
        return table
    if abs(have - rows) >= multiple * max_parallel:
        raise CheckpointError(
            f"{where}: {WORD_EMBEDDINGS} has {have} rows, the model {rows}: more than padding apart, so the "
            "checkpoint was trained with another vocabulary; set model.tokenizer (or model.vocab_size) to match"
        )
    if have < rows:
        logger.info(
            "%s: %d rows in the checkpoint, %d in the model: padding rows %d..%d with zeros",
            WORD_EMBEDDINGS,
            have,
            rows,
            have,
            rows - 1,
        )
        return torch.cat([table, table.new_zeros(rows - have, table.shape[1])])
    logger.info(
        "%s: %d rows in the checkpoint, %d in the model: dropping padding rows %d..%d",
        WORD_EMBEDDINGS,
        have,
        rows,
        rows,
        have - 1,
    )
    return table[:rows]
