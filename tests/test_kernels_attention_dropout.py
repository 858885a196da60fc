"""The GLM attention's in-kernel dropout (``kernels/triton_attention_dropout.py``): the rate, the expectation and the
independence of the keep decisions, their dependence on the seed alone, and the same mask in the forward and both
backward kernels, however it reaches them (the forward's stored bits, dQ's, or drawn again). On CUDA tensors where
a GPU is present, otherwise in the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
import triton

from kernels import glm_attention
from kernels.reference import glm_attention_mask
from kernels.triton_attention_backward_kernels import (
    attention_backward_dkdv_kernel,
    attention_backward_dq_kernel,
)
from kernels.triton_attention_kernels import attention_forward_kernel
from kernels.triton_attention_tuning import DKDV_SHAPES, DQ_SHAPES, FORWARD_SHAPES
from tests.attention_cases import forward_backward, int_tensor, random_qkv, random_tensor, record_launches


def _dropped_probabilities(q, k, sep, dropout_p, seed):
    """The kernel's dropped, rescaled probability matrix, read off by attending to one-hot values (v_j = e_j)."""
    batch, heads, length, head_dim = q.shape
    one_hot = torch.eye(length, head_dim, dtype=q.dtype, device=q.device).expand(
        batch, heads, length, head_dim
    )
    torch.manual_seed(seed)
    return glm_attention(q, k, one_hot, sep, dropout_p=dropout_p, backend="triton")[..., :length].double()


def _probabilities(q, k, sep):
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    visible = glm_attention_mask(sep, q.shape[2])
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1), visible.expand_as(scores)


def test_dropout_drops_p_of_the_probability_mass_and_keeps_the_expectation():
    dropout_p = 0.3
    q, k, _ = random_qkv(2, 4, 64, 64, 64, torch.float32)
    sep = int_tensor([20, 0])
    dropped = _dropped_probabilities(q, k, sep, dropout_p, seed=3)
    probabilities, visible = _probabilities(q, k, sep)
    assert torch.all(dropped[~visible] == 0)
    kept = dropped[visible] != 0
    assert abs((1 - kept.double().mean().item()) - dropout_p) < 0.03
    dropped_mass = probabilities[visible][~kept].sum() / probabilities.sum()
    assert abs(dropped_mass.item() - dropout_p) < 0.03
    torch.testing.assert_close(
        dropped[visible][kept], probabilities[visible][kept] / (1 - dropout_p), rtol=1e-5, atol=1e-6
    )
    # Rescaling by 1/(1-p) keeps each row's expected sum at 1.
    assert abs(dropped.sum(-1).mean().item() - 1.0) < 0.04


def test_every_key_of_a_philox_call_drops_at_the_rate_p_and_on_its_own():
    """One Philox call decides 8 keys of a 32-key block (see triton_attention_dropout.py): each of the 32 key
    positions drops at the rate p, and no two positions share their decisions (two independent keys agree with
    probability p^2 + (1 - p)^2 = 0.58 at p = 0.3; two that read the same uniform always agree)."""
    dropout_p, length = 0.3, 64
    q, k, _ = random_qkv(4, 4, length, length, 64, torch.float32)
    dropped = _dropped_probabilities(q, k, int_tensor([length] * 4), dropout_p, seed=5) == 0
    by_position = dropped.reshape(-1, 32).T.double()  # [key position in its block of 32, samples]
    assert by_position.shape[1] == 4 * 4 * length * 2
    rates = by_position.mean(1)
    assert torch.all((rates - dropout_p).abs() < 0.06), rates
    agreement = (by_position[:, None, :] == by_position[None, :, :]).double().mean(-1)
    off_diagonal = agreement[~torch.eye(32, dtype=torch.bool)]
    assert off_diagonal.max().item() < 0.68, off_diagonal.max()


def test_a_dropout_p_next_to_1_drops_nearly_everything():
    """p = 1 - 1e-6 keeps 1 uniform in 65536 (the threshold, at most 65535, shifted into a word's high half must
    not wrap around to 0 and keep every high half)."""
    q, k, _ = random_qkv(4, 4, 64, 64, 64, torch.float32)
    kept = _dropped_probabilities(q, k, int_tensor([64] * 4), 1 - 1e-6, seed=6) != 0
    assert kept.double().mean().item() < 1e-3


def test_dropout_is_a_function_of_the_torch_seed():
    q, k, v = random_qkv(1, 2, 48, 48, 32, torch.float16)
    sep = int_tensor([16])
    grad_out = random_tensor(1, 2, 48, 32)

    def run(seed):
        torch.manual_seed(seed)
        return forward_backward(
            lambda q, k, v: glm_attention(q, k, v, sep, dropout_p=0.2, backend="triton"), [q, k, v], grad_out
        )

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for a, b in zip(first, other):
        assert not torch.equal(a, b)


def test_backward_replays_the_forward_dropout_mask():
    dropout_p, seed = 0.25, 11
    batch, heads, length, head_dim = 2, 2, 48, 64
    q, k, v = random_qkv(batch, heads, length, length, head_dim, torch.float32)
    sep = int_tensor([10, 30])
    keep = _dropped_probabilities(q, k, sep, dropout_p, seed) != 0
    grad_out = random_tensor(batch, heads, length, head_dim, seed=2)

    def same_mask_in_torch(q, k, v):
        scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
        scores = scores.masked_fill(~glm_attention_mask(sep, length), float("-inf"))
        return (torch.softmax(scores, dim=-1) * keep / (1 - dropout_p)) @ v

    def triton_with_seed(q, k, v):
        torch.manual_seed(seed)
        return glm_attention(q, k, v, sep, dropout_p=dropout_p, backend="triton")

    want = forward_backward(same_mask_in_torch, [x.double() for x in (q, k, v)], grad_out.double())
    got = forward_backward(triton_with_seed, [q, k, v], grad_out)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


# Tilings whose forward and backward tiles differ (forward 128 x 64 against dQ's 128 x 32 and dK/dV's 32-query
# tiles; forward 128 x 128 against 64 x 64): the stored bits are written by one tiling and read by others. On a
# GPU the untuned default tiles only, as the other GPU tests run (the 128-row tiles compile for seconds each).
KEEP_BITS_TILES = [None] if torch.cuda.is_available() else [1, 4]


@pytest.mark.parametrize("index", KEEP_BITS_TILES)
def test_the_stored_dropout_mask_gives_what_replaying_it_gives(monkeypatch, index):
    """The forward's keep bits, read back by dQ and dK/dV, are the decisions the backward would draw again from
    Philox: outputs and gradients bitwise equal with both, over padding rows, cached keys (Tq < Tk) and sep
    at and off the tiles' edges. The bits take one byte per query and 8 keys (each query's row padded to whole
    128-key tiles, which every tile of every candidate stays inside), kept for the backward; past the
    size limit (GLM_KERNELS_DROPOUT_MASK_MAX_MIB) the dQ kernel runs first, draws them and stores them for dK/dV
    (up to GLM_KERNELS_DROPOUT_BACKWARD_MASK_MAX_MIB), and past that both draw them again."""
    from kernels import triton_attention_tuning, triton_support

    for kernel, owned, inner, shapes in (
        (attention_forward_kernel, "BLOCK_M", "BLOCK_N", FORWARD_SHAPES),
        (attention_backward_dq_kernel, "BLOCK_M", "BLOCK_N", DQ_SHAPES),
        (attention_backward_dkdv_kernel, "BLOCK_N", "BLOCK_M", DKDV_SHAPES),
    ):
        if index is not None:
            first, second, _, _ = shapes[index]
            config = triton.Config({owned: first, inner: second, "USE_TMA": False})
            monkeypatch.setattr(kernel, "configs", [config])
            monkeypatch.setattr(kernel, "cache", {})
    assert "KEEP_BITS" in triton_attention_tuning._TUNING_KEY
    assert "STORE_BITS" in triton_attention_tuning._DQ_TUNING_KEY
    launched = []
    record_launches(monkeypatch, ("_backward_dq", "_backward_dkdv"), launched)
    batch, heads, query_length, key_length, head_dim = 4, 2, 130, 150, 16
    q, _, _ = random_qkv(batch, heads, query_length, query_length, head_dim, torch.float32, seed=3)
    _, k, v = random_qkv(batch, heads, key_length, key_length, head_dim, torch.float32, seed=4)
    sep, lengths = int_tensor([0, 64, 100, 149]), int_tensor([150, 140, 129, 31])
    grad_out = random_tensor(batch, heads, query_length, head_dim, seed=5)
    # Bytes of the bits, stored up to the limit: one per query and 8 keys, rows padded to whole 128-key tiles.
    size = batch * heads * query_length * -(-key_length // 128) * 16

    def run(forward_limit: int, backward_limit: int):
        monkeypatch.setattr(triton_support, "DROPOUT_MASK_MAX_BYTES", forward_limit)
        monkeypatch.setattr(triton_support, "DROPOUT_BACKWARD_MASK_MAX_BYTES", backward_limit)
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(9)
        out = glm_attention(*leaves, sep, dropout_p=0.3, lengths=lengths, backend="triton")
        saved = [t for t in out.grad_fn.saved_tensors if t.dtype == torch.uint8]
        launched.clear()
        out.backward(grad_out)
        return [out.detach()] + [leaf.grad for leaf in leaves], saved, list(launched)

    stored, bits, stored_launches = run(size, 0)
    from_dq, none, dq_launches = run(size - 1, size)
    replayed, also_none, replayed_launches = run(size - 1, size - 1)
    for name, a, b, c in zip(["out", "dq", "dk", "dv"], stored, from_dq, replayed):
        assert torch.equal(a, b), name
        assert torch.equal(a, c), name
    assert stored[2].abs().max() > 0
    assert [t.numel() for t in bits] == [size]
    assert none == also_none == []
    # (launcher, STORE_BITS, KEEP_BITS): the forward's bits read by both; dQ first, storing for dK/dV; drawn twice.
    assert stored_launches == [("_backward_dkdv", None, True), ("_backward_dq", False, True)]
    assert dq_launches == [("_backward_dq", True, False), ("_backward_dkdv", None, True)]
    assert replayed_launches == [("_backward_dkdv", None, False), ("_backward_dq", False, False)]
    # Without a backward to come (a recomputation's first pass runs under no_grad) nothing is stored, and the
    # forward drops what it drops with the bits.
    monkeypatch.setattr(triton_support, "DROPOUT_MASK_MAX_BYTES", size)
    torch.manual_seed(9)
    with torch.no_grad():
        assert torch.equal(
            glm_attention(q, k, v, sep, dropout_p=0.3, lengths=lengths, backend="triton"), stored[0]
        )
