"""Per-layer CUDA graphs' plumbing on any machine: CUDA's graph primitives replaced by stand-ins that run the
captured code eagerly and replay nothing, so the first graphed call, which captures, computes what the eager layer
computes. What a real capture and replay do is ``tests/test_cuda_graphs_cuda.py``'s to check, on a GPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from megatron_glm import parallel
from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel, glm_loss, loss_row_index
from megatron_glm.model.cuda_graphs import enable_layer_graphs

VOCAB, LENGTH, ROWS, SEP = 256, 64, 2, 20


class _Graph:
    def register_generator_state(self, generator) -> None:
        pass

    def replay(self) -> None:
        pass


class _Stream:
    def wait_stream(self, stream) -> None:
        pass


@pytest.fixture
def graph_stand_ins(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _Stream())
    monkeypatch.setattr(torch.cuda, "get_rng_state", torch.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", torch.set_rng_state)
    parallel.initialize_parallel(1, 1)
    yield
    parallel.destroy_parallel()


def _first_step(graphs: bool, dropout: float) -> tuple[float, list[torch.Tensor]]:
    """The first training step's loss and gradients."""
    parallel.seed_parallel_rng(1)
    config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=LENGTH,
                         vocab_size=VOCAB, hidden_dropout=dropout, attention_dropout=dropout, kernels="torch")  # fmt: skip
    model = GLMModel(config, VOCAB).train()
    if graphs:
        enable_layer_graphs(model.transformer)
    model.transformer.defer_residual_adds = False  # the graphed layers run one by one
    g = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g) for _ in range(2))
    positions = torch.arange(LENGTH).clamp(max=SEP - 1).expand(ROWS, LENGTH)
    blocks = (torch.arange(LENGTH) - SEP + 1).clamp(min=0).expand(ROWS, LENGTH)
    position_ids = torch.stack([positions, blocks], 1).contiguous()
    mask = (torch.arange(LENGTH) >= SEP).float().expand(ROWS, LENGTH).contiguous()
    hidden = model(tokens, position_ids, torch.full((ROWS,), SEP))
    loss = glm_loss(model, hidden, targets, mask, loss_row_index(mask))
    loss.backward()  # captures each layer's backward, after its input was copied in
    if graphs:
        # Captured at the first call, after the warm-ups: every training call is a replay.
        assert [len(layer._captures) for layer in model.transformer.layer_graphs] == [1, 1]
    with torch.no_grad():
        model.eval()  # evaluation runs eagerly, around the graphs
        assert model(tokens, position_ids, torch.full((ROWS,), SEP)).shape == (ROWS, LENGTH, 64)
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_the_first_graphed_step_computes_what_the_eager_model_computes(graph_stand_ins, dropout):
    # With dropout this holds only if the warm-ups before the capture put the generators back: the capture then
    # draws the numbers the eager step draws.
    loss, grads = _first_step(graphs=True, dropout=dropout)
    eager_loss, eager_grads = _first_step(graphs=False, dropout=dropout)
    assert loss == eager_loss
    for ours, theirs in zip(grads, eager_grads, strict=True):
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
        from megatron_glm.model.cuda_graphs import LayerGraphs

        LayerGraphs(torch.nn.Linear(2, 2), None, None, warmup=0)
