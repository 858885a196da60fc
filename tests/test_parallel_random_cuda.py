"""The RNG tracker inside a CUDA graph: a fork captured in a graph draws, replay after replay, what eager execution
draws from the same starting states. CUDA only (``tests/conftest.py`` collects ``*_cuda.py`` modules where a GPU is
present; ``benchmarks/gpu_check.py`` runs them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_glm.parallel import RNGStatesTracker
from tests.test_parallel_random import _assert_same_states, _seeded


def test_fork_in_a_cuda_graph_draws_what_eager_execution_draws():
    tracker = _seeded(RNGStatesTracker())
    out = torch.zeros(5, 8, device="cuda")

    def step():
        out[0] = torch.rand(8, device="cuda")
        with tracker.fork("a"):
            out[1] = torch.rand(8, device="cuda")
            out[2] = F.dropout(torch.ones(8, device="cuda"), p=0.5, training=True)
        with tracker.fork("b"):
            out[3] = torch.randn(8, device="cuda")
        out[4] = torch.rand(8, device="cuda")

    start_default, start_streams = torch.cuda.get_rng_state(), tracker.get_states()

    def rewind():
        torch.cuda.set_rng_state(start_default)
        tracker.set_states(start_streams)

    graph = torch.cuda.CUDAGraph()
    for generator in tracker.cuda_generators():
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step()
    # Move every generator on, then rewind: the replays must start from the states set_states put back.
    step()
    rewind()
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append(out.clone())
    default_after_replays, streams_after_replays = torch.cuda.get_rng_state(), tracker.get_states()
    rewind()
    eager = []
    for _ in range(2):
        step()
        eager.append(out.clone())
    # Inside fork("a") the first replay draws stream "a"'s first numbers, the second replay new ones.
    assert torch.equal(
        replays[0][1], torch.rand(8, device="cuda", generator=torch.Generator("cuda").manual_seed(11))
    )
    assert not torch.equal(replays[0], replays[1])
    for want, got in zip(eager, replays):
        assert torch.equal(want, got)
    assert torch.equal(default_after_replays, torch.cuda.get_rng_state())
    _assert_same_states(tracker.get_states(), streams_after_replays)
