"""The GLM model on Megatron-style tensor parallelism, with THUDM/GLM's parameter names.

glm                GLMModel (embeddings, layers, final LayerNorm, tied output), glm_loss, optimizer groups
transformer        GLMTransformerLayer and its parts (self-attention, MLP, LayerNorm)
checkpoint_layout  how each THUDM key is split over tensor-parallel ranks
thudm_checkpoint   load/save THUDM-layout checkpoints at any tensor-parallel size
"""

from megatron_glm.model.checkpoint_layout import (
    Partition,
    full_shape,
    merge_shards,
    partition_of,
    split_tensor,
)
from megatron_glm.model.glm import (
    GLMModel,
    GLMTransformer,
    PositionEmbeddings,
    glm_loss,
    loss_row_index,
    loss_rows,
    masked_token_mean,
    weight_decay_param_groups,
)
from megatron_glm.model.thudm_checkpoint import (
    CheckpointError,
    find_checkpoint_files,
    load_thudm_checkpoint,
    read_module_state,
    save_thudm_checkpoint,
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
    "CheckpointError",
    "GLMModel",
    "GLMSelfAttention",
    "GLMTransformer",
    "GLMTransformerLayer",
    "LayerNorm",
    "Partition",
    "find_checkpoint_files",
    "full_shape",
    "PositionEmbeddings",
    "glm_loss",
    "loss_row_index",
    "loss_rows",
    "masked_token_mean",
    "init_generator",
    "load_thudm_checkpoint",
    "merge_shards",
    "partition_of",
    "read_module_state",
    "save_thudm_checkpoint",
    "split_tensor",
    "weight_decay_param_groups",
]
