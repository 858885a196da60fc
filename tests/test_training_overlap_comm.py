"""ZeRO's gradient reduction on a side stream (``parallel.overlap_comm``, on by default with CUDA and more than
one data-parallel rank, off on CPUs) trains as the reduction in line does.

The run takes the GPU where there is one (``benchmarks/gpu_check.py`` runs this module on CUDA, where the side
stream is real); on CPUs DeepSpeed still takes its bucketed overlap path, with no stream to overlap with."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.glm_corpora import austen_corpus
from tests.training_runs import ROOT, pretrain_command, step_losses, tiny_overrides

pytestmark = pytest.mark.slow  # real glm-pretrain processes; `make test-fast` leaves them out


def _env() -> dict[str, str]:
    """One rank, on the GPU where there is one (``pretrain_env`` hides GPUs from runs of several ranks)."""
    # The caller's PYTHONPATH stays behind ours: on a GPU node it may carry DeepSpeed (gpu-deps/).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(key, None)
    return env


def _losses(run_dir, overrides: list[str]) -> dict[int, float]:
    result = subprocess.run(
        pretrain_command(1, overrides), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return step_losses(run_dir)


@pytest.mark.parametrize("zero_stage,precision", [(1, "fp32"), (2, "bf16")], ids=["zero1-fp32", "zero2-bf16"])
def test_overlapped_reduction_trains_as_the_reduction_in_line(tmp_path, zero_stage, precision):
    corpus = austen_corpus(tmp_path, 0, 6)
    losses = {}
    for overlap in (False, True):
        run_dir = tmp_path / f"overlap-{overlap}"
        settings = {
            "parallel.zero_stage": zero_stage,
            "parallel.overlap_comm": overlap,
            "training.precision": precision,
            "training.train_steps": 6,
            # torch's kernels: this is about DeepSpeed's reduction, not Triton's compile time.
            "model.kernels": "torch",
        }
        losses[overlap] = _losses(run_dir, tiny_overrides(corpus, tmp_path / "samples", run_dir, **settings))
    assert sorted(losses[True]) == list(range(1, 7))
    # One data-parallel rank: both paths reduce over one rank, so the updates are the same bits.
    assert losses[True] == losses[False]
