"""Preemption as Slurm delivers it: the signal reaches every process of the job step, the data loader's
worker processes included. A worker survives SIGUSR1 and a SIGTERM that does not come from its own rank
and keeps serving batches; the rank's step-boundary checkpoint is tested in test_training_resume.py, with
the signal sent to a rank and its workers."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.training_runs import ROOT, kill_tree, pretrain_env

# A rank with one persistent loader worker over a toy dataset: it prints the worker's pid, waits for a line
# on stdin (the signals are sent meanwhile), then fetches more batches through the same worker.
_LOADER = """
import sys
import numpy as np
from megatron_glm.data.loader import build_data_loader

class Items:
    def __getitem__(self, i):
        z = np.zeros(4, dtype=np.int64)
        return {"tokens": z + i, "targets": z, "loss_mask": z.astype(np.float32),
                "position_ids": np.zeros((2, 4), dtype=np.int64), "sep": 1, "objective": 0}

loader = build_data_loader(Items(), [[i, i + 1] for i in range(0, 40, 2)], num_workers=1)
batches = iter(loader)
next(batches)
print(batches._workers[0].pid, flush=True)
sys.stdin.readline()
print(sum(int(b["tokens"][0, 0]) for b in batches), flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_loader_workers_survive_preemption_signals(sig):
    """The signal comes from outside (as from slurmstepd), not from the worker's parent."""
    rank = subprocess.Popen(
        [sys.executable, "-c", _LOADER],
        env=pretrain_env(),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        worker = int(rank.stdout.readline())
        os.kill(worker, sig)
        time.sleep(0.5)  # the worker would be dead by now, and the rank's SIGCHLD handler armed
        stdout, stderr = rank.communicate("go\n", timeout=60)
    finally:
        kill_tree(rank.pid)
    assert rank.returncode == 0, stderr[-3000:]
    assert int(stdout) == sum(range(2, 40, 2))
