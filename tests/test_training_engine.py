"""The engine's DeepSpeed configuration, the run's counters and the checkpoint cadence (no process group)."""

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from megatron_glm.config import load_config, parallel_layout
from megatron_glm.training.checkpoint import CheckpointManager, TrainingState
from megatron_glm.training.engine import deepspeed_config, single_replica_zero_warning


def test_bf16_accumulates_and_reduces_gradients_in_fp32_and_overlap_follows_the_device():
    cfg = load_config(
        None, ["training.precision=bf16", "parallel.zero_stage=1", "training.global_batch_size=32"]
    )
    layout = parallel_layout(cfg, 8)
    on_gpus = deepspeed_config(cfg, layout, cuda=True)
    assert on_gpus["data_types"] == {"grad_accum_dtype": "fp32"}
    # Reduced over the data-parallel ranks in fp32 as well (DeepSpeed's bf16 default rounds them to bf16).
    assert on_gpus["communication_data_type"] == "fp32"
    # The reduction overlaps the backward on GPUs, where there are data-parallel ranks to reduce over ...
    assert layout.data_parallel_size == 8 and on_gpus["zero_optimization"]["overlap_comm"] is True
    assert deepspeed_config(cfg, layout, cuda=False)["zero_optimization"]["overlap_comm"] is False
    # ... and not over one rank, where DeepSpeed's overlapped path would only synchronize the device.
    one_gpu = deepspeed_config(cfg, parallel_layout(cfg, 1), cuda=True)
    assert one_gpu["zero_optimization"]["overlap_comm"] is False
    tensor_parallel = load_config(None, ["parallel.tensor_parallel_size=8"])
    one_replica = deepspeed_config(tensor_parallel, parallel_layout(tensor_parallel, 8), cuda=True)
    assert one_replica["zero_optimization"]["overlap_comm"] is False
    forced = load_config(None, ["parallel.overlap_comm=true"])
    assert deepspeed_config(forced, parallel_layout(forced, 1), cuda=True)["zero_optimization"][
        "overlap_comm"
    ]


def test_deepspeed_throughput_timer_is_off_so_no_step_waits_for_the_device():
    """DeepSpeed's throughput timer synchronizes the device at each forward's start and each step's end (its
    default); glm-pretrain turns it off in the configuration, as DeepSpeed reads it."""
    from deepspeed.utils.config import get_timers_config

    cfg = load_config(None, [])
    timers = get_timers_config(deepspeed_config(cfg, parallel_layout(cfg, 1), cuda=True))
    assert timers.enabled is False and timers.synchronized is False
    assert get_timers_config({}).synchronized is True  # what it would be without the key


def test_overlap_comm_is_a_config_key_and_fp32_needs_no_accumulation_dtype():
    cfg = load_config(None, ["training.precision=fp32", "parallel.overlap_comm=false"])
    config = deepspeed_config(cfg, parallel_layout(cfg, 1), cuda=True)
    assert "data_types" not in config and config["zero_optimization"]["overlap_comm"] is False


def test_zero2_over_one_data_parallel_rank_is_warned_about():
    """ZeRO-2 partitions gradients over the data-parallel ranks: over one it only costs time, and the user is
    told which key to change. Over several, and for other stages, nothing is said."""
    zero2 = load_config(None, ["parallel.zero_stage=2", "parallel.tensor_parallel_size=2"])
    message = single_replica_zero_warning(zero2, parallel_layout(zero2, 2))
    assert "parallel.zero_stage=1" in message and "tp 2 x pp 1 x dp 1" in message
    assert single_replica_zero_warning(zero2, parallel_layout(zero2, 4)) is None  # dp 2
    zero1 = load_config(None, ["parallel.zero_stage=1"])
    assert single_replica_zero_warning(zero1, parallel_layout(zero1, 1)) is None


def test_training_state_round_trips_through_the_client_state():
    state = TrainingState()
    state.advance(8)
    state.advance(8)
    state.skipped_steps += 1  # the loop counts a skipped update when it reads the step's verdict
    assert state == TrainingState(step=2, consumed_samples=16, skipped_steps=1)
    assert TrainingState.from_client_state(state.to_client_state()) == state
    # Checkpoints of older versions carry no skipped-step count.
    assert TrainingState.from_client_state({"step": 3, "consumed_samples": 24}).skipped_steps == 0


@pytest.mark.parametrize(
    "interval, step, flags, due",
    [
        (10, 20, {}, True),
        (10, 21, {}, False),
        (0, 20, {}, False),
        (10, 21, {"preempted": True}, True),
        (10, 21, {"final": True}, True),
        (10, 5, {"final": True}, False),  # step 5 is the checkpoint the run resumed from / last saved
    ],
)
def test_checkpoint_manager_decides_when_to_save(tmp_path, interval, step, flags, due):
    manager = CheckpointManager(tmp_path, interval=interval)
    manager.saved_step = 5
    assert manager.due(step, **flags) is due


def _matmul_twice(a: torch.Tensor) -> torch.Tensor:
    return a @ a @ a


def test_step_profiler_writes_the_ops_then_the_host_functions_of_the_profiled_steps(tmp_path):
    from megatron_glm.training.metrics import StepProfiler

    profiler = StepProfiler([2, 3], tmp_path, rank=0, device=torch.device("cpu"))
    a = torch.randn(64, 64)
    for step in range(1, 6):
        profiler.before(step)
        _matmul_twice(a)
        profiler.after(step)
        if step == 3:  # the ops of steps 2-3; the host profile of steps 4-5 is still running
            text = (tmp_path / "profile-rank0.txt").read_text()
            assert text.startswith("steps 2-3") and "aten::mm" in text and "cProfile" not in text
    text = (tmp_path / "profile-rank0.txt").read_text()
    host = text[text.index("steps 4-5 under cProfile") :]
    # Python functions with their own time, ours among them.
    assert "_matmul_twice" in host and "tottime" in host
    # The profiled steps' timeline, for chrome://tracing or Perfetto.
    with gzip.open(tmp_path / "trace-rank0.json.gz", "rt") as trace:
        names = {event.get("name") for event in json.load(trace)["traceEvents"]}
    assert "aten::mm" in names
    assert StepProfiler([], tmp_path, 0, torch.device("cpu")).first == 0  # empty: never starts


class _RecordingProfile:
    """Stands in for an entered ``torch.profiler.profile``: records TEARDOWN_CUPTI as Kineto reads it on stop."""

    def __init__(self) -> None:
        self.teardown = "never stopped"

    def __exit__(self, *exc) -> None:
        self.teardown = os.environ.get("TEARDOWN_CUPTI")


@pytest.mark.parametrize(
    ("user", "graphs", "cuda", "expected"),
    [
        (None, False, "12.4", "1"),  # no graphs: torn down on any CUDA
        (None, True, "13.0", "1"),  # graphs from CUDA 12.6 on
        (None, True, "12.4", None),  # graphs before 12.6: re-initializing CUPTI after a teardown crashed
        ("0", False, "13.0", "0"),  # the user's choice wins
    ],
)
def test_a_profile_stops_with_cupti_torn_down(monkeypatch, user, graphs, cuda, expected):
    # Kineto leaves CUPTI attached after a profile unless TEARDOWN_CUPTI=1 when it stops: every launch after it
    # would pay CUPTI's callbacks, and glm-pretrain's steps after logging.profile_steps would run slower.
    from megatron_glm.training.metrics import stop_profiler

    monkeypatch.setattr(torch.version, "cuda", cuda)
    if user is None:
        monkeypatch.delenv("TEARDOWN_CUPTI", raising=False)
    else:
        monkeypatch.setenv("TEARDOWN_CUPTI", user)
    profile = _RecordingProfile()
    stop_profiler(profile, cuda_graphs=graphs)
    assert profile.teardown == expected
    assert os.environ.get("TEARDOWN_CUPTI") == user  # the environment as it was


def test_profile_steps_must_be_first_and_last():
    from megatron_glm.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="logging.profile_steps"):
        validate_config(load_config(None, ["logging.profile_steps=[5, 2]"]))
    validate_config(load_config(None, ["logging.profile_steps=[2, 5]"]))


def test_gpu_kernel_time_counts_kernels_not_the_spans_of_annotated_regions():
    """The profile's "GPU kernels per step" line: the kernels' own time; the GPU-side span of a region named with
    record_function (the engine's glm.forward, glm.backward) covers those kernels and must not be added again."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from megatron_glm.training.metrics import gpu_kernel_ms

    def event(device_type, microseconds, annotation=False):
        return SimpleNamespace(
            device_type=device_type, self_device_time_total=microseconds, is_user_annotation=annotation
        )

    averages = [
        event(DeviceType.CUDA, 3000.0),  # a kernel
        event(DeviceType.CUDA, 2000.0),  # another
        event(DeviceType.CUDA, 5000.0, annotation=True),  # glm.backward's span over both
        event(DeviceType.CPU, 0.0),  # the op that launched them
    ]
    assert gpu_kernel_ms(averages) == 5.0


def test_host_scalars_give_the_values_as_floats():
    from megatron_glm.training.metrics import HostScalars

    scalars = HostScalars([torch.tensor(1.25, dtype=torch.float64), None, 3, torch.tensor([2.0])])
    assert scalars.values() == [1.25, None, 3.0, 2.0]
    assert scalars.values() == [1.25, None, 3.0, 2.0]  # read again: the same


def test_cuda_graphs_auto_is_no_error_on_a_cpu_where_true_is():
    from megatron_glm.config import ConfigError, load_config
    from megatron_glm.training.trainer import refuse_gpu_only_settings

    config = Path(__file__).resolve().parent.parent / "run" / "configs" / "glm-tiny.yaml"
    cpu = torch.device("cpu")
    refuse_gpu_only_settings(load_config(config, ["training.cuda_graphs=auto"]), cpu)  # off, not refused
    with pytest.raises(
        ConfigError, match="training.cuda_graphs: CUDA graphs need CUDA GPUs; this run is on cpu"
    ):
        refuse_gpu_only_settings(load_config(config, ["training.cuda_graphs=true"]), cpu)
