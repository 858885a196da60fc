"""The batch contract and the loaders the trainer uses.

A batch is a dict of tensors (B = micro batch size, T = ``data.seq_length``):

===============  =======  =========  ==================================================================
key              dtype    shape      meaning
===============  =======  =========  ==================================================================
``tokens``       int64    [B, T]     Part A + Part B inputs, zero-padded
``targets``      int64    [B, T]     already aligned with ``tokens`` (no shift in the loss)
``loss_mask``    float32  [B, T]     1 on Part-B targets, 0 on Part A and padding
``position_ids`` int64    [B, 2, T]  positions, block positions
``sep``          int64    [B]        length of Part A (bidirectional prefix); causal after it
``objective``    int64    [B]        ``data_tools.objectives.Objective`` of each sample (for logging)
``loss_index``   int64    [N]        row-major indices of the ``loss_mask > 0`` positions (the rows that
                                    get logits), computed here so the GPU never waits on a boolean mask
===============  =======  =========  ==================================================================
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from data_tools.errors import DataError
from data_tools.sample_reader import SampleDirectory
from data_tools.samples import CorpusSpec, build_or_load_samples
from data_tools.tokenizer import GLMTokenizer
from megatron_glm.config import DataConfig
from megatron_glm.data.dataset import GLMDataset
from megatron_glm.data.sampler import GLMBatchSampler
from megatron_glm.model.glm import loss_row_index

BATCH_KEYS = ("tokens", "targets", "loss_mask", "position_ids", "sep", "objective", "loss_index")


def collate_glm_batch(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack ``GLMDataset`` items (all of length T) into the batch contract above."""
    loss_mask = torch.from_numpy(np.stack([item["loss_mask"] for item in items]))
    return {
        "tokens": torch.from_numpy(np.stack([item["tokens"] for item in items])),
        "targets": torch.from_numpy(np.stack([item["targets"] for item in items])),
        "loss_mask": loss_mask,
        "position_ids": torch.from_numpy(np.stack([item["position_ids"] for item in items])),
        "sep": torch.tensor([item["sep"] for item in items], dtype=torch.int64),
        "objective": torch.tensor([item["objective"] for item in items], dtype=torch.int64),
        "loss_index": loss_row_index(loss_mask),
    }


def build_data_loader(dataset: GLMDataset, sampler: GLMBatchSampler, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ``sampler``'s micro-batches; memory is pinned only when CUDA is present.

    Workers persist: each ``iter()`` after the first restarts the sampler in the same worker processes
    instead of forking new ones (a fork in a process whose other threads hold locks can hang the child,
    and evaluation iterates its loader anew every ``eval_interval`` steps).
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_glm_batch,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def prepare_sample_directory(
    data: DataConfig, tokenizer: str, *, builder: bool = True, workers: int = 1, progress: bool = False
) -> Path:
    """Build (on ``builder`` ranks) or wait for the sample directory of ``data`` under ``data.cache_dir``.

    Online masking needs only the packed samples, so it builds none of the K span variants.
    """
    if not data.corpora:
        raise DataError(
            "data.corpora is empty: list the corpus prefixes (written by glm-preprocess) to train on"
        )
    return build_or_load_samples(
        [CorpusSpec(c.path, c.weight) for c in data.corpora],
        tokenizer,
        data.seq_length,
        data.objectives,
        0 if data.online_masking else data.num_variants,
        data.split,
        data.seed,
        data.cache_dir,
        builder=builder,
        workers=workers,
        progress=progress,
    )


def build_glm_data_loader(
    data: DataConfig,
    tokenizer: GLMTokenizer | str,
    sample_dir: str | Path,
    split: str,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    consumed_samples: int = 0,
) -> DataLoader:
    """The loader of one data-parallel rank for ``split``, resuming after ``consumed_samples`` samples.

    Train shuffles each epoch; valid and test run in order. The stream is unbounded: take as many
    micro-batches as needed (``accumulation_steps`` per optimizer step).
    """
    directory = SampleDirectory(sample_dir, corpus_paths=[c.path for c in data.corpora] or None)
    dataset = GLMDataset(directory, split, tokenizer, objectives=data.objectives, online=data.online_masking)
    sampler = GLMBatchSampler(
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        consumed_samples=consumed_samples,
    )
    return build_data_loader(dataset, sampler, data.num_workers)
