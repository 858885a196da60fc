"""Process-group start-up for every launcher: torchrun, the deepspeed launcher, srun and mpirun.

The launcher is recognized by its environment and mapped to torch's ``RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT``; nothing needs a hostfile or SSH. The backend is NCCL when CUDA devices are
present and gloo otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from datetime import timedelta

import torch

from megatron_glm.errors import LaunchError


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # "torchrun" (also the deepspeed launcher), "slurm", "mpi" or "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """``"gpu[01-03,7],login1"`` -> ``["gpu01", "gpu02", "gpu03", "gpu7", "login1"]`` (what scontrol prints)."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                start, end = part.split("-", 1)
                width = len(start)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(start), int(end) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def _slurm_master_addr(env: dict[str, str]) -> str:
    """The first node of the job: its address as Slurm knows it (NodeAddr), else its name.

    Node names need not resolve (several nodes on one host, or names that are not host names); NodeAddr
    is where slurmctld reaches the node, so the other nodes reach it there too.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError(
            "srun launch without SLURM_JOB_NODELIST: set MASTER_ADDR to the first node's address"
        )
    first = expand_slurm_nodelist(nodelist)[0]
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        first = out[0] if out else first
        node = subprocess.run(
            ["scontrol", "show", "node", "-o", first], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        match = re.search(r"\bNodeAddr=(\S+)", node)
        if match:
            return match.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    return first


def _mpi_master_addr() -> str:
    """127.0.0.1 when every rank runs on this host (asked over MPI: imports mpi4py only on this path).

    Across hosts the address must come from the user (``MASTER_ADDR``, which run/mpirun.sh sets from the
    hostfile): a guess from the interfaces of rank 0's host can pick a docker bridge or a management
    NIC the other nodes cannot reach, and the rendezvous then hangs.
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise LaunchError(
            "mpirun launch needs MASTER_ADDR in the environment or mpi4py installed "
            "(pip install mpi4py; it needs an MPI library such as Open MPI)"
        ) from exc
    comm = MPI.COMM_WORLD
    hosts = comm.allgather(MPI.Get_processor_name())
    if len(set(hosts)) == 1:
        return "127.0.0.1"
    raise LaunchError(
        f"mpirun across {len(set(hosts))} hosts ({', '.join(sorted(set(hosts))[:4])}, ...) without MASTER_ADDR: "
        "export MASTER_ADDR=<an address of rank 0's host that every host can reach> and pass it with "
        "`mpirun -x MASTER_ADDR`, or launch with run/mpirun.sh, which sets it from the hostfile"
    )


def _int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as exc:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from exc


def detect_launch(env: dict[str, str] | None = None) -> LaunchInfo:
    """Recognize the launcher from the environment (``os.environ`` by default)."""
    env = dict(os.environ if env is None else env)
    default_port = 29500
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            "torchrun",
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", default_port)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        # Under srun (a job step); a bare sbatch script also has SLURM_PROCID but is not a rank.
        job = int(env.get("SLURM_JOB_ID", "0"))
        port = int(env.get("MASTER_PORT", 20000 + job % 20000))
        addr = env.get("MASTER_ADDR") or _slurm_master_addr(env)
        return LaunchInfo(
            "slurm",
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_NTASKS"),
            _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            addr,
            port,
        )
    for rank_key, size_key, local_key in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ):
        if rank_key in env and size_key in env:
            addr = env.get("MASTER_ADDR") or _mpi_master_addr()
            return LaunchInfo(
                "mpi",
                _int(env, rank_key),
                _int(env, size_key),
                _int(env, local_key) if local_key in env else 0,
                addr,
                int(env.get("MASTER_PORT", default_port)),
            )
    port = int(env.get("MASTER_PORT", 0)) or free_port()
    return LaunchInfo("single", 0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a single-process job's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_size(env: dict[str, str] | None = None) -> int | None:
    """How many ranks the launcher started on this node, if its environment says so."""
    env = os.environ if env is None else env
    # torchrun, the deepspeed launcher, Open MPI, MPICH/Intel MPI, srun --ntasks-per-node.
    keys = (
        "LOCAL_WORLD_SIZE",
        "LOCAL_SIZE",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    )
    for key in keys:
        if env.get(key, "").isdigit():
            return int(env[key])
    # srun's SLURM_TASKS_PER_NODE reads "8(x2)" or "4(x2),3": one count per node, in node order.
    counts = [
        int(count)
        for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", env.get("SLURM_TASKS_PER_NODE", ""))
        for _ in range(int(repeat or 1))
    ]
    node = env.get("SLURM_NODEID", "")
    if node.isdigit() and int(node) < len(counts):
        return counts[int(node)]
    return max(counts) if counts else None


def gpus_bound_per_rank(env: dict[str, str] | None = None) -> bool:
    """Whether the launcher gave each rank its own GPU(s) (``srun --gpus-per-task``, or the user says so
    with ``GLM_GPUS_PER_RANK=1`` for containers and wrappers that set ``CUDA_VISIBLE_DEVICES`` per rank)."""
    env = os.environ if env is None else env
    return env.get("SLURM_GPUS_PER_TASK", "").isdigit() or env.get("GLM_GPUS_PER_RANK") == "1"


def cuda_device_index(
    local_rank: int, local_ranks: int | None, device_count: int, bound_per_rank: bool
) -> int:
    """The index of this rank's GPU among the ``device_count`` it sees.

    Ranks that see only their own GPU(s) take the first; otherwise local rank ``i`` takes GPU ``i``.
    Several ranks on one GPU would be refused later by NCCL ("Duplicate GPU detected") or DeepSpeed
    ("invalid device ordinal"), so more local ranks than visible GPUs is a ``LaunchError`` here.
    """
    if bound_per_rank:
        return 0
    ranks = max(local_rank + 1, local_ranks or 0)
    if ranks > device_count:
        raise LaunchError(
            f"local rank {local_rank}: {ranks} ranks on this node but {device_count} visible GPU(s); start "
            f"at most {device_count} ranks per node (torchrun --nproc-per-node {device_count}, srun "
            f"--ntasks-per-node {device_count}), or, if each rank sees only its own GPU, say so with "
            "srun --gpus-per-task=1 or GLM_GPUS_PER_RANK=1 (CUDA_VISIBLE_DEVICES='' trains on the CPU)"
        )
    return local_rank


def device_for(info: LaunchInfo, env: dict[str, str] | None = None) -> torch.device:
    """This rank's device: its GPU when CUDA is present (see ``cuda_device_index``), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = cuda_device_index(
        info.local_rank, local_world_size(env), torch.cuda.device_count(), gpus_bound_per_rank(env)
    )
    return torch.device("cuda", index)


def init_distributed(timeout_minutes: int = 30) -> LaunchInfo:
    """Join the job's process group (wrapped by DeepSpeed) and make this rank's device current.

    DeepSpeed places itself on ``cuda:LOCAL_RANK`` (PipelineModule, ZeRO-3's ``Init``, a process group it
    creates), which is the wrong GPU where each rank sees only its own. So on a GPU, ``LOCAL_RANK`` is
    set to the index of this rank's device before DeepSpeed is imported; the launcher's local rank, which
    says which rank of its node this is, stays in the returned ``LaunchInfo``. The group is created here
    with ``device_id`` = our device, and the engine gets the same device through ``TrainingEngine``.
    """
    info = detect_launch()
    os.environ.update(
        {
            "RANK": str(info.rank),
            "WORLD_SIZE": str(info.world_size),
            "LOCAL_RANK": str(info.local_rank),
            "MASTER_ADDR": info.master_addr,
            "MASTER_PORT": str(info.master_port),
        }
    )
    # The node's rank count, as torchrun gives it, for what shares the node's CPUs (data-loader threads, the
    # kernels' parallel compile) whichever launcher started the job.
    ranks_on_node = local_world_size()
    if ranks_on_node is not None:
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(ranks_on_node))
    device = device_for(info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        _name_device_for_deepspeed(device)
    else:
        # One thread per rank unless the user said otherwise: ranks share the cores.
        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or max(
            1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
        )
        torch.set_num_threads(threads)
    import deepspeed
    import torch.distributed as dist

    if device.type == "cpu":
        _skip_cpu_shm_compile()
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        # A bound device makes torch build every later group with ncclCommSplit; a single rank has no
        # peer, so it stays unbound (as DeepSpeed does).
        bind = {"device_id": device} if device.type == "cuda" and info.world_size > 1 else {}
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timeout,
            rank=info.rank,
            world_size=info.world_size,
            **bind,
        )
    # DeepSpeed wraps the group that is now up (ours, or a caller's).
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        auto_mpi_discovery=False,
        timeout=timeout,
        rank=info.rank,
        world_size=info.world_size,
        verbose=False,
    )
    return info


def _name_device_for_deepspeed(device: torch.device) -> None:
    """Make the local rank DeepSpeed reads from the environment name ``device``.

    DeepSpeed takes ``LOCAL_RANK`` for the index of the rank's GPU, and its engine asserts Open MPI's
    ``OMPI_COMM_WORLD_LOCAL_RANK`` equal to it under mpirun, so both become the device index (they are
    unchanged where local rank ``i`` takes GPU ``i``).
    """
    os.environ["LOCAL_RANK"] = str(device.index)
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(device.index)


def _skip_cpu_shm_compile() -> None:
    # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks at init (30-50 s, needs a compiler);
    # plain gloo gives identical results. Set GLM_DS_SHM_COMM=1 to keep DeepSpeed's op.
    if os.environ.get("GLM_DS_SHM_COMM") == "1":
        return
    import deepspeed.comm.torch  # noqa: F401

    # By module name: the package attribute ``deepspeed.comm.torch`` is torch itself.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
