"""Preemption as Slurm delivers it: the signal reaches every process of the job step, the data loader's
worker processes included. The ranks still save at a step boundary, exit 0, and resume exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_glm.training.distributed import free_port
from tests.glm_corpora import austen_corpus
from tests.training_runs import (
    ROOT,
    children,
    kill_tree,
    pretrain_arguments,
    pretrain_env,
    run_pretrain,
    step_losses,
    tiny_overrides,
)

STEPS = 10
# One rank keeps it quick; the ranks' agreement on the flag is tested in test_training_resume.py.
WORLD = 1


def _overrides(corpus, root, run_dir):
    settings = {"training.train_steps": STEPS, "data.num_workers": 1, "checkpoint.interval": 0}
    return tiny_overrides(corpus, root / "samples", run_dir, **settings)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pgroup")
    corpus = austen_corpus(root, 0, 6)
    run_pretrain(WORLD, _overrides(corpus, root, root / "uninterrupted"))
    return root, corpus, step_losses(root / "uninterrupted")


# Stands in for slurmstepd: starts the ranks in its own new process group (so they share it, as srun's
# tasks do under proctrack/pgid), survives the signal itself, and exits with the ranks' exit codes.
_STEPD = """
import json, os, signal, subprocess, sys
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda *_: None)  # a Python handler, reset to the default in the exec'd ranks
world_size, command = int(sys.argv[1]), sys.argv[2:]
ranks = [
    subprocess.Popen(command, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r)})
    for r in range(world_size)
]
print(json.dumps([p.wait() for p in ranks]))
"""


def _start_ranks_in_one_process_group(overrides, world_size=WORLD) -> subprocess.Popen:
    env = {**pretrain_env(), "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(free_port())
    command = [sys.executable, "-m", "megatron_glm.cli.pretrain", *pretrain_arguments(overrides)]
    return subprocess.Popen(
        [sys.executable, "-c", _STEPD, str(world_size), *command],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_sigusr1_to_the_whole_process_group_saves_exits_0_and_resumes_exactly(workspace):
    root, corpus, reference = workspace
    run_dir = root / "preempted"
    stepd = _start_ranks_in_one_process_group(_overrides(corpus, root, run_dir))
    metrics = run_dir / "logs" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert stepd.poll() is None, f"the ranks ended before training started:\n{stepd.stderr.read()}"
            assert time.monotonic() < deadline, "timed out waiting for training steps"
            time.sleep(0.02)
        # Each rank's persistent DataLoader worker runs, in the ranks' process group.
        ranks = children(stepd.pid)
        workers = [child for rank in ranks for child in children(rank)]
        assert len(ranks) == WORLD and len(workers) >= WORLD
        assert {os.getpgid(pid) for pid in ranks + workers} == {stepd.pid}
        os.killpg(stepd.pid, signal.SIGUSR1)  # what srun does with --signal=USR1
        stdout, stderr = stepd.communicate(timeout=240)
    finally:
        kill_tree(stepd.pid)
    assert json.loads(stdout.splitlines()[-1]) == [0] * WORLD, stderr[-3000:]
    assert "killed by signal" not in stderr
    assert "preempted at step" in stderr
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text())
    assert 3 <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / str(stopped_at) / "meta.json").is_file()
    before = step_losses(run_dir)
    assert max(before) == stopped_at
    assert all(loss == reference[step] for step, loss in before.items())

    metrics.unlink()
    run_pretrain(WORLD, _overrides(corpus, root, run_dir))
    resumed = step_losses(run_dir)
    assert min(resumed) == stopped_at + 1 and max(resumed) == STEPS
    for step, loss in resumed.items():
        assert loss == reference[step], f"step {step}: {loss!r} != {reference[step]!r}"


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
