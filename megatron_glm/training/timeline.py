"""Where a GPU sits idle in a profiled stretch of training, read from the profiler's trace.

A step whose GPU kernels take 50 ms may still take 90: the GPU waits between kernels, either because the host
has not launched the next one yet (a host slower than the GPU, a Python loop, a data wait) or because the host
waited for the GPU (a ``.item()``, a ``synchronize``) and only then went on to launch. The op tables of
torch.profiler sum times per op and cannot show this; the trace (``export_chrome_trace``) has every kernel and
every host call on one clock. ``idle_report`` merges the kernels' intervals, finds the gaps between them, and
charges each gap to the host op that launched the kernel ending it (and to the engine phase, a
``record_function`` region such as ``glm.backward``, that op ran in), noting gaps that begin when a host sync
returns.

    python -m megatron_glm.training.timeline logs/trace-rank0.json.gz     # the report of a saved trace
"""

from __future__ import annotations

import bisect
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# Host calls that wait for the GPU.
SYNC_CALLS = (
    "cudaDeviceSynchronize",
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cuStreamSynchronize",
    "cuCtxSynchronize",
    "cuEventSynchronize",
)


def load_trace(path: str | Path) -> list[dict]:
    """The complete (``"ph": "X"``) events of a Chrome trace, ``.json`` or ``.json.gz``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def profile_events(profile, keep: str | Path | None = None) -> list[dict]:
    """The complete events of a finished ``torch.profiler.profile``'s trace; with ``keep`` (a ``.json.gz`` path)
    the trace is also kept there, gzipped, for chrome://tracing or Perfetto (written under a temporary name,
    then renamed)."""
    import os
    import shutil
    import tempfile

    handle, raw = tempfile.mkstemp(suffix=".json", dir=None if keep is None else Path(keep).parent)
    os.close(handle)
    try:
        profile.export_chrome_trace(raw)
        if keep is not None:
            with open(raw, "rb") as source, gzip.open(f"{keep}.tmp", "wb") as target:
                shutil.copyfileobj(source, target)
            os.replace(f"{keep}.tmp", keep)
        return load_trace(raw)
    finally:
        os.unlink(raw)


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


class _Enclosing:
    """The host events of one thread, to find the ones that contain a moment (outermost first). Host events nest
    (an op within its phase, a kernel call within its op): each event's parent is found once, and a query walks
    up from the last event to start before the moment."""

    def __init__(self, events: list[dict]) -> None:
        self.events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
        self.starts = [e["ts"] for e in self.events]
        self.parent: list[int] = []
        open_events: list[int] = []
        for index, event in enumerate(self.events):
            while open_events and self._end(open_events[-1]) < event["ts"]:
                open_events.pop()
            self.parent.append(open_events[-1] if open_events else -1)
            open_events.append(index)

    def _end(self, index: int) -> float:
        event = self.events[index]
        return event["ts"] + event["dur"]

    def at(self, moment: float) -> list[dict]:
        index = bisect.bisect_right(self.starts, moment) - 1
        while index >= 0 and self._end(index) < moment:
            index = self.parent[index]
        found = []
        while index >= 0:
            found.append(self.events[index])
            index = self.parent[index]
        return found[::-1]


def idle_report(events: list[dict], steps: int, min_gap_us: float = 20.0, rows: int = 12) -> str:
    """A text report of the GPU's idle time between its first and last kernel in ``events`` (per step, over
    ``steps`` steps): its total, and the largest causes as ``phase / host op that launched the next kernel``,
    with how much of it began when a host sync returned. Gaps under ``min_gap_us`` count in the total only."""
    kernels = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not kernels:
        return "GPU idle time: no GPU kernels in the trace\n"
    busy = _merged([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    window = busy[-1][1] - busy[0][0]
    busy_time = sum(end - start for start, end in busy)
    # The first kernel of each busy interval is the one that ended the gap before it.
    first_kernel: dict[float, dict] = {}
    for event in sorted(kernels, key=lambda e: e["ts"]):
        first_kernel.setdefault(event["ts"], event)
    starts = sorted(first_kernel)

    launches = {}
    host_by_thread: dict[tuple, list[dict]] = defaultdict(list)
    syncs = []
    annotations: list[dict] = []
    for event in events:
        category = event.get("cat", "")
        if category in ("cuda_runtime", "cuda_driver"):
            correlation = event.get("args", {}).get("correlation")
            if correlation is not None:
                launches[correlation] = event
            if event["name"] in SYNC_CALLS:
                syncs.append(event["ts"] + event["dur"])
        elif category == "cpu_op":
            host_by_thread[(event.get("pid"), event.get("tid"))].append(event)
        elif category == "user_annotation":
            annotations.append(event)
    syncs.sort()
    enclosing = {thread: _Enclosing(host) for thread, host in host_by_thread.items()}

    causes: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    small = 0.0
    for (_, gap_start), (gap_end, _) in zip(busy, busy[1:]):
        gap = gap_end - gap_start
        if gap < min_gap_us:
            small += gap
            continue
        kernel = first_kernel[starts[bisect.bisect_left(starts, gap_end)]]
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            label = f"(launch not in the trace) / {kernel['name'][:50]}"
        else:
            thread = enclosing.get((launch.get("pid"), launch.get("tid")))
            ops = [e["name"] for e in thread.at(launch["ts"])] if thread else []
            # The phase on any thread (the backward's ops run on autograd's thread, inside the main thread's
            # glm.backward): the shortest annotation around the launch.
            phases = [e for e in annotations if e["ts"] <= launch["ts"] <= e["ts"] + e["dur"]]
            phase = min(phases, key=lambda e: e["dur"])["name"] if phases else "(no phase)"
            label = f"{phase} / {ops[0] if ops else launch['name']}"
            if len(ops) > 1:
                label += f" > {ops[-1]}"
        index = bisect.bisect_left(syncs, gap_start - 5.0)
        after_sync = index < len(syncs) and syncs[index] <= gap_end
        cause = causes[label]
        cause[0] += gap
        cause[1] += gap if after_sync else 0.0
        cause[2] += 1
    idle = window - busy_time
    lines = [
        f"GPU idle between its first and last kernel: {idle / 1e3 / steps:.1f} ms per step of "
        f"{window / 1e3 / steps:.1f} ({idle / window:.0%}); gaps under {min_gap_us:g} us: "
        f"{small / 1e3 / steps:.1f} ms per step",
        "",
        "| idle before a kernel launched by (phase / host op) | ms per step | after a host sync | gaps per step |",
        "|---|---|---|---|",
    ]
    for label, (total, synced, count) in sorted(causes.items(), key=lambda item: -item[1][0])[:rows]:
        lines.append(
            f"| {label} | {total / 1e3 / steps:.2f} | {synced / 1e3 / steps:.2f} | {count / steps:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="a Chrome trace from torch.profiler (.json or .json.gz)")
    parser.add_argument("--steps", type=int, default=1, help="steps the trace covers (per-step figures)")
    parser.add_argument("--min-gap-us", type=float, default=20.0)
    args = parser.parse_args(argv)
    print(idle_report(load_trace(args.trace), args.steps, args.min_gap_us), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
