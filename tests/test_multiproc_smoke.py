import os

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import HIDE_GPUS, rank_backend, run_ranks


def _all_reduce(rank, world_size):
    device = f"cuda:{rank}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(t)
    return t.item(), dist.get_backend(), torch.cuda.is_available(), os.environ.get("DS_ACCELERATOR")


def test_ranks_join_one_group():
    results = run_ranks(_all_reduce, 2)
    assert [total for total, *_ in results] == [3.0, 3.0]
    backend, env = rank_backend(torch.cuda.device_count(), 2)
    sees_gpu = backend == "nccl"
    accelerator = env.get("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR"))
    assert [rest for _, *rest in results] == [[backend, sees_gpu, accelerator]] * 2


@pytest.mark.parametrize(
    "device_count,world_size,backend,env",
    [
        (0, 1, "gloo", {}),
        (0, 4, "gloo", {}),
        (1, 1, "nccl", {}),
        (1, 2, "gloo", HIDE_GPUS),  # NCCL refuses two ranks on one GPU: all on the CPU
        (2, 4, "gloo", HIDE_GPUS),
        (4, 4, "nccl", {}),
        (8, 2, "nccl", {}),
    ],
)
def test_ranks_get_a_gpu_each_or_run_on_the_cpu(device_count, world_size, backend, env):
    assert rank_backend(device_count, world_size) == (backend, env)
