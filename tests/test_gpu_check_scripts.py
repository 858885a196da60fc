"""The GPU check's own pieces that run anywhere: its report names no machine paths, and the launch-overhead
benchmark runs with the Triton launches stubbed (its ``launch`` stage on a CPU); the attention scheduling model
behind a kernel decision finds what the work log reports."""

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


def test_the_schedule_model_finds_what_the_work_log_reports():
    """``benchmarks/attention_schedule.py``, behind the decision to leave persistent attention programs out
    (docs/gpu-work-log.md): with each sample's own sep, the GPU's block dispatch stays near the ideal and
    round-robin persistent programs do not; with P a multiple of the blocks per head, not even on a uniform sep."""
    import attention_schedule

    rows = attention_schedule.block_costs(512, 4, [0, 100, 300, 512], 64, 64)
    # Later query blocks see more keys: each head's blocks in launch order cost the same or less.
    assert all(
        a >= b for head in range(4) for a, b in zip(rows[head * 8 : head * 8 + 7], rows[head * 8 + 1 :])
    )
    assert rows[:8] == [9, 8, 7, 6, 5, 4, 3, 2]  # sep 0: causal, block i visits its i + 1 key blocks
    assert rows[-8:] == [9] * 8  # sep 512: every block sees every key
    for length in (512, 2048):
        rows = max(1, 16384 // length) * 16
        seps = [(7919 * row) % (length + 1) for row in range(rows // 16) for _ in range(16)]
        costs = attention_schedule.block_costs(length, rows, seps, 64, 64)
        ideal = sum(costs) / 264
        dispatched = attention_schedule.dispatched(costs, 264) / ideal
        assert dispatched < 1.1
        assert attention_schedule.round_robin(costs, 264) / ideal > dispatched + 0.05
    uniform = attention_schedule.block_costs(512, 256, [256] * 256, 64, 64)
    assert attention_schedule.round_robin(uniform, 264) > 1.3 * sum(uniform) / 264


def test_a_stage_without_budget_left_says_so_instead_of_failing(tmp_path):
    """The optimizer-step stage comes last in its call: with the budget spent it is reported as not run, not as
    a failed (cut-short) benchmark."""
    import gpu_check

    report = Report(tmp_path / "gpu-check.md", 0, tmp_path / "work")
    gpu_check.stage_optimizer_step(report, dict(os.environ), tmp_path / "work", smoke=False)
    assert "not run:" in (tmp_path / "gpu-check.md").read_text()
    assert report.failures == []


def test_the_warp_specialized_kernel_bench_runs_apart_and_only_with_time_left(tmp_path, monkeypatch):
    """The warp-specialized tiles are timed in a process of their own, with GLM_KERNELS_WARP_SPECIALIZE=1 set
    there only (a faulting kernel costs that table alone, and the kbench stage times the default candidates);
    last in its call, it is reported as not run when the budget is spent."""
    import gpu_check

    calls = []
    monkeypatch.setattr(
        gpu_check, "run_tables", lambda report, name, command, env, *rest: calls.append((command, env))
    )
    report = Report(tmp_path / "gpu-check.md", 600, tmp_path / "work")
    env = {"GLM_KERNELS_WARP_SPECIALIZE": "0"}
    gpu_check.stage_kernel_bench(report, env, tmp_path / "work", smoke=True, extra="")
    gpu_check.stage_kernel_bench_ws(report, env, tmp_path / "work", smoke=True)
    (plain, plain_env), (specialized, specialized_env) = calls
    assert (
        plain_env["GLM_KERNELS_WARP_SPECIALIZE"] == "0"
        and specialized_env["GLM_KERNELS_WARP_SPECIALIZE"] == "1"
    )
    assert env == {"GLM_KERNELS_WARP_SPECIALIZE": "0"}
    assert specialized[specialized.index("--variants") + 1] == "ours sep=T/2,sdpa-causal"

    spent = Report(tmp_path / "spent.md", 0, tmp_path / "work")
    gpu_check.stage_kernel_bench_ws(spent, env, tmp_path / "work", smoke=True)
    assert len(calls) == 2 and "not run:" in (tmp_path / "spent.md").read_text()


def test_the_graphs_resume_stage_on_a_cpu_says_it_needs_a_gpu(tmp_path):
    """The kill -9 and resume under training.cuda_graphs is a GPU check: a CPU smoke run reports it as not run
    (glm-pretrain would refuse the setting there), not as a failure."""
    import gpu_check_training

    report = Report(tmp_path / "gpu-check.md", 60, tmp_path / "work")
    gpu_check_training.stage_pretrain(
        report, dict(os.environ), tmp_path / "work", True, 6, [], variant="graphs", cuda=False
    )
    text = (tmp_path / "gpu-check.md").read_text()
    assert "## glm-pretrain with training.cuda_graphs: train, evaluate, checkpoint, kill -9, resume" in text
    assert "not run: CUDA graphs need a GPU" in text
    assert report.failures == []
