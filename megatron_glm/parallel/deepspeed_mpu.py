"""The ``mpu`` object DeepSpeed asks for: our process groups under the names DeepSpeed 0.19 calls.

DeepSpeed uses it for the data-parallel gradient reduction (ZeRO), the gradient-norm and overflow
reductions over the "model parallel" group (tensor x pipeline ranks of one replica; parameters marked
``tensor_model_parallel`` are counted on every rank, the others on model-parallel rank 0), checkpoint
file names (``mp_rank_XX`` = tensor rank) and activation checkpointing. It must not define
``initialize_sequence_parallel``: DeepSpeed takes that as a sign of Ulysses sequence parallelism.
"""

from __future__ import annotations

import torch.distributed as dist

from megatron_glm.parallel import state


class DeepSpeedMPU:
    """Pass an instance as ``deepspeed.initialize(..., mpu=DeepSpeedMPU())`` after ``initialize_parallel``."""

    def get_model_parallel_rank(self) -> int:
        return state.get_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return state.get_model_parallel_world_size()

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return state.get_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return state.get_tensor_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return state.get_tensor_parallel_world_size()

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup | None:
        return state.get_tensor_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return state.get_tensor_parallel_src_rank()

    def get_slice_parallel_rank(self) -> int:
        return state.get_tensor_parallel_rank()

    def get_slice_parallel_world_size(self) -> int:
        return state.get_tensor_parallel_world_size()

    def get_slice_parallel_group(self) -> dist.ProcessGroup | None:
        return state.get_tensor_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return state.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return state.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(state.get_data_parallel_ranks())

    def get_pipe_parallel_rank(self) -> int:
        return state.get_pipeline_parallel_rank()

    def get_pipe_parallel_world_size(self) -> int:
        return state.get_pipeline_parallel_world_size()

    def get_pipe_parallel_group(self) -> dist.ProcessGroup | None:
        return state.get_pipeline_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return state.get_pipeline_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return state.get_pipeline_parallel_world_size()

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup | None:
        return state.get_pipeline_parallel_group()
