"""The GLM model on Megatron-style tensor parallelism, with THUDM/GLM's parameter names.

glm                GLMModel (embeddings, layers, final LayerNorm, tied output)
transformer        GLMTransformerLayer and its parts (self-attention, MLP, LayerNorm)
loss               the pretraining loss: loss rows, token mean, per-objective evaluation sums
kv_cache           KVCache: keys/values kept between decoding steps

Checkpoint layouts (THUDM keys, tensor-parallel shards, loading and saving) live in ``megatron_glm.checkpoint``.
"""

from megatron_glm.model.glm import GLMModel, GLMTransformer, PositionEmbeddings
from megatron_glm.model.kv_cache import KVCache
from megatron_glm.model.loss import (
    GLMLoss,
    glm_loss,
    loss_row_index,
    loss_rows,
    masked_token_mean,
    per_objective_means,
)
from megatron_glm.model.transformer import (
    GLMMLP,
    GLMSelfAttention,
    GLMTransformerLayer,
    LayerNorm,
    init_generator,
)

__all__ = [
    "GLMMLP",
    "GLMModel",
    "GLMSelfAttention",
    "GLMTransformer",
    "GLMTransformerLayer",
    "KVCache",
    "LayerNorm",
    "PositionEmbeddings",
    "glm_loss",
    "loss_row_index",
    "loss_rows",
    "masked_token_mean",
    "init_generator",
    "GLMLoss",
    "per_objective_means",
]
