"""Inputs and helpers shared by the attention kernel tests (``test_kernels_attention.py``,
``test_kernels_attention_dropout.py``): random q, k, v in the model's layout, on CUDA where a GPU is present."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def random_qkv(batch, heads, query_length, key_length, head_dim, dtype, seed=0, device=DEVICE):
    """Random q, k, v in the model's layout: [B, T, H, D] storage viewed as [B, H, T, D] (non-contiguous)."""
    generator = torch.Generator().manual_seed(seed)

    def make(length):
        values = torch.randn(batch, length, heads, head_dim, generator=generator)
        return values.to(device=device, dtype=dtype).transpose(1, 2)

    return make(query_length), make(key_length), make(key_length)


def int_tensor(values):
    return torch.tensor(values, device=DEVICE)


def random_tensor(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def forward_backward(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def record_launches(monkeypatch, names: tuple[str, ...], launched: list) -> None:
    """Wrap the launchers ``names`` of ``kernels.triton_attention`` so that each call appends ``(name, STORE_BITS,
    KEEP_BITS)`` (None where the call passes no such switch) to ``launched``, then launches."""
    from kernels import triton_attention

    for name in names:
        launcher = getattr(triton_attention, name)

        def wrapped(*args, launcher=launcher, name=name, **kwargs):
            launched.append((name, kwargs.get("STORE_BITS"), kwargs.get("KEEP_BITS")))
            return launcher(*args, **kwargs)

        monkeypatch.setattr(triton_attention, name, wrapped)
