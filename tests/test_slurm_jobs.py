"""The job scripts of run/slurm/ under a real Slurm (munged, slurmctld, two slurmd on this machine).

A 2-node x 2-task pretrain.sbatch trains, is sent the preemption signal, checkpoints, requeues itself and
finishes with exactly the losses of an uninterrupted 4-rank run; preprocess.sbatch writes exactly the
corpus of a single-process run. Slurm and munge are installed with apt when missing (root only): on a
machine that cannot, the tests fail and say why (``make test`` runs as root in CI).
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.preprocess import main as preprocess_main
from tests.glm_corpora import AUSTEN, austen_corpus
from tests.slurm_cluster import local_slurm
from tests.training_runs import (
    ROOT,
    TINY_CONFIG,
    pretrain_arguments,
    pretrain_env,
    run_pretrain,
    step_losses,
    tiny_overrides,
)

STEPS = 12
# Two nodes x two tasks; the test cluster's nodes have no GPUs and 2 CPUs each.
JOB_SHAPE = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_slurm(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def _sbatch(cluster, script: str, output, arguments: list[str], env: dict[str, str]) -> int:
    out = cluster.command(
        "sbatch", "--parsable", *JOB_SHAPE, f"--output={output}", str(ROOT / "run" / "slurm" / script),
        *arguments, env=env,
    )  # fmt: skip
    return int(out.strip().split(";")[0])


def _wait_until_done(cluster, job_id: int, timeout: float) -> dict[str, str]:
    states = {}

    def done() -> bool:
        states.update(cluster.job_state(job_id))
        return states["JobState"] in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        )

    cluster.wait_for(done, timeout, f"job {job_id} to end")
    return states


@pytest.mark.slow
def test_pretrain_job_is_preempted_requeues_itself_and_resumes_exactly(cluster, tmp_path):
    corpus = austen_corpus(tmp_path, 0, 6)
    settings = {"training.train_steps": STEPS, "data.num_workers": 1}
    reference_dir, job_dir = tmp_path / "torchrun", tmp_path / "sbatch"
    run_pretrain(4, tiny_overrides(corpus, tmp_path / "samples", reference_dir, **settings))
    reference = step_losses(reference_dir)

    output = tmp_path / "job.out"
    # PREPARE=0: the reference run has built the samples (--prepare-only is tested with glm-pretrain).
    env = {**pretrain_env(), **cluster.env, "CONFIG": str(TINY_CONFIG), "PREPARE": "0"}
    arguments = pretrain_arguments(tiny_overrides(corpus, tmp_path / "samples", job_dir, **settings))[2:]
    job_id = _sbatch(cluster, "pretrain.sbatch", output, arguments, env)

    metrics = job_dir / "logs" / "metrics.jsonl"
    cluster.wait_for(
        lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 240, "training steps"
    )
    # What --signal=B:USR1@120 does before the time limit: the batch script alone gets the signal.
    cluster.command("scancel", "--signal=USR1", "--batch", str(job_id))
    states = _wait_until_done(cluster, job_id, 300)
    log = output.read_text()
    assert states["JobState"] == "COMPLETED" and states["ExitCode"] == "0:0", log[-4000:]
    assert states["Restarts"] == "1", log[-4000:]
    assert "requeueing job" in log
    stopped_at = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert 2 <= stopped_at < STEPS
    # Two nodes, two local ranks each, the master taken from the first node.
    assert re.search(r"on nodeA,nodeB, 4 tasks, master nodeA \(127\.0\.0\.1:\d+\)", log)
    assert re.search(rf"training from step {stopped_at} to {STEPS}", log), log[-4000:]
    losses = step_losses(job_dir)  # metrics.jsonl is appended to by the requeued run
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == reference[step], f"step {step}: {loss!r} != {reference[step]!r}"


def test_preprocess_job_equals_a_single_process_run(cluster, tmp_path):
    inputs = tmp_path / "raw"
    inputs.mkdir()
    lines = AUSTEN.read_text().splitlines()
    for i in range(4):  # four files, one for each task
        (inputs / f"part{i}.jsonl").write_text("\n".join(lines[2 * i : 2 * i + 2]) + "\n")
    single = tmp_path / "single" / "austen"
    single.parent.mkdir()
    common = ["--input", str(inputs), "--tokenizer", "bert-base-uncased", "--workers", "1"]
    assert preprocess_main([*common, "--output-prefix", str(single)]) == 0

    output = tmp_path / "job.out"
    prefix = tmp_path / "job" / "austen"
    env = {**pretrain_env(), **cluster.env, "INPUT": str(inputs), "OUTPUT_PREFIX": str(prefix)}
    job_id = _sbatch(cluster, "preprocess.sbatch", output, common[2:], env)
    states = _wait_until_done(cluster, job_id, 240)
    log = output.read_text()
    assert states["JobState"] == "COMPLETED", log[-4000:]
    assert len(list(prefix.parent.glob("austen_rank*-of-00004.idx"))) == 4  # one share per task
    for suffix in (".bin", ".idx"):
        assert Path(f"{single}{suffix}").read_bytes() == Path(f"{prefix}{suffix}").read_bytes(), suffix


def test_a_crashed_rank_ends_the_srun_step_naming_the_rank(cluster, tmp_path):
    """srun --kill-on-bad-exit (as pretrain.sbatch runs it): rank 3 raises, the other ranks are ended."""
    corpus = austen_corpus(tmp_path, 0, 6)
    program = [sys.executable, str(ROOT / "tests" / "crashing_pretrain.py")]
    program += pretrain_arguments(tiny_overrides(corpus, tmp_path / "samples", tmp_path / "run"))
    env = {**pretrain_env(), **cluster.env, "CRASH_RANK": "3", "CRASH_STEP": "2"}
    started = time.monotonic()
    result = subprocess.run(
        ["srun", "--kill-on-bad-exit=1", *JOB_SHAPE, *program],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode != 0
    assert "glm-pretrain: rank 3 of 4 failed" in result.stderr, result.stderr[-3000:]
    assert "RuntimeError: injected failure at step 2" in result.stderr
    # srun names the tasks that exited with an error, grouped per node and exit code: "task 3", or "tasks 2-3"
    # when rank 2 failed on its own first (its collective with rank 3 broke) before srun ended it.
    failed = set()
    for tasks in re.findall(r"srun: error: nodeB: tasks? ([\d,-]+): Exited with exit code 1", result.stderr):
        for span in tasks.split(","):
            first, _, last = span.partition("-")
            failed.update(range(int(first), int(last or first) + 1))
    assert 3 in failed, result.stderr[-3000:]
    assert time.monotonic() - started < 240  # the others were ended, not left to a collective timeout
