"""The GPU idle-time report read from a profiler trace (``megatron_glm.training.timeline``)."""

from __future__ import annotations

import gzip
import json

from megatron_glm.training.timeline import idle_report, load_trace


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def _trace():
    main, autograd, stream = 1, 2, 7
    return [
        # GPU: busy 0-150, 400-500, 510-600, 900-1000
        _x("kernel", "k1", 0, 100, stream, correlation=1),
        _x("kernel", "k2", 100, 50, stream, correlation=2),
        _x("kernel", "k3", 400, 100, stream, correlation=3),
        _x("kernel", "k4", 510, 90, stream, correlation=4),
        _x("kernel", "k5", 900, 100, stream, correlation=5),
        # The host: glm.forward waits for the GPU in an .item() (sync returns at 150), then launches k3 at 350
        # from aten::addmm inside aten::linear.
        _x("user_annotation", "glm.forward", 0, 400, main),
        _x("cpu_op", "aten::item", 110, 50, main),
        _x("cuda_runtime", "cudaStreamSynchronize", 120, 30, main),
        _x("cpu_op", "aten::linear", 300, 90, main),
        _x("cpu_op", "aten::addmm", 340, 40, main),
        _x("cuda_runtime", "cudaLaunchKernel", 350, 5, main, correlation=3),
        _x("cuda_runtime", "cudaLaunchKernel", 390, 5, main, correlation=4),
        # glm.backward on the main thread; its ops run on autograd's thread, which launches k5 at 870.
        _x("user_annotation", "glm.backward", 700, 300, main),
        _x("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 850, 49, autograd),
        _x("cpu_op", "aten::mm", 860, 30, autograd),
        _x("cuda_driver", "cuLaunchKernelEx", 870, 5, autograd, correlation=5),
        {"ph": "i", "name": "an instant event without a duration", "ts": 5},
    ]


def test_idle_time_is_charged_to_the_host_op_that_launched_the_next_kernel(tmp_path):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": _trace()}, handle)
    report = idle_report(load_trace(path), steps=2, min_gap_us=20)
    # Window 0-1000 us, busy 440: idle 560 us over 2 steps; the 10 us gap before k4 is under the threshold.
    assert report.startswith("GPU idle between its first and last kernel: 0.3 ms per step of 0.5 (56%)")
    assert "gaps under 20 us: 0.0 ms per step" in report
    rows = [line for line in report.splitlines() if line.startswith("| glm.")]
    # Largest first: the backward's gap (300 us, no sync before it), then the forward's, which began when the
    # host's sync returned.
    assert rows == [
        "| glm.backward / autograd::engine::evaluate_function: MmBackward0 > aten::mm | 0.15 | 0.00 | 0.5 |",
        "| glm.forward / aten::linear > aten::addmm | 0.12 | 0.12 | 0.5 |",
    ]


def test_a_trace_without_gpu_kernels_says_so():
    assert "no GPU kernels" in idle_report([_x("cpu_op", "aten::mm", 0, 10)], steps=1)
