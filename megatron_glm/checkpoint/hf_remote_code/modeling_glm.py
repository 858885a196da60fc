"""GLM (THUDM/GLM, arXiv 2103.10360) for Hugging Face ``transformers``, in plain PyTorch.

Written by megatron-glm's ``glm-convert export --to hf``; it does not import megatron-glm. Module names and
state-dict keys are THUDM/GLM's (``word_embeddings``, ``transformer.layers.{i}.attention.query_key_value``,
...); the head models hold the base model as ``glm``. The math is megatron-glm's: pre-LayerNorm layers,
fused ``[Q; K; V]`` projection, GeLU with the tanh approximation (what the weights were trained with),
logits tied to the word embeddings, and two position tables (positions and block positions).

``attention_mask`` is either the length of Part A per sample (``[B]``: bidirectional over the first
``sep`` tokens, causal after, THUDM's "sep" form) or a ``[B, 1, S, S]`` 0/1 matrix. ``position_ids`` is
``[B, 2, S]`` (positions, block positions). ``build_inputs_for_generation`` prepares blank filling with
``generate``.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_glm import GLMConfig


@dataclass
class GLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


def _ltor_mask(attention_mask, batch_size, seq_length, device, dtype):
    """The ``[B, 1, S, S]`` 0/1 mask from a ``[B]``/scalar sep, a 4-D matrix or None (causal)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.to(dtype)
    if attention_mask is None:
        attention_mask = torch.zeros(batch_size, dtype=torch.long, device=device)
    sep = attention_mask.reshape(-1).expand(batch_size) if attention_mask.numel() == 1 else attention_mask
    columns = torch.arange(seq_length, device=device)
    causal = columns[None, :] <= columns[:, None]
    prefix = columns[None, None, :] < sep.reshape(-1, 1, 1)
    return (causal[None] | prefix).unsqueeze(1).to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = nn.Dropout(config.attention_dropout_prob)
        self.output_dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, hidden, mask):
        batch, seq, _ = hidden.shape
        q, k, v = (
            t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            for t in self.query_key_value(hidden).chunk(3, dim=-1)
        )
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(mask == 0, torch.finfo(scores.dtype).min)
        probs = self.attention_dropout(torch.softmax(scores.float(), dim=-1).to(v.dtype))
        context = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, -1)
        return self.output_dropout(self.dense(context))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, hidden):
        return self.dropout(self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden), approximate="tanh")))


class GLMBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden, mask):
        hidden = hidden + self.attention(self.input_layernorm(hidden), mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class GLMStack(nn.Module):
    def __init__(self, config):
        super().__init__()
        rows = (
            config.max_sequence_length + 1 if config.block_position_encoding else config.max_sequence_length
        )
        self.position_embeddings = nn.Embedding(rows, config.hidden_size)
        self.block_position_embeddings = (
            nn.Embedding(rows, config.hidden_size) if config.block_position_encoding else None
        )
        self.embedding_dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, hidden, position_ids, mask):
        hidden = hidden + self.position_embeddings(position_ids[:, 0])
        if self.block_position_embeddings is not None:
            hidden = hidden + self.block_position_embeddings(position_ids[:, 1])
        hidden = self.embedding_dropout(hidden)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return self.final_layernorm(hidden)


class GLMPreTrainedModel(PreTrainedModel):
    config_class = GLMConfig
    base_model_prefix = "glm"
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


class GLMModel(GLMPreTrainedModel):
    """Embeddings, the transformer stack and the tied output logits (THUDM/GLM's ``GLMModel``)."""

    def __init__(self, config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = GLMStack(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, return_dict=None, **kwargs):
        batch, seq = input_ids.shape
        if position_ids is None:
            positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
            position_ids = torch.stack([positions, torch.zeros_like(positions)], dim=1)
        embeddings = self.word_embeddings(input_ids)
        mask = _ltor_mask(attention_mask, batch, seq, input_ids.device, embeddings.dtype)
        hidden = self.transformer(embeddings, position_ids, mask)
        logits = F.linear(hidden, self.word_embeddings.weight) if self.config.output_predict else None
        return GLMOutput(logits=logits, last_hidden_state=hidden)


class GLMForConditionalGeneration(GLMPreTrainedModel, GenerationMixin):
    """GLM with its tied language-model head: ``logits`` at every position, cross entropy on ``labels``
    (-100 ignored); ``generate`` fills one blank per sample (see ``build_inputs_for_generation``)."""

    def __init__(self, config):
        super().__init__(config)
        self.glm = GLMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.glm.word_embeddings

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, labels=None, **kwargs):
        output = self.glm(input_ids, position_ids, attention_mask)
        logits = output.logits
        if logits is None:
            logits = F.linear(output.last_hidden_state, self.glm.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
            )
        return GLMOutput(loss=loss, logits=logits, last_hidden_state=output.last_hidden_state)

    def prepare_inputs_for_generation(
        self, input_ids, position_ids=None, generation_attention_mask=None, **kwargs
    ):
        # No key/value cache: every step runs the whole sequence (blank filling is short).
        seq = input_ids.shape[1]
        return {
            "input_ids": input_ids,
            "position_ids": position_ids[:, :, :seq],
            "attention_mask": generation_attention_mask[:, :, :seq, :seq],
        }


def build_inputs_for_generation(input_ids, sop_token_id, mask_token_ids, max_gen_length):
    """``input_ids``, ``position_ids`` and ``generation_attention_mask`` to fill the first blank of each
    sample with ``generate(..., max_new_tokens=max_gen_length)``: the context (bidirectional), then
    ``[sop]`` and the generated tokens (causal), placed at the blank's position with block positions 1, 2, ..."""
    batch, seq = input_ids.shape
    total = seq + max_gen_length + 1
    mask_positions = []
    for row in input_ids.tolist():
        found = [i for i, t in enumerate(row) if t in mask_token_ids]
        if not found:
            raise ValueError("every sample needs a [MASK], [sMASK] or [gMASK] token to fill")
        mask_positions.append(found[0])
    sop = torch.full((batch, 1), sop_token_id, dtype=input_ids.dtype, device=input_ids.device)
    positions = torch.arange(total, device=input_ids.device).expand(batch, total).clone()
    blocks = torch.zeros_like(positions)
    for b, position in enumerate(mask_positions):
        positions[b, seq:] = position
        blocks[b, seq:] = torch.arange(1, total - seq + 1, device=input_ids.device)
    mask = _ltor_mask(
        torch.full((batch,), seq, device=input_ids.device), batch, total, input_ids.device, torch.long
    )
    return {
        "input_ids": torch.cat([input_ids, sop], dim=1),
        "position_ids": torch.stack([positions, blocks], dim=1),
        "generation_attention_mask": mask,
    }
