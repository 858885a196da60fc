"""Tensor-parallel layers and cross entropy on 4 real gloo ranks (TP = 2 and TP = 4) against dense torch."""

import pytest
import torch
import torch.nn.functional as F

from megatron_glm import parallel
from megatron_glm.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    normal_init,
    reduce_from_tensor_parallel,
    shard,
    unshard,
    vocab_parallel_cross_entropy,
)
from tests.multiproc import run_ranks

IN, OUT, VOCAB, ROWS = 16, 24, 32, 6
SMOOTHING = 0.1  # seq2seq finetuning's label smoothing (THUDM's configs use 0.1)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(ROWS, IN, generator=g),
        "grad_out": torch.randn(ROWS, OUT, generator=g),
        "logits": torch.randn(ROWS, VOCAB, generator=g) * 3,
        "targets": torch.randint(0, VOCAB, (ROWS,), generator=g),
        "loss_weights": torch.rand(ROWS, generator=g),
        "ids": torch.randint(0, VOCAB, (2, 5), generator=g),
    }


def _master(shape, seed):
    weight = torch.empty(shape)
    normal_init(0.5)(weight, torch.Generator().manual_seed(seed))
    return weight


def _layers_at(tp):
    parallel.initialize_parallel(tp, 1)
    data = _inputs()
    out = {}

    column = ColumnParallelLinear(IN, OUT, gather_output=True, init_method=normal_init(0.5))
    column.reset_parameters(torch.Generator().manual_seed(1))
    x = data["x"].clone().requires_grad_()
    y = column(x)
    y.backward(data["grad_out"])
    out["column"] = (y.detach(), x.grad, column.weight.detach().clone(), column.weight.grad)

    row = RowParallelLinear(IN, OUT, input_is_parallel=False, init_method=normal_init(0.5))
    row.reset_parameters(torch.Generator().manual_seed(2))
    with torch.no_grad():
        row.bias.fill_(0.25)
    x = data["x"].clone().requires_grad_()
    y = row(x)
    y.backward(data["grad_out"])
    out["row"] = (y.detach(), x.grad, row.weight.detach().clone(), row.weight.grad, row.bias.grad)

    embedding = VocabParallelEmbedding(VOCAB, IN, init_method=normal_init(0.5))
    embedding.reset_parameters(torch.Generator().manual_seed(3))
    e = embedding(data["ids"])
    e.backward(torch.ones_like(e))
    out["embedding"] = (e.detach(), embedding.weight.detach().clone(), embedding.weight.grad)

    logits = shard(data["logits"], 1, parallel.get_tensor_parallel_rank(), tp).clone().requires_grad_()
    losses = vocab_parallel_cross_entropy(logits, data["targets"])
    (losses * data["loss_weights"]).sum().backward()
    out["cross_entropy"] = (losses.detach(), logits.grad)

    logits = shard(data["logits"], 1, parallel.get_tensor_parallel_rank(), tp).clone().requires_grad_()
    losses = vocab_parallel_cross_entropy(logits, data["targets"], label_smoothing=SMOOTHING)
    (losses * data["loss_weights"]).sum().backward()
    out["smoothed_cross_entropy"] = (losses.detach(), logits.grad)

    partial = torch.full((2, 3), float(parallel.get_tensor_parallel_rank() + 1), requires_grad=True) * 1.0
    summed = reduce_from_tensor_parallel(partial)
    out["reduce"] = (summed.detach().clone(), summed.data_ptr() == partial.data_ptr())

    bf16_logits = logits.detach().bfloat16().requires_grad_()
    vocab_parallel_cross_entropy(bf16_logits, data["targets"]).sum().backward()
    out["cross_entropy_bf16_grad_dtype"] = bf16_logits.grad.dtype
    parallel.destroy_parallel()
    return out


def _layers_on_4_ranks(rank, world_size):
    return {tp: _layers_at(tp) for tp in (2, 4)}


@pytest.fixture(scope="module")
def results():
    return run_ranks(_layers_on_4_ranks, 4)


def _shards(results, tp, layer, index):
    return [results[r][tp][layer][index] for r in range(tp)]


TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # fp32; only the order of summation differs from dense torch


@pytest.mark.parametrize("tp", [2, 4])
def test_column_parallel_linear_equals_dense(results, tp):
    data = _inputs()
    weight = _master((OUT, IN), 1)
    x = data["x"].clone().requires_grad_()
    dense_weight = weight.clone().requires_grad_()
    y = F.linear(x, dense_weight)
    y.backward(data["grad_out"])
    assert torch.equal(unshard(_shards(results, tp, "column", 2), dim=0), weight)
    for rank in range(tp):
        torch.testing.assert_close(results[rank][tp]["column"][0], y.detach(), **TOLERANCE)
        torch.testing.assert_close(results[rank][tp]["column"][1], x.grad, **TOLERANCE)
    torch.testing.assert_close(
        unshard(_shards(results, tp, "column", 3), dim=0), dense_weight.grad, **TOLERANCE
    )


@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_linear_equals_dense(results, tp):
    data = _inputs()
    weight = _master((OUT, IN), 2)
    x = data["x"].clone().requires_grad_()
    dense_weight = weight.clone().requires_grad_()
    y = F.linear(x, dense_weight) + 0.25
    y.backward(data["grad_out"])
    assert torch.equal(unshard(_shards(results, tp, "row", 2), dim=1), weight)
    for rank in range(tp):
        torch.testing.assert_close(results[rank][tp]["row"][0], y.detach(), **TOLERANCE)
        torch.testing.assert_close(results[rank][tp]["row"][1], x.grad, **TOLERANCE)
        torch.testing.assert_close(results[rank][tp]["row"][4], data["grad_out"].sum(0), **TOLERANCE)
    torch.testing.assert_close(unshard(_shards(results, tp, "row", 3), dim=1), dense_weight.grad, **TOLERANCE)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_embedding_equals_dense(results, tp):
    ids = _inputs()["ids"]
    weight = _master((VOCAB, IN), 3).requires_grad_()
    e = F.embedding(ids, weight)
    e.backward(torch.ones_like(e))
    for rank in range(tp):
        torch.testing.assert_close(results[rank][tp]["embedding"][0], e.detach(), rtol=0, atol=0)
    torch.testing.assert_close(
        unshard(_shards(results, tp, "embedding", 1), dim=0), weight.detach(), rtol=0, atol=0
    )
    torch.testing.assert_close(
        unshard(_shards(results, tp, "embedding", 2), dim=0), weight.grad, rtol=0, atol=0
    )


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("smoothing", [0.0, SMOOTHING])
def test_vocab_parallel_cross_entropy_equals_full(results, tp, smoothing):
    data = _inputs()
    logits = data["logits"].clone().requires_grad_()
    # torch's label smoothing is THUDM's: (1 - eps) CE + eps mean over the vocabulary of -log softmax.
    losses = F.cross_entropy(logits, data["targets"], reduction="none", label_smoothing=smoothing)
    (losses * data["loss_weights"]).sum().backward()
    name = "smoothed_cross_entropy" if smoothing else "cross_entropy"
    for rank in range(tp):
        torch.testing.assert_close(results[rank][tp][name][0], losses.detach(), **TOLERANCE)
        assert results[rank][tp]["cross_entropy_bf16_grad_dtype"] == torch.bfloat16
    torch.testing.assert_close(unshard(_shards(results, tp, name, 1), dim=1), logits.grad, **TOLERANCE)


@pytest.mark.parametrize("tp", [2, 4])
def test_reduce_sums_the_ranks_partials_in_place(results, tp):
    for rank in range(tp):
        summed, in_place = results[rank][tp]["reduce"]
        assert torch.equal(summed, torch.full((2, 3), tp * (tp + 1) / 2)) and in_place


def test_strided_shards_hold_each_ranks_query_key_value():
    # Rows of [Q; K; V] for 4 heads of size 1: Q = 0..3, K = 10..13, V = 20..23.
    fused = torch.tensor([0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]).unsqueeze(1)
    assert shard(fused, 0, 1, 2, stride=3).flatten().tolist() == [2, 3, 12, 13, 22, 23]
    assert shard(fused, 0, 3, 4, stride=3).flatten().tolist() == [3, 13, 23]
    for world_size in (1, 2, 4):
        shards = [shard(fused, 0, r, world_size, stride=3) for r in range(world_size)]
        assert torch.equal(unshard(shards, 0, stride=3), fused)


def test_gathering_strided_outputs_is_refused():
    with pytest.raises(ValueError, match="out of order"):
        ColumnParallelLinear(IN, 3 * IN, stride=3, gather_output=True)


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="equal chunks"):
        shard(torch.zeros(10, 2), 0, 0, 4)


def test_skip_bias_add_leaves_the_bias_to_the_caller_except_under_zero3():
    """Megatron's skip_bias_add: the sum and the bias, whose add the caller fuses into the next kernel; under
    DeepSpeed's ZeRO-3 (parameters with a ds_id) the layer adds it itself and hands back None."""
    parallel.initialize_parallel(1, 1)
    try:
        plain = RowParallelLinear(IN, OUT, init_method=normal_init(0.5))
        skipping = RowParallelLinear(IN, OUT, skip_bias_add=True, init_method=normal_init(0.5))
        for layer in (plain, skipping):
            layer.reset_parameters(torch.Generator().manual_seed(2))
            with torch.no_grad():
                layer.bias.fill_(0.25)
        x = _inputs()["x"]
        y, bias = skipping(x)
        assert bias is skipping.bias and torch.equal(y + bias, plain(x))
        skipping.bias.ds_id = 7  # as ZeRO-3 marks its partitioned parameters
        y, bias = skipping(x)
        assert bias is None and torch.equal(y, plain(x))
    finally:
        parallel.destroy_parallel()
