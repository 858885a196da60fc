"""Exact resume and preemption: a run stopped at any point (kill -9, or SIGTERM/SIGUSR1 at a step boundary)
and resumed produces exactly the losses of an uninterrupted run; checkpoints are atomic and pruned."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.glm_corpora import austen_corpus
from tests.training_runs import (
    children,
    kill_tree,
    pretrain_command,
    pretrain_env,
    run_pretrain,
    step_losses,
    tiny_overrides,
)

pytestmark = pytest.mark.slow  # end-to-end runs of real processes; `make test-fast` leaves them out

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    corpus = austen_corpus(root, 0, 12)
    reference = root / "uninterrupted"
    run_pretrain(2, _overrides(corpus, root, reference))
    return root, corpus, step_losses(reference)


def _overrides(corpus, root, run_dir, **extra):
    settings = {
        "training.train_steps": STEPS,
        "checkpoint.interval": 5,
        "checkpoint.keep_last": 2,
        "parallel.zero_stage": 1,
        # With dropout, exactness also needs every random stream (default, tensor-parallel) restored.
        "model.hidden_dropout": 0.1,
        "model.attention_dropout": 0.1,
        # Evaluation draws random numbers between steps too (a new loader iterator).
        "training.eval_interval": 7,
        "training.eval_steps": 1,
        **extra,
    }
    return tiny_overrides(corpus, root / "samples", run_dir, **settings)


def _start(world_size, overrides) -> subprocess.Popen:
    return subprocess.Popen(
        pretrain_command(world_size, overrides),
        env=pretrain_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"run ended before the condition held:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(process.pid)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def _latest(run_dir: Path) -> int | None:
    tracker = run_dir / "checkpoints" / "latest"
    return int(tracker.read_text()) if tracker.is_file() else None


def test_uninterrupted_run_keeps_the_last_two_checkpoints(workspace):
    root, _, losses = workspace
    checkpoints = root / "uninterrupted" / "checkpoints"
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["35", "40"]
    assert (checkpoints / "latest").read_text().strip() == "40"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
    meta = json.loads((checkpoints / "40" / "meta.json").read_text())
    assert meta["step"] == 40 and meta["consumed_samples"] == 40 * 8
    assert (checkpoints / "40" / "mp_rank_00_model_states.pt").is_file()


def test_resume_after_kill_9_is_bitwise_exact(workspace):
    root, corpus, reference = workspace
    run_dir = root / "killed"
    process = _start(2, _overrides(corpus, root, run_dir))
    _wait_for(lambda: (_latest(run_dir) or 0) >= 5, process)
    # kill -9 every rank and the launcher (torchrun puts its workers in their own process groups).
    for pid in children(process.pid) + [process.pid]:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    resumed_from = _latest(run_dir)
    assert resumed_from is not None and resumed_from < STEPS
    # Whatever the kill interrupted, the tracker points at a complete checkpoint.
    assert (run_dir / "checkpoints" / str(resumed_from) / "meta.json").is_file()

    (run_dir / "logs" / "metrics.jsonl").unlink()
    run_pretrain(2, _overrides(corpus, root, run_dir))
    resumed = step_losses(run_dir)
    assert min(resumed) == resumed_from + 1 and max(resumed) == STEPS
    for step, loss in resumed.items():
        assert loss == reference[step], f"step {step}: {loss!r} != {reference[step]!r}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_to_one_rank_and_its_workers_saves_exits_0_and_resumes_exactly(workspace, sig):
    root, corpus, reference = workspace
    run_dir = root / f"preempted-{sig.name}"
    process = _start(2, _overrides(corpus, root, run_dir, **{"checkpoint.interval": 0}))
    metrics = run_dir / "logs" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, process)
    ranks = children(process.pid)
    assert len(ranks) == 2
    # As Slurm's --signal does, the signal reaches the rank's DataLoader workers too (they must survive it);
    # but only one rank gets it: the ranks must agree to stop at the same step.
    receivers = [ranks[1], *children(ranks[1])]
    assert len(receivers) >= 2, "the rank's persistent loader worker is running"
    for pid in receivers:
        os.kill(pid, sig)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "killed by signal" not in stderr
    assert "preempted at step" in stderr
    stopped_at = _latest(run_dir)
    assert stopped_at is not None and 3 <= stopped_at < STEPS
    assert max(step_losses(run_dir)) == stopped_at

    metrics.unlink()
    run_pretrain(2, _overrides(corpus, root, run_dir, **{"checkpoint.interval": 0}))
    resumed = step_losses(run_dir)
    assert min(resumed) == stopped_at + 1
    for step, loss in resumed.items():
        assert loss == reference[step], f"step {step}: {loss!r} != {reference[step]!r}"
