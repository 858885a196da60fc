"""The GPU check (``make gpu-check``): one script that shows on one GPU that the GPU path works and how fast.

On one H100/H200 with the image's python3 (CUDA torch and triton installed; DeepSpeed and its pure-Python
dependencies on PYTHONPATH from ``gpu-deps/``, which ``benchmarks/gpu_deps.sh`` fills; no network) it runs,
within about 8 minutes:

1. the kernel tests on CUDA (attention, LayerNorm, dropout), each kernel on one fixed tile shape
   (``GLM_KERNELS_AUTOTUNE=0``, set by tests/conftest.py), spread over processes with pytest-xdist, and the
   RNG tracker's tests (its fork captured in a CUDA graph);
2. ``benchmarks/bench_model.py --preset glm-large --dropout 0.1,0 --profile --kernels triton,triton-atomic,torch``:
   GLM with Triton (deterministic, and with the attention's dQ added by atomics) and with torch kernels next to
   HF BertForMaskedLM (SDPA), steps interleaved, the matmul peak measured in the same run,
   and where each step's GPU and host time goes; its autotuned tile choices stay in Triton's on-disk cache,
   where the training runs find them;
3. ``benchmarks/bench_launch_overhead.py``: the host time per forward+backward call of our LayerNorm and
   attention, launched directly and through Triton's dispatch, next to torch's;
4. ``glm-pretrain`` of glm-large (bf16, dropout 0.1, micro = global batch 16, the bundled Austen corpus) for
   100 steps with an evaluation and a checkpoint at step 50; then the same run killed (SIGKILL) once its
   step-50 checkpoint is complete, resumed, and its losses of steps 51-100 compared with the first run's;
   the throughput table, and a profile of three steps (GPU kernels and the host's phases) and of three more
   under cProfile (the host's Python functions);
5. on request (``--stages``): ``throughput`` (glm-pretrain under ZeRO-1, and ZeRO-1 with the attention's
   atomic-dQ backward, with per-layer CUDA graphs and with torch's kernels, side by side), ``graphs``
   (the model step also captured in one CUDA graph: its speed without the host's launch overhead), ``kbench``
   (``benchmarks/bench_kernels_gpu.py``: attention against SDPA and FlexAttention, LayerNorm against torch),
   ``kbench-ws`` (its attention without dropout with the warp-specialized tiles among the candidates),
   ``glm2b`` (glm-2b on one GPU with ZeRO-1 at T 1024: tokens/s, MFU and peak memory), ``compile``
   (``benchmarks/bench_compile.py``: the attention kernels' autotuning candidates compiled one by one, as
   Triton's autotuner does, against ``kernels/precompile.py``'s worker processes) and ``optstep``
   (``benchmarks/bench_optimizer_step.py``: DeepSpeed's bf16 ZeRO-2 step against ours: operations, host reads
   and step time).

Every stage's output goes to stdout and, with the summary, to ``<out>/gpu-check.md`` (the commands' logs to
``<out>/gpu-check-logs.tar.gz``); the exit status is 1
when a stage failed. ``--smoke`` runs every stage at toy size on whatever device there is (on a CPU: fp32,
DeepSpeed's CPU accelerator and Triton's interpreter), to check the script itself anywhere.

    benchmarks/gpu_deps.sh                                          # once, where pip works
    PYTHONPATH=$PWD:$PWD/gpu-deps python3 benchmarks/gpu_check.py --out outputs/gpu-check
    python benchmarks/gpu_check.py --smoke --out smoke-report      # the same stages, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
from pathlib import Path

from gpu_check_support import ROOT, Report, child_env, run, run_tables
from gpu_check_training import stage_glm2b, stage_pretrain, stage_throughput

# The tests that run on CUDA tensors where there is a GPU: the kernels' (test_kernels_compile, which compiles
# ahead of time for GPUs on machines without one, is for CPU machines), the RNG tracker's (its fork captured in
# a CUDA graph), per-layer CUDA graphs against eager training, and a training step that waits for nothing.
CUDA_TESTS = [
    "tests/test_kernels_attention.py",
    "tests/test_kernels_attention_dropout.py",
    "tests/test_kernels_layernorm.py",
    "tests/test_kernels_dropout.py",
    "tests/test_kernels_cross_entropy.py",
    "tests/test_kernels_launcher.py",
    "tests/test_host_scalars_cuda.py",
    "tests/test_parallel_random.py",
    "tests/test_parallel_random_cuda.py",
    "tests/test_cuda_graphs_cuda.py",
    "tests/test_training_overlap_comm.py",
    "tests/test_training_no_sync_cuda.py",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu-check"),
        help="report",
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: <out>-work beside --out)"
    )
    parser.add_argument("--smoke", action="store_true", help="every stage at toy size (any device)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (unset: 100; with --smoke 6)")
    parser.add_argument(
        "--stages",
        default="kernels,bench,launch,pretrain",
        help="which stages to run, comma-separated, in this order: kernels (the kernel tests), bench "
        "(bench_model.py, dropout 0.1 and 0, profiled; it also leaves the autotuned tiles of the glm-large "
        "shapes in Triton's cache for the training runs), launch (bench_launch_overhead.py: host time per "
        "kernel call, direct launches vs Triton's dispatch vs torch), pretrain (100 steps, evaluation, checkpoint, kill -9, "
        "exact resume), resume-graphs (the same with training.cuda_graphs, unprofiled), throughput (glm-pretrain ZeRO-1 vs atomic-dQ attention vs CUDA graphs vs torch kernels, profiled), graphs (bench_model.py with each "
        "step also captured in a CUDA graph), kbench (bench_kernels_gpu.py), kbench-ws (its attention rows "
        "without dropout with the warp-specialized tiles among the candidates), "
        "glm2b (glm-2b on one GPU, ZeRO-1, T 1024, 12 steps: tokens/s, MFU, peak "
        "memory), compile (bench_compile.py: the autotuning candidates compiled one by one vs in worker "
        "processes), optstep (bench_optimizer_step.py: DeepSpeed's bf16 ZeRO-2 step vs ours); the default set "
        "stays under 8 minutes",
    )
    parser.add_argument(
        "--kernel-bench-args",
        default="",
        help="further arguments of bench_kernels_gpu.py in the kbench stage, e.g. '--lengths 1024,4096'",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further glm-pretrain setting for the training runs (repeatable), e.g. training.precision=bf16",
    )
    parser.add_argument(
        "--budget", type=float, default=480, help="seconds for everything: a stage gets at most what is left"
    )
    return parser.parse_args()


def stage_environment(report: Report, cuda: bool) -> None:
    import torch

    report.add("## Environment\n")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report.add(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        )
    else:
        report.add(f"- no GPU: CPU smoke run on {os.cpu_count()} CPUs")
    versions = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    for name in ("triton", "deepspeed", "transformers", "pydantic"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:  # noqa: BLE001 (a missing package is reported, the stage that needs it fails)
            versions.append(f"{name} MISSING")
    report.add("- " + ", ".join(versions))


def stage_kernels(report: Report, env: dict[str, str], work: Path, smoke: bool) -> None:
    report.add("\n## Kernel tests\n")
    tests = ["tests/test_kernels_layernorm.py"] if smoke else CUDA_TESTS
    command = [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "--durations=15"]
    if smoke:
        command += ["-k", "not slow"]
    else:
        # Most of a GPU test run is Triton compiling one variant per dtype and flag set: spread it over
        # processes (pytest-xdist) where there are cores for it.
        try:
            import xdist  # noqa: F401

            command += ["-n", str(min(12, max(1, (os.cpu_count() or 1) - 2)))]
        except ImportError:
            pass
    timings = work / "kernel-test-times.log"
    timings.unlink(missing_ok=True)
    status, text = run(
        report,
        command,
        {**env, "GLM_TEST_TIMINGS": str(timings)},
        120 if not smoke else 300,
        work / "kernel-tests.log",
    )
    if timings.is_file():
        lines = timings.read_text().splitlines()
        started = [line.split(" ", 1)[1] for line in lines if line.startswith("start ")]
        finished = [
            line.split(" ", 2) for line in lines if not line.startswith("start ") and line.count(" ") >= 2
        ]
        slowest = sorted(finished, key=lambda fields: -float(fields[0]))[:8]
        report.add(
            f"    {len(finished)} tests finished, {sum(float(f[0]) for f in finished):.0f} s of test time in all; "
            "the slowest: " + ", ".join(f"{f[2].split('::')[-1]} {float(f[0]):.1f} s" for f in slowest)
        )
        running = sorted(set(started) - {f[2] for f in finished})
        if running:
            report.add(f"    still running when the stage ended: {', '.join(running[:12])}")
    summary = [
        line for line in text.splitlines() if " passed" in line or " failed" in line or "error" in line
    ]
    report.add(
        "    "
        + (summary[-1] if summary else text.strip().splitlines()[-1] if text.strip() else "(no output)")
    )
    # Which tests failed and why (pytest's short summary), so that the report alone says what to look at.
    failed = [line for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    for line in failed[:20]:
        report.add(f"    {line[:400]}")
    if len(failed) > 20:
        report.add(f"    ... and {len(failed) - 20} more (see kernel-tests.log)")
    if status != 0:
        report.fail("kernel tests", f"pytest exit {status}")


def stage_graphs(report: Report, env: dict[str, str], work: Path, smoke: bool) -> None:
    """The model step captured in CUDA graphs (no host launch overhead) next to the same step launched
    eagerly, in its own process: a failed capture cannot disturb the other stages."""
    report.add("\n## Model step in one CUDA graph (the step without the host's launch overhead)\n")
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--preset", "glm-large"]
    command += ["--dropout", "0,0.1", "--cuda-graph", "--layer-graphs", "--steps", "6", "--warmup", "3"]
    if smoke:
        command += ["--layers", "2", "--hidden", "64", "--heads", "4", "--seq", "64", "--batch", "2"]
        command += ["--vocab", "1024", "--dtypes", "fp32", "--kernels", "torch"]
    log = work / "bench-model-graphs.log"
    # Eight models per dropout value (GLM on each kernel set eagerly, with per-layer graphs and captured whole;
    # BERT eagerly and captured whole): ~3 minutes on an H200.
    run_tables(report, "bench_model --cuda-graph", command, env, 240 if not smoke else 300, log)


def stage_launch(report: Report, env: dict[str, str], work: Path, smoke: bool) -> None:
    """Host time per call of our kernels' launches (direct, and through Triton's dispatch) next to torch's."""
    report.add("\n## Host time per kernel call: our launches (direct and through Triton) vs torch\n")
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_launch_overhead.py")]
    if smoke:
        command += ["--stub", "--calls", "20", "--repeats", "2"]
    # One tile per kernel: the host's cost does not depend on it, and nothing is autotuned for these shapes.
    env = {**env, "GLM_KERNELS_AUTOTUNE": "0"}
    run_tables(report, "bench_launch_overhead", command, env, 90, work / "launch.log")


def stage_optimizer_step(report: Report, env: dict[str, str], work: Path, smoke: bool) -> None:
    """DeepSpeed's bf16 ZeRO-2 optimizer step against ours (training/fused_zero.py), in glm-pretrain's engine at
    24 layers (glm-large's 293 parameter tensors) of toy width: a step bound by its host, as on one GPU."""
    report.add("\n## DeepSpeed's optimizer step against ours (operations, host reads, train_step time)\n")
    if report.left(120) < 45:  # it needs ~30 s on a GPU: say so rather than fail on a cut-short run
        report.add(f"not run: {report.left(120):.0f} s of the budget left")
        return
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_optimizer_step.py"), "--configs", "bf16:2"]
    if smoke:
        command += ["--layers", "2", "--rounds", "2", "--steps", "2"]
    run_tables(report, "bench_optimizer_step", command, env, report.left(120), work / "optimizer-step.log")


# The lines of bench_kernels_gpu.py's output that go into the report: its tables, headings and notes.
BENCH_LINES = ("|", "#", "torch ", "TFLOP", "GB/s", "rel diff", "- ", "ABORTED", "Device-to-device")


def stage_kernel_bench(report: Report, env: dict[str, str], work: Path, smoke: bool, extra: str) -> None:
    report.add("\n## Kernels: GLM attention vs SDPA and FlexAttention, LayerNorm vs torch\n")
    budget = max(20.0, min(240.0, report.left(400) - 50))
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels_gpu.py"), "--budget", f"{budget:.0f}"]
    command += (["--smoke"] if smoke else []) + extra.split()
    run_tables(
        report, "bench_kernels_gpu", command, env, budget + 60, work / "bench-kernels.log", BENCH_LINES
    )


def stage_kernel_bench_ws(report: Report, env: dict[str, str], work: Path, smoke: bool) -> None:
    """The attention without dropout with the warp-specialized candidates among the autotuner's
    (``GLM_KERNELS_WARP_SPECIALIZE=1``, opt-in until checked on a GPU), next to SDPA's causal flash path: in a
    process of its own, so that a kernel that faults costs this table only. Its tile table says whether the
    autotuner chose one (``WS: True``), its rel diff column whether the results hold; the ``kbench`` stage's
    "ours sep=T/2" rows are the same kernels without them."""
    report.add("\n## Warp-specialized attention tiles (`GLM_KERNELS_WARP_SPECIALIZE=1`), without dropout\n")
    if report.left(150) < 60:
        report.add(f"not run: {report.left(150):.0f} s of the budget left")
        return
    budget = max(20.0, min(90.0, report.left(150) - 40))
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels_gpu.py"), "--budget", f"{budget:.0f}"]
    command += ["--variants", "ours sep=T/2,sdpa-causal", "--widths", "none"]
    command += ["--smoke"] if smoke else ["--lengths", "1024,2048,4096"]
    env = {**env, "GLM_KERNELS_WARP_SPECIALIZE": "1"}
    run_tables(
        report,
        "bench_kernels_gpu (warp-specialized)",
        command,
        env,
        budget + 60,
        work / "bench-kernels-ws.log",
        BENCH_LINES,
    )


def stage_compile(report: Report, env: dict[str, str], work: Path, smoke: bool) -> None:
    """Compile time of the attention kernels' autotuning candidates: one by one against the parallel compile."""
    report.add("\n## Compiling the autotuning candidates: one by one vs worker processes\n")
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_compile.py")]
    if smoke:
        command += ["--workers", "2"]
    # Its own empty caches: the training stages' cache is left as it is.
    run_tables(report, "bench_compile", command, env, 150, work / "compile.log", ("|", "#", "candidates"))


def stage_bench(report: Report, env: dict[str, str], work: Path, smoke: bool) -> None:
    report.add(
        "\n## Model step: GLM (Triton, Triton with atomic dQ, torch kernels) vs HF BertForMaskedLM (SDPA), "
        "dropout 0.1 and 0\n"
    )
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_model.py"),
        "--preset",
        "glm-large",
        "--dropout",
        "0.1,0",
        "--profile",
    ]
    if not smoke:  # also the attention backward that adds dQ with atomics (model.deterministic_kernels=false)
        command += ["--kernels", "triton,triton-atomic,torch"]
    if smoke:
        command += ["--layers", "2", "--hidden", "64", "--heads", "4", "--seq", "64", "--batch", "2"]
        # Torch kernels only: Triton's interpreter takes half a minute per step (the kernel tests cover it).
        command += [
            "--vocab",
            "1024",
            "--dtypes",
            "fp32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--kernels",
            "torch",
        ]
    log = work / "bench-model.log"
    status, text = run(report, command, env, 240 if not smoke else 400, log)  # four models, two dropouts
    report.add("")
    tables, _, profiles = text.partition("# profile of")
    for line in tables.splitlines():
        if line.startswith(("|", "#")):
            report.add(line)
    # Each profiled model's wall and GPU time, and the GPU's idle share, next to the table.
    for line in profiles.splitlines():
        if line.startswith("# ") and (": wall " in line or "GPU idle between" in line):
            report.add(line)
    if "# profile of" in text:
        profile = text[text.find("# profile of") :].strip()
        report.add("\n### Where the step's time goes (torch.profiler)\n\n```\n" + profile + "\n```")
    if status != 0:
        report.fail("bench_model", f"exit {status} (see {log.name})")
    if PARALLEL_COMPILE_FAILED in text:
        report.fail("parallel compile", f"the autotuner compiled in-process instead (see {log.name})")


STAGES = (
    "kernels",
    "bench",
    "launch",
    "pretrain",
    "resume-graphs",
    "throughput",
    "graphs",
    "kbench",
    "kbench-ws",
    "glm2b",
    "compile",
    "optstep",
)
# kernels/precompile.py's warning when its worker processes could not compile the autotuning candidates.
PARALLEL_COMPILE_FAILED = "parallel compilation of Triton autotuning candidates failed"


def main() -> int:
    args = parse_args()
    requested = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = [name for name in requested if name not in STAGES]
    if unknown:
        print(
            f"gpu_check: unknown --stages {', '.join(unknown)}; choose from {', '.join(STAGES)}",
            file=sys.stderr,
        )
        return 2
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "gpu_check: no CUDA GPU here; run it on a GPU machine, or with --smoke to check the script on a CPU",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out.parent / (args.out.name + "-work")
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu-check.md", 3600 if args.smoke else args.budget, work)
    report.add(
        f"# GPU check{' (smoke, toy sizes)' if args.smoke else ''}: {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    stage_environment(report, cuda)
    env = child_env(args.smoke, cuda)
    steps = args.steps or (6 if args.smoke else 100)
    stages = {
        "kernels": lambda: stage_kernels(report, env, work, args.smoke),
        "pretrain": lambda: stage_pretrain(report, env, work, args.smoke, steps, args.overrides),
        "resume-graphs": lambda: stage_pretrain(
            report, env, work, args.smoke, steps, args.overrides, variant="graphs", cuda=cuda
        ),
        "throughput": lambda: stage_throughput(
            report, env, work, args.smoke, args.steps or (6 if args.smoke else 50), args.overrides, cuda
        ),
        "bench": lambda: stage_bench(report, env, work, args.smoke),
        "graphs": lambda: stage_graphs(report, env, work, args.smoke),
        "launch": lambda: stage_launch(report, env, work, args.smoke),
        "kbench": lambda: stage_kernel_bench(report, env, work, args.smoke, args.kernel_bench_args),
        "kbench-ws": lambda: stage_kernel_bench_ws(report, env, work, args.smoke),
        "glm2b": lambda: stage_glm2b(report, env, work, args.smoke, args.overrides),
        "compile": lambda: stage_compile(report, env, work, args.smoke),
        "optstep": lambda: stage_optimizer_step(report, env, work, args.smoke),
    }
    for name in requested:
        stages[name]()
    started = time.time() - report.elapsed()
    # This run's logs (the work folder may hold older ones), in one archive beside the report.
    logs = [log for log in sorted(work.glob("*.log")) if log.stat().st_mtime >= started]
    with tarfile.open(args.out / "gpu-check-logs.tar.gz", "w:gz") as archive:
        for log in logs:
            archive.add(log, arcname=log.name)
    report.add(f"\n{len(report.failures)} stage(s) failed; {report.elapsed():.0f} s in all")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
