"""The GPU check's own pieces that run anywhere: its report names no machine paths, and the launch-overhead
benchmark runs with the Triton launches stubbed (its ``launch`` stage on a CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

from gpu_check_support import Report  # noqa: E402


def test_the_report_names_no_paths_of_this_machine(tmp_path):
    work = tmp_path / "work"
    report = Report(tmp_path / "gpu-check.md", 60, work)
    report.add(f"    $ {sys.executable} {REPOSITORY / 'benchmarks' / 'bench_model.py'} --out {work / 'logs'}")
    report.add(f"  3  0.1  {REPOSITORY / 'kernels' / 'triton_support.py'}:160(__call__)")
    written = (tmp_path / "gpu-check.md").read_text()
    assert "    $ python3 benchmarks/bench_model.py --out $WORK/logs" in written
    assert "  3  0.1  kernels/triton_support.py:160(__call__)" in written
    assert str(REPOSITORY) not in written and str(tmp_path) not in written


def test_launch_overhead_benchmark_runs_with_stubbed_launches():
    # Every kernel wrapper runs its host side up to a no-op launch, the grids the autotuner's tiles size included.
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "benchmarks/bench_launch_overhead.py",
        "--stub",
        "--calls",
        "2",
        "--repeats",
        "1",
    ]
    result = subprocess.run(command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| ours: bias + dropout 0.1 + residual + LayerNorm (Triton, direct launches) |" in result.stdout
    assert "| ours: bias + dropout 0.1 + add (Triton, direct launches) |" in result.stdout
    assert "| ours: GLM attention" in result.stdout
