"""Named RNG streams for dropout under tensor parallelism.

Activations that every tensor-parallel rank holds in full (the residual stream, the embeddings) must
see the same dropout mask on every rank, or the replicas drift apart; activations that are split
over the ranks (the attention probabilities of each rank's own heads) must see different masks, or
head j of rank 0 and head j of rank 1 drop the same entries. So hidden dropout draws from the default
generator, seeded identically on all tensor-parallel ranks, while attention dropout draws inside
``tracker.fork()`` from the "model-parallel" stream, seeded ``seed + 2718 + tensor_rank`` as in
THUDM/GLM and Megatron.

A tracker stream is one generator per device in use (the CPU and, when present, the current CUDA
device), seeded like a fresh generator of that device. ``fork`` makes the default generators draw
from the stream's for the length of the block. On CUDA it points the default generator at the
stream generator's state object (``graphsafe_set_state``): copying a CUDA generator's state in and
out (``get_state``/``set_state``) is forbidden while a CUDA graph is being captured, sharing it is
not, and a graph that registers the stream generators (``cuda_generators``) then advances them on
every replay. The CPU has no graph capture and no shared states, so its state is copied in and out.
Both ways draw the numbers that copying every state would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_glm.errors import ParallelStateError

MODEL_PARALLEL_RNG = "model-parallel"
# THUDM/GLM and Megatron seed the model-parallel stream with seed + 2718 + tensor-parallel rank.
MODEL_PARALLEL_SEED_OFFSET = 2718


def _default_generators() -> list[torch.Generator]:
    generators = [torch.default_generator]
    if torch.cuda.is_available():
        # current_device() initializes CUDA, which fills the tuple: read it only after that call.
        index = torch.cuda.current_device()
        generators.append(torch.cuda.default_generators[index])
    return generators


def _shares_state(generator: torch.Generator) -> bool:
    """Whether ``fork`` swaps this generator's state object instead of copying its state.

    CUDA generators can share their state object (torch >= 2.5); a CPU generator cannot (it raises).
    """
    return generator.device.type == "cuda" and hasattr(generator, "graphsafe_set_state")


class RNGStatesTracker:
    """Named generator streams that ``fork(name)`` puts in place of the default generators."""

    def __init__(self) -> None:
        # Per stream, one generator per entry of _default_generators(), in the same order (CPU, CUDA).
        self._generators: dict[str, list[torch.Generator]] = {}
        self._forked: set[str] = set()

    def reset(self) -> None:
        self._generators = {}

    def names(self) -> list[str]:
        return list(self._generators)

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` from freshly seeded generators (the defaults are untouched)."""
        if name in self._generators:
            raise ValueError(f"RNG stream {name!r} already exists; reset() the tracker before re-seeding")
        self._generators[name] = [
            torch.Generator(device=default.device).manual_seed(seed) for default in _default_generators()
        ]

    def cuda_generators(self) -> list[torch.Generator]:
        """The CUDA generators of every stream, for ``torch.cuda.CUDAGraph.register_generator_state``.

        A graph advances on each replay only the generators registered with it (the default one
        registers itself), so a graph whose step forks must register these before capture. It keeps
        drawing from them even after ``reset()`` or ``add()`` made new ones.
        """
        return [g for stream in self._generators.values() for g in stream if g.device.type == "cuda"]

    def get_states(self) -> dict[str, list[torch.Tensor]]:
        """Every stream's state as ``{name: [CPU state, CUDA state]}`` (new tensors).

        What activation checkpointing replays on recompute and what checkpoints save.
        """
        self._refuse_inside_fork("get_states")
        return {name: [g.get_state() for g in stream] for name, stream in self._generators.items()}

    def set_states(self, states: dict[str, list[torch.Tensor]]) -> None:
        """Make the streams those of ``states`` (a ``get_states()``), dropping any other stream.

        A stream that exists keeps its generator objects, so a CUDA graph that registered them stays
        bound to the tracker. A saved CUDA state that this process has no GPU for is ignored.
        """
        self._refuse_inside_fork("set_states")
        defaults = _default_generators()
        for name, stream in states.items():
            if len(stream) < len(defaults):
                devices = ", ".join(str(g.device) for g in defaults)
                raise ParallelStateError(
                    f"RNG stream {name!r} has {len(stream)} saved state(s) but this process draws on "
                    f"{len(defaults)} devices ({devices}): the states come from a process without a GPU; "
                    "resume on the same kind of machine, or re-seed with megatron_glm.parallel.seed_parallel_rng"
                )
        generators = {}
        for name, stream in states.items():
            existing = self._generators.get(name, [])
            if len(existing) != len(defaults):
                existing = [torch.Generator(device=default.device) for default in defaults]
            for generator, state in zip(existing, stream):
                generator.set_state(state)
            generators[name] = existing
        self._generators = generators

    def _refuse_inside_fork(self, action: str) -> None:
        # Inside a fork the forked stream's CPU state is parked in the default generator while its CUDA
        # state is shared with it: no consistent snapshot to give or to replace.
        if self._forked:
            raise RuntimeError(f"RNGStatesTracker.{action}() inside fork({sorted(self._forked)[0]!r})")

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with stream ``name`` as the default generators, then leave the stream advanced."""
        if name not in self._generators:
            raise KeyError(f"RNG stream {name!r} is not seeded; call megatron_glm.parallel.seed_parallel_rng")
        if name in self._forked:
            raise RuntimeError(
                f"RNG stream {name!r} is already forked; nested forks of one stream are not allowed"
            )
        defaults = _default_generators()
        stream = self._generators[name]
        outside = []
        for default, own in zip(defaults, stream):
            if _shares_state(default):
                outside.append(default.graphsafe_get_state())
                default.graphsafe_set_state(own)
            else:
                outside.append(default.get_state())
                default.set_state(own.get_state())
        self._forked.add(name)
        try:
            yield
        finally:
            self._forked.discard(name)
            for default, own, state in zip(defaults, stream, outside):
                if _shares_state(default):
                    default.graphsafe_set_state(state)
                else:
                    own.set_state(default.get_state())
                    default.set_state(state)
