"""GLM at TP = 2 and TP = 4 (4 real gloo ranks) equals TP = 1; dropout and checkpointing under TP."""

import dataclasses

import pytest
import torch

from megatron_glm import parallel
from megatron_glm.checkpoint import merge_shards, partition_of
from megatron_glm.model import GLMModel
from megatron_glm.parallel import get_rng_tracker, unshard
from tests.multiproc import run_ranks
from tests.tiny_glm import TINY, VOCAB, forward_and_loss, make_batch

SEED = 7
DROPOUT = dataclasses.replace(TINY, hidden_dropout=0.1, attention_dropout=0.1)


def _run(model, batch):
    hidden, loss = forward_and_loss(model, batch)
    logits = model.logits(hidden)
    loss.backward()
    return {
        "hidden": hidden.detach(),
        "logits": logits.detach(),
        "loss": loss.detach(),
        "grads": {name: p.grad for name, p in model.named_parameters()},
    }


def _dropout_checks():
    batch = make_batch()
    out = {}
    model = GLMModel(DROPOUT, VOCAB, seed=SEED).train()
    parallel.seed_parallel_rng(SEED)
    first = forward_and_loss(model, batch)[0].detach()
    parallel.seed_parallel_rng(SEED)
    out["repeat_equal"] = torch.equal(first, forward_and_loss(model, batch)[0].detach())
    out["hidden"] = first
    parallel.seed_parallel_rng(SEED)
    out["default_draw"] = torch.rand(8)
    with get_rng_tracker().fork():
        out["model_parallel_draw"] = torch.rand(8)
    grads = {}
    for mode in ("none", "full", "selective"):
        model = GLMModel(
            dataclasses.replace(DROPOUT, activation_checkpointing=mode), VOCAB, seed=SEED
        ).train()
        parallel.seed_parallel_rng(SEED)
        forward_and_loss(model, batch)[1].backward()
        grads[mode] = {name: p.grad for name, p in model.named_parameters()}
    out["checkpointed_grads_equal"] = {
        mode: all(torch.equal(grads[mode][n], grads["none"][n]) for n in grads["none"])
        for mode in ("full", "selective")
    }
    return out


def _tensor_parallel_on_4_ranks(rank, world_size):
    results = {}
    for tp in (2, 4):
        parallel.initialize_parallel(tp, 1)
        parallel.seed_parallel_rng(SEED)
        results[tp] = _run(GLMModel(TINY, VOCAB, seed=SEED), make_batch())
        if tp == 2:
            results["dropout"] = _dropout_checks()
        parallel.destroy_parallel()
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_tensor_parallel_on_4_ranks, 4)


@pytest.fixture(scope="module")
def single():
    parallel.initialize_parallel(1, 1)
    parallel.seed_parallel_rng(SEED)
    result = _run(GLMModel(TINY, VOCAB, seed=SEED), make_batch())
    parallel.destroy_parallel()
    return result


# fp32 on the same weights: only the order of the tensor-parallel sums differs from TP = 1.
TOLERANCE = {"rtol": 1e-5, "atol": 2e-6}


@pytest.mark.parametrize("tp", [2, 4])
def test_hidden_logits_and_loss_equal_tp1(ranks, single, tp):
    for rank in range(tp):
        torch.testing.assert_close(ranks[rank][tp]["hidden"], single["hidden"], **TOLERANCE)
        torch.testing.assert_close(ranks[rank][tp]["loss"], single["loss"], **TOLERANCE)
    logits = unshard([ranks[rank][tp]["logits"] for rank in range(tp)], dim=-1)
    torch.testing.assert_close(logits, single["logits"], **TOLERANCE)


@pytest.mark.parametrize("tp", [2, 4])
def test_every_gradient_equals_tp1(ranks, single, tp):
    for name, expected in single["grads"].items():
        shards = [ranks[rank][tp]["grads"][name] for rank in range(tp)]
        torch.testing.assert_close(merge_shards(shards, name), expected, **TOLERANCE, msg=name)
        if partition_of(name).replicated:
            # Replicated parameters must get the same gradient on every tensor rank, or the replicas drift.
            for shard in shards[1:]:
                assert torch.equal(shard, shards[0]), name


def test_data_parallel_replicas_compute_the_same(ranks):
    # At TP = 2 the 4 ranks form two data-parallel replicas fed the same batch.
    for name, grad in ranks[0][2]["grads"].items():
        assert torch.equal(ranks[2][2]["grads"][name], grad), name


def test_dropout_is_deterministic_and_replicated_across_tensor_ranks(ranks):
    dropout = [ranks[rank]["dropout"] for rank in range(2)]
    assert all(d["repeat_equal"] for d in dropout)
    # Hidden dropout draws the same mask on both tensor ranks, so the replicated output agrees exactly.
    assert torch.equal(dropout[0]["hidden"], dropout[1]["hidden"])
    assert torch.equal(dropout[0]["default_draw"], dropout[1]["default_draw"])
    # Attention dropout (each rank's own heads) draws from a per-rank stream.
    assert not torch.equal(dropout[0]["model_parallel_draw"], dropout[1]["model_parallel_draw"])


def test_activation_checkpointing_keeps_gradients_under_tp(ranks):
    for rank in range(2):
        assert ranks[rank]["dropout"]["checkpointed_grads_equal"] == {"full": True, "selective": True}
