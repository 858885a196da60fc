"""Run ``glm-pretrain`` for real (torchrun for several ranks, plain python for one) on a tiny GLM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.multiproc import HIDE_GPUS

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "run" / "configs" / "glm-tiny.yaml"


def tiny_overrides(corpus: str, cache_dir: Path, run_dir: Path, **settings) -> list[str]:
    """A 2-layer, hidden-64 GLM in fp32 without dropout: a few steps in seconds, deterministic."""
    values = {
        "data.corpora": f"[{{path: {corpus}}}]",
        "data.cache_dir": str(cache_dir),
        "data.seq_length": 64,
        "data.split": "[90, 10, 0]",
        "model.num_layers": 2,
        "model.hidden_size": 64,
        "model.num_attention_heads": 4,
        "model.max_position_embeddings": 64,
        # Padded for tensor-parallel sizes up to 2 (128 x 2), so every layout has the same table.
        "model.vocab_size": 30720,
        "model.hidden_dropout": 0.0,
        "model.attention_dropout": 0.0,
        "training.precision": "fp32",
        "training.micro_batch_size": 2,
        "training.global_batch_size": 8,
        "training.train_steps": 4,
        "training.eval_interval": 0,
        "optimizer.lr": 1e-3,
        "lr_schedule.warmup_fraction": 0.0,
        "lr_schedule.decay_steps": 100,
        "checkpoint.save_dir": str(run_dir / "checkpoints"),
        "checkpoint.interval": 0,
        "logging.log_dir": str(run_dir / "logs"),
        "logging.log_interval": 1,
        "logging.tensorboard": False,
    }
    values.update(settings)
    return [f"{key}={value}" for key, value in values.items()]


# Open MPI refuses to start as root (CI containers) without these.
MPI_AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def pretrain_arguments(overrides: list[str]) -> list[str]:
    """``--config <glm-tiny> --set k=v ...`` for ``glm-pretrain``."""
    arguments = ["--config", str(TINY_CONFIG)]
    for item in overrides:
        arguments += ["--set", item]
    return arguments


def pretrain_command(world_size: int, overrides: list[str]) -> list[str]:
    launcher = [sys.executable]
    if world_size > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(world_size)]
    return launcher + ["-m", "megatron_glm.cli.pretrain", *pretrain_arguments(overrides)]


def mpirun_command(world_size: int, program: list[str], exports: tuple[str, ...] = ()) -> list[str]:
    """``mpirun`` running ``program`` on ``world_size`` local ranks with PATH, PYTHONPATH, OMP_NUM_THREADS
    and ``exports`` passed to them (run it with ``{**pretrain_env(), **MPI_AS_ROOT}``)."""
    command = ["mpirun", "--oversubscribe", "-np", str(world_size)]
    for name in ("PATH", "PYTHONPATH", "OMP_NUM_THREADS", *exports):
        command += ["-x", name]
    return command + program


# The most ranks a test launches on this machine.
MAX_TEST_RANKS = 4


def pretrain_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if 0 < torch.cuda.device_count() < MAX_TEST_RANKS:
        # glm-pretrain refuses more local ranks than GPUs: on a machine with fewer GPUs than the tests'
        # ranks, the runs train on the CPU as everywhere else (gloo, Triton's interpreter).
        env.update(HIDE_GPUS)
    return env


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (torchrun starts its workers in their own sessions)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (a hung multi-rank run must not outlive its test)."""
    for child in children(pid):
        kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def run_pretrain(world_size: int, overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        pretrain_command(world_size, overrides),
        env=pretrain_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        _, stderr = process.communicate()
        raise AssertionError(f"glm-pretrain did not finish in {timeout} s:\n{stderr[-4000:]}") from None
    if process.returncode != 0:
        raise AssertionError(f"glm-pretrain failed ({process.returncode}):\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from the run's metrics.jsonl (log_interval 1)."""
    losses = {}
    with open(run_dir / "logs" / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "train":
                losses[record["step"]] = record["loss"]
    return losses
