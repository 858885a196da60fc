"""Reporting: a live progress line, TensorBoard scalars and a JSON-lines metrics file (rank 0 only)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_glm.log import get_logger

logger = get_logger("metrics")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class HostScalars:
    """Scalars of the device (tensors of one element, or host numbers) on their way to the host, without waiting.

    ``.item()`` on a CUDA tensor copies on the current stream, so it waits for everything queued before it: read
    after the next step has been launched, it would wait for that step too. Here the values are copied into
    pinned host memory as soon as they are queued, behind the work that produces them and ahead of anything
    launched later, and an event marks the copy; ``values()`` waits for that event alone. On CPUs the values
    are copied as they are and read by ``values()``.
    """

    def __init__(self, values: list) -> None:
        self._values = [v.detach().clone() if torch.is_tensor(v) and not v.is_cuda else v for v in values]
        self._positions = [i for i, v in enumerate(self._values) if torch.is_tensor(v) and v.is_cuda]
        self._host = self._event = None
        if self._positions:
            device = self._values[self._positions[0]].device
            stacked = torch.stack(
                [self._values[i].detach().reshape(()).to(device, torch.float64) for i in self._positions]
            )
            self._host = torch.empty(len(self._positions), dtype=torch.float64, pin_memory=True)
            self._host.copy_(stacked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def values(self) -> list:
        """The values as Python floats (None stays None)."""
        if self._host is not None:
            self._event.synchronize()
            for position, value in zip(self._positions, self._host.tolist()):
                self._values[position] = value
            self._host = self._event = None
        return [v if v is None else float(v.item() if torch.is_tensor(v) else v) for v in self._values]


class MetricsReporter:
    """Collects per-step values and reports averages every ``log_interval`` steps."""

    def __init__(
        self,
        log_dir: str | Path,
        *,
        enabled: bool,
        tensorboard: bool,
        total_steps: int,
        tokens_per_step: int,
        flops_per_token: Callable[[float], float],
        peak_flops: float,
        log_interval: int,
    ):
        """``flops_per_token(f)``: training FLOPs per token when a fraction f of positions needs logits."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.log_interval = max(1, log_interval)
        self._window: list[dict[str, float]] = []
        self._writer = None
        self._jsonl = None
        if enabled:
            directory = Path(log_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(directory / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(directory / "tensorboard"))
        self._start = time.perf_counter()
        self._start_step: int | None = None

    def step(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float | None,
        step_time: float,
        data_wait: float,
        loss_fraction: float,
        skipped_total: int,
    ) -> None:
        """Record optimizer step ``step`` (1-based); prints and writes at the interval and at the end."""
        if self._start_step is None:
            self._start_step = step - 1
        self._window.append(
            {
                "loss": loss,
                "lr": lr,
                "grad_norm": math.nan if grad_norm is None else grad_norm,
                "step_time": step_time,
                "data_wait": data_wait,
                "loss_fraction": loss_fraction,
            }
        )
        if step % self.log_interval and step != self.total_steps:
            return
        window, self._window = self._window, []
        if not self.enabled:
            return
        mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
        tokens_per_second = self.tokens_per_step / mean["step_time"] if mean["step_time"] > 0 else math.nan
        flops = self.flops_per_token(mean["loss_fraction"])
        mfu = tokens_per_second * flops / self.peak_flops if self.peak_flops > 0 else math.nan
        elapsed = time.perf_counter() - self._start
        done = step - self._start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else math.inf
        record = {
            "step": step,
            "loss": mean["loss"],
            "lr": lr,
            "grad_norm": mean["grad_norm"],
            "tokens_per_second": tokens_per_second,
            "mfu": mfu,
            "step_time": mean["step_time"],
            "data_wait_fraction": mean["data_wait"] / mean["step_time"] if mean["step_time"] > 0 else 0.0,
            "skipped_steps": skipped_total,
            "elapsed": elapsed,
            # Most GPU memory this rank has held (tensors; the caching allocator reserves more).
            **(
                {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
                if torch.cuda.is_initialized()
                else {}
            ),
        }
        grad = f"{mean['grad_norm']:.3f}" if math.isfinite(mean["grad_norm"]) else "-"
        logger.info(
            "step %d/%d | loss %.4f | lr %.3e | grad norm %s | %s tok/s | MFU %.1f%% | data wait %.1f%% "
            "| skipped %d | ETA %s",
            step,
            self.total_steps,
            mean["loss"],
            lr,
            grad,
            f"{tokens_per_second:,.0f}",
            100 * mfu,
            100 * record["data_wait_fraction"],
            skipped_total,
            format_duration(eta),
        )
        self._write(record, "train")

    def evaluation(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        parts = " | ".join(f"{name} {value:.4f}" for name, value in losses.items())
        logger.info("eval at step %d | %s", step, parts)
        self._write({"step": step, **{f"eval_{k}": v for k, v in losses.items()}}, "eval")

    def _write(self, record: dict[str, Any], prefix: str) -> None:
        self._jsonl.write(json.dumps({"kind": prefix, **record}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"{prefix}/{key.removeprefix('eval_')}", value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()


def gpu_kernel_ms(averages) -> float:
    """Milliseconds of GPU kernels in a profile's ``key_averages()`` (the kernels' own events: the ops that
    launched them would count the same time twice; and not the GPU-side spans of ``record_function`` regions,
    such as the engine's ``glm.forward``, which cover the kernels they enclose)."""
    from torch.autograd import DeviceType

    return (
        sum(
            e.self_device_time_total
            for e in averages
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        )
        / 1e3
    )


def _cupti_teardown_is_safe(cuda_graphs: bool) -> bool:
    """Whether Kineto may finalize CUPTI when a profile stops: always without CUDA graphs; with them only from
    CUDA 12.6, where re-initializing CUPTI after a teardown no longer crashes graph replays (torch's profiler
    turns the teardown off for graphs on older CUDA)."""
    if not cuda_graphs:
        return True
    version = tuple(int(part) for part in (torch.version.cuda or "0.0").split(".")[:2])
    return version >= (12, 6)


def stop_profiler(profile, cuda_graphs: bool = False) -> None:
    """Stop a ``torch.profiler.profile`` that was entered, tearing CUPTI down as it stops.

    Kineto leaves CUPTI attached after a profile unless ``TEARDOWN_CUPTI=1`` is set when it stops, and every
    kernel launch after it keeps paying CUPTI's callbacks (10-20% slower training in pytorch/pytorch#144455;
    on the H200 every model step timed after a profile ran 13-40% slower than before it). The variable is set
    around the stop only, and left as it was: a value the user set wins.
    """
    if "TEARDOWN_CUPTI" in os.environ or not _cupti_teardown_is_safe(cuda_graphs):
        profile.__exit__(None, None, None)
        return
    os.environ["TEARDOWN_CUPTI"] = "1"
    try:
        profile.__exit__(None, None, None)
    finally:
        del os.environ["TEARDOWN_CUPTI"]


class StepProfiler:
    """torch.profiler over optimizer steps ``first..last``, then cProfile over as many steps after them.

    At ``last`` it writes the ops that took the most GPU (else CPU) time to ``<log_dir>/profile-rank<r>.txt``
    (the table torch prints); once the host window ends it appends the Python functions the host spent the
    most time in (cProfile, by own time): on a step bound by its host, the launch wrappers, hooks and library
    loops that hold the GPU back. The two run over different steps, so neither inflates the other's times.
    """

    def __init__(
        self,
        steps: list[int],
        log_dir: str | Path,
        rank: int,
        device: torch.device,
        cuda_graphs: bool = False,
    ):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.host_last = 2 * self.last - self.first + 1
        self.path = Path(log_dir) / f"profile-rank{rank}.txt"
        self.device = device
        self.cuda_graphs = cuda_graphs
        self._profile = None
        self._host = None

    def before(self, step: int) -> None:
        """Call before optimizer step ``step`` (1-based) runs."""
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profile = profile(activities=activities)
            self._profile.__enter__()
        elif step == self.last + 1 and self.path.is_file():
            import cProfile

            self._synchronize()
            self._host = cProfile.Profile()
            self._host_start = time.perf_counter()
            self._host.enable()

    def after(self, step: int) -> None:
        """Call after optimizer step ``step`` is done."""
        if self._host is not None and step == self.host_last:
            self._write_host_profile()
        if self._profile is None or step != self.last:
            return
        self._synchronize()
        stop_profiler(self._profile, self.cuda_graphs)
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        averages = self._profile.key_averages()
        text = f"steps {self.first}-{self.last}, sorted by {key}\n"
        text += averages.table(sort_by=key, row_limit=30, max_name_column_width=70) + "\n"
        if self.device.type == "cuda":
            steps = self.last - self.first + 1
            text += f"\nGPU kernels: {gpu_kernel_ms(averages) / steps:.1f} ms per step\n"
            # Where the host's time goes: the engine's phases (glm.forward, glm.backward, glm.optimizer_step)
            # and the ops that cost the CPU most. A step whose host time exceeds its GPU time is launch-bound.
            text += (
                f"\nsteps {self.first}-{self.last}, sorted by cpu_time_total (host time, children included)\n"
            )
            text += averages.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70) + "\n"
        idle = self._export_trace(self.last - self.first + 1)
        if self.device.type == "cuda":
            text += f"\nsteps {self.first}-{self.last}, {idle}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text)
        logger.info("profile of steps %d-%d written to %s", self.first, self.last, self.path)
        self._profile = None

    def _export_trace(self, steps: int) -> str:
        """Write the profiled steps' trace (``trace-rank<r>.json.gz``, for chrome://tracing or Perfetto) and
        return where the GPU sat idle in them (``training.timeline``)."""
        from megatron_glm.training.timeline import idle_report, profile_events

        trace = self.path.with_name(self.path.name.replace("profile-", "trace-")).with_suffix(".json.gz")
        trace.parent.mkdir(parents=True, exist_ok=True)
        report = idle_report(profile_events(self._profile, keep=trace), steps)
        return report + f"(trace: {trace.name})\n"

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _write_host_profile(self) -> None:
        import io
        import pstats

        self._host.disable()
        steps = self.host_last - self.last
        seconds = (time.perf_counter() - self._host_start) / steps
        self._synchronize()
        table = io.StringIO()
        pstats.Stats(self._host, stream=table).sort_stats("tottime").print_stats(30)
        lines = [line for line in table.getvalue().splitlines() if line.strip() and "Ordered by" not in line]
        with self.path.open("a") as out:
            out.write(
                f"\nsteps {self.last + 1}-{self.host_last} under cProfile (host, Python): {seconds * 1e3:.1f} ms "
                "per step until its last launch; top 30 functions by own time (tottime: in the function itself, "
                "cumtime: with what it calls; seconds over the steps)\n" + "\n".join(lines) + "\n"
            )
        logger.info("host profile of steps %d-%d added to %s", self.last + 1, self.host_last, self.path)
        self._host = None


class TimedIterator:
    """Counts the time spent waiting for the next micro-batch (the data loader's share of a step) and the
    share of positions that carry a loss (the rows whose logits are computed)."""

    def __init__(self, inner: Iterator[dict]):
        self.inner = inner
        self.waited = 0.0
        self._loss_positions = 0.0
        self._positions = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = time.perf_counter()
        batch = next(self.inner)
        self.waited += time.perf_counter() - start
        self._loss_positions += batch["loss_index"].numel()
        self._positions += batch["loss_mask"].numel()
        return batch

    @property
    def loss_fraction(self) -> float:
        return self._loss_positions / self._positions if self._positions else 0.0
