"""GLM pretraining batches from a sample directory: dataset, data-parallel batch sampler, collate, loaders."""

from megatron_glm.data.dataset import GLMDataset
from megatron_glm.data.loader import (
    BATCH_KEYS,
    build_data_loader,
    build_glm_data_loader,
    collate_glm_batch,
    prepare_sample_directory,
)
from megatron_glm.data.sampler import GLMBatchSampler

__all__ = [
    "BATCH_KEYS",
    "GLMBatchSampler",
    "GLMDataset",
    "build_data_loader",
    "build_glm_data_loader",
    "collate_glm_batch",
    "prepare_sample_directory",
]
