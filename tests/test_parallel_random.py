"""RNG streams and activation checkpointing that replays them (single process; multi-rank in test_model_tensor_parallel)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_glm import parallel
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
