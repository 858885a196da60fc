"""Read and write model weights in THUDM/GLM's layout (``mp_rank_XX_model_states.pt`` under ``'module'``).

Loading re-shards: the k source shards of each tensor are merged into the full tensor by the rules of
``layout`` (interleaving query/key/value thirds like THUDM's ``change_mp.py``) and this rank's shard is
cut from it, so any k loads into any tensor-parallel size. Source files are memory-mapped, so reading
all k of them costs little memory. ``write_module_file`` is the one writer of THUDM-layout files; the
trainer (``write_training_weights``), ``save_thudm_checkpoint`` and ``glm-convert`` all go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from megatron_glm.checkpoint.files import (
    WEIGHTS_SUBDIR,
    CheckpointError,
    find_checkpoint_files,
    load_torch_file,
    release_pages,
    save_torch_atomic,
    shard_file_name,
    staged,
    write_trackers,
)
from megatron_glm.checkpoint.layout import (
    WORD_EMBEDDINGS,
    ModelShape,
    fit_vocab,
    full_shape,
    merge_shards,
    model_shape,
    partition_of,
    pipeline_key_to_thudm,
    split_tensor,
)
from megatron_glm.checkpoint.streaming import TensorPlan, write_torch_file
from megatron_glm.log import get_logger
from megatron_glm.parallel import state

logger = get_logger("checkpoint")


def read_module_state(path: str | Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """The model state dict of one file: its ``'module'`` entry, or the file itself when it is a bare state dict."""
    path = Path(path)
    content = load_torch_file(path, trust=trust)
    module = content.get("module", content) if isinstance(content, dict) else None
    if not isinstance(module, dict) or not all(isinstance(v, torch.Tensor) for v in module.values()):
        raise CheckpointError(
            f"{path}: expected a state dict of tensors or a dict with a 'module' state dict"
        )
    return module


class ThudmShards:
    """The k model-parallel files of a THUDM-layout checkpoint, opened lazily (memory-mapped).

    ``full(key)`` merges one tensor at a time, so converting a model holds one full tensor beyond the
    mapped files.
    """

    def __init__(self, path: str | Path, *, trust: bool = False):
        self.files = find_checkpoint_files(path)
        self.sources = [read_module_state(f, trust=trust) for f in self.files]
        self.where = (
            str(self.files[0])
            if len(self.files) == 1
            else f"{len(self.files)} files in {self.files[0].parent}"
        )
        first = list(self.sources[0])
        for file, source in zip(self.files[1:], self.sources[1:]):
            if list(source) != first:
                missing = [k for k in first if k not in source][:4]
                extra = [k for k in source if k not in self.sources[0]][:4]
                raise CheckpointError(
                    f"{file}: its keys differ from {self.files[0]} (missing {missing}, extra {extra}); the "
                    "shard files come from different checkpoints"
                )

    @property
    def model_parallel_size(self) -> int:
        return len(self.files)

    def keys(self) -> list[str]:
        return list(self.sources[0])

    def full(self, key: str) -> torch.Tensor:
        """The full tensor of ``key``, in memory of its own: the mapped source pages are released."""
        shards = [source[key] for source in self.sources]
        try:
            full = merge_shards(shards, key)
        except ValueError as exc:
            raise CheckpointError(f"{key} in {self.where}: {exc}") from exc
        if any(full.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in shards):
            full = full.clone()  # replicated, or one source file: the merge is the mapped shard itself
        for shard in shards:
            release_pages(shard)
        return full

    def full_shape(self, key: str) -> tuple[int, ...]:
        return full_shape(self.sources[0][key].shape, key, len(self.files))

    def dtype(self, key: str) -> torch.dtype:
        return self.sources[0][key].dtype

    def shape(self) -> ModelShape:
        return model_shape({k: self.full_shape(k) for k in self.keys()}, self.where)


def check_keys(
    expected: list[str], found: list[str], where: str | Path, allow_unexpected: bool = False
) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [] if allow_unexpected else [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(
            f"{where}: {' and '.join(parts)}. Expected the keys of THUDM/GLM's GLMModel for this config "
            "(word_embeddings.weight, transformer.*); finetuned checkpoints with 'model.' prefixes or extra "
            "heads must be reduced to the language model's keys first"
        )


@torch.no_grad()
def load_thudm_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    thudm_key: Callable[[str], str] | None = None,
    vocab_multiple: int | None = None,
    trust: bool = False,
) -> None:
    """Load THUDM-layout weights (any model-parallel size) into ``model`` (any tensor-parallel size).

    ``model`` is a ``GLMModel`` (its keys are THUDM's) or a part of one, such as a pipeline stage, whose
    parameter names ``thudm_key`` maps to THUDM keys; a part takes its keys and ignores the others.
    ``vocab_multiple`` is the model's vocab padding multiple (default: ``model.config``'s). ``trust``
    allows files holding types beyond the allowlist (see ``files.load_torch_file``).
    """
    shards = ThudmShards(path, trust=trust)
    own = model.state_dict()
    names = {key: thudm_key(key) if thudm_key else key for key in own}
    check_keys(list(names.values()), shards.keys(), shards.files[0], allow_unexpected=thudm_key is not None)
    if vocab_multiple is None:
        vocab_multiple = model.config.make_vocab_size_divisible_by
    rank, world_size = state.get_tensor_parallel_rank(), state.get_tensor_parallel_world_size()
    for own_key, param in own.items():
        key = names[own_key]
        full = shards.full(key)
        expected = full_shape(param.shape, key, world_size)
        if key == WORD_EMBEDDINGS:
            max_parallel = max(shards.model_parallel_size, world_size)
            full = fit_vocab(full, expected[0], max_parallel, vocab_multiple, str(shards.files[0]))
        if tuple(full.shape) != expected:
            raise CheckpointError(
                f"{key}: shape {tuple(full.shape)} in {shards.where}, the model expects {expected} "
                f"(hidden size, layer count or position table size differ)"
            )
        param.copy_(split_tensor(full, key, rank, world_size))
    logger.info("loaded %s into tensor-parallel rank %d of %d", shards.where, rank, world_size)


def stream_module_file(
    path: Path,
    plans: list[TensorPlan],
    produce: Callable[[str], torch.Tensor],
    model_parallel_size: int,
    progress: tqdm | None = None,
) -> None:
    """Write one THUDM-layout file (``{"module": ..., "mp_world_size": ...}``) atomically, producing and
    writing one tensor at a time (``produce(plan.name)``), so its size never has to fit in memory."""
    with staged(path) as tmp:
        write_torch_file(
            tmp,
            plans,
            produce,
            wrap=lambda module: {"module": module, "mp_world_size": model_parallel_size},
            progress=progress,
        )


def write_module_file(path: Path, module: dict[str, torch.Tensor], model_parallel_size: int) -> None:
    """Write one THUDM-layout file from a state dict (any device: each tensor is copied to the host in turn)."""
    plans = [TensorPlan(key, tuple(tensor.shape), tensor.dtype) for key, tensor in module.items()]
    stream_module_file(path, plans, lambda key: module[key].detach().cpu(), model_parallel_size)


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
    model: nn.Module, save_dir: str | Path, *, tag: str = "release", merge: bool = True
) -> Path:
    """Write ``model`` (a ``GLMModel``) in THUDM's layout with both tracker files; returns the tag directory.

    ``merge=True`` writes one MP=1 file (each full tensor is gathered, moved to the CPU and kept only on
    tensor rank 0), ``merge=False`` one file per tensor rank. Every rank of the world must call it;
    data-parallel rank 0 writes.
    """
    save_dir = Path(save_dir)
    tag_dir = save_dir / tag
    rank, world_size = state.get_tensor_parallel_rank(), state.get_tensor_parallel_world_size()
    writer = state.get_data_parallel_rank() == 0
    files: dict[int, dict[str, torch.Tensor]] = {}
    if merge:
        module = {}
        for key, tensor in model.state_dict().items():
            full = _gather_full(key, tensor)
            if rank == 0:
                module[key] = full.cpu()
        if rank == 0:
            files[0] = module
        model_parallel = 1
    else:
        files[rank] = model.state_dict()
        model_parallel = world_size
    if writer:
        tag_dir.mkdir(parents=True, exist_ok=True)
        for file_rank, module in files.items():
            write_module_file(tag_dir / shard_file_name(file_rank), module, model_parallel)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if writer and rank == 0:
        write_trackers(save_dir, tag)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return tag_dir


@torch.no_grad()
def write_training_weights(
    module: nn.Module, checkpoint_dir: Path, *, pipeline: bool, num_layers: int
) -> None:
    """Write ``<checkpoint_dir>/thudm/mp_rank_XX_model_states.pt`` (THUDM keys, one file per tensor rank) for
    a pipeline-parallel or ZeRO-3 training module; a collective over the whole world.

    Pipeline: each stage of the first data-parallel replica writes its part to disk and the first stage
    merges the parts (nothing travels through GPU memory). ZeRO-3: every rank of a data-parallel group
    gathers each module's partitions; only data-parallel rank 0 keeps a host copy and writes.
    """
    directory = checkpoint_dir / WEIGHTS_SUBDIR
    tp_rank, tp_size = state.get_tensor_parallel_rank(), state.get_tensor_parallel_world_size()
    final = directory / shard_file_name(tp_rank)
    writer = state.get_data_parallel_rank() == 0
    if pipeline:
        if not writer:  # replicas hold the same weights; one pipeline writes them
            return
        stage = state.get_pipeline_parallel_rank()
        part = final.with_name(f"{final.name}.stage{stage}")
        directory.mkdir(exist_ok=True)
        stage_state = {pipeline_key_to_thudm(k, num_layers): v for k, v in module.state_dict().items()}
        save_torch_atomic({key: tensor.detach().cpu() for key, tensor in stage_state.items()}, part)
        dist.barrier(group=state.get_pipeline_parallel_group())
        if stage != 0:
            return
        merged: dict[str, torch.Tensor] = {}
        parts = [
            final.with_name(f"{final.name}.stage{s}") for s in range(state.get_pipeline_parallel_world_size())
        ]
        for path in parts:
            merged.update(load_torch_file(path))
        write_module_file(final, merged, tp_size)
        for path in parts:
            path.unlink()
        return
    import deepspeed

    full: dict[str, torch.Tensor] = {}
    for prefix, child in module.named_modules():
        params = list(child.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if writer:
                for name, param in params:
                    full[f"{prefix}.{name}" if prefix else name] = param.detach().cpu().clone()
    if writer:
        directory.mkdir(exist_ok=True)
        write_module_file(final, full, tp_size)
