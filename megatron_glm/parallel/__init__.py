"""Megatron-style tensor parallelism: process groups, communication, parallel layers, RNG streams.

state          the process groups (tensor, data, pipeline, model, embedding) and the RNG tracker
mappings       the communication as autograd functions (copy/reduce/scatter/gather)
sharding       how a tensor is split into tensor-parallel shards (and merged back)
layers         ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
cross_entropy  cross entropy over vocab-parallel logits
random         named RNG streams (dropout that differs or agrees across tensor ranks)
checkpointing  activation checkpointing that replays those streams
deepspeed_mpu  the ``mpu`` object handed to DeepSpeed
"""

from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_glm.parallel.deepspeed_mpu import DeepSpeedMPU
from megatron_glm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    normal_init,
    vocab_parallel_logits,
    vocab_range,
)
from megatron_glm.parallel.mappings import (
    copy_to_tensor_parallel,
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
    scatter_to_tensor_parallel,
)
from megatron_glm.parallel.random import MODEL_PARALLEL_RNG, RNGStatesTracker
from megatron_glm.parallel.recompute import recompute
from megatron_glm.parallel.sharding import shard, unshard
from megatron_glm.parallel.state import (
    ParallelStateError,
    destroy_parallel,
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_ranks,
    get_data_parallel_world_size,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
    get_pipeline_parallel_group,
    get_pipeline_parallel_rank,
    get_pipeline_parallel_world_size,
    get_rng_tracker,
    get_tensor_parallel_group,
    get_tensor_parallel_rank,
    get_tensor_parallel_src_rank,
    get_tensor_parallel_world_size,
    grid_ranks,
    initialize_parallel,
    is_initialized,
    is_pipeline_first_stage,
    is_pipeline_last_stage,
    seed_parallel_rng,
)

__all__ = [
    "MODEL_PARALLEL_RNG",
    "ColumnParallelLinear",
    "DeepSpeedMPU",
    "ParallelStateError",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "recompute",
    "copy_to_tensor_parallel",
    "destroy_parallel",
    "gather_from_tensor_parallel",
    "get_data_parallel_group",
    "get_data_parallel_rank",
    "get_data_parallel_ranks",
    "get_data_parallel_world_size",
    "get_model_parallel_group",
    "get_model_parallel_rank",
    "get_model_parallel_world_size",
    "get_pipeline_parallel_group",
    "get_pipeline_parallel_rank",
    "get_pipeline_parallel_world_size",
    "get_rng_tracker",
    "get_tensor_parallel_group",
    "get_tensor_parallel_rank",
    "get_tensor_parallel_src_rank",
    "get_tensor_parallel_world_size",
    "grid_ranks",
    "initialize_parallel",
    "is_initialized",
    "is_pipeline_first_stage",
    "is_pipeline_last_stage",
    "normal_init",
    "reduce_from_tensor_parallel",
    "scatter_to_tensor_parallel",
    "seed_parallel_rng",
    "shard",
    "unshard",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_logits",
    "vocab_range",
]
