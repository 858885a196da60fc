"""Read and write model weights in THUDM/GLM's checkpoint layout, at any tensor-parallel size.

On disk (THUDM/GLM, also what DeepSpeed writes)::

    <save_dir>/latest_checkpointed_iteration.txt     the tag, e.g. "release" or "150000"
    <save_dir>/latest                                 the same tag (DeepSpeed's tracker)
    <save_dir>/<tag>/mp_rank_00_model_states.pt       {"module": state dict of model-parallel rank 0, ...}
    <save_dir>/<tag>/mp_rank_01_model_states.pt       ...

A source may be such a directory, a tag directory holding ``mp_rank_XX_model_states.pt`` files, or one
file (an MP=1 ``mp_rank_00_model_states.pt`` or a bare state dict such as ``pytorch_model.bin``).
Loading re-shards: the k source shards of each tensor are merged into the full tensor by the rules of
``checkpoint_layout`` (interleaving query/key/value thirds like ``change_mp.py``) and this rank's
shard is cut from it, so any k loads into any tensor-parallel size. Source files are memory-mapped
when their format allows, so reading all k of them costs little memory.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.log import get_logger
from megatron_glm.model.checkpoint_layout import (
    WORD_EMBEDDINGS,
    full_shape,
    merge_shards,
    partition_of,
    split_tensor,
)
from megatron_glm.model.glm import GLMModel
from megatron_glm.parallel import state

logger = get_logger("checkpoint")

TRACKER_FILES = ("latest_checkpointed_iteration.txt", "latest")
# Where glm-pretrain puts THUDM-layout weights inside a checkpoint whose DeepSpeed files are not in that
# layout (pipeline-parallel: per-layer files; ZeRO-3: partitioned parameters).
WEIGHTS_SUBDIR = "thudm"
_SHARD_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")


class CheckpointError(Exception):
    """A checkpoint that cannot be read into this model; the message names the file and the key."""


def shard_file_name(tensor_rank: int) -> str:
    return f"mp_rank_{tensor_rank:02d}_model_states.pt"


def find_checkpoint_files(path: str | Path) -> list[Path]:
    """The source files in model-parallel rank order (see the module docstring for accepted paths)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    for tracker in TRACKER_FILES:
        if (path / tracker).is_file() and not any(_SHARD_FILE.fullmatch(p.name) for p in path.iterdir()):
            tag = (path / tracker).read_text().strip()
            if not (path / tag).is_dir():
                raise CheckpointError(f"{path / tracker} names tag {tag!r}, but {path / tag} does not exist")
            path = path / tag
            break
    if (path / WEIGHTS_SUBDIR).is_dir():
        path = path / WEIGHTS_SUBDIR
    ranks = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _SHARD_FILE.fullmatch(p.name)))
    if not ranks:
        raise CheckpointError(
            f"{path}: no mp_rank_XX_model_states.pt files (and no tracker file naming a tag "
            f"directory that has them)"
        )
    if [r for r, _ in ranks] != list(range(len(ranks))):
        raise CheckpointError(
            f"{path}: model-parallel ranks {[r for r, _ in ranks]} are not 0..{len(ranks) - 1}; "
            "a shard file is missing"
        )
    return [p for _, p in ranks]


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        # Files in the legacy (pre-zip) format cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True)


def read_module_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of one file: its ``'module'`` entry, or the file itself when it is a bare state dict."""
    path = Path(path)
    try:
        content = _torch_load(path)
    except pickle.UnpicklingError:
        # THUDM/DeepSpeed saves also pickle RNG states and scheduler objects, which weights_only refuses.
        logger.warning(
            "%s holds more than tensors; loading it with full unpickling (only load trusted files)", path
        )
        content = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint: {exc}") from exc
    module = content.get("module", content) if isinstance(content, dict) else None
    if not isinstance(module, dict) or not all(isinstance(v, torch.Tensor) for v in module.values()):
        raise CheckpointError(
            f"{path}: expected a state dict of tensors or a dict with a 'module' state dict"
        )
    return module


def _check_keys(expected: list[str], found: dict, path: Path, allow_unexpected: bool = False) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [] if allow_unexpected else [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(
            f"{path}: {' and '.join(parts)}. Expected the keys of THUDM/GLM's GLMModel for this config "
            "(word_embeddings.weight, transformer.*); finetuned checkpoints with 'model.' prefixes or extra "
            "heads must be reduced to the language model's keys first"
        )


def _fit_vocab(
    table: torch.Tensor,
    rows: int,
    model_parallel: int,
    tensor_parallel: int,
    multiple: int,
    files: list[Path],
) -> torch.Tensor:
    """Pad (zeros) or trim the embedding table when the two sides padded the same vocabulary differently.

    Each side rounds the tokenizer's size up to ``multiple x its parallel size``, so two paddings of one
    vocabulary differ by less than ``multiple x max(sizes)`` rows, all of them beyond the tokenizer.
    """
    have = table.shape[0]
    if have == rows:
        return table
    if abs(have - rows) >= multiple * max(model_parallel, tensor_parallel):
        raise CheckpointError(
            f"{files[0]}: {WORD_EMBEDDINGS} has {have} rows, the model {rows}: more than padding apart, so the "
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


@torch.no_grad()
def load_thudm_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    thudm_key: Callable[[str], str] | None = None,
    vocab_multiple: int | None = None,
) -> None:
    """Load THUDM-layout weights (any model-parallel size) into ``model`` (any tensor-parallel size).

    ``model`` is a ``GLMModel`` (its keys are THUDM's) or a part of one, such as a pipeline stage, whose
    parameter names ``thudm_key`` maps to THUDM keys; a part takes its keys and ignores the others.
    ``vocab_multiple`` is the model's vocab padding multiple (default: ``model.config``'s).
    """
    files = find_checkpoint_files(path)
    sources = [read_module_state(f) for f in files]
    own = model.state_dict()
    names = {key: thudm_key(key) if thudm_key else key for key in own}
    for file, source in zip(files, sources):
        _check_keys(list(names.values()), source, file, allow_unexpected=thudm_key is not None)
    if vocab_multiple is None:
        vocab_multiple = model.config.make_vocab_size_divisible_by
    rank, world_size = state.get_tensor_parallel_rank(), state.get_tensor_parallel_world_size()
    for own_key, param in own.items():
        key = names[own_key]
        shards = [source[key] for source in sources]
        try:
            full = merge_shards(shards, key)
        except ValueError as exc:
            raise CheckpointError(f"{key} in {files[0].parent}: {exc}") from exc
        expected = full_shape(param.shape, key, world_size)
        if key == WORD_EMBEDDINGS:
            full = _fit_vocab(full, expected[0], len(files), world_size, vocab_multiple, files)
        if tuple(full.shape) != expected:
            where = files[0] if len(files) == 1 else f"{len(files)} files in {files[0].parent}"
            raise CheckpointError(
                f"{key}: shape {tuple(full.shape)} in {where}, the model expects {expected} "
                f"(hidden size, layer count or position table size differ)"
            )
        param.copy_(split_tensor(full, key, rank, world_size))
    logger.info(
        "loaded %s (%d model-parallel file(s)) into tensor-parallel rank %d of %d",
        files[0].parent if len(files) > 1 else files[0],
        len(files),
        rank,
        world_size,
    )


def _gather_full(key: str, local: torch.Tensor) -> torch.Tensor:
    """The full tensor of ``key`` on every tensor rank (a collective over the tensor-parallel group)."""
    world_size = state.get_tensor_parallel_world_size()
    if world_size == 1 or partition_of(key).replicated:
        return local
    local = local.contiguous()
    shards = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(shards, local, group=state.get_tensor_parallel_group())
    return merge_shards(shards, key)


@torch.no_grad()
def save_thudm_checkpoint(
    model: GLMModel, save_dir: str | Path, *, tag: str = "release", merge: bool = True
) -> Path:
    """Write ``model`` in THUDM's layout; returns the tag directory.

    ``merge=True`` writes one MP=1 file (the tensor ranks gather every shard to rank 0), ``merge=False``
    one file per tensor rank. Every rank of the world must call it; data-parallel rank 0 writes.
    """
    tag_dir = Path(save_dir) / tag
    rank, world_size = state.get_tensor_parallel_rank(), state.get_tensor_parallel_world_size()
    writer = state.get_data_parallel_rank() == 0
    own = model.state_dict()
    if merge:
        module = {key: _gather_full(key, tensor) for key, tensor in own.items()}
        files = {0: module} if rank == 0 else {}
        model_parallel = 1
    else:
        files = {rank: own}
        model_parallel = world_size
    if writer:
        tag_dir.mkdir(parents=True, exist_ok=True)
        for file_rank, module in files.items():
            torch.save(
                {"module": module, "mp_world_size": model_parallel}, tag_dir / shard_file_name(file_rank)
            )
        if rank == 0:
            for tracker in TRACKER_FILES:
                (Path(save_dir) / tracker).write_text(tag)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return tag_dir
