"""Data-parallel micro-batches of stream positions, resumable from a count of consumed samples.

A global batch of G samples is the stream positions ``[c, c + G)`` where c counts the samples consumed
before it. It is processed as ``G / (B x dp)`` accumulation steps; step a covers ``[c + a B dp,
c + (a + 1) B dp)`` and data-parallel rank r takes the r-th block of B positions of it (Megatron's
pretraining sampler). Resuming at ``consumed_samples = c`` yields exactly the micro-batches an
uninterrupted run would see next.
"""

from __future__ import annotations

from collections.abc import Iterator

from data_tools.errors import DataError


class GLMBatchSampler:
    """Yields this rank's micro-batches (lists of B stream positions), from ``consumed_samples`` on.

    ``end_samples`` stops before the first accumulation step that would reach past it (None: unbounded).
    """

    def __init__(
        self,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        consumed_samples: int = 0,
        end_samples: int | None = None,
    ):
        per_step = micro_batch_size * data_parallel_size
        if micro_batch_size < 1 or data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(
                f"invalid batch layout: micro_batch_size {micro_batch_size}, data-parallel rank "
                f"{data_parallel_rank} of {data_parallel_size}"
            )
        if global_batch_size % per_step:
            raise DataError(
                f"global batch {global_batch_size} is not a multiple of micro_batch_size x data-parallel "
                f"size = {per_step}"
            )
        if consumed_samples < 0 or consumed_samples % per_step:
            raise DataError(
                f"consumed_samples {consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size x data-parallel size = {per_step} to resume on a batch boundary"
            )
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples
        self.end_samples = end_samples

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.micro_batch_size * self.data_parallel_size
        step = self.consumed_samples
        while self.end_samples is None or step + per_step <= self.end_samples:
            first = step + self.data_parallel_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            step += per_step

    def __len__(self) -> int:
        if self.end_samples is None:
            raise TypeError("an unbounded GLMBatchSampler has no length")
        return max(
            0, (self.end_samples - self.consumed_samples) // (self.micro_batch_size * self.data_parallel_size)
        )
