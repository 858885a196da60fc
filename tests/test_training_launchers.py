"""glm-pretrain runs the same under torchrun, the deepspeed launcher and mpirun (run/mpirun.sh on a hostfile
of local slots, a stand-in for several nodes): every launcher's 2-rank run gives exactly the per-step losses
of the torchrun run. A rank that raises mid-training ends the whole job quickly under torchrun and mpirun,
with a message naming that rank. (srun under a real Slurm: test_slurm_jobs.py.)"""

import os
import shutil
import subprocess
import sys
import time

import pytest

from megatron_glm.training.distributed import free_port
from tests.glm_corpora import austen_corpus
from tests.training_runs import (
    ROOT,
    pretrain_arguments,
    pretrain_env,
    run_pretrain,
    step_losses,
    tiny_overrides,
)

pytestmark = pytest.mark.slow  # end-to-end runs of real processes; `make test-fast` leaves them out

CRASH = str(ROOT / "tests" / "crashing_pretrain.py")
# Far below any collective timeout (30 min): the launcher, not a timeout, must end the other ranks.
CRASH_DEADLINE = 120


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    corpus = austen_corpus(root, 0, 6)
    run_pretrain(2, tiny_overrides(corpus, root / "samples", root / "torchrun"))
    hostfile = root / "hostfile"
    hostfile.write_text("# a stand-in for two nodes\nlocalhost slots=2\n")
    return root, corpus, hostfile, step_losses(root / "torchrun")


def _mpirun_script(hostfile, program: list[str], timeout: float, **extra) -> subprocess.CompletedProcess:
    env = {**pretrain_env(), **extra, "HOSTFILE": str(hostfile), "MASTER_PORT": str(free_port())}
    env["MPIRUN_ARGS"] = " ".join(["--oversubscribe", *(f"-x {name}" for name in extra)])
    command = [str(ROOT / "run" / "mpirun.sh"), *program]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_mpirun_script_on_a_hostfile_trains_like_torchrun(workspace):
    root, corpus, hostfile, reference = workspace
    run_dir = root / "mpirun"
    program = [sys.executable, "-m", "megatron_glm.cli.pretrain"]
    program += pretrain_arguments(tiny_overrides(corpus, root / "samples", run_dir))
    result = _mpirun_script(hostfile, program, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks from" in result.stderr and "master localhost (127.0.0.1:" in result.stderr
    assert "launcher mpi" in (run_dir / "logs" / "rank-0.log").read_text()
    assert step_losses(run_dir) == reference


def test_deepspeed_launcher(workspace):
    root, corpus, _, reference = workspace
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
    result = subprocess.run(
        command, env=pretrain_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert step_losses(run_dir) == reference


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_a_crashed_rank_ends_the_job_naming_the_rank(workspace, launcher):
    root, corpus, hostfile, _ = workspace
    program = [
        CRASH,
        *pretrain_arguments(tiny_overrides(corpus, root / "samples", root / f"crash-{launcher}")),
    ]
    crash = {"CRASH_RANK": "1", "CRASH_STEP": "2"}
    env = {**pretrain_env(), **crash}
    started = time.monotonic()
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *program]
        result = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=CRASH_DEADLINE
        )
    else:
        result = _mpirun_script(hostfile, [sys.executable, *program], CRASH_DEADLINE, **crash)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "glm-pretrain: rank 1 of 2 failed" in result.stderr, result.stderr[-3000:]
    assert "RuntimeError: injected failure at step 2" in result.stderr
    assert elapsed < CRASH_DEADLINE
