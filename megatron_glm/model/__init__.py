"""The GLM model on Megatron-style tensor parallelism, with THUDM/GLM's parameter names.

glm                GLMModel (embeddings, layers, final LayerNorm, tied output), glm_loss, optimizer groups
transformer        GLMTransformerLayer and its parts (self-attention, MLP, LayerNorm)
kv_cache           KVCache: keys/values kept between decoding steps

Checkpoint layouts (THUDM keys, tensor-parallel shards, loading and saving) live in ``megatron_glm.checkpoint``.
"""

from megatron_glm.model.glm import (
    GLMModel,
    GLMTransformer,
    PositionEmbeddings,
    glm_loss,
    loss_rows,
    masked_token_mean,
    weight_decay_param_groups,
)
from megatron_glm.model.kv_cache import KVCache
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
    "loss_rows",
    "masked_token_mean",
    "init_generator",
    "weight_decay_param_groups",
]
