"""Per-layer CUDA graphs (``training.cuda_graphs``) train as the eager model does, and resume exactly. CUDA only
(collected where a GPU is present; ``benchmarks/gpu_check.py`` runs it). ``test_cuda_graphs.py`` runs the same
checks on CPUs, with stand-ins that re-run the captured code."""

from __future__ import annotations

import pytest
import torch

from megatron_glm import parallel
from tests.graph_training import train

DEVICE = torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def single_rank():
    parallel.initialize_parallel(1, 1)
    yield
    parallel.destroy_parallel()


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_layer_graphs_train_as_the_eager_model(single_rank, kernels, dropout):
    # Every training call replays (the capture at the first call follows warm-ups that draw nothing for good);
    # two micro-batches per step, so every graph is replayed with accumulation. Dropout draws the numbers eager
    # execution draws from the same states.
    # The default path: each layer's last add in the next LayerNorm, graphed as it is run eagerly.
    eager = train(DEVICE, False, dropout, kernels)
    graphed = train(DEVICE, True, dropout, kernels)
    assert graphed.captured == 2  # one input shape, two layers
    # The second layer reads the first one's static outputs, and hands its input gradients back in place.
    assert graphed.chained_inputs == [False, True] and graphed.chained_output_grads == [True]
    torch.testing.assert_close(graphed.losses, eager.losses, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(graphed.params, eager.params, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graphed.evaluated, eager.evaluated, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_a_graphed_run_resumed_from_its_state_continues_bitwise(single_rank, kernels):
    # What glm-pretrain's exact resume needs under training.cuda_graphs: the resumed run captures anew and replays
    # from its first step, on what the uninterrupted run replayed at those steps.
    whole = train(DEVICE, True, 0.1, kernels)
    first = train(DEVICE, True, 0.1, kernels, steps=range(3))
    second = train(DEVICE, True, 0.1, kernels, steps=range(3, 5), resume_from=first.state)
    assert torch.equal(torch.cat([first.losses, second.losses]), whole.losses)
    for ours, theirs in zip(second.params, whole.params, strict=True):
        assert torch.equal(ours, theirs)
