"""Per-layer CUDA graphs (``training.cuda_graphs``) train as the eager model does, and resume exactly. CUDA only
(collected where a GPU is present; ``benchmarks/gpu_check.py`` runs it)."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_glm import parallel
from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel, glm_loss, loss_row_index
from megatron_glm.model.cuda_graphs import enable_layer_graphs

DEVICE = torch.device("cuda", torch.cuda.current_device())
VOCAB, LENGTH, ROWS = 256, 64, 2


@pytest.fixture
def single_rank():
    parallel.initialize_parallel(1, 1)
    yield
    parallel.destroy_parallel()


def _batches(count: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        sep = int(torch.randint(8, LENGTH - 8, (1,), generator=g))
        positions = torch.arange(LENGTH).clamp(max=sep - 1).expand(ROWS, LENGTH)
        blocks = (torch.arange(LENGTH) - sep + 1).clamp(min=0).expand(ROWS, LENGTH)
        mask = (torch.arange(LENGTH) >= sep).float().expand(ROWS, LENGTH).contiguous()
        batch = {
            "tokens": torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g),
            "targets": torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g),
            "position_ids": torch.stack([positions, blocks], 1).contiguous(),
            "sep": torch.full((ROWS,), sep),
            "loss_mask": mask,
            "loss_index": loss_row_index(mask),
        }
        batches.append({k: v.to(DEVICE) for k, v in batch.items()})
    return batches


def _model(graphs: bool, dropout: float, kernels: str) -> GLMModel:
    config = ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=LENGTH, vocab_size=VOCAB,
        hidden_dropout=dropout, attention_dropout=dropout, kernels=kernels,
    )  # fmt: skip
    model = GLMModel(config, VOCAB, device=DEVICE).train()
    if graphs:
        enable_layer_graphs(model.transformer)
    # Layer by layer, as graphed layers run: the default path's deferred residual adds round otherwise.
    model.transformer.defer_residual_adds = False
    return model


def _rng_states() -> tuple:
    return torch.cuda.get_rng_state(), parallel.get_rng_tracker().get_states()


def _set_rng_states(states: tuple) -> None:
    torch.cuda.set_rng_state(states[0])
    parallel.get_rng_tracker().set_states(states[1])


def _train(graphs: bool, dropout: float, kernels: str, accumulation: int = 2, steps: range = range(5),
           resume_from: dict | None = None):  # fmt: skip
    """Train ``steps`` of the batch sequence; ``resume_from`` a state ``_train`` returned: model, optimizer and
    random generators as a checkpoint holds them, loaded into a new model."""
    parallel.seed_parallel_rng(1234)
    model = _model(graphs, dropout, kernels)
    # Hold every parameter's AccumulateGrad node, made here on the default stream, as DeepSpeed's gradient hooks
    # do: the captured backward must not sync with the stream such a node was made on.
    accumulators = [p.view_as(p).grad_fn.next_functions[0][0] for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        _set_rng_states(resume_from["rng"])
    losses = []
    batches = _batches(5 * accumulation)
    for step in steps:
        for micro in range(accumulation):
            batch = batches[step * accumulation + micro]
            hidden = model(batch["tokens"], batch["position_ids"], batch["sep"])
            loss = glm_loss(model, hidden, batch["targets"], batch["loss_mask"], batch["loss_index"])
            (loss / accumulation).backward()
            losses.append(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": _rng_states(),
    }
    with torch.no_grad():  # evaluation runs eagerly
        model.eval()
        batch = batches[0]
        evaluated = glm_loss(model, model(batch["tokens"], batch["position_ids"], batch["sep"]),
                             batch["targets"], batch["loss_mask"], batch["loss_index"])  # fmt: skip
    captured = sum(len(g._captures) for g in model.transformer.layer_graphs or [])
    del accumulators
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], evaluated, captured, state


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_layer_graphs_train_as_the_eager_model(single_rank, kernels, dropout):
    # Every training call replays (the capture at the first call follows warm-ups that draw nothing for good);
    # two micro-batches per step, so every graph is replayed with accumulation. Dropout draws the numbers eager
    # execution draws from the same states.
    eager_losses, eager_params, eager_eval, _, _ = _train(False, dropout, kernels)
    losses, params, evaluated, captured, _ = _train(True, dropout, kernels)
    assert captured == 2  # one input shape, two layers
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(params, eager_params):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(evaluated, eager_eval, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_a_graphed_run_resumed_from_its_state_continues_bitwise(single_rank, kernels):
    # What glm-pretrain's exact resume needs under training.cuda_graphs: the resumed run captures anew and replays
    # from its first step, on what the uninterrupted run replayed at those steps.
    losses, params, _, _, _ = _train(True, 0.1, kernels)
    first, _, _, _, state = _train(True, 0.1, kernels, steps=range(3))
    second, resumed_params, _, _, _ = _train(True, 0.1, kernels, steps=range(3, 5), resume_from=state)
    assert torch.equal(torch.cat([first, second]), losses)
    for ours, theirs in zip(resumed_params, params, strict=True):
        assert torch.equal(ours, theirs)
