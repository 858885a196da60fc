"""glm-pretrain runs the same under torchrun, the deepspeed launcher, mpirun and srun: every launcher's
2-rank run gives exactly the per-step losses of the torchrun run."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.glm_corpora import austen_corpus
from tests.training_runs import ROOT, TINY_CONFIG, pretrain_env, run_pretrain, step_losses, tiny_overrides


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    corpus = austen_corpus(root, 0, 6)
    run_pretrain(2, tiny_overrides(corpus, root / "samples", root / "torchrun"))
    return root, corpus, step_losses(root / "torchrun")


def _arguments(overrides):
    arguments = ["--config", str(TINY_CONFIG)]
    for item in overrides:
        arguments += ["--set", item]
    return arguments


def _free_port(low: int = 20000, high: int = 40000) -> int:
    for port in range(low + os.getpid() % 1000, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _check(result, run_dir, reference):
    assert result.returncode == 0, result.stderr[-3000:]
    assert step_losses(run_dir) == reference


def test_mpirun(workspace):
    root, corpus, reference = workspace
    run_dir = root / "mpirun"
    env = {
        **pretrain_env(),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "MASTER_PORT": str(_free_port()),
    }
    command = [
        "mpirun",
        "--oversubscribe",
        "-np",
        "2",
        "-x",
        "PATH",
        "-x",
        "PYTHONPATH",
        "-x",
        "OMP_NUM_THREADS",
        "-x",
        "MASTER_PORT",
        sys.executable,
        "-m",
        "megatron_glm.cli.pretrain",
        *_arguments(tiny_overrides(corpus, root / "samples", run_dir)),
    ]
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
        str(_free_port()),
        shutil.which("glm-pretrain", path=os.path.dirname(sys.executable)),
        *_arguments(tiny_overrides(corpus, root / "samples", run_dir)),
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
    job_id = _free_port() - 20000
    command = [
        sys.executable,
        "-m",
        "megatron_glm.cli.pretrain",
        *_arguments(tiny_overrides(corpus, root / "samples", run_dir)),
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
