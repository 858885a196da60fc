"""Torch implementations of the fused kernels: the CPU path and the ground truth the Triton kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dropout import dropout


def glm_attention_mask(
    sep: torch.Tensor,
    query_length: int,
    key_length: int | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean visibility ``[B, 1, Tq, Tk]``: key j is visible to query i iff ``j < sep[b]`` or ``j <= i``.

    With ``Tq < Tk`` (decoding against cached keys) query i sits at absolute position ``Tk - Tq + i``.
    With ``lengths`` keys at positions ``>= lengths[b]`` are padding and visible to no query.
    """
    key_length = query_length if key_length is None else key_length
    offset = key_length - query_length
    rows = torch.arange(query_length, device=sep.device).view(1, 1, query_length, 1) + offset
    cols = torch.arange(key_length, device=sep.device).view(1, 1, 1, key_length)
    visible = (cols <= rows) | (cols < sep.view(-1, 1, 1, 1))
    if lengths is not None:
        visible = visible & (cols < lengths.to(sep.device).view(-1, 1, 1, 1))
    return visible


def query_rows_valid(lengths: torch.Tensor, query_length: int, key_length: int) -> torch.Tensor:
    """``[B, 1, Tq, 1]``: True where query row i (absolute position ``Tk - Tq + i``) is below ``lengths[b]``."""
    rows = torch.arange(query_length, device=lengths.device) + (key_length - query_length)
    return rows.view(1, 1, query_length, 1) < lengths.view(-1, 1, 1, 1)


def glm_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over ``[B, H, T, D]`` with GLM's mask: bidirectional over the first ``sep[b]`` keys, causal after.

    With ``lengths`` ([B] ints) query rows at or past ``lengths[b]`` are padding: their output is 0 and they
    pass no gradient; keys at or past ``lengths[b]`` are visible to no query.
    """
    query_length, key_length = q.shape[-2], k.shape[-2]
    sep = sep.to(q.device)
    if lengths is None:
        mask = glm_attention_mask(sep, query_length, key_length)
        return _attention(q, k, v, mask, softmax_scale, dropout_p)
    lengths = lengths.to(q.device)
    # A sample of length 0 would leave rows with no visible key, which SDPA turns into NaN (and NaN
    # gradients). Letting such rows see key 0 keeps everything finite; their output is zeroed below anyway.
    mask = glm_attention_mask(sep, query_length, key_length, lengths.clamp(min=1))
    out = _attention(q, k, v, mask, softmax_scale, dropout_p)
    return out.masked_fill(~query_rows_valid(lengths, query_length, key_length), 0.0)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    softmax_scale: float | None,
    dropout_p: float,
) -> torch.Tensor:
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale
        )
    # With dropout, SDPA on CPU leaves its flash kernel for a path that draws the mask with bernoulli_; the
    # same math with the cheap mask of kernels.dropout is faster.
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).masked_fill_(~mask, float("-inf"))
    probabilities = dropout(torch.softmax(scores, dim=-1), dropout_p)
    return torch.matmul(probabilities, v)


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
