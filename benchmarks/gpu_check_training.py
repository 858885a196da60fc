"""The GPU check's training stages (``benchmarks/gpu_check.py``): glm-pretrain with evaluation, checkpoint, kill -9 and
exact resume; its throughput in a few configurations; glm-2b on one GPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_check_support import CORPUS, ROOT, Report, run


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


def pretrain_command(
    report: Report, env: dict[str, str], work: Path, smoke: bool
) -> tuple[str | None, list[str]]:
    """The preprocessed corpus (None if preprocessing failed) and glm-pretrain's command for glm-large (tiny
    with --smoke)."""
    config = ROOT / "run" / "configs" / ("glm-tiny.yaml" if smoke else "glm-large.yaml")
    command = [sys.executable, "-m", "megatron_glm.cli.pretrain", "--config", str(config)]
    return preprocess(report, env, work, "bert-base-uncased"), command


# The pretrain stage's variants: (title, run-folder suffix, further settings, profiled). "graphs" checks the
# kill -9 and exact resume under per-layer CUDA graphs (GPU only), which the GPU recipes would then turn on.
PRETRAIN_VARIANTS = {
    "": ("glm-pretrain", "", [], True),
    "graphs": ("glm-pretrain with training.cuda_graphs", "-graphs", ["training.cuda_graphs=true"], False),
}


def host_profiled_last(profiled: tuple[int, int]) -> int:
    """The last step of ``logging.profile_steps``' cProfile window, which follows the torch.profiler one."""
    first, last = profiled
    return 2 * last - first + 1


def unprofiled_steps(train: dict[int, dict], after: int, profiled: tuple[int, int]) -> list[dict]:
    """The training records after step ``after``, less the steps under torch.profiler or cProfile."""
    return [
        train[s] for s in sorted(train) if s > after and not profiled[0] <= s <= host_profiled_last(profiled)
    ]


# What ``profile_aftermath`` measures, as the report names it.
AFTERMATH = "tokens/s before / after the profiled steps (median)"


def profile_aftermath(timed: list[dict], profiled: tuple[int, int]) -> str:
    """Tokens/s before the profiled steps against after them (Kineto left CUPTI attached after a profile,
    slowing every later launch, until ``stop_profiler`` tore it down)."""
    before = [r for r in timed if r["step"] < profiled[0]]
    after = [r for r in timed if r["step"] > profiled[1]]
    if not before or not after:
        return "not enough steps"
    return f"{median(before, 'tokens_per_second'):,.0f} / {median(after, 'tokens_per_second'):,.0f}"


def report_profile(report: Report, run_dir: Path) -> None:
    """The profiled steps' table (and their timeline, beside the report) of the run in ``run_dir``."""
    profile = run_dir / "logs" / "profile-rank0.txt"
    if not profile.is_file():
        report.fail("glm-pretrain", "no profile written")
        return
    report.add(
        f"\n### Where glm-pretrain's steps go (torch.profiler)\n\n```\n{profile.read_text().strip()}\n```"
    )
    trace = run_dir / "logs" / "trace-rank0.json.gz"
    if trace.is_file():
        shutil.copy(trace, report.path.parent / "trace-pretrain.json.gz")


def stage_pretrain(
    report: Report,
    env: dict[str, str],
    work: Path,
    smoke: bool,
    steps: int,
    extra: list[str],
    variant: str = "",
    cuda: bool = True,
) -> None:
    title, suffix, settings, profile = PRETRAIN_VARIANTS[variant]
    report.add(f"\n## {title}: train, evaluate, checkpoint, kill -9, resume\n")
    if "training.cuda_graphs=true" in settings and not cuda:
        report.add("not run: CUDA graphs need a GPU")
        return
    corpus, pretrain = pretrain_command(report, env, work, smoke)
    if corpus is None:
        return
    extra = extra + settings
    half = steps // 2

    reference, killed = work / f"reference{suffix}", work / f"killed{suffix}"
    for folder in (reference, killed):
        shutil.rmtree(folder, ignore_errors=True)
    # A few steps of the uninterrupted run under torch.profiler (left out of the throughput figures).
    profiled = ((2, 3) if smoke else (21, 23)) if profile else (0, -1)
    profiling = [f"logging.profile_steps={list(profiled)}"] if profile else []
    log = f"pretrain-reference{suffix}.log"
    status, _ = run(
        report,
        pretrain + pretrain_settings(str(corpus), work, reference, smoke, steps, extra + profiling),
        env,
        240,
        work / log,
    )
    if status != 0:
        report.fail(title, f"exit {status} (see {log})")
        return
    train, evals = train_records(reference)
    # The uninterrupted run's figures first, so that they are reported whatever happens to the kill and resume.
    timed = unprofiled_steps(train, min(10, half), profiled)
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
    if profile:
        report.add(f"| {AFTERMATH} | {profile_aftermath(timed, profiled)} |")
    report.add(
        f"| step 1 (Triton compiles and times its tiles unless its cache has them) | {train[1]['step_time']:.1f} s |"
    )
    report.add(f"| data wait (median share of the step) | {median(timed, 'data_wait_fraction'):.1%} |")
    for record in evals:
        losses = ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("eval_"))
        report.add(f"| evaluation at step {record['step']} | {losses} |")
    if profile:
        report_profile(report, reference)

    command = pretrain + pretrain_settings(str(corpus), work, killed, smoke, steps, extra)
    report.add(f"\n    $ {' '.join(command)}  # killed with SIGKILL once checkpoint {half} is complete")
    with open(work / f"pretrain-killed{suffix}.log", "w") as out:
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
        why = (
            "the time budget ran out first"
            if time.monotonic() >= deadline
            else f"see pretrain-killed{suffix}.log"
        )
        report.fail(
            f"kill and resume ({title})", f"checkpoint {half} never appeared (latest: {killed_at}; {why})"
        )
        return
    status, _ = run(
        report,
        pretrain + pretrain_settings(str(corpus), work, killed, smoke, steps, extra),
        env,
        240,
        work / f"pretrain-resumed{suffix}.log",
    )
    if status != 0:
        report.fail(f"resume ({title})", f"exit {status} (see pretrain-resumed{suffix}.log)")
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
        report.fail(f"resume ({title})", f"compared {len(compared)} of {steps - half} steps")
    elif not worst < 1e-3:
        report.fail(f"resume ({title})", f"losses after the resume differ by up to {worst:.2e} (relative)")


# The throughput stage's runs: ZeRO-1 (ZeRO-2 ran 2.3x slower on one H200 on 2026-11-27: it partitions nothing on
# one GPU), then ZeRO-1 with the attention's atomic-dQ backward, with the per-layer CUDA graphs (GPU only) and with
# torch's kernels instead of Triton's: which of them brings glm-pretrain nearest the bare step. (label, settings,
# profiled: the eager run and the graphed one, whose steps no longer wait for the host; the profile's file name).
THROUGHPUT_VARIANTS = [
    ("ZeRO-1", ["parallel.zero_stage=1"], "zero1"),
    (
        "ZeRO-1, model.deterministic_kernels=false",
        ["parallel.zero_stage=1", "model.deterministic_kernels=false"],
        None,
    ),
    ("ZeRO-1, training.cuda_graphs", ["parallel.zero_stage=1", "training.cuda_graphs=true"], "graphs"),
    ("ZeRO-1, model.kernels=torch", ["parallel.zero_stage=1", "model.kernels=torch"], None),
]


def stage_throughput(
    report: Report, env: dict[str, str], work: Path, smoke: bool, steps: int, extra: list[str], cuda: bool
) -> None:
    """glm-pretrain of glm-large without evaluation or checkpoints in the configurations of
    ``THROUGHPUT_VARIANTS``, side by side; the first profiled (GPU and host time) over three steps."""
    report.add(
        "\n## glm-pretrain throughput: ZeRO-1, atomic-dQ attention, CUDA graphs, torch kernels (no evaluation)\n"
    )
    corpus, pretrain = pretrain_command(report, env, work, smoke)
    if corpus is None:
        return
    profiled = (2, 3) if smoke else (21, 23)
    rows, summaries = [], []
    for index, (label, variant, profile_name) in enumerate(THROUGHPUT_VARIANTS):
        if "training.cuda_graphs=true" in variant and not cuda:
            rows.append(f"| {label} | - | not run: CUDA graphs need a GPU | | |")
            continue
        run_dir = work / f"throughput-{index}"
        shutil.rmtree(run_dir, ignore_errors=True)
        settings = variant + ["training.eval_interval=0", "checkpoint.interval=0"]
        if profile_name:
            settings.append(f"logging.profile_steps={list(profiled)}")
        status, _ = run(
            report,
            pretrain + pretrain_settings(str(corpus), work, run_dir, smoke, steps, extra + settings),
            env,
            120,
            work / f"pretrain-throughput-{index}.log",
        )
        train, _ = train_records(run_dir)
        timed = unprofiled_steps(train, min(10, steps // 2), profiled if profile_name else (0, -1))
        if status != 0 or not timed:
            report.fail(f"throughput {label}", f"exit {status}, {len(timed)} timed steps")
            rows.append(f"| {label} | - | failed (exit {status}; pretrain-throughput-{index}.log) | | |")
            continue
        tokens = [r["tokens_per_second"] for r in timed]
        rows.append(
            f"| {label} | {len(timed)} | {median(timed, 'tokens_per_second'):,.0f} "
            f"({min(tokens):,.0f} - {max(tokens):,.0f}) | {median(timed, 'mfu'):.1%} | "
            f"{max(r.get('peak_memory_gib', math.nan) for r in timed):.1f} GiB |"
        )
        profile = run_dir / "logs" / "profile-rank0.txt"
        if profile_name and profile.is_file():
            shutil.copy(profile, report.path.parent / f"profile-pretrain-{profile_name}.txt")
            # Its per-step GPU time and idle share, beside the table (the whole profile in the file).
            for line in profile.read_text().splitlines():
                if line.startswith(("GPU kernels:", "steps ")) and ("ms per step" in line or "idle" in line):
                    summaries.append(f"- {label}: {line.strip().split('; top ')[0]}")
            summaries.append(f"- {label}: {AFTERMATH}: {profile_aftermath(timed, profiled)}")
    report.add("")
    report.add(
        "| configuration | steps timed | tokens/s median (min - max) | reported MFU (median) | peak memory |"
    )
    report.add("|---|---|---|---|---|")
    for row in rows:
        report.add(row)
    if summaries:
        report.add(
            "\nThe profiled runs (steps " + f"{profiled[0]}-{profiled[1]}; files profile-pretrain-*.txt):\n"
        )
        for line in summaries:
            report.add(line)


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
    """glm-2b (36 x 2048) on one GPU, ZeRO-1, T 1024, no recomputation: 12 steps, then killed (no checkpoint).

    On one GPU ZeRO-1 is the fast engine (DeepSpeed's ZeRO-2 ran glm-large 2.3x slower there, and partitions
    nothing over one rank), and at micro batch 8 the activations of all 36 layers fit beside the ~38 GB of
    weights, fp32 masters, gradients and Adam moments (~18 GB in bf16), so the recipe's full recomputation,
    which is for 64 GPUs' memory, only costs a third more compute here."""
    report.add("\n## glm-pretrain of glm-2b on one GPU (ZeRO-1, T 1024, no recomputation)\n")
    corpus = preprocess(report, env, work, "gpt2")
    if corpus is None:
        return
    run_dir = work / "glm2b"
    shutil.rmtree(run_dir, ignore_errors=True)
    values = {
        "data.corpora": f"[{{path: {corpus}}}]",
        "data.cache_dir": str(work / "samples"),
        "data.seq_length": 1024,
        "parallel.zero_stage": 1,
        "model.activation_checkpointing": "none",
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
