"""Cross entropy over the whole vocabulary on Triton (``kernels.cross_entropy``), against torch's, on CUDA tensors
where a GPU is present and otherwise on CPU tensors in the Triton interpreter (tests/conftest.py turns it on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import KernelError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(rows, vocab, dtype, seed=0, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * 3 + offset).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[0], targets[-1] = 0, vocab - 1  # the first and the last column
    grad = torch.rand(rows, generator=generator).to(DEVICE)
    return logits, targets.to(DEVICE), grad


def _loss_and_grad(fn, logits, targets, grad):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, targets)
    loss.backward(grad.to(loss.dtype))
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "label_smoothing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_torch(dtype, smoothing):
    # 1000 columns: blocks of the interpreter's 256 and a ragged last one; an offset of 1000 makes a naive
    # exp overflow, which the running maximum must avoid.
    logits, targets, grad = _case(5, 1000, dtype, offset=1000.0 if dtype == torch.float32 else 0.0)

    def torch_ce(x, t):
        return F.cross_entropy(x, t, reduction="none", label_smoothing=smoothing)

    def ours(x, t):
        return kernels.cross_entropy(x, t, smoothing, backend="triton")

    exact = _loss_and_grad(lambda x, t: torch_ce(x.double(), t), logits, targets, grad)
    in_fp32 = _loss_and_grad(lambda x, t: torch_ce(x.float(), t), logits, targets, grad)
    loss, logits_grad = _loss_and_grad(ours, logits, targets, grad)
    assert loss.dtype == torch.float32 and logits_grad.dtype == dtype
    # Within twice what torch's fp32 cross entropy is off (fp32 logits near 1000 keep 2^-14 of absolute
    # precision), plus a few units of the result's dtype.
    for name, got, want, theirs, unit in (
        ("loss", loss, exact[0], in_fp32[0], 2**-24),
        ("grad", logits_grad, exact[1], in_fp32[1].to(dtype), 2**-24 if dtype == torch.float32 else 2**-8),
    ):
        torch_error = (theirs.double() - want).abs().max().item()
        bound = 2 * torch_error + 4 * unit * want.abs().max().item()
        error = (got.double() - want).abs().max().item()
        assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g} (torch fp32: {torch_error:.3g})"


def test_vocab_parallel_cross_entropy_on_one_rank_takes_the_kernels():
    """The model's loss at tensor-parallel size 1: the Triton kernels give what the all-reduce form gives."""
    from megatron_glm import parallel
    from megatron_glm.parallel import vocab_parallel_cross_entropy

    parallel.initialize_parallel(1, 1)
    try:
        logits, targets, grad = _case(7, 700, torch.float32, seed=3)
        triton_path = _loss_and_grad(
            lambda x, t: vocab_parallel_cross_entropy(x.view(1, 7, 700), t.view(1, 7), 0.1, "triton").view(7),
            logits,
            targets,
            grad,
        )
        torch_path = _loss_and_grad(
            lambda x, t: vocab_parallel_cross_entropy(x, t, 0.1, "torch"), logits, targets, grad
        )
    finally:
        parallel.destroy_parallel()
    for ours, theirs in zip(triton_path, torch_path):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_bad_shapes_raise_kernel_error():
    with pytest.raises(KernelError, match=r"\[N, V\]"):
        kernels.cross_entropy(
            torch.zeros(2, 3, 4, device=DEVICE),
            torch.zeros(2, 3, dtype=torch.long, device=DEVICE),
            backend="triton",
        )
