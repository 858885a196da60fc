"""Run a function on N real processes joined in a gloo (CPU) or NCCL (GPU) process group.

Each rank runs with one thread, a fresh port on 127.0.0.1, DeepSpeed's shared-memory comm op skipped
(plain gloo trains identically and nothing is compiled), and tears the group down at the end.
``fn(rank, world_size, *args)`` must be importable (a module-level function); what each rank
returns comes back as a list indexed by rank.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_glm.training.distributed import free_port


def _entry(rank: int, fn, world_size: int, port: int, out_dir: str, args: tuple, env: dict) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    _skip_deepspeed_shm_build()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _skip_deepspeed_shm_build() -> None:
    # deepspeed.init_distributed JIT-compiles a shared-memory comm op on CPU (30-50 s); gloo alone suffices.
    try:
        import deepspeed.comm.torch  # noqa: F401
    except ImportError:
        return
    # By module name: the package attribute deepspeed.comm.torch is torch itself.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def run_ranks(fn, world_size: int, *args, env: dict | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes and return their results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), out_dir, args, dict(env or {})),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
