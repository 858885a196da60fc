import torch
import torch.distributed as dist

from tests.multiproc import run_ranks


def _all_reduce(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_ranks_join_one_group():
    assert run_ranks(_all_reduce, 2) == [3.0, 3.0]
