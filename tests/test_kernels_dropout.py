"""The fast CPU dropout: the right drop rate, unbiased, seeded by torch's generator, and the attention path
that uses it computes softmax * keep / (1 - p) with the mask it draws."""

import math

import pytest
import torch

from kernels import dropout, glm_attention, glm_attention_mask, keep_mask


def test_keep_mask_drops_p_of_the_elements_in_both_halves_of_each_draw():
    torch.manual_seed(0)
    mask = keep_mask((1_000_000,), 0.1)
    # Binomial standard deviation at n = 1e6, p = 0.1 is 3e-4; 5 sigma.
    assert abs((~mask).float().mean().item() - 0.1) < 1.5e-3
    pairs = mask.view(-1, 2)
    for half in (0, 1):
        assert abs((~pairs[:, half]).float().mean().item() - 0.1) < 2e-3
    assert keep_mask((7, 3), 0.5).shape == (7, 3)


def test_dropout_preserves_the_expectation_and_follows_the_seed():
    x = torch.ones(400_000)
    torch.manual_seed(1)
    first = dropout(x, 0.25)
    assert first.unique().tolist() == pytest.approx([0.0, 1.0 / 0.75])
    assert first.mean().item() == pytest.approx(1.0, abs=5e-3)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.25), first)
    assert not torch.equal(dropout(x, 0.25), first)
    assert dropout(x, 0.25, training=False) is x


def test_dropout_gradient_uses_the_same_mask():
    x = torch.randn(1000, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.3)
    y.sum().backward()
    kept = y != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.7))
    assert torch.all(x.grad[~kept] == 0)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_attention_dropout_on_cpu_applies_the_drawn_mask(dtype, tolerance):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 40, 16, dtype=dtype) for _ in range(3))
    sep = torch.tensor([10, 40])
    torch.manual_seed(5)
    out = glm_attention(q, k, v, sep, dropout_p=0.2, backend="torch")
    torch.manual_seed(5)
    keep = keep_mask((2, 3, 40, 40), 0.2)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(16)
    scores = scores.masked_fill(~glm_attention_mask(sep, 40), float("-inf"))
    expected = (torch.softmax(scores, -1) * keep / 0.8) @ v.float()
    assert torch.allclose(out.float(), expected, atol=tolerance, rtol=tolerance)
