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

import os
import signal
import threading

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

BATCH_KEYS = ("tokens", "targets", "loss_mask", "position_ids", "sep", "objective", "loss_index")


def loss_row_index(loss_mask: torch.Tensor) -> torch.Tensor:
    """The int64 ``[N]`` row-major indices of the positions with ``loss_mask > 0``: the rows that need logits.

    The data loader computes them on the host (``batch["loss_index"]``) so that selecting the rows on a GPU
    is an ``index_select``, not a boolean mask that makes the host wait for the GPU.
    """
    return torch.nonzero(loss_mask.reshape(-1) > 0).squeeze(1)


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


def ignore_preemption_signals(worker_id: int) -> None:
    """``worker_init_fn``: a DataLoader worker ignores SIGUSR1, and SIGTERM unless its rank sent it.

    Slurm (``--signal``, ``scancel``, the end of a time limit) signals every process of a job step, the
    workers included. A worker killed by it makes its rank raise "DataLoader worker ... killed" in the
    middle of a step, instead of saving a checkpoint at the step boundary: the rank's
    ``PreemptionHandler`` is the one to act. The rank itself still stops a worker that did not quit in
    time with SIGTERM (``Process.terminate`` at shutdown), so that one must still end the worker: a
    thread waits for SIGTERM with its sender's pid (blocked in every other thread of the worker, which
    is single-threaded at this point). A worker whose rank died exits on its own (torch watches the parent).
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from_parent, name="sigterm-from-rank", daemon=True).start()


def _exit_on_sigterm_from_parent() -> None:
    parent = os.getppid()
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)  # as torch's own worker handler does for its parent's terminate()


def build_data_loader(dataset: GLMDataset, sampler: GLMBatchSampler, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ``sampler``'s micro-batches; memory is pinned only when CUDA is present.

    Workers persist: each ``iter()`` after the first restarts the sampler in the same worker processes
    instead of forking new ones (a fork in a process whose other threads hold locks can hang the child,
    and evaluation iterates its loader anew every ``eval_interval`` steps). Workers ignore the
    preemption signals (``ignore_preemption_signals``).
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_glm_batch,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_preemption_signals if num_workers > 0 else None,
    )


def prepare_sample_directory(
    data: DataConfig, tokenizer: str, *, builder: bool = True, workers: int = 1, progress: bool = False
) -> SampleDirectory:
    """Build (on ``builder`` ranks) or wait for the sample directory of ``data`` under ``data.cache_dir``,
    and open it.

    Online masking needs only the packed samples, so it builds none of the K span variants. The
    directory is named by a hash of the corpora's fingerprints, computed here from the files as they are
    now: found under that name, it was built from exactly these files, so opening it verifies nothing
    again.
    """
    if not data.corpora:
        raise DataError(
            "data.corpora is empty: list the corpus prefixes (written by glm-preprocess) to train on"
        )
    path = build_or_load_samples(
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
    return SampleDirectory(path, corpus_paths=[c.path for c in data.corpora], verify=False)


def build_glm_data_loader(
    data: DataConfig,
    tokenizer: GLMTokenizer | str,
    directory: SampleDirectory,
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
    dataset = GLMDataset(directory, split, tokenizer, objectives=data.objectives, online=data.online_masking)
    sampler = GLMBatchSampler(
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        consumed_samples=consumed_samples,
    )
    return build_data_loader(dataset, sampler, data.num_workers)
