"""The GLM model (THUDM/GLM ``GLMModel`` + ``GPT2ParallelTransformer``), tensor-parallel.

Inputs (the batch contract of the data pipeline):

    tokens        [B, T] int64    Part A (the text with each span replaced by a mask token), then Part B
    position_ids  [B, 2, T] int64 row 0: positions; row 1: block positions (0 in Part A, 1.. in a span)
    sep           [B] int64       length of Part A: bidirectional attention over the first sep tokens,
                                  causal after
    targets       [B, T] int64    already aligned with tokens (no shift)
    loss_mask     [B, T]          1 on Part-B targets, 0 elsewhere

Forward::

    h_0 = dropout(word_embeddings[tokens] + position_embeddings[pos] + block_position_embeddings[block_pos])
    h_l = layer_l(h_{l-1}, sep)                      l = 1..L   (see transformer.py)
    out = final_layernorm(h_L)
    logits = out @ word_embeddings^T                 tied, no bias, vocab-parallel

Parameter names follow THUDM/GLM, so ``state_dict()`` at tensor-parallel size 1 has exactly the
reference's keys (``word_embeddings.weight``, ``transformer.position_embeddings.weight``,
``transformer.layers.{i}.attention.query_key_value.weight``, ...); ``megatron_glm.checkpoint.layout`` describes how
each is split at larger sizes.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from megatron_glm.config import ModelConfig
from megatron_glm.model.kv_cache import KVCache
from megatron_glm.model.transformer import GLMTransformerLayer, LayerNorm, init_generator
from megatron_glm.parallel import (
    VocabParallelEmbedding,
    normal_init,
    recompute,
    vocab_parallel_logits,
)


def _embedding(rows: int, width: int, device, dtype) -> nn.Embedding:
    """``nn.Embedding(rows, width)``; on ``meta`` without its initialization, which has nothing to draw there but
    runs torch's Python reference of ``normal_``, whose first call imports TorchDynamo (seconds per process)."""
    if torch.device(device if device is not None else torch.get_default_device()).type != "meta":
        return nn.Embedding(rows, width, device=device, dtype=dtype)
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width, device="meta", dtype=dtype))


class PositionEmbeddings(nn.Module):
    """The position and block-position tables and the embedding dropout.

    ``GLMTransformer`` is one (so the tables keep THUDM's ``transformer.position_embeddings`` keys); the
    pipeline's embedding stage is another.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        seed: int = 1234,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        h = config.hidden_size
        self.init_method_std = config.init_method_std
        if config.block_position_encoding:
            # Masking makes sequences longer than the text (two tokens per span), hence the extra row.
            rows = config.max_position_embeddings + 1
            self.position_embeddings = _embedding(rows, h, device, dtype)
            self.block_position_embeddings = _embedding(rows, h, device, dtype)
        else:
            self.position_embeddings = _embedding(config.max_position_embeddings, h, device, dtype)
            self.block_position_embeddings = None
        self.embedding_dropout = kernels.Dropout(config.hidden_dropout)
        if not self.position_embeddings.weight.is_meta:
            self.reset_position_embeddings(seed)

    @torch.no_grad()
    def reset_position_embeddings(self, seed: int) -> None:
        for name in ("position_embeddings", "block_position_embeddings"):
            table = getattr(self, name)
            if table is not None:
                generator = init_generator(seed, f"transformer.{name}")
                table.weight.copy_(
                    torch.empty(table.weight.shape).normal_(0.0, self.init_method_std, generator=generator)
                )

    def embed_positions(self, word_embeddings: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``dropout(word + position[pos] + block_position[block_pos])``."""
        hidden = word_embeddings + self.position_embeddings(position_ids[:, 0])
        if self.block_position_embeddings is not None:
            hidden = hidden + self.block_position_embeddings(position_ids[:, 1])
        return self.embedding_dropout(hidden)


class GLMTransformer(PositionEmbeddings):
    """Position embeddings, the layers and the final LayerNorm (THUDM's ``transformer.*`` keys)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        seed: int = 1234,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(config, seed=seed, device=device, dtype=dtype)
        h = config.hidden_size
        self.recompute_layers = config.activation_checkpointing == "full"
        self.layers = nn.ModuleList(
            GLMTransformerLayer(config, i, seed=seed, device=device, dtype=dtype)
            for i in range(config.num_layers)
        )
        self.final_layernorm = LayerNorm(
            h, config.layernorm_epsilon, kernel_backend=config.kernels, device=device, dtype=dtype
        )
        # Per-layer CUDA graphs in training (model.cuda_graphs.enable_layer_graphs), else None.
        self.layer_graphs: list | None = None
        # Each layer's last add in the next LayerNorm (GLMTransformerLayer.forward's ``defer``), graphed or not;
        # False runs the layers one by one, as recomputation does.
        self.defer_residual_adds = True

    def reset_parameters(self, seed: int) -> None:
        self.reset_position_embeddings(seed)
        for layer in self.layers:
            layer.reset_parameters(seed)
        self.final_layernorm.reset_parameters()

    def forward(
        self,
        word_embeddings: torch.Tensor,
        position_ids: torch.Tensor,
        sep: torch.Tensor,
        cache: KVCache | None = None,
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embed_positions(word_embeddings, position_ids)
        if cache is not None:
            cache.begin(token_valid)
            for layer in self.layers:
                hidden = layer(hidden, sep, cache)
            cache.commit()
            return self.final_layernorm(hidden)
        # The kernels take sep as int32 on the device: convert it once here, not in each layer.
        sep = sep.to(device=hidden.device, dtype=torch.int32)
        recomputed = self.recompute_layers and torch.is_grad_enabled()
        # Per-layer CUDA graphs (training only) take the layers' places; they take the same arguments.
        layers = self.layer_graphs or self.layers
        if recomputed or not self.defer_residual_adds:
            # Layer by layer: a recomputed layer takes and returns one stream.
            for layer in layers:
                if recomputed:
                    hidden = recompute(layer, hidden, sep)
                else:
                    hidden = layer(hidden, sep)
            return self.final_layernorm(hidden)
        # Each layer's last add (its MLP output's bias, dropout and residual add) happens in the next LayerNorm,
        # the final one's for the last layer: see GLMTransformerLayer.forward.
        incoming = None
        for layer in layers:
            hidden, *incoming = layer(hidden, sep, incoming=incoming, defer=True)
        if incoming is None:
            return self.final_layernorm(hidden)
        dropout_p = self.layers[-1].hidden_dropout if self.training else 0.0
        output, bias = incoming
        return self.final_layernorm(output, residual=hidden, dropout_p=dropout_p, x_bias=bias)[0]


class GLMModel(nn.Module):
    """GLM at this rank's tensor-parallel size; build after ``megatron_glm.parallel.initialize_parallel``.

    ``vocab_size`` is the padded table size (``megatron_glm.config.padded_vocab_size``), divisible by the
    tensor-parallel size. Parameters are initialized from ``seed`` (the same values at every parallel
    size) unless ``device`` is ``"meta"``, which allocates nothing; such a model is materialized with
    ``model.to_empty(device=...)`` and then ``reset_parameters(seed)`` or a checkpoint load.
    """

    def __init__(
        self,
        config: ModelConfig,
        vocab_size: int,
        *,
        seed: int = 1234,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size,
            config.hidden_size,
            init_method=normal_init(config.init_method_std),
            device=device,
            dtype=dtype,
        )
        self.transformer = GLMTransformer(config, seed=seed, device=device, dtype=dtype)
        if not self.word_embeddings.weight.is_meta:
            self.word_embeddings.reset_parameters(init_generator(seed, "word_embeddings"))

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> GLMModel:
        """``nn.Module.to_empty`` that keeps the parameters' tensor-parallel marks.

        Leaving ``meta`` replaces each parameter by a new one, which would drop ``tensor_model_parallel`` /
        ``partition_dim``: DeepSpeed would then count sharded weights as replicated in the gradient norm.
        """
        marks = {name: dict(vars(param)) for name, param in self.named_parameters()}
        # What nn.Module.to_empty does, without torch.empty_like: on a meta tensor that runs torch's Python
        # reference, whose first call imports SymPy and FX's shape machinery (about a second per process).
        self._apply(
            lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device), recurse=recurse
        )
        for name, param in self.named_parameters():
            param.__dict__.update(marks[name])
        return self

    def reset_parameters(self, seed: int) -> None:
        """(Re-)initialize every parameter from ``seed``: N(0, std), output projections N(0, std / sqrt(2L))."""
        self.word_embeddings.reset_parameters(init_generator(seed, "word_embeddings"))
        self.transformer.reset_parameters(seed)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        sep: torch.Tensor,
        cache: KVCache | None = None,
        token_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states ``[B, T, h]`` (after the final LayerNorm), replicated on the tensor ranks.

        With ``cache`` (decoding) ``tokens`` are the next chunk of each row, ``token_valid`` [B, T] flags
        the real ones, the mask comes from the cache and ``sep`` is not used (see ``kv_cache.py``).
        """
        embeddings = self.word_embeddings(tokens)
        if cache is None:
            return self.transformer(embeddings, position_ids, sep)
        return self.transformer(embeddings, position_ids, sep, cache, token_valid)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V / tp]`` over this rank's vocab range (output tied to the word embeddings)."""
        return vocab_parallel_logits(hidden, self.word_embeddings.weight)
