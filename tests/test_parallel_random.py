"""RNG streams and activation checkpointing that replays them (single process; multi-rank in test_model_tensor_parallel)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from megatron_glm import parallel
from megatron_glm.errors import ParallelStateError
from megatron_glm.parallel import MODEL_PARALLEL_RNG, RNGStatesTracker, get_rng_tracker, recompute


@pytest.fixture
def single_rank():
    parallel.initialize_parallel(1, 1)
    yield
    parallel.destroy_parallel()


def test_fork_draws_from_its_stream_and_leaves_the_default_untouched():
    tracker = RNGStatesTracker()
    tracker.add("stream", 99)
    torch.manual_seed(5)
    with tracker.fork("stream"):
        first = torch.rand(4)
    outside = torch.rand(4)
    with tracker.fork("stream"):
        second = torch.rand(4)
    stream = torch.Generator().manual_seed(99)
    assert torch.equal(first, torch.rand(4, generator=stream))
    assert torch.equal(second, torch.rand(4, generator=stream))
    assert torch.equal(outside, torch.rand(4, generator=torch.Generator().manual_seed(5)))


def test_tracker_errors_name_the_stream():
    tracker = RNGStatesTracker()
    with pytest.raises(KeyError, match="seed_parallel_rng"), tracker.fork("missing"):
        pass
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)


def test_seed_parallel_rng_follows_the_reference_offsets(single_rank):
    parallel.seed_parallel_rng(1234)
    default = torch.rand(3)
    with get_rng_tracker().fork(MODEL_PARALLEL_RNG):
        model_parallel = torch.rand(3)
    assert torch.equal(default, torch.rand(3, generator=torch.Generator().manual_seed(1234)))
    # seed + 2718 + tensor rank (0 here).
    assert torch.equal(model_parallel, torch.rand(3, generator=torch.Generator().manual_seed(1234 + 2718)))


def _block(x, weight):
    """Dropout from both streams around a matmul: what a transformer layer does."""
    y = F.dropout(x @ weight, p=0.5, training=True)
    with get_rng_tracker().fork():
        y = F.dropout(torch.tanh(y), p=0.5, training=True)
    return y @ weight


@pytest.mark.parametrize("use_recompute", [False, True])
def test_recompute_replays_both_streams(single_rank, use_recompute):
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def loss_and_grad(checkpointed):
        parallel.seed_parallel_rng(7)
        weight.grad = None
        out = recompute(_block, x, weight) if checkpointed else _block(x, weight)
        # Draws after the block must not be disturbed by the recompute in backward.
        out.sum().backward()
        return out.detach(), weight.grad.clone(), torch.rand(2)

    reference = loss_and_grad(False)
    result = loss_and_grad(use_recompute)
    for expected, actual in zip(reference, result):
        assert torch.equal(expected, actual)


def test_checkpoint_without_tracker_replay_would_differ(single_rank):
    """The same block under plain torch checkpointing gives wrong gradients: the replay is needed."""
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    parallel.seed_parallel_rng(7)
    _block(x, weight).sum().backward()
    expected = weight.grad.clone()
    weight.grad = None
    parallel.seed_parallel_rng(7)
    torch.utils.checkpoint.checkpoint(_block, x, weight, use_reentrant=False).sum().backward()
    assert not torch.allclose(weight.grad, expected)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class CopyingTracker:
    """The tracker as it was before CUDA graphs: streams kept as state tensors, copied in and out by fork()."""

    def __init__(self):
        self.states = {}

    @staticmethod
    def defaults():
        cuda = (
            [torch.cuda.default_generators[torch.cuda.current_device()]] if torch.cuda.is_available() else []
        )
        return [torch.default_generator, *cuda]

    def add(self, name, seed):
        self.states[name] = [
            torch.Generator(device=g.device).manual_seed(seed).get_state() for g in self.defaults()
        ]

    def get_states(self):
        return {name: [s.clone() for s in states] for name, states in self.states.items()}

    @contextlib.contextmanager
    def fork(self, name):
        generators = self.defaults()
        outside = [g.get_state() for g in generators]
        for generator, state in zip(generators, self.states[name]):
            generator.set_state(state)
        try:
            yield
        finally:
            self.states[name] = [g.get_state() for g in generators]
            for generator, state in zip(generators, outside):
                generator.set_state(state)


def _interleaved_draws(tracker):
    """Default draws and forks of two streams, one nested in the other, on every device in use."""
    draws = []

    def draw():
        for device in DEVICES:
            draws.extend([torch.rand(5, device=device), torch.randn(3, device=device)])

    draw()
    with tracker.fork("a"):
        draw()
        draw()
    draw()
    with tracker.fork("b"):
        draw()
        with tracker.fork("a"):
            draw()
        draw()
    with tracker.fork("a"):
        draw()
    draw()
    with tracker.fork("b"):
        draw()
    return draws


def _default_states():
    return [g.get_state() for g in CopyingTracker.defaults()]


def _assert_same_states(expected, actual):
    assert list(expected) == list(actual)
    for name in expected:
        assert len(expected[name]) == len(actual[name]) == len(DEVICES)
        for want, got in zip(expected[name], actual[name]):
            assert got.dtype == torch.uint8 and got.device.type == "cpu"
            assert torch.equal(want, got)


def _seeded(tracker):
    torch.manual_seed(5)
    tracker.add("a", 11)
    tracker.add("b", 22)
    return tracker


def test_fork_draws_what_the_copying_tracker_drew():
    reference = _seeded(CopyingTracker())
    expected = _interleaved_draws(reference)
    expected_defaults = _default_states()
    tracker = _seeded(RNGStatesTracker())
    actual = _interleaved_draws(tracker)
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        assert torch.equal(want, got)
    _assert_same_states(reference.get_states(), tracker.get_states())
    for want, got in zip(expected_defaults, _default_states()):
        assert torch.equal(want, got)


def test_states_round_trip_and_states_of_the_copying_tracker_load():
    tracker = _seeded(RNGStatesTracker())
    _interleaved_draws(tracker)
    snapshot = tracker.get_states()
    default = _default_states()
    first = _interleaved_draws(tracker)
    # A checkpoint written by the copying tracker: the same format, so it loads and draws the same.
    reference = _seeded(CopyingTracker())
    _interleaved_draws(reference)
    _assert_same_states(reference.get_states(), snapshot)
    for replay in (snapshot, reference.get_states()):
        tracker.set_states(replay)
        for generator, state in zip(CopyingTracker.defaults(), default):
            generator.set_state(state)
        again = _interleaved_draws(tracker)
        assert all(torch.equal(want, got) for want, got in zip(first, again))
    # set_states replaces the whole set of streams, as before.
    tracker.set_states({"a": snapshot["a"]})
    assert tracker.names() == ["a"]


def test_states_are_not_swapped_while_a_stream_is_forked():
    tracker = _seeded(RNGStatesTracker())
    with tracker.fork("a"):
        first = torch.rand(4)
        with pytest.raises(RuntimeError, match="already forked"), tracker.fork("a"):
            pass
        with pytest.raises(RuntimeError, match="inside fork"):
            tracker.get_states()
        with pytest.raises(RuntimeError, match="inside fork"):
            tracker.set_states({})
    # The refused calls left the fork intact: the stream went on from where the block left it.
    with tracker.fork("a"):
        second = torch.rand(4)
    stream = torch.Generator().manual_seed(11)
    assert torch.equal(first, torch.rand(4, generator=stream))
    assert torch.equal(second, torch.rand(4, generator=stream))


def test_states_without_one_per_device_are_refused_and_change_nothing():
    tracker = _seeded(RNGStatesTracker())
    at_seed = tracker.get_states()
    with tracker.fork("a"):
        first = torch.rand(4)
    with pytest.raises(ParallelStateError, match="'b' has 0 saved state"):
        tracker.set_states({"a": at_seed["a"], "b": []})
    assert tracker.names() == ["a", "b"]
    with tracker.fork("a"):
        second = torch.rand(4)
    stream = torch.Generator().manual_seed(11)
    assert torch.equal(first, torch.rand(4, generator=stream))
    assert torch.equal(second, torch.rand(4, generator=stream))
