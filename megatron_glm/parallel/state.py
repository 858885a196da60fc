"""Parallel state: the process groups of tensor, pipeline and data parallelism, and the RNG tracker.

This is the one module of the project with mutable global state. ``initialize_parallel`` splits the
world into a grid with the rank order of DeepSpeed's ``PipeModelDataParallelTopology(num_pp, num_mp,
num_dp)`` (axes pipe, data, model; the last varies fastest)::

    global_rank = pipeline_rank * (dp * tp) + data_rank * tp + tensor_rank

so tensor-parallel ranks are consecutive (they share a node's fast links), then data-parallel
replicas, then pipeline stages. The training engine hands DeepSpeed the same topology, so both agree
on who is who. Without ``torch.distributed`` (a single process) ``initialize_parallel(1, 1)`` still
works: every size is 1, every rank 0 and every group ``None``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megatron_glm.errors import ParallelStateError
from megatron_glm.parallel.random import MODEL_PARALLEL_RNG, MODEL_PARALLEL_SEED_OFFSET, RNGStatesTracker


@dataclasses.dataclass(frozen=True)
class _Axis:
    """One parallel dimension as seen from this rank: its group, the rank in it, its size and members."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    ranks: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _ParallelState:
    tensor: _Axis
    data: _Axis
    pipeline: _Axis
    # Tensor x pipeline ranks that share one data-parallel index (DeepSpeed's "model parallel" group).
    # (No group of the first and last pipeline stages for the tied word embeddings: DeepSpeed's
    # PipelineModule ties them and makes its own.)
    model: _Axis


_STATE: _ParallelState | None = None
_RNG_TRACKER = RNGStatesTracker()


def grid_ranks(tensor_parallel_size: int, data_parallel_size: int, pipeline_parallel_size: int) -> dict:
    """The rank lists of every group of the grid, in DeepSpeed's topology order.

    Returns ``{"tensor": [...], "data": [...], "pipeline": [...], "model": [...]}``, each a list of rank lists
    covering the world.
    """
    tp, dp, pp = tensor_parallel_size, data_parallel_size, pipeline_parallel_size

    def rank(p: int, d: int, t: int) -> int:
        return p * dp * tp + d * tp + t

    return {
        "tensor": [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "data": [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pipeline": [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "model": [sorted(rank(p, d, t) for p in range(pp) for t in range(tp)) for d in range(dp)],
    }


def initialize_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> None:
    """Build the process groups over the initialized world (or the single-process state without one).

    Every rank must call this with the same sizes: group creation is a collective.
    """
    global _STATE
    if _STATE is not None:
        raise ParallelStateError("initialize_parallel was already called; call destroy_parallel() first")
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if tp < 1 or pp < 1:
        raise ParallelStateError(
            f"tensor_parallel_size ({tp}) and pipeline_parallel_size ({pp}) must be >= 1"
        )
    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    if world_size % (tp * pp):
        raise ParallelStateError(
            f"world size {world_size} is not divisible by tensor_parallel_size x pipeline_parallel_size = "
            f"{tp} x {pp}; launch a multiple of {tp * pp} processes"
        )
    dp = world_size // (tp * pp)

    axes: dict[str, _Axis] = {}
    # One group per distinct member list: axes that coincide share it (at tp = pp = 1 the tensor, pipeline
    # and model groups are all this rank alone). new_group is collective over the whole world (with
    # NCCL a communicator split each), so at hundreds of ranks this cuts the start-up's group creations
    # about 4x. Every rank walks the same lists in the same order, so all create the same groups.
    groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    for name, lists in grid_ranks(tp, dp, pp).items():
        for members in lists:
            key = tuple(members)
            if key not in groups:
                groups[key] = dist.new_group(members) if distributed else None
            if rank in members:
                axes[name] = _Axis(groups[key], members.index(rank), len(members), key)
    _STATE = _ParallelState(**axes)


def destroy_parallel() -> None:
    """Forget the groups (the process group itself stays up) and reset the RNG tracker."""
    global _STATE
    _STATE = None
    _RNG_TRACKER.reset()


def is_initialized() -> bool:
    return _STATE is not None


def _state() -> _ParallelState:
    if _STATE is None:
        raise ParallelStateError(
            "the parallel state is not initialized: call "
            "megatron_glm.parallel.initialize_parallel(tp, pp) first"
        )
    return _STATE


def get_tensor_parallel_group() -> dist.ProcessGroup | None:
    return _state().tensor.group


def get_tensor_parallel_rank() -> int:
    return _state().tensor.rank


def get_tensor_parallel_world_size() -> int:
    return _state().tensor.world_size


def get_tensor_parallel_src_rank() -> int:
    """The global rank of tensor-parallel rank 0 in this rank's group (the one that broadcasts batches)."""
    return _state().tensor.ranks[0]


def get_data_parallel_group() -> dist.ProcessGroup | None:
    return _state().data.group


def get_data_parallel_rank() -> int:
    return _state().data.rank


def get_data_parallel_world_size() -> int:
    return _state().data.world_size


def get_data_parallel_ranks() -> tuple[int, ...]:
    return _state().data.ranks


def get_pipeline_parallel_group() -> dist.ProcessGroup | None:
    return _state().pipeline.group


def get_pipeline_parallel_rank() -> int:
    return _state().pipeline.rank


def get_pipeline_parallel_world_size() -> int:
    return _state().pipeline.world_size


def is_pipeline_first_stage() -> bool:
    return get_pipeline_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_parallel_rank() == get_pipeline_parallel_world_size() - 1


def get_model_parallel_group() -> dist.ProcessGroup | None:
    """Tensor x pipeline ranks of one data-parallel replica (where gradient norms are summed)."""
    return _state().model.group


def get_model_parallel_rank() -> int:
    return _state().model.rank


def get_model_parallel_world_size() -> int:
    return _state().model.world_size


def get_rng_tracker() -> RNGStatesTracker:
    """The tensor-parallel RNG tracker (seeded by ``megatron_glm.parallel.seed_parallel_rng``)."""
    return _RNG_TRACKER


def seed_parallel_rng(seed: int) -> None:
    """Seed the default generators with ``seed`` and the tracker's model-parallel stream per tensor rank.

    The default stream (hidden and embedding dropout) is identical on the ranks of a tensor-parallel
    group; the model-parallel stream (attention dropout) is ``seed + 2718 + tensor_rank``. Callers that
    want different dropout masks on different data-parallel replicas pass a seed that includes the
    data-parallel rank.
    """
    torch.manual_seed(seed)
    _RNG_TRACKER.reset()
    _RNG_TRACKER.add(MODEL_PARALLEL_RNG, seed + MODEL_PARALLEL_SEED_OFFSET + get_tensor_parallel_rank())
