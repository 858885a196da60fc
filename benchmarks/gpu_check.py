"""The GPU check (``make gpu-check``): one script that shows on one GPU that the GPU path works and how fast.

On one H100/H200 with the image's python3 (CUDA torch and triton installed; DeepSpeed and its pure-Python
dependencies on PYTHONPATH from ``gpu-deps/``, which ``benchmarks/gpu_deps.sh`` fills; no network) it runs,
within about 8 minutes:

1. the kernel tests on CUDA (attention, LayerNorm, dropout), each kernel on one fixed tile shape
   (``GLM_KERNELS_AUTOTUNE=0``, set by tests/conftest.py), spread over processes with pytest-xdist, and the
   RNG tracker's tests (its fork captured in a CUDA graph);
2. ``benchmarks/bench_model.py --preset glm-large --dropout 0.1,0 --profile``: GLM with Triton and with torch
   kernels next to HF BertForMaskedLM (SDPA), steps interleaved, the matmul peak measured in the same run,
   and where each step's GPU and host time goes; its autotuned tile choices stay in Triton's on-disk cache,
   where the training runs find them;
3. ``benchmarks/bench_launch_overhead.py``: the host time per forward+backward call of our LayerNorm and
   attention, launched directly and through Triton's dispatch, next to torch's;
4. ``glm-pretrain`` of glm-large (bf16, dropout 0.1, micro = global batch 16, the bundled Austen corpus) for
   100 steps with an evaluation and a checkpoint at step 50; then the same run killed (SIGKILL) once its
   step-50 checkpoint is complete, resumed, and its losses of steps 51-100 compared with the first run's;
   the throughput table, and a profile of three steps (GPU kernels and the host's phases) and of three more
   under cProfile (the host's Python functions);
5. on request (``--stages``): ``throughput`` (glm-pretrain under ZeRO-1 and ZeRO-2 side by side), ``graphs``
   (the model step also captured in one CUDA graph: its speed without the host's launch overhead), ``kbench``
   (``benchmarks/bench_kernels_gpu.py``: attention against SDPA and FlexAttention, LayerNorm against torch)
   and ``glm2b`` (glm-2b on one GPU with ZeRO-2 at T 1024: tokens/s, MFU and peak memory).

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
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "run" / "demo" / "corpus" / "austen-chapters.jsonl"
# The tests that run on CUDA tensors where there is a GPU: the kernels' (test_kernels_compile, which compiles
# ahead of time for GPUs on machines without one, is for CPU machines) and the RNG tracker's (its fork
# captured in a CUDA graph).
CUDA_TESTS = [
    "tests/test_kernels_attention.py",
    "tests/test_kernels_layernorm.py",
    "tests/test_kernels_dropout.py",
    "tests/test_kernels_launcher.py",
    "tests/test_parallel_random.py",
    "tests/test_parallel_random_cuda.py",
    "tests/test_cuda_graphs_cuda.py",
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
        "exact resume), throughput (glm-pretrain ZeRO-1 vs ZeRO-2, profiled), graphs (bench_model.py with each "
        "step also captured in a CUDA graph), kbench (bench_kernels_gpu.py), "
        "glm2b (glm-2b on one GPU, ZeRO-2, T 1024, 12 steps: tokens/s, MFU, peak "
        "memory); the default set stays under 8 minutes",
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


class Report:
    """Prints each stage as it runs and keeps the markdown report."""

    def __init__(self, path: Path, budget: float):
        self.path = path
        self.budget = budget
        self.lines: list[str] = []
        self.failures: list[str] = []
        self.start = time.perf_counter()

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        os.replace(tmp, self.path)

    def fail(self, stage: str, why: str) -> None:
        self.failures.append(f"{stage}: {why}")
        self.add(f"**FAILED** {stage}: {why}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, cap: float) -> float:
        """A stage's time limit: ``cap``, or what remains of the budget (at least 10 s)."""
        return max(10.0, min(cap, self.budget - self.elapsed()))


def child_env(smoke: bool, cuda: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    # The caller's PYTHONPATH (with gpu-deps/ on a GPU node) after the repository.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("TRITON_INTERPRET", "1")
    # Tile choices are timed once and reused by the later stages and the resumed run: every stage uses the
    # cache folder glm-pretrain uses (its node-local default), so what the step benchmark tuned and compiled
    # the training runs find.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from megatron_glm.cli.pretrain import triton_cache_environment

    env.update(triton_cache_environment(env))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(
    report: Report, command: list[str], env: dict[str, str], timeout: float, log: Path
) -> tuple[int, str]:
    """Run ``command``, echo and log its output; (exit status, output). Status 124 when it timed out."""
    report.add(f"\n    $ {' '.join(command)}")
    start = time.perf_counter()
    timeout = report.left(timeout)
    with open(log, "w") as out:
        # Its own process group, so that a timeout ends its children too (pytest-xdist workers, data-loader
        # workers), which would otherwise keep the GPU busy under the later stages.
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = 124
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # leftovers of a finished command
    text = log.read_text(errors="replace")
    report.add(f"    (exit {status} after {time.perf_counter() - start:.0f} s; log {log.name})")
    return status, text


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
    command = [sys.executable, "-m", "pytest", *tests, "-q", "-x", "-p", "no:cacheprovider", "--durations=15"]
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
    if status != 0:
        report.fail("kernel tests", f"pytest exit {status}")


def pretrain_settings(
    corpus: str, work: Path, run_dir: Path, smoke: bool, steps: int, extra: list[str]
) -> list[str]:
    half = steps // 2
    values = {
        "data.corpora": f"[{{path: {corpus}}}]",
        "data.cache_dir": str(work / "samples"),
        "training.train_steps": steps,
        "training.global_batch_size": 16,
        "training.micro_batch_size": 16,
        "training.eval_interval": half,
        "training.eval_steps": 2,
        "lr_schedule.decay_steps": steps,
        "checkpoint.interval": half,
        "checkpoint.keep_last": 2,
        "checkpoint.save_dir": str(run_dir / "checkpoints"),
        "logging.log_dir": str(run_dir / "logs"),
        "logging.log_interval": 1,
        "logging.tensorboard": False,
    }
    if smoke:
        values.update(
            {
                "model.num_layers": 2,
                "model.hidden_size": 64,
                "model.num_attention_heads": 4,
                "model.max_position_embeddings": 64,
                "data.seq_length": 64,
                "data.split": "[90, 10, 0]",
                "training.global_batch_size": 4,
                "training.micro_batch_size": 2,
                "training.precision": "fp32",
            }
        )
    arguments = []
    for item in [f"{key}={value}" for key, value in values.items()] + extra:
        arguments += ["--set", item]
    return arguments


def train_records(run_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    path = run_dir / "logs" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    return train, [r for r in records if r["kind"] == "eval"]


def median(records: list[dict], key: str) -> float:
    """The median of ``key`` over the training records (the upper one of an even count)."""
    values = sorted(r[key] for r in records)
    return values[len(values) // 2]


def latest_step(run_dir: Path) -> int | None:
    tracker = run_dir / "checkpoints" / "latest"
    try:
        return int(tracker.read_text().strip())
    except (OSError, ValueError):
        return None


def stage_pretrain(
    report: Report, env: dict[str, str], work: Path, smoke: bool, steps: int, extra: list[str]
) -> None:
    report.add("\n## glm-pretrain: train, evaluate, checkpoint, kill -9, resume\n")
    corpus = preprocess(report, env, work, "bert-base-uncased")
    if corpus is None:
        return
    config = ROOT / "run" / "configs" / ("glm-tiny.yaml" if smoke else "glm-large.yaml")
    pretrain = [sys.executable, "-m", "megatron_glm.cli.pretrain", "--config", str(config)]
    half = steps // 2

    reference = work / "reference"
    # A few steps of the uninterrupted run under torch.profiler (left out of the throughput figures).
    profiled = (2, 3) if smoke else (21, 23)
    status, _ = run(
        report,
        pretrain
        + pretrain_settings(
            str(corpus), work, reference, smoke, steps, extra + [f"logging.profile_steps={list(profiled)}"]
        ),
        env,
        240,
        work / "pretrain-reference.log",
    )
    if status != 0:
        report.fail("glm-pretrain", f"exit {status} (see pretrain-reference.log)")
        return
    train, evals = train_records(reference)
    # The uninterrupted run's figures first, so that they are reported whatever happens to the kill and resume.
    timed = [train[s] for s in sorted(train) if s > min(10, half) and not profiled[0] <= s <= profiled[1]]
    tokens = [r["tokens_per_second"] for r in timed]
    report.add("")
    report.add("| what | value |")
    report.add("|---|---|")
    report.add(f"| loss, step 1 -> {steps} | {train[1]['loss']:.4f} -> {train[steps]['loss']:.4f} |")
    report.add(
        f"| tokens/s after step {min(10, half)} (median, min-max) | {median(timed, 'tokens_per_second'):,.0f} "
        f"({min(tokens):,.0f} - {max(tokens):,.0f}) |"
    )
    report.add(f"| reported MFU (median) | {median(timed, 'mfu'):.1%} |")
    report.add(f"| data wait (median share of the step) | {median(timed, 'data_wait_fraction'):.1%} |")
    for record in evals:
        losses = ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("eval_"))
        report.add(f"| evaluation at step {record['step']} | {losses} |")
    profile = reference / "logs" / "profile-rank0.txt"
    if profile.is_file():
        report.add(
            f"\n### Where glm-pretrain's steps go (torch.profiler)\n\n```\n{profile.read_text().strip()}\n```"
        )
    else:
        report.fail("glm-pretrain", "no profile written")

    killed = work / "killed"
    command = pretrain + pretrain_settings(str(corpus), work, killed, smoke, steps, extra)
    report.add(f"\n    $ {' '.join(command)}  # killed with SIGKILL once checkpoint {half} is complete")
    with open(work / "pretrain-killed.log", "w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + report.left(240)
        while latest_step(killed) != half and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        killed_at = latest_step(killed)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the rank and its data-loader workers
        process.wait()
    if killed_at != half:
        why = "the time budget ran out first" if time.monotonic() >= deadline else "see pretrain-killed.log"
        report.fail("kill and resume", f"checkpoint {half} never appeared (latest: {killed_at}; {why})")
        return
    status, _ = run(
        report,
        pretrain + pretrain_settings(str(corpus), work, killed, smoke, steps, extra),
        env,
        240,
        work / "pretrain-resumed.log",
    )
    if status != 0:
        report.fail("resume", f"exit {status} (see pretrain-resumed.log)")
        return
    resumed, _ = train_records(killed)
    compared = [s for s in range(half + 1, steps + 1) if s in train and s in resumed]
    worst = max(
        (abs(resumed[s]["loss"] - train[s]["loss"]) / abs(train[s]["loss"]) for s in compared),
        default=math.nan,
    )
    exact = bool(compared) and all(resumed[s]["loss"] == train[s]["loss"] for s in compared)
    report.add("")
    report.add("| resume after kill -9 | value |")
    report.add("|---|---|")
    report.add(f"| checkpoint resumed from | {half} |")
    report.add(f"| steps compared | {len(compared)} |")
    report.add(
        f"| losses bitwise equal | {'yes' if exact else 'no'} (worst relative difference {worst:.2e}) |"
    )
    if len(compared) != steps - half:
        report.fail("resume", f"compared {len(compared)} of {steps - half} steps")
    elif not worst < 1e-3:
        report.fail("resume", f"losses after the resume differ by up to {worst:.2e} (relative)")


def stage_throughput(
    report: Report, env: dict[str, str], work: Path, smoke: bool, steps: int, extra: list[str]
) -> None:
    """glm-pretrain of glm-large without evaluation or checkpoints, ZeRO-1 then ZeRO-2, side by side; the
    ZeRO-1 run profiled (GPU and host time) over three steps."""
    report.add("\n## glm-pretrain throughput: ZeRO-1 vs ZeRO-2 (no evaluation, no checkpoint)\n")
    corpus = preprocess(report, env, work, "bert-base-uncased")
    if corpus is None:
        return
    config = ROOT / "run" / "configs" / ("glm-tiny.yaml" if smoke else "glm-large.yaml")
    pretrain = [sys.executable, "-m", "megatron_glm.cli.pretrain", "--config", str(config)]
    profiled = (2, 3) if smoke else (21, 23)
    rows = []
    for stage in (1, 2):
        run_dir = work / f"throughput-zero{stage}"
        shutil.rmtree(run_dir, ignore_errors=True)
        settings = [
            f"parallel.zero_stage={stage}",
            "training.eval_interval=0",
            "checkpoint.interval=0",
        ] + ([f"logging.profile_steps={list(profiled)}"] if stage == 1 else [])
        status, _ = run(
            report,
            pretrain + pretrain_settings(str(corpus), work, run_dir, smoke, steps, extra + settings),
            env,
            120,
            work / f"pretrain-zero{stage}.log",
        )
        train, _ = train_records(run_dir)
        timed = [
            train[s] for s in sorted(train) if s > min(10, steps // 2) and not profiled[0] <= s <= profiled[1]
        ]
        if status != 0 or not timed:
            report.fail(f"throughput ZeRO-{stage}", f"exit {status}, {len(timed)} timed steps")
            continue
        tokens = [r["tokens_per_second"] for r in timed]
        rows.append(
            f"| ZeRO-{stage} | {len(timed)} | {median(timed, 'tokens_per_second'):,.0f} "
            f"({min(tokens):,.0f} - {max(tokens):,.0f}) | {median(timed, 'mfu'):.1%} | "
            f"{max(r.get('peak_memory_gib', math.nan) for r in timed):.1f} GiB |"
        )
        profile = run_dir / "logs" / "profile-rank0.txt"
        if profile.is_file():
            shutil.copy(profile, report.path.parent / "profile-pretrain-zero1.txt")
    report.add("")
    report.add("| engine | steps timed | tokens/s median (min - max) | reported MFU (median) | peak memory |")
    report.add("|---|---|---|---|---|")
    for row in rows:
        report.add(row)


def preprocess(report: Report, env: dict[str, str], work: Path, tokenizer: str) -> Path | None:
    """The bundled Austen corpus tokenized with ``tokenizer`` (once per work folder)."""
    corpus = work / "corpus" / f"austen-{tokenizer}"
    if Path(str(corpus) + ".idx").is_file():
        return corpus
    command = [sys.executable, "-m", "data_tools.preprocess", "--input", str(CORPUS), "--output-prefix"]
    command += [str(corpus), "--tokenizer", tokenizer, "--no-progress"]
    status, _ = run(report, command, env, 300, work / f"preprocess-{tokenizer}.log")
    if status != 0:
        report.fail("preprocess", f"exit {status}")
        return None
    return corpus


def stage_glm2b(report: Report, env: dict[str, str], work: Path, smoke: bool, extra: list[str]) -> None:
    """glm-2b (36 x 2048) on one GPU, ZeRO-2, T 1024, full recompute: 12 steps, then killed (no checkpoint)."""
    report.add("\n## glm-pretrain of glm-2b on one GPU (ZeRO-2, T 1024)\n")
    corpus = preprocess(report, env, work, "gpt2")
    if corpus is None:
        return
    run_dir = work / "glm2b"
    shutil.rmtree(run_dir, ignore_errors=True)
    values = {
        "data.corpora": f"[{{path: {corpus}}}]",
        "data.cache_dir": str(work / "samples"),
        "data.seq_length": 1024,
        "parallel.zero_stage": 2,
        "training.micro_batch_size": 8,
        "training.global_batch_size": 8,
        "training.train_steps": 1000,
        "training.eval_interval": 0,
        "checkpoint.interval": 0,
        "checkpoint.save_dir": str(run_dir / "checkpoints"),
        "logging.log_dir": str(run_dir / "logs"),
        "logging.log_interval": 1,
        "logging.tensorboard": False,
    }
    if smoke:
        values.update({"model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4})
        values.update(
            {"data.seq_length": 64, "model.max_position_embeddings": 64, "training.precision": "fp32"}
        )
        values.update(
            {"training.micro_batch_size": 2, "training.global_batch_size": 2, "data.split": "[90, 10, 0]"}
        )
    command = [
        sys.executable,
        "-m",
        "megatron_glm.cli.pretrain",
        "--config",
        str(ROOT / "run/configs/glm-2b.yaml"),
    ]
    for item in [f"{key}={value}" for key, value in values.items()] + extra:
        command += ["--set", item]
    last = 4 if smoke else 12
    report.add(f"\n    $ {' '.join(command)}  # killed after step {last}")
    with open(work / "pretrain-glm2b.log", "w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + report.left(300)
        while (
            process.poll() is None
            and time.monotonic() < deadline
            and max(train_records(run_dir)[0], default=0) < last
        ):
            time.sleep(0.5)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    train, _ = train_records(run_dir)
    timed = [train[s] for s in sorted(train) if s > 2]
    if not timed:
        report.fail(
            "glm-2b", f"no step after step 2 was logged (see pretrain-glm2b.log); steps {sorted(train)}"
        )
        return
    memory = max((r.get("peak_memory_gib", math.nan) for r in timed), default=math.nan)
    report.add("")
    report.add("| steps | tokens/s (median) | reported MFU (median) | peak GPU memory (tensors) |")
    report.add("|---|---|---|---|")
    report.add(
        f"| {timed[0]['step']}-{timed[-1]['step']} | {median(timed, 'tokens_per_second'):,.0f} | "
        f"{median(timed, 'mfu'):.1%} | {memory:.1f} GiB |"
    )


def stage_graphs(report: Report, env: dict[str, str], work: Path, smoke: bool) -> None:
    """The model step captured in CUDA graphs (no host launch overhead) next to the same step launched
    eagerly, in its own process: a failed capture cannot disturb the other stages."""
    report.add("\n## Model step in one CUDA graph (the step without the host's launch overhead)\n")
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--preset", "glm-large"]
    command += ["--dropout", "0,0.1", "--cuda-graph", "--layer-graphs", "--steps", "6", "--warmup", "3"]
    if smoke:
        command += ["--layers", "2", "--hidden", "64", "--heads", "4", "--seq", "64", "--batch", "2"]
        command += ["--vocab", "1024", "--dtypes", "fp32", "--kernels", "torch"]
    status, text = run(report, command, env, 150 if not smoke else 300, work / "bench-model-graphs.log")
    report.add("")
    for line in text.splitlines():
        if line.startswith(("|", "#")):
            report.add(line)
    if status != 0:
        report.fail("bench_model --cuda-graph", f"exit {status} (see bench-model-graphs.log)")


def stage_launch(report: Report, env: dict[str, str], work: Path, smoke: bool) -> None:
    """Host time per call of our kernels' launches (direct, and through Triton's dispatch) next to torch's."""
    report.add("\n## Host time per kernel call: our launches (direct and through Triton) vs torch\n")
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_launch_overhead.py")]
    if smoke:
        command += ["--stub", "--calls", "20", "--repeats", "2"]
    # One tile per kernel: the host's cost does not depend on it, and nothing is autotuned for these shapes.
    status, text = run(report, command, {**env, "GLM_KERNELS_AUTOTUNE": "0"}, 90, work / "launch.log")
    report.add("")
    for line in text.splitlines():
        if line.startswith(("|", "#")):
            report.add(line)
    if status != 0:
        report.fail("bench_launch_overhead", f"exit {status} (see launch.log)")


def stage_kernel_bench(report: Report, env: dict[str, str], work: Path, smoke: bool, extra: str) -> None:
    report.add("\n## Kernels: GLM attention vs SDPA and FlexAttention, LayerNorm vs torch\n")
    budget = max(20.0, min(240.0, report.left(400) - 50))
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels_gpu.py"), "--budget", f"{budget:.0f}"]
    command += (["--smoke"] if smoke else []) + extra.split()
    status, text = run(report, command, env, budget + 60, work / "bench-kernels.log")
    report.add("")
    for line in text.splitlines():
        if line.startswith(("|", "#", "torch ", "TFLOP", "GB/s", "rel diff", "- ", "ABORTED")):
            report.add(line)
    if status != 0:
        report.fail("bench_kernels_gpu", f"exit {status} (see bench-kernels.log)")


def stage_bench(report: Report, env: dict[str, str], work: Path, smoke: bool) -> None:
    report.add(
        "\n## Model step: GLM (Triton, torch kernels) vs HF BertForMaskedLM (SDPA), dropout 0.1 and 0\n"
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
    status, text = run(report, command, env, 180 if not smoke else 400, log)
    report.add("")
    for line in text.splitlines():
        if line.startswith(("|", "#")) and "profile of" not in line:
            report.add(line)
    if "# profile of" in text:
        profile = text[text.find("# profile of") :].strip()
        report.add("\n### Where the step's time goes (torch.profiler)\n\n```\n" + profile + "\n```")
    if status != 0:
        report.fail("bench_model", f"exit {status} (see {log.name})")


STAGES = ("kernels", "bench", "launch", "pretrain", "throughput", "graphs", "kbench", "glm2b")


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
    shutil.rmtree(work / "reference", ignore_errors=True)
    shutil.rmtree(work / "killed", ignore_errors=True)
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu-check.md", 3600 if args.smoke else args.budget)
    report.add(
        f"# GPU check{' (smoke, toy sizes)' if args.smoke else ''}: {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    stage_environment(report, cuda)
    env = child_env(args.smoke, cuda)
    steps = args.steps or (6 if args.smoke else 100)
    stages = {
        "kernels": lambda: stage_kernels(report, env, work, args.smoke),
        "pretrain": lambda: stage_pretrain(report, env, work, args.smoke, steps, args.overrides),
        "throughput": lambda: stage_throughput(
            report, env, work, args.smoke, args.steps or (6 if args.smoke else 50), args.overrides
        ),
        "bench": lambda: stage_bench(report, env, work, args.smoke),
        "graphs": lambda: stage_graphs(report, env, work, args.smoke),
        "launch": lambda: stage_launch(report, env, work, args.smoke),
        "kbench": lambda: stage_kernel_bench(report, env, work, args.smoke, args.kernel_bench_args),
        "glm2b": lambda: stage_glm2b(report, env, work, args.smoke, args.overrides),
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
