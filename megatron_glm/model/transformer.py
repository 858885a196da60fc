"""One GLM transformer layer (THUDM/GLM ``ParallelTransformerLayer``), tensor-parallel.

Pre-LayerNorm, with the residual on the un-normalized stream::

    a = x + dropout(attention(LN_1(x)))
    y = a + dropout(mlp(LN_2(a)))

Module and parameter names are THUDM/GLM's (``input_layernorm``, ``attention.query_key_value``,
``attention.dense``, ``post_attention_layernorm``, ``mlp.dense_h_to_4h``, ``mlp.dense_4h_to_h``), so a
layer's state dict at tensor-parallel size 1 is the reference's ``transformer.layers.{i}.*`` entries.
A layer stands alone (its own initialization from the seed and its layer number), so a pipeline
stage can build just its layers.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from megatron_glm.config import ModelConfig
from megatron_glm.model.kv_cache import KVCache
from megatron_glm.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    get_rng_tracker,
    get_tensor_parallel_world_size,
    normal_init,
    recompute,
)
from megatron_glm.parallel.sharding import divide


def init_generator(seed: int, key: str) -> torch.Generator:
    """The CPU generator that initializes the parameters under THUDM key prefix ``key``.

    One stream per embedding table and per layer, derived from the seed and the key, makes the initial
    weights independent of how the model is split: the same for any tensor- or pipeline-parallel size.
    """
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


class LayerNorm(nn.Module):
    """LayerNorm over the hidden dimension through ``kernels.layer_norm``.

    With ``residual`` it returns ``(LN(x + residual), x + residual)``, the fused residual-add form, and with
    ``dropout_p`` and ``x_bias`` as well ``(LN(s), s)`` for ``s = residual + dropout(x + x_bias)`` (the Triton
    kernels add the bias and drop in the kernel).
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        *,
        kernel_backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps, self.kernel_backend = eps, kernel_backend
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        if not self.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        x_bias: torch.Tensor | None = None,
    ):
        return kernels.layer_norm(
            x,
            self.weight,
            self.bias,
            self.eps,
            residual=residual,
            backend=self.kernel_backend,
            dropout_p=dropout_p,
            x_bias=x_bias,
        )


class GLMSelfAttention(nn.Module):
    """Multi-head self-attention with GLM's mask; each tensor-parallel rank holds ``heads / tp`` heads.

    ``query_key_value`` is column-parallel with stride 3, so rank r's output is ``[Q_r; K_r; V_r]`` for
    its own heads. Scores are ``q . k / sqrt(d_head)`` (THUDM scales k before the product: the same
    number up to rounding), query i sees key j iff ``j < sep`` (Part A, bidirectional) or ``j <= i``
    (causal). THUDM's ``--attention-scale s`` computes ``((q / sqrt(s)) . (k / sqrt(d_head s))) * s``
    minus the row maximum, which equals the plain scores up to rounding, so ``ModelConfig.attention_scale``
    needs no code path: it only kept fp16 scores from overflowing, which the kernels avoid by
    accumulating in fp32 (Triton, torch's flash kernels) or scaling q and k before the product (torch's
    math path).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = divide(h, heads, "hidden size (per head)")
        self.local_heads = divide(
            heads, get_tensor_parallel_world_size(), "attention heads (per tensor rank)"
        )
        self.dropout_p = config.attention_dropout
        self.recompute_core = config.activation_checkpointing == "selective"
        self.kernel_backend = config.kernels
        self.deterministic = config.deterministic_kernels
        output_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
        self.query_key_value = ColumnParallelLinear(
            h, 3 * h, stride=3, init_method=normal_init(config.init_method_std), device=device, dtype=dtype
        )
        # Its bias is added by the LayerNorm after it, with the dropout and the residual add (skip_bias_add).
        self.dense = RowParallelLinear(
            h, h, skip_bias_add=True, init_method=normal_init(output_std), device=device, dtype=dtype
        )

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.query_key_value.reset_parameters(generator)
        self.dense.reset_parameters(generator)

    def forward(
        self, x: torch.Tensor, sep: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output without the dense layer's bias, that bias)``: the layer adds it in the LayerNorm after."""
        batch, length, _ = x.shape
        # [B, T, 3, heads, d_head]: the attention takes it packed, and hands back its gradient in one piece.
        qkv = self.query_key_value(x).view(batch, length, 3, self.local_heads, self.head_dim)
        if cache is not None:
            # Decoding: the new tokens attend to the cached keys under the cache's mask (GLM's sep mask
            # over rows of different lengths), see kv_cache.py.
            q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))  # [B, heads, T, d_head] views
            k, v = cache.store(layer, k, v)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, scale=self.head_dim**-0.5)
        elif self.recompute_core and torch.is_grad_enabled():
            context = recompute(self.core_attention, qkv, sep)
        else:
            context = self.core_attention(qkv, sep)
        return self.dense(context.transpose(1, 2).reshape(batch, length, self.local_heads * self.head_dim))

    def core_attention(self, qkv: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
        """Attention over the packed ``qkv`` [B, T, 3, heads, d_head]; returns [B, heads, T, d_head]."""
        scale = 1.0 / math.sqrt(self.head_dim)
        options = {
            "softmax_scale": scale,
            "backend": self.kernel_backend,
            "deterministic": self.deterministic,
        }
        if not (self.training and self.dropout_p > 0):
            return kernels.glm_attention_qkv(qkv, sep, **options)
        # The heads are split over the tensor ranks: each rank drops from its own stream.
        with get_rng_tracker().fork():
            return kernels.glm_attention_qkv(qkv, sep, dropout_p=self.dropout_p, **options)


class GLMMLP(nn.Module):
    """``dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))``; the 4h activations are split over the tensor ranks. The
    forward returns the output without ``dense_4h_to_h``'s bias and that bias, which the layer adds in the
    dropout-add after it."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        h = config.hidden_size
        output_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
        self.dense_h_to_4h = ColumnParallelLinear(
            h, 4 * h, init_method=normal_init(config.init_method_std), device=device, dtype=dtype
        )
        self.dense_4h_to_h = RowParallelLinear(
            4 * h, h, skip_bias_add=True, init_method=normal_init(output_std), device=device, dtype=dtype
        )

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.dense_h_to_4h.reset_parameters(generator)
        self.dense_4h_to_h.reset_parameters(generator)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The tanh approximation, as the released weights were trained with.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMTransformerLayer(nn.Module):
    """Layer ``layer_number`` (0-based) of the stack: ``(hidden [B, T, h], sep [B]) -> hidden``."""

    def __init__(
        self,
        config: ModelConfig,
        layer_number: int,
        *,
        seed: int = 1234,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layer_number = layer_number
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = LayerNorm(h, eps, kernel_backend=config.kernels, device=device, dtype=dtype)
        self.attention = GLMSelfAttention(config, device=device, dtype=dtype)
        self.post_attention_layernorm = LayerNorm(
            h, eps, kernel_backend=config.kernels, device=device, dtype=dtype
        )
        self.mlp = GLMMLP(config, device=device, dtype=dtype)
        self.hidden_dropout = config.hidden_dropout
        self.kernel_backend = config.kernels
        if not self.input_layernorm.weight.is_meta:
            self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        generator = init_generator(seed, f"transformer.layers.{self.layer_number}")
        self.input_layernorm.reset_parameters()
        self.attention.reset_parameters(generator)
        self.post_attention_layernorm.reset_parameters()
        self.mlp.reset_parameters(generator)

    def forward(
        self,
        hidden: torch.Tensor,
        sep: torch.Tensor,
        cache: KVCache | None = None,
        *,
        incoming: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        defer: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The layer's output stream ``y = a + dropout(mlp + b)``.

        The last add can move into the next LayerNorm, the stack's way on one device (``GLMTransformer``): with
        ``defer`` the layer returns ``(a, mlp, b)`` instead of ``y``, and the next layer, given them as
        ``incoming = (mlp, b)`` with ``a`` as ``hidden``, forms ``y`` in its first LayerNorm, whose kernel then
        adds the bias, drops, adds the residual and normalizes in one pass each way. Same numbers, same random
        draws in the same order: bitwise the layer-by-layer result, one kernel, its backward and the residual
        gradient's add fewer per layer.
        """
        dropout_p = self.hidden_dropout if self.training else 0.0
        if incoming is None:
            attention_input = self.input_layernorm(hidden)
        else:
            # The previous layer's output, formed here: LN_1(a + dropout(mlp + b)) and the stream itself.
            attention_input, hidden = self.input_layernorm(
                incoming[0], residual=hidden, dropout_p=dropout_p, x_bias=incoming[1]
            )
        attention_output, attention_bias = self.attention(attention_input, sep, cache, self.layer_number)
        # LN_2 of the new residual stream a = x + dropout(attention), and a itself (the dense layer's bias, the
        # dropout, the add and the LayerNorm are one kernel each way on the Triton path).
        mlp_input, hidden = self.post_attention_layernorm(
            attention_output, residual=hidden, dropout_p=dropout_p, x_bias=attention_bias
        )
        mlp_output, mlp_bias = self.mlp(mlp_input)
        if defer:
            # Flat, so that DeepSpeed's ZeRO-3 sees the bias among the outputs and keeps it gathered.
            return hidden, mlp_output, mlp_bias
        return kernels.dropout_add(
            mlp_output, hidden, dropout_p, backend=self.kernel_backend, x_bias=mlp_bias
        )
