"""A training step queues all of its work without waiting for the GPU. CUDA only (collected where a GPU is
present; ``benchmarks/gpu_check.py`` runs it).

Under ``torch.cuda.set_sync_debug_mode("error")`` every operation that makes the host wait for the GPU raises
(``.item()``, a copy from pageable host memory, a boolean-mask index, ``nonzero``): here around glm-pretrain's
step (forward, backward and DeepSpeed's bf16 ZeRO-1 or ZeRO-2 update, with dropout and gradient clipping) and the
loop's per-step preemption check. The step's results are read after it, outside the check, as the loop reads them
once the next step is queued. The CPU tests find the host reads (``tests/test_training_nonfinite.py``); this
finds what only a GPU makes a wait.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiproc import run_ranks

CHECKED_FROM = 2  # the first steps allocate, and create the optimizer's state


def _steps_under_the_sync_check(rank: int, world_size: int, zero_stage: int) -> dict:
    from megatron_glm import parallel
    from megatron_glm.config import load_config, padded_vocab_size, parallel_layout
    from megatron_glm.training.engine import TrainingEngine
    from megatron_glm.training.signals import PreemptionHandler
    from tests.tiny_glm import TINY_SETTINGS, engine_batches

    overrides = [
        *TINY_SETTINGS,
        "model.kernels=torch",  # the step around the kernels; the Triton launches are checked elsewhere
        "training.precision=bf16",
        "training.micro_batch_size=2",
        "training.global_batch_size=4",  # two micro-batches per step
        "training.train_steps=10",
        f"parallel.zero_stage={zero_stage}",
        "training.grad_clip=1e-3",  # every step clips
    ]
    cfg = load_config(None, overrides)
    layout = parallel_layout(cfg, world_size)
    parallel.initialize_parallel(1, 1)
    parallel.seed_parallel_rng(cfg.training.seed)
    device = torch.device("cuda", torch.cuda.current_device())
    engine = TrainingEngine(cfg, layout, padded_vocab_size(cfg.model, 1), device)
    preemption = PreemptionHandler(device)

    micro_batches, losses, skipped, preempted = engine_batches(pin=True), [], [], []
    for step in range(6):
        mode = torch.cuda.get_sync_debug_mode()
        if step >= CHECKED_FROM:
            torch.cuda.set_sync_debug_mode("error")
        try:
            result = engine.train_step(micro_batches)
            preempted.append(preemption.requested())
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        losses.append(result.loss)
        skipped.append(result.skipped)
    outcome = {"losses": losses, "skipped": skipped, "preempted": preempted, "lr": result.lr}
    parallel.destroy_parallel()
    return outcome


# ZeRO-1: DeepSpeed's BF16 optimizer (training/fused_bf16.py); ZeRO-2: its ZeRO optimizer (training/fused_zero.py).
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_a_training_step_makes_the_host_wait_for_nothing(zero_stage):
    (outcome,) = run_ranks(_steps_under_the_sync_check, 1, zero_stage)
    assert outcome["skipped"] == [False] * 6
    assert all(0.0 < loss < 20.0 for loss in outcome["losses"]), outcome["losses"]
    assert outcome["preempted"] == [False] * 6
    assert outcome["lr"] > 0.0
