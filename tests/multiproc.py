"""Run a function on N real processes joined in a gloo (CPU) or NCCL (GPU) process group.

NCCL where the machine has a GPU for every rank; gloo on the CPU otherwise, with the GPUs hidden from the
ranks where there are some but too few (NCCL refuses two ranks on one GPU). Each rank runs with one thread,
a rendezvous through a file (MASTER_ADDR and MASTER_PORT are set for code that reads them, but nothing
listens on that port), DeepSpeed's shared-memory comm op skipped (plain gloo trains identically and
nothing is compiled), and tears the group down at the end. The ranks fork from a server that has imported
torch where they need no environment of their own (the CPU), and are spawned otherwise.
``fn(rank, world_size, *args)`` must be importable (a module-level function); what each rank
returns comes back as a list indexed by rank.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_glm.training.distributed import free_port

# What a rank needs to run on the CPU on a machine with GPUs: none visible (torch and NCCL), DeepSpeed's CPU
# accelerator, Triton's interpreter (there is no GPU to compile for). Set before the rank imports anything.
HIDE_GPUS = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "TRITON_INTERPRET": "1"}


def rank_backend(device_count: int, world_size: int) -> tuple[str, dict[str, str]]:
    """The process group's backend for ``world_size`` ranks on a machine with ``device_count`` GPUs, and
    the environment the ranks need: NCCL with one GPU per rank, gloo on the CPU where there is no GPU, or
    too few (the GPUs then hidden)."""
    if device_count >= world_size:
        return "nccl", {}
    return "gloo", dict(HIDE_GPUS) if device_count > 0 else {}


def _entry(
    rank: int, fn, world_size: int, backend: str, port: int, out_dir: str, args: tuple, env: dict[str, str]
) -> None:
    os.environ.update(env)  # first: the environment the ranks would have inherited if spawned
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
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # The rendezvous goes through a file, not a TCP port: a port picked free before the ranks start can be
    # taken by then (by another test's ranks, or as some connection's ephemeral port) on a busy machine.
    rendezvous = f"file://{Path(out_dir) / 'rendezvous'}"
    dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=world_size)
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
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes and return their results; ``env``
    is added to the ranks' environment."""
    backend, backend_env = rank_backend(torch.cuda.device_count(), world_size)
    rank_env = {**backend_env, **(env or {})}
    start_method = _start_method(rank_env)
    with tempfile.TemporaryDirectory() as out_dir:
        # Spawned ranks inherit this process's environment: set there, it holds before they import torch,
        # DeepSpeed or Triton, which read it once.
        with mock.patch.dict(os.environ, rank_env):
            mp.start_processes(
                _entry,
                args=(fn, world_size, backend, free_port(), out_dir, args, dict(os.environ)),
                nprocs=world_size,
                join=True,
                start_method=start_method,
            )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _start_method(rank_env: dict[str, str]) -> str:
    """How the ranks start: forked from a server process that has imported torch (its 2 s import paid once per
    test process instead of once per rank) where the ranks need no environment this process lacks, so that
    the server's (this process's when it started) will do; spawned otherwise (GPUs to hide).

    The server imports torch alone, which reads no setting of ours; ``_entry`` then sets the rank's whole
    environment before the rank's code runs.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    if any(os.environ.get(key) != value for key, value in rank_env.items()):
        return "spawn"
    mp.get_context("forkserver").set_forkserver_preload(["torch"])
    return "forkserver"
