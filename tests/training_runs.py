"""Run ``glm-pretrain`` for real (torchrun for several ranks, plain python for one) on a tiny GLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def pretrain_command(world_size: int, overrides: list[str]) -> list[str]:
    launcher = [sys.executable]
    if world_size > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(world_size)]
    command = launcher + ["-m", "megatron_glm.cli.pretrain", "--config", str(TINY_CONFIG)]
    for item in overrides:
        command += ["--set", item]
    return command


def pretrain_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_pretrain(world_size: int, overrides: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(pretrain_command(world_size, overrides), env=pretrain_env(), capture_output=True,
                            text=True, timeout=timeout, cwd=ROOT)
    if result.returncode != 0:
        raise AssertionError(f"glm-pretrain failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from the run's metrics.jsonl (log_interval 1)."""
    losses = {}
    with open(run_dir / "logs" / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "train":
                losses[record["step"]] = record["loss"]
    return losses
