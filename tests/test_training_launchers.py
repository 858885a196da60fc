"""glm-pretrain runs the same under torchrun, the deepspeed launcher, mpirun and srun: every launcher's
2-rank run gives exactly the per-step losses of the torchrun run."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from megatron_glm.training.distributed import free_port
from tests.glm_corpora import austen_corpus
from tests.training_runs import (
    MPI_AS_ROOT,
    ROOT,
    mpirun_command,
    pretrain_arguments,
    pretrain_env,
    run_pretrain,
    step_losses,
    tiny_overrides,
)

pytestmark = pytest.mark.slow  # end-to-end runs of real processes; `make test-fast` leaves them out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    corpus = austen_corpus(root, 0, 6)
    run_pretrain(2, tiny_overrides(corpus, root / "samples", root / "torchrun"))
    return root, corpus, step_losses(root / "torchrun")


def _slurm_job_id() -> int:
    """A job id whose derived rendezvous port (20000 + id, as under srun without MASTER_PORT) is free."""
    low, high = 20000, 40000
    for port in range(low + os.getpid() % 1000, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port - low
    raise RuntimeError("no free port")


def _check(result, run_dir, reference):
    assert result.returncode == 0, result.stderr[-3000:]
    assert step_losses(run_dir) == reference


def test_mpirun(workspace):
    root, corpus, reference = workspace
    run_dir = root / "mpirun"
    env = {**pretrain_env(), **MPI_AS_ROOT, "MASTER_PORT": str(free_port())}
    program = [sys.executable, "-m", "megatron_glm.cli.pretrain"]
    program += pretrain_arguments(tiny_overrides(corpus, root / "samples", run_dir))
    command = mpirun_command(2, program, exports=("MASTER_PORT",))
    _check(
        subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT),
        run_dir,
        reference,
    )


def test_deepspeed_launcher(workspace):
    root, corpus, reference = workspace
    run_dir = root / "deepspeed"
    command = [
        shutil.which("deepspeed", path=os.path.dirname(sys.executable)),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        shutil.which("glm-pretrain", path=os.path.dirname(sys.executable)),
        *pretrain_arguments(tiny_overrides(corpus, root / "samples", run_dir)),
    ]
    _check(
        subprocess.run(command, env=pretrain_env(), capture_output=True, text=True, timeout=300, cwd=ROOT),
        run_dir,
        reference,
    )


def test_srun_environment(workspace):
    """Two processes with the environment srun gives its tasks (no MASTER_ADDR/PORT: from the job)."""
    root, corpus, reference = workspace
    run_dir = root / "srun"
    job_id = _slurm_job_id()
    command = [
        sys.executable,
        "-m",
        "megatron_glm.cli.pretrain",
        *pretrain_arguments(tiny_overrides(corpus, root / "samples", run_dir)),
    ]
    processes = []
    for rank in range(2):
        env = {
            **pretrain_env(),
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": str(job_id),
            "SLURM_JOB_NODELIST": "localhost",
            "PATH": "/usr/bin:/bin",
        }
        processes.append(
            subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert "launcher slurm" in (run_dir / "logs" / "rank-0.log").read_text()
    assert step_losses(run_dir) == reference
