"""Per-layer CUDA graphs' plumbing on any machine: CUDA's graph primitives replaced by stand-ins that run the
captured code eagerly and replay nothing, so the first graphed call computes what the eager layer computes.
What a real capture and replay do is ``tests/test_cuda_graphs_cuda.py``'s to check, on a GPU."""

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


def _losses(graphs: bool) -> list[float]:
    parallel.seed_parallel_rng(1)
    config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=LENGTH,
                         vocab_size=VOCAB, hidden_dropout=0.0, attention_dropout=0.0, kernels="torch")  # fmt: skip
    model = GLMModel(config, VOCAB).train()
    if graphs:
        enable_layer_graphs(model.transformer)
    g = torch.Generator().manual_seed(0)
    tokens, targets = (torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g) for _ in range(2))
    positions = torch.arange(LENGTH).clamp(max=SEP - 1).expand(ROWS, LENGTH)
    blocks = (torch.arange(LENGTH) - SEP + 1).clamp(min=0).expand(ROWS, LENGTH)
    position_ids = torch.stack([positions, blocks], 1).contiguous()
    mask = (torch.arange(LENGTH) >= SEP).float().expand(ROWS, LENGTH).contiguous()
    losses = []
    for _ in range(3):  # two eager warm-up calls per layer, then the call that captures
        hidden = model(tokens, position_ids, torch.full((ROWS,), SEP))
        loss = glm_loss(model, hidden, targets, mask, loss_row_index(mask))
        loss.backward()  # the third captures each layer's backward, after its input was copied in
        losses.append(loss.item())
    with torch.no_grad():
        model.eval()
        assert model(tokens, position_ids, torch.full((ROWS,), SEP)).shape == (ROWS, LENGTH, 64)
    if graphs:
        assert [len(layer._captures) for layer in model.transformer.layer_graphs] == [1, 1]
        assert [set(layer._calls.values()) for layer in model.transformer.layer_graphs] == [{2}, {2}]
    return losses


def test_the_first_graphed_step_computes_what_the_eager_model_computes(graph_stand_ins):
    assert _losses(graphs=True) == _losses(graphs=False)
    # The layers stay registered once: the state dict has THUDM's keys only.
    model = GLMModel(
        ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB), VOCAB
    )
    keys = set(model.state_dict())
    enable_layer_graphs(model.transformer)
    assert set(model.state_dict()) == keys
