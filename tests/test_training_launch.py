"""Launcher detection (torchrun, srun, mpirun) and the reference's LR schedule."""

import math
import os
import subprocess
import sys
import tempfile
import textwrap
import types
from unittest import mock

import pytest
import torch

from megatron_glm.config import LRScheduleConfig
from megatron_glm.training.distributed import (
    LaunchError,
    cuda_device_index,
    detect_launch,
    expand_slurm_nodelist,
    gpus_bound_per_rank,
    init_distributed,
    local_world_size,
)
from megatron_glm.training.lr_schedule import lr_at
from tests.training_runs import MPI_AS_ROOT, mpirun_command, pretrain_env


def test_torchrun_environment():
    info = detect_launch(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    )
    assert (
        info.launcher,
        info.rank,
        info.world_size,
        info.local_rank,
        info.master_addr,
        info.master_port,
    ) == ("torchrun", 3, 8, 1, "10.0.0.1", 1234)


def test_srun_environment_derives_master_from_the_nodelist(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the nodelist is expanded by us
    info = detect_launch(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "5",
            "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[07-08],cpu1",
        }
    )
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 5, 16, 5)
    assert info.master_addr == "gpu07"
    assert info.master_port == 20000 + 4242


def test_sbatch_shell_without_a_job_step_is_not_a_rank():
    info = detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "1"})
    assert info.launcher == "single" and info.world_size == 1


def test_open_mpi_environment_with_explicit_master():
    info = detect_launch(
        {
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "MASTER_ADDR": "node0",
            "MASTER_PORT": "5555",
        }
    )
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.master_addr) == (
        "mpi",
        1,
        4,
        1,
        "node0",
    )


def test_bad_integer_in_environment_names_the_variable():
    with pytest.raises(LaunchError, match="RANK='x'"):
        detect_launch({"RANK": "x", "WORLD_SIZE": "2"})


def test_slurm_nodelist_expansion():
    assert expand_slurm_nodelist("a[1-3,10],b,c[08-09]") == ["a1", "a2", "a3", "a10", "b", "c08", "c09"]


def test_real_mpirun_launch_forms_one_group(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent("""
        import torch, torch.distributed as dist
        from megatron_glm.training.distributed import init_distributed
        info = init_distributed()
        total = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(total)
        print(f"rank {info.rank}/{info.world_size} launcher {info.launcher} sum {total.item():.0f}", flush=True)
        dist.barrier()
        dist.destroy_process_group()
    """)
    )
    out = subprocess.run(
        mpirun_command(2, [sys.executable, str(script)]),
        env={**pretrain_env(), **MPI_AS_ROOT},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rank 0/2 launcher mpi sum 3" in out.stdout and "rank 1/2 launcher mpi sum 3" in out.stdout


def _schedule(style, **kw):
    return LRScheduleConfig(
        style=style,
        decay_steps=kw.get("decay", 1000),
        warmup_fraction=kw.get("warmup", 0.1),
        min_lr_ratio=kw.get("ratio", 0.1),
    )


def test_warmup_is_linear_from_zero():
    s = _schedule("cosine")
    assert lr_at(0, 1.0, s, 1000) == 0.0
    assert lr_at(50, 1.0, s, 1000) == pytest.approx(0.5)
    assert lr_at(100, 1.0, s, 1000) == pytest.approx(1.0)


def test_cosine_decays_to_the_ratio_and_stays():
    s = _schedule("cosine")
    assert lr_at(550, 1.0, s, 1000) == pytest.approx((1 + 0.1) / 2)
    assert lr_at(1000, 1.0, s, 1000) == pytest.approx(0.1)
    assert lr_at(5000, 1.0, s, 1000) == pytest.approx(0.1)


def test_linear_is_not_clamped_as_in_the_reference():
    s = _schedule("linear")
    assert lr_at(1000, 1.0, s, 1000) == pytest.approx(0.1)
    assert lr_at(1050, 1.0, s, 1000) == pytest.approx(0.05)
    assert lr_at(10**6, 1.0, s, 1000) == 0.0


def test_decay_defaults_to_train_steps_and_constant_stays():
    s = LRScheduleConfig(style="cosine", decay_steps=None, warmup_fraction=0.0, min_lr_ratio=0.0)
    assert lr_at(250, 2.0, s, 500) == pytest.approx(2.0 * (math.cos(math.pi * 0.5) + 1) / 2)
    assert lr_at(7, 3.0, LRScheduleConfig(style="constant", warmup_fraction=0.0), 100) == 3.0


def test_each_local_rank_takes_its_own_gpu():
    assert [cuda_device_index(r, 4, 8, bound_per_rank=False) for r in range(4)] == [0, 1, 2, 3]


def test_ranks_that_see_only_their_own_gpu_take_the_first():
    # srun --gpus-per-task=1: local rank 5 sees one GPU, which is cuda:0 in its process (DeepSpeed's
    # cuda:LOCAL_RANK would be an invalid ordinal).
    env = {"SLURM_GPUS_PER_TASK": "1", "SLURM_TASKS_PER_NODE": "8(x2)"}
    assert gpus_bound_per_rank(env) and local_world_size(env) == 8
    assert cuda_device_index(5, local_world_size(env), 1, gpus_bound_per_rank(env)) == 0
    assert gpus_bound_per_rank({"GLM_GPUS_PER_RANK": "1"}) and not gpus_bound_per_rank({})


# What the launchers set: cleared, so that the test's launch is the only one.
LAUNCH_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_STEP_ID",
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_NODEID",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_GPUS_PER_TASK",
    "GLM_GPUS_PER_RANK",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
)


@pytest.fixture
def launch_environment():
    """``os.environ`` without any launcher's variables; afterwards all of it as before, without what
    ``init_distributed`` exported."""
    with mock.patch.dict(os.environ):
        for key in LAUNCH_KEYS:
            os.environ.pop(key, None)
        yield os.environ


@pytest.mark.parametrize(
    "launch, visible_gpus, device_index",
    [
        # srun --gpus-per-task=1: local rank 3 sees one GPU, its cuda:0.
        (
            {
                "SLURM_PROCID": "3",
                "SLURM_NTASKS": "4",
                "SLURM_LOCALID": "3",
                "SLURM_STEP_ID": "0",
                "SLURM_GPUS_PER_TASK": "1",
                "SLURM_TASKS_PER_NODE": "4",
            },
            1,
            0,
        ),
        # torchrun, four ranks sharing the node's four GPUs: local rank 3 takes cuda:3.
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 4, 3),
        # mpirun where each rank sees only its own GPU: DeepSpeed also reads Open MPI's local rank.
        (
            {
                "OMPI_COMM_WORLD_RANK": "3",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
                "GLM_GPUS_PER_RANK": "1",
            },
            1,
            0,
        ),
    ],
    ids=["srun-gpus-per-task", "torchrun-shared-gpus", "mpirun-gpus-per-rank"],
)
def test_deepspeed_places_itself_on_the_gpu_chosen_for_the_rank(
    monkeypatch, launch_environment, launch, visible_gpus, device_index
):
    # DeepSpeed's PipelineModule and ZeRO-3 Init move to cuda:LOCAL_RANK: an invalid ordinal on local rank
    # 3 where it sees one GPU. CUDA, the process group and DeepSpeed's wrapper of it are mocked.
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine

    launch_environment.update({**launch, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    made_current, groups = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible_gpus)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: groups.append(kwargs))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: None)

    info = init_distributed()

    device = torch.device("cuda", device_index)
    assert made_current == [device] and groups[0]["device_id"] == device
    assert info.local_rank == 3  # the launcher's: which rank of its node this is (data caches, logs)
    assert os.environ["LOCAL_RANK"] == str(device_index)
    # Whichever launcher, the node's rank count is exported as torchrun does (the kernels' parallel compile
    # and the CPU threads share the node's cores by it).
    assert os.environ["LOCAL_WORLD_SIZE"] == "4"
    # The engine's own reading: it asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK under mpirun.
    engine = types.SimpleNamespace()
    DeepSpeedEngine._configure_with_arguments(engine, None, None)
    assert engine.local_rank == device_index


@pytest.mark.parametrize(
    "env, local_rank",
    [({"LOCAL_WORLD_SIZE": "2"}, 0), ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 1), ({}, 1)],
)
def test_more_local_ranks_than_gpus_is_a_launch_error(env, local_rank):
    # Two ranks on one GPU would end in NCCL's "Duplicate GPU detected" or an invalid ordinal.
    with pytest.raises(LaunchError, match=r"visible GPU\(s\).*--nproc-per-node 1"):
        cuda_device_index(local_rank, local_world_size(env), 1, gpus_bound_per_rank(env))


def test_local_world_size_from_each_launcher():
    assert local_world_size({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert local_world_size({"MPI_LOCALNRANKS": "3"}) == 3
    assert local_world_size({"LOCAL_SIZE": "2"}) == 2  # the deepspeed launcher
    assert local_world_size({"SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2"}) == 3
    assert local_world_size({"SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "1"}) == 4
    assert local_world_size({}) is None


def test_glm_pretrain_caches_triton_autotuning_unless_the_user_chose():
    from megatron_glm.cli.pretrain import triton_cache_environment

    added = triton_cache_environment({})
    assert added["TRITON_CACHE_AUTOTUNING"] == "1" and added["TRITON_CACHE_DIR"].startswith(
        tempfile.gettempdir()
    )
    assert triton_cache_environment({"TRITON_CACHE_AUTOTUNING": "0", "TRITON_CACHE_DIR": "/x"}) == {}


def test_cuda_graphs_on_a_cpu_run_are_refused_at_start(tmp_path):
    import subprocess

    from tests.training_runs import pretrain_command, pretrain_env, tiny_overrides

    env = {**pretrain_env(), "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    overrides = tiny_overrides("unused-corpus", tmp_path / "samples", tmp_path / "run")
    result = subprocess.run(
        pretrain_command(1, [*overrides, "training.cuda_graphs=true"]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "training.cuda_graphs: CUDA graphs need CUDA GPUs; this run is on cpu" in result.stderr
    assert not (tmp_path / "samples").exists()  # refused before any data is prepared
