"""The GLM model on one rank: THUDM keys and sizes, an independent reference forward, mask semantics, loss."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_glm import parallel
from megatron_glm.config import ModelConfig, count_parameters, load_config, padded_vocab_size
from megatron_glm.model import GLMModel, LayerNorm, glm_loss
from megatron_glm.training.optimizer import weight_decay_param_groups
from tests.tiny_glm import TINY, VOCAB, forward_and_loss, make_batch

CONFIGS = Path(__file__).resolve().parent.parent / "run" / "configs"


def reference_forward(weights: dict, config: ModelConfig, tokens, position_ids, sep) -> torch.Tensor:
    """GLM straight from the reference description, in plain torch over a THUDM state dict."""
    h, heads = config.hidden_size, config.num_attention_heads
    d = h // heads
    batch, length = tokens.shape

    def layer_norm(x, prefix):
        return F.layer_norm(
            x, (h,), weights[prefix + ".weight"], weights[prefix + ".bias"], config.layernorm_epsilon
        )

    def linear(x, prefix):
        return x @ weights[prefix + ".weight"].T + weights[prefix + ".bias"]

    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))

    x = (
        weights["word_embeddings.weight"][tokens]
        + weights["transformer.position_embeddings.weight"][position_ids[:, 0]]
        + weights["transformer.block_position_embeddings.weight"][position_ids[:, 1]]
    )
    mask = torch.tril(torch.ones(length, length)).repeat(batch, 1, 1, 1)
    for b in range(batch):
        mask[b, 0, :, : sep[b]] = 1.0
    for i in range(config.num_layers):
        p = f"transformer.layers.{i}"
        q, k, v = linear(layer_norm(x, p + ".input_layernorm"), p + ".attention.query_key_value").split(
            h, dim=-1
        )
        q, k, v = (t.view(batch, length, heads, d).transpose(1, 2) for t in (q, k, v))
        scores = q @ (k / math.sqrt(d)).transpose(-1, -2)
        scores = scores * mask - 65504.0 * (1.0 - mask)
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, h)
        x = x + linear(context, p + ".attention.dense")
        mlp = linear(
            gelu(linear(layer_norm(x, p + ".post_attention_layernorm"), p + ".mlp.dense_h_to_4h")),
            p + ".mlp.dense_4h_to_h",
        )
        x = x + mlp
    return layer_norm(x, "transformer.final_layernorm")


@pytest.fixture
def single_rank():
    parallel.initialize_parallel(1, 1)
    parallel.seed_parallel_rng(0)
    yield
    parallel.destroy_parallel()


def test_state_dict_has_the_reference_keys_and_shapes(single_rank):
    h, rows = TINY.hidden_size, TINY.max_position_embeddings + 1
    expected = {
        "word_embeddings.weight": (VOCAB, h),
        "transformer.position_embeddings.weight": (rows, h),
        "transformer.block_position_embeddings.weight": (rows, h),
        "transformer.final_layernorm.weight": (h,),
        "transformer.final_layernorm.bias": (h,),
    }
    for i in range(TINY.num_layers):
        p = f"transformer.layers.{i}."
        expected.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "input_layernorm.bias": (h,),
                p + "attention.query_key_value.weight": (3 * h, h),
                p + "attention.query_key_value.bias": (3 * h,),
                p + "attention.dense.weight": (h, h),
                p + "attention.dense.bias": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "post_attention_layernorm.bias": (h,),
                p + "mlp.dense_h_to_4h.weight": (4 * h, h),
                p + "mlp.dense_h_to_4h.bias": (4 * h,),
                p + "mlp.dense_4h_to_h.weight": (h, 4 * h),
                p + "mlp.dense_4h_to_h.bias": (h,),
            }
        )
    state = GLMModel(TINY, VOCAB).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


# The parameter counts of the released GLM models (the GLM paper's Table 1, THUDM/GLM's README), rounded as there.
REFERENCE_PARAMETERS = {
    "glm-base": "109.3M",
    "glm-large": "334.7M",
    "glm-410m": "410.3M",
    "glm-515m": "514.6M",
    "glm-2b": "1.92B",
    "glm-10b": "9.88B",
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMETERS))
def test_reference_sizes_on_the_meta_device(single_rank, name):
    config = load_config(CONFIGS / f"{name}.yaml").model
    vocab = padded_vocab_size(config)
    model = GLMModel(config, vocab, device="meta")
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == count_parameters(config, vocab)
    rounded = f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.1f}M"
    assert rounded == REFERENCE_PARAMETERS[name]


def test_meta_model_materializes_to_the_same_weights(single_rank):
    direct = GLMModel(TINY, VOCAB, seed=3)
    late = GLMModel(TINY, VOCAB, seed=3, device="meta")
    late.to_empty(device="cpu")
    late.reset_parameters(3)
    for (name, a), b in zip(direct.state_dict().items(), late.state_dict().values()):
        assert torch.equal(a, b), name
    # DeepSpeed reads these marks to count each sharded weight once in the gradient norm.
    for (name, a), b in zip(direct.named_parameters(), late.parameters()):
        assert vars(a) == vars(b), name
    assert late.transformer.layers[0].attention.query_key_value.weight.tensor_model_parallel


def test_initialization_follows_the_reference(single_rank):
    config = dataclasses.replace(TINY, hidden_size=128, num_layers=4)
    state = GLMModel(config, VOCAB, seed=1).state_dict()
    output_std = 0.02 / math.sqrt(2 * config.num_layers)
    for key, value in state.items():
        if key.endswith("layernorm.weight"):
            assert torch.equal(value, torch.ones_like(value)), key
        elif key.endswith(".bias"):
            assert torch.equal(value, torch.zeros_like(value)), key
        else:
            std = output_std if key.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else 0.02
            assert abs(value.mean().item()) < 0.1 * std, key
            assert value.std().item() == pytest.approx(std, rel=0.05), key
    assert not torch.equal(
        state["word_embeddings.weight"],
        GLMModel(config, VOCAB, seed=2).state_dict()["word_embeddings.weight"],
    )


def test_matches_an_independent_reference_forward(single_rank):
    # Larger weights than the 0.02 init push activations to O(1), where e.g. exact and tanh GeLU differ.
    config = dataclasses.replace(TINY, init_method_std=0.2)
    model = GLMModel(config, VOCAB, seed=11)
    # Non-trivial LayerNorm and bias values, so a swapped or missing one shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    batch = make_batch()
    hidden, loss = forward_and_loss(model, batch)
    expected = reference_forward(
        model.state_dict(), config, batch["tokens"], batch["position_ids"], batch["sep"]
    )
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    logits = expected @ model.state_dict()["word_embeddings.weight"].T
    ce = F.cross_entropy(logits.view(-1, VOCAB), batch["targets"].view(-1), reduction="none")
    mask = batch["loss_mask"].view(-1)
    torch.testing.assert_close(loss, (ce * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)


@pytest.fixture
def eval_model(single_rank):
    return GLMModel(TINY, VOCAB, seed=5).eval()


def _hidden_after(model, batch, position, new_token):
    tokens = batch["tokens"].clone()
    tokens[:, position] = new_token
    with torch.no_grad():
        return model(tokens, batch["position_ids"], batch["sep"])


def test_part_a_never_sees_part_b(eval_model):
    batch = make_batch(seps=(14, 14))
    before = _hidden_after(eval_model, batch, 15, batch["tokens"][0, 15])
    after = _hidden_after(eval_model, batch, 15, (batch["tokens"][0, 15] + 1) % VOCAB)
    torch.testing.assert_close(after[:, :15], before[:, :15], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 15:], before[:, 15:], atol=1e-3)


def test_part_b_is_causal(eval_model):
    batch = make_batch(seps=(10, 10))
    before = _hidden_after(eval_model, batch, 18, batch["tokens"][0, 18])
    after = _hidden_after(eval_model, batch, 18, (batch["tokens"][0, 18] + 7) % VOCAB)
    torch.testing.assert_close(after[:, :18], before[:, :18], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 18:], before[:, 18:], atol=1e-3)


def test_part_a_is_bidirectional(eval_model):
    batch = make_batch(seps=(14, 14))
    before = _hidden_after(eval_model, batch, 13, batch["tokens"][0, 13])
    after = _hidden_after(eval_model, batch, 13, (batch["tokens"][0, 13] + 3) % VOCAB)
    # The first Part-A token sees the last one; Part B sees all of Part A.
    for position in (0, 5, 20):
        assert not torch.allclose(after[:, position], before[:, position], atol=1e-3), position


def test_loss_at_masked_positions_equals_the_full_logits_loss(single_rank):
    model = GLMModel(TINY, VOCAB, seed=5)
    batch = make_batch()
    batch["loss_mask"][0, -1] = 0.0  # a masked-out Part-B position, too
    hidden, loss = forward_and_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model(batch["tokens"], batch["position_ids"], batch["sep"])
    ce = parallel.vocab_parallel_cross_entropy(model.logits(hidden), batch["targets"])
    full_loss = (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    full_loss.backward()
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-7)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_no_weight_decay_on_biases_and_layernorms(single_rank):
    model = GLMModel(TINY, VOCAB)
    decay, no_decay = weight_decay_param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".weight") and "layernorm" not in names[id(p)] for p in decay["params"])
    layer_norms = {id(p) for m in model.modules() if isinstance(m, LayerNorm) for p in m.parameters()}
    for param in no_decay["params"]:
        assert names[id(param)].endswith(".bias") or id(param) in layer_norms
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_gradients_with_dropout(single_rank, mode, kernels):
    # The Triton kernels (the interpreter on CPUs) draw their dropout seeds from torch's generator in the kernel
    # calls: the recomputation must draw the same ones.
    config = dataclasses.replace(TINY, hidden_dropout=0.2, attention_dropout=0.2, kernels=kernels)
    batch = make_batch()

    def gradients(activation_checkpointing):
        model = GLMModel(
            dataclasses.replace(config, activation_checkpointing=activation_checkpointing), VOCAB
        )
        model.transformer.defer_residual_adds = False  # layer by layer, as the recomputation runs them
        parallel.seed_parallel_rng(9)
        forward_and_loss(model, batch)[1].backward()
        return {n: p.grad for n, p in model.named_parameters()}

    expected, actual = gradients("none"), gradients(mode)
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_each_layers_last_add_in_the_next_layernorm_is_the_layer_by_layer_result(single_rank, kernels):
    """The stack forms each layer's output stream in the next LayerNorm (the final one's for the last layer):
    with dropout, the same hidden states and gradients as running the layers one by one, which draws the same
    masks in the same order. On the Triton path the MLP output biases' gradients come from the LayerNorm
    kernel's partial sums instead of torch's sum over the rows: equal up to the order of the fp32 additions."""
    # Two layers: the first's stream formed in the second's LayerNorm, the second's in the final one.
    config = dataclasses.replace(
        TINY, num_layers=2, hidden_dropout=0.2, attention_dropout=0.2, kernels=kernels
    )
    batch = make_batch()
    results = {}
    for defer in (True, False):
        model = GLMModel(config, VOCAB, seed=5)
        model.transformer.defer_residual_adds = defer
        parallel.seed_parallel_rng(9)
        hidden, loss = forward_and_loss(model, batch)
        loss.backward()
        results[defer] = hidden.detach(), {n: p.grad for n, p in model.named_parameters()}
    (hidden, grads), (want_hidden, want_grads) = results[True], results[False]
    assert torch.equal(hidden, want_hidden)
    for name, grad in grads.items():
        if kernels == "triton" and name.endswith("mlp.dense_4h_to_h.bias"):
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(grad, want_grads[name]), name


def test_triton_kernels_compute_what_torch_kernels_compute(single_rank):
    """``model.kernels=triton`` (the interpreter on CPUs) against ``torch``, without dropout: the packed attention,
    the LayerNorms that add the dense layers' left-out biases with the residual, the dropout-add with the MLP's
    bias, the loss's cross entropy. The hidden states, the loss and every parameter's gradient agree."""
    batch = make_batch()
    results = {}
    for kernels in ("torch", "triton"):
        model = GLMModel(dataclasses.replace(TINY, kernels=kernels), VOCAB, seed=3)
        generator = torch.Generator().manual_seed(4)
        with torch.no_grad():  # biases are zero at initialization: give them values whose adds show
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        hidden, loss = forward_and_loss(model, batch)
        loss.backward()
        results[kernels] = hidden.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (hidden, loss, grads), (want_hidden, want_loss, want_grads) = results["triton"], results["torch"]
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_non_deterministic_kernels_train_as_the_deterministic_ones(single_rank, monkeypatch):
    """``model.deterministic_kernels: false`` reaches the attention: its backward adds dQ with atomics (the dQ
    conversion kernel runs, the dQ kernel does not) and, with dropout, the loss is the same and every gradient
    agrees with the deterministic model's up to the order of the fp32 additions."""
    from kernels import triton_attention

    launched = []
    for name in ("_backward_dq", "_backward_dq_convert"):
        launcher = getattr(triton_attention, name)

        def spy(*args, launcher=launcher, name=name, **kwargs):
            launched.append(name)
            return launcher(*args, **kwargs)

        monkeypatch.setattr(triton_attention, name, spy)
    config = dataclasses.replace(TINY, hidden_dropout=0.2, attention_dropout=0.2, kernels="triton")
    batch = make_batch()
    results = {}
    for deterministic in (True, False):
        launched.clear()
        model = GLMModel(dataclasses.replace(config, deterministic_kernels=deterministic), VOCAB, seed=5)
        parallel.seed_parallel_rng(9)
        hidden, loss = forward_and_loss(model, batch)
        loss.backward()
        results[deterministic] = (
            loss.detach(),
            {n: p.grad for n, p in model.named_parameters()},
            set(launched),
        )
    (loss, grads, kernels_run), (want_loss, want_grads, want_kernels) = results[False], results[True]
    assert (kernels_run, want_kernels) == ({"_backward_dq_convert"}, {"_backward_dq"})
    assert torch.equal(loss, want_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_tracks_fp32(single_rank):
    batch = make_batch()
    model = GLMModel(TINY, VOCAB, seed=5)
    _, loss32 = forward_and_loss(model, batch)
    model_bf16 = GLMModel(TINY, VOCAB, seed=5, dtype=torch.bfloat16)
    hidden, loss16 = forward_and_loss(model_bf16, batch)
    loss16.backward()
    assert hidden.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert all(
        p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in model_bf16.parameters()
    )


def test_without_block_positions_one_table_of_max_positions(single_rank):
    config = dataclasses.replace(TINY, block_position_encoding=False)
    model = GLMModel(config, VOCAB)
    assert model.transformer.block_position_embeddings is None
    assert model.transformer.position_embeddings.weight.shape[0] == TINY.max_position_embeddings
    batch = make_batch()
    assert forward_and_loss(model, batch)[0].shape == (2, 24, TINY.hidden_size)


def test_loss_at_the_loaders_row_index_equals_boolean_row_selection(single_rank):
    # The loader ships loss_index so that a GPU selects rows without a host sync; the loss and its
    # gradients must be bit for bit those of selecting with the boolean mask.
    from megatron_glm.data import collate_glm_batch
    from megatron_glm.parallel import vocab_parallel_cross_entropy

    model = GLMModel(TINY, VOCAB, seed=5)
    batch = make_batch()
    hidden = model(batch["tokens"], batch["position_ids"], batch["sep"])
    items = [{k: v[b].numpy() for k, v in batch.items()} for b in range(2)]
    for item in items:
        item["sep"], item["objective"] = int(item["sep"]), 0
    loss_index = collate_glm_batch(items)["loss_index"]
    ours = glm_loss(model, hidden, batch["targets"], batch["loss_mask"], loss_index)
    (ours_grad,) = torch.autograd.grad(ours, model.word_embeddings.weight, retain_graph=True)
    selected = batch["loss_mask"].reshape(-1) > 0
    logits = model.logits(hidden.reshape(-1, hidden.shape[-1])[selected])
    weights = batch["loss_mask"].reshape(-1)
    losses = vocab_parallel_cross_entropy(logits, batch["targets"].reshape(-1)[selected])
    reference = (losses * weights[selected]).sum() / weights.sum()
    (reference_grad,) = torch.autograd.grad(reference, model.word_embeddings.weight)
    assert torch.equal(loss_index, torch.nonzero(selected).squeeze(1))
    assert torch.equal(ours, reference) and torch.equal(ours_grad, reference_grad)
