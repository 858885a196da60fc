"""Named RNG streams for dropout under tensor parallelism.

Activations that every tensor-parallel rank holds in full (the residual stream, the embeddings) must
see the same dropout mask on every rank, or the replicas drift apart; activations that are split
over the ranks (the attention probabilities of each rank's own heads) must see different masks, or
head j of rank 0 and head j of rank 1 drop the same entries. So hidden dropout draws from the default
generator, seeded identically on all tensor-parallel ranks, while attention dropout draws inside
``tracker.fork()`` from the "model-parallel" stream, seeded ``seed + 2718 + tensor_rank`` as in
THUDM/GLM and Megatron.

A tracker stream is the saved state of the default generator of each device in use (the CPU and, when
present, the current CUDA device); ``fork`` swaps it in, runs the block, stores the advanced state
and swaps the default one back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

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


class RNGStatesTracker:
    """Named generator states that ``fork(name)`` swaps in for the default generators."""

    def __init__(self) -> None:
        self._states: dict[str, list[torch.Tensor]] = {}

    def reset(self) -> None:
        self._states = {}

    def names(self) -> list[str]:
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` as the state of freshly seeded generators (the defaults are untouched)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists; reset() the tracker before re-seeding")
        states = []
        for default in _default_generators():
            generator = torch.Generator(device=default.device)
            generator.manual_seed(seed)
            states.append(generator.get_state())
        self._states[name] = states

    def get_states(self) -> dict[str, list[torch.Tensor]]:
        """A copy of every stream's state (what activation checkpointing replays on recompute)."""
        return {name: [s.clone() for s in states] for name, states in self._states.items()}

    def set_states(self, states: dict[str, list[torch.Tensor]]) -> None:
        self._states = {name: [s.clone() for s in stream] for name, stream in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with stream ``name`` as the default generators' state, then advance the stream."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} is not seeded; call megatron_glm.parallel.seed_parallel_rng")
        generators = _default_generators()
        outside = [g.get_state() for g in generators]
        for generator, state in zip(generators, self._states[name]):
            generator.set_state(state)
        try:
            yield
        finally:
            self._states[name] = [g.get_state() for g in generators]
            for generator, state in zip(generators, outside):
                generator.set_state(state)
