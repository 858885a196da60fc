"""Torch implementations of the fused kernels: the CPU path and the ground truth the Triton kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def glm_attention_mask(sep: torch.Tensor, query_length: int, key_length: int | None = None) -> torch.Tensor:
    """Boolean visibility ``[B, 1, Tq, Tk]``: key j is visible to query i iff ``j < sep[b]`` or ``j <= i``.

    With ``Tq < Tk`` (decoding against cached keys) query i sits at absolute position ``Tk - Tq + i``.
    """
    key_length = query_length if key_length is None else key_length
    offset = key_length - query_length
    rows = torch.arange(query_length, device=sep.device).view(1, 1, query_length, 1) + offset
    cols = torch.arange(key_length, device=sep.device).view(1, 1, 1, key_length)
    return (cols <= rows) | (cols < sep.view(-1, 1, 1, 1))


def glm_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention over ``[B, H, T, D]`` with GLM's mask: bidirectional over the first ``sep[b]`` keys, causal after."""
    mask = glm_attention_mask(sep, q.shape[-2], k.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)


def layer_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim; with ``residual`` returns ``(LN(x + residual), x + residual)``."""
    if residual is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    summed = x + residual
    return F.layer_norm(summed, (x.shape[-1],), weight, bias, eps), summed
