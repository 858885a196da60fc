"""Activation recomputation ("activation checkpointing") that replays the tensor-parallel RNG streams on recompute.

``torch.utils.checkpoint`` restores the default generators before recomputing, so hidden dropout
draws the same mask twice; it knows nothing of the tracker's model-parallel stream, which by the time
of the backward pass has moved on. ``recompute`` snapshots the tracker when the forward pass runs
and puts that snapshot back for the recompute (then restores the current streams), so attention
dropout draws the same mask too and the gradients equal those of the uncheckpointed model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch.utils.checkpoint

from megatron_glm.parallel.state import get_rng_tracker


def recompute(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` without keeping its activations; they are recomputed in the backward pass.

    A drop-in for ``deepspeed.checkpointing.checkpoint`` (same signature), e.g. as a pipeline
    module's ``activation_checkpoint_func``.
    """
    tracker = get_rng_tracker()
    states_at_forward = tracker.get_states()

    @contextlib.contextmanager
    def replay_tracker() -> Iterator[None]:
        states_now = tracker.get_states()
        tracker.set_states(states_at_forward)
        try:
            yield
        finally:
            tracker.set_states(states_now)

    return torch.utils.checkpoint.checkpoint(
        function,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=lambda: (contextlib.nullcontext(), replay_tracker()),
    )
