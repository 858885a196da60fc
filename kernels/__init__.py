"""Fused kernels for GLM: attention with the prefix (``sep``) mask and LayerNorm.

``glm_attention`` and ``layer_norm`` are the interface the model calls. Today they run the torch
implementations in ``kernels.reference``; the Triton kernels plug in behind the same functions.
"""

from kernels.reference import glm_attention_mask, glm_attention_torch, layer_norm_torch

glm_attention = glm_attention_torch
layer_norm = layer_norm_torch

__all__ = ["glm_attention", "glm_attention_mask", "glm_attention_torch", "layer_norm", "layer_norm_torch"]
