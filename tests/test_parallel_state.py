"""Process groups: DeepSpeed's rank order, real groups on 8 gloo ranks, the single-process mode."""

import pytest
import torch
import torch.distributed as dist

from megatron_glm import parallel
from megatron_glm.parallel import DeepSpeedMPU, ParallelStateError, grid_ranks
from tests.multiproc import run_ranks


@pytest.mark.parametrize("tp,dp,pp", [(2, 2, 2), (4, 1, 2), (1, 4, 1), (2, 3, 1), (1, 1, 3)])
def test_grid_matches_deepspeed_topology(tp, dp, pp):
    # Imported here, not at module level: the spawned ranks of this module's other test import the module.
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    grid = grid_ranks(tp, dp, pp)
    assert sorted(grid["tensor"]) == sorted(topology.get_axis_comm_lists("model"))
    assert sorted(grid["data"]) == sorted(topology.get_axis_comm_lists("data"))
    assert sorted(grid["pipeline"]) == sorted(topology.get_axis_comm_lists("pipe"))
    # DeepSpeed's "model parallel" group: every rank with the same data-parallel coordinate.
    assert grid["model"] == [sorted(topology.get_axis_list(axis="data", idx=d)) for d in range(dp)]
    for axis in ("tensor", "data", "pipeline", "model"):
        covered = sorted(r for members in grid[axis] for r in members)
        assert covered == list(range(tp * dp * pp)), axis


def test_tensor_ranks_are_consecutive():
    assert grid_ranks(4, 2, 1)["tensor"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert grid_ranks(2, 1, 2)["pipeline"] == [[0, 2], [1, 3]]


def test_single_process_mode():
    with pytest.raises(ParallelStateError, match="initialize_parallel"):
        parallel.get_tensor_parallel_rank()
    with pytest.raises(ParallelStateError, match="world size 1"):
        parallel.initialize_parallel(2, 1)
    parallel.initialize_parallel(1, 1)
    try:
        assert parallel.is_initialized()
        assert (
            parallel.get_tensor_parallel_world_size(),
            parallel.get_data_parallel_world_size(),
            parallel.get_pipeline_parallel_world_size(),
        ) == (1, 1, 1)
        assert parallel.get_tensor_parallel_group() is None
        assert parallel.is_pipeline_first_stage() and parallel.is_pipeline_last_stage()
        with pytest.raises(ParallelStateError, match="already"):
            parallel.initialize_parallel(1, 1)
    finally:
        parallel.destroy_parallel()
    assert not parallel.is_initialized()


def _check_groups(rank, tp, pp):
    created = []
    new_group = dist.new_group

    def counting_new_group(ranks, *args, **kwargs):
        created.append(tuple(ranks))
        return new_group(ranks, *args, **kwargs)

    dist.new_group = counting_new_group
    try:
        parallel.initialize_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    finally:
        dist.new_group = new_group
    mpu = DeepSpeedMPU()
    sums = {}
    for name, group in (
        ("tensor", parallel.get_tensor_parallel_group()),
        ("data", parallel.get_data_parallel_group()),
        ("pipeline", parallel.get_pipeline_parallel_group()),
        ("model", parallel.get_model_parallel_group()),
    ):
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=group)
        sums[name] = value.item()
    result = {
        "sums": sums,
        "created": created,
        "coords": (
            parallel.get_pipeline_parallel_rank(),
            parallel.get_data_parallel_rank(),
            parallel.get_tensor_parallel_rank(),
        ),
        "mpu": (
            mpu.get_pipe_parallel_rank(),
            mpu.get_data_parallel_rank(),
            mpu.get_tensor_model_parallel_rank(),
            mpu.get_model_parallel_world_size(),
            mpu.get_data_parallel_group_ranks(),
            mpu.get_tensor_model_parallel_src_rank(),
        ),
    }
    parallel.destroy_parallel()
    return result


def _groups_on_4_ranks(rank, world_size):
    # Two layouts of the same world, one after the other: tp x pp = 2 x 2, then tp x dp = 2 x 2.
    return {(2, 2): _check_groups(rank, 2, 2), (2, 1): _check_groups(rank, 2, 1)}


@pytest.fixture(scope="module")
def four_rank_groups():
    return run_ranks(_groups_on_4_ranks, 4)


@pytest.mark.parametrize("tp,pp", [(2, 2), (2, 1)])
def test_groups_on_real_ranks(four_rank_groups, tp, pp):
    dp = 4 // (tp * pp)
    grid = grid_ranks(tp, dp, pp)
    for rank, results in enumerate(four_rank_groups):
        result = results[(tp, pp)]
        coords = (rank // (tp * dp), rank // tp % dp, rank % tp)
        assert result["coords"] == coords
        for axis, total in result["sums"].items():
            members = next(m for m in grid[axis] if rank in m)
            assert total == sum(members), (rank, axis)
        *mpu_coords, model_size, dp_ranks, src = result["mpu"]
        assert tuple(mpu_coords) == coords
        assert model_size == tp * pp
        assert dp_ranks == next(m for m in grid["data"] if rank in m)
        assert src == rank - rank % tp
        # Each distinct member list is created once, by every rank, in the same order (a collective).
        distinct = list(dict.fromkeys(tuple(m) for lists in grid.values() for m in lists))
        assert result["created"] == distinct
        if pp == 1:  # the pipeline groups are single ranks, and the model groups the tensor groups
            assert len(distinct) < sum(len(lists) for lists in grid.values())


def test_axes_that_coincide_share_one_group(monkeypatch):
    # Rank 0 of 8 at tensor = pipeline = 1 (a stand-in world: group creation is what is counted). Its tensor,
    # pipeline and model groups are each rank 0 alone: one group object, not three.
    created = []

    def new_group(ranks):
        created.append(tuple(ranks))
        return object()

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 8)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "new_group", new_group)
    parallel.initialize_parallel(1, 1)
    try:
        assert len(created) == len(set(created)) == 9  # 8 single ranks and the data-parallel group
        alone = parallel.get_tensor_parallel_group()
        assert parallel.get_pipeline_parallel_group() is alone
        assert parallel.get_model_parallel_group() is alone
        assert parallel.get_data_parallel_group() is not alone
    finally:
        parallel.destroy_parallel()
