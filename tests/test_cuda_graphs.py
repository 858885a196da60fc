"""Per-layer CUDA graphs' plumbing on any machine: CUDA's graph primitives replaced by stand-ins that run the
captured code when it is captured, and again at every replay after the first (which the capture's own run
stands for), writing the results into the static outputs the capture returned. Everything around the graphs
then runs as on a GPU: the static buffers, the copies in and out, the warm-ups, the gradients' routing, the
random generators. What a real capture and replay do is ``tests/test_cuda_graphs_cuda.py``'s to check, on a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_glm import parallel
from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel
from megatron_glm.model.cuda_graphs import LayerGraphs, enable_layer_graphs
from tests.graph_training import train

CPU = torch.device("cpu")
VOCAB = 256


class _Graph:
    """A CUDA graph stand-in: replays by running the captured code again (see the module docstring)."""

    def __init__(self) -> None:
        self.replays = 0

    def register_generator_state(self, generator) -> None:
        pass

    def record(self, launch):
        self.launch, self.outputs, self.fresh = launch, launch(), True
        return self.outputs

    def replay(self) -> None:
        self.replays += 1
        if self.fresh:  # the capture's own run computed this replay's outputs, from the same inputs
            self.fresh = False
            return
        outputs = self.launch()
        pairs = zip(self.outputs, outputs) if isinstance(outputs, tuple) else [(self.outputs, outputs)]
        for static, fresh in pairs:
            if static is not None:
                static.detach().copy_(fresh)


class _Stream:
    def wait_stream(self, stream) -> None:
        pass


@pytest.fixture
def graph_stand_ins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _Stream())
    monkeypatch.setattr(torch.cuda, "get_rng_state", torch.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", torch.set_rng_state)
    monkeypatch.setattr(LayerGraphs, "_record", lambda self, graph, launch: graph.record(launch))
    parallel.initialize_parallel(1, 1)
    yield
    parallel.destroy_parallel()


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_graphed_training_is_the_eager_models(graph_stand_ins, dropout):
    # Five steps of two micro-batches: every training call replays, the first included (its capture follows
    # warm-ups that change nothing: with dropout the losses differ from the first step on if the warm-ups do not
    # put the generators back), each backward replays on the output gradient of its own micro-batch, the
    # evaluation runs eagerly around the graphs. On CPUs the stand-ins' replays compute what eager execution
    # computes, so the runs agree bit for bit.
    eager = train(CPU, False, dropout)
    graphed = train(CPU, True, dropout)
    assert graphed.captured == 2  # one input shape, two layers, captured once each
    assert torch.equal(graphed.losses, eager.losses)
    for ours, theirs in zip(graphed.params, eager.params, strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(graphed.evaluated, eager.evaluated)


def test_a_graphed_run_resumed_from_its_state_continues_bitwise(graph_stand_ins):
    # The resumed run captures anew at its first step and continues the uninterrupted run's numbers.
    whole = train(CPU, True, 0.1)
    first = train(CPU, True, 0.1, steps=range(3))
    second = train(CPU, True, 0.1, steps=range(3, 5), resume_from=first.state)
    assert torch.equal(torch.cat([first.losses, second.losses]), whole.losses)
    for ours, theirs in zip(second.params, whole.params, strict=True):
        assert torch.equal(ours, theirs)


def test_the_graphed_layers_keep_the_state_dict_keys(graph_stand_ins):
    model = GLMModel(
        ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB), VOCAB
    )
    keys = set(model.state_dict())
    enable_layer_graphs(model.transformer)
    assert set(model.state_dict()) == keys  # the layers stay registered once, under THUDM's keys


def test_a_capture_needs_a_warm_up():
    with pytest.raises(ValueError, match="warmup: at least one forward and backward before a capture"):
        LayerGraphs(torch.nn.Linear(2, 2), None, None, warmup=0)
