"""Step results read back without waiting for later GPU work (``training.metrics.HostScalars``). CUDA only
(collected where a GPU is present; ``benchmarks/gpu_check.py`` runs it)."""

from __future__ import annotations

import torch

from megatron_glm.training.metrics import HostScalars


def test_values_arrive_while_later_work_still_runs():
    # A loss computed, then the next step's work queued (a kernel that spins for a while): the loss can be read
    # without waiting for that work, which .item() would wait for.
    loss = torch.full((), 2.5, device="cuda", dtype=torch.float64) * 2
    scalars = HostScalars([loss, None, 1.0])
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time
    assert scalars.values() == [5.0, None, 1.0]
    assert not torch.cuda.current_stream().query()  # the later work is still running
    torch.cuda.synchronize()
