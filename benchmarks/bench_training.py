"""Training throughput of glm-pretrain end to end (DeepSpeed, data loading, optimizer), and the share of
step time spent waiting for data.

    python benchmarks/bench_training.py                    # glm-tiny and a glm-base-shaped model, 1 and 2 ranks
    python benchmarks/bench_training.py --models tiny --steps 20

Each row is a real ``glm-pretrain`` run on the bundled Austen corpus (preprocessed into
``outputs/bench/corpus`` if missing): one rank with all cores, or ``torchrun`` with 2 ranks of one thread.
The rows report medians over the logged steps after the first two (start-up), as glm-pretrain measures
them: tokens/s = global batch x sequence length / step time; MFU = tokens/s x FLOPs per token / the
matmul peak measured by each rank at start (summed over ranks); FLOPs per token = 72 L h^2 + 12 L h T +
6 V h f (f = share of positions with a loss, whose logits are computed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "outputs" / "bench" / "corpus" / "austen"

MODELS = {
    "tiny": {"config": "glm-tiny.yaml", "settings": {}},
    "base": {
        "config": "glm-base.yaml",
        "settings": {
            "data.seq_length": 512,
            "training.micro_batch_size": 4,
            "training.global_batch_size": 8,
            "data.objectives.token_prob": 1.0,
            "data.split": "[98, 2, 0]",
        },
    },
}


def ensure_corpus() -> None:
    if Path(str(CORPUS) + ".idx").is_file():
        return
    subprocess.run([sys.executable, "-m", "data_tools.preprocess", "--input",
                    str(ROOT / "run" / "demo" / "corpus" / "austen-chapters.jsonl"), "--output-prefix", str(CORPUS),
                    "--tokenizer", "bert-base-uncased", "--no-progress"], check=True, cwd=ROOT)  # fmt: skip


def run(model: str, ranks: int, steps: int, precision: str, work: Path) -> dict:
    spec = MODELS[model]
    run_dir = work / f"{model}-{ranks}-{precision}"
    settings = {"data.corpora": f"[{{path: {CORPUS}}}]", "data.cache_dir": str(ROOT / "outputs" / "bench" / "samples"),
                "training.train_steps": steps, "training.precision": precision, "training.eval_interval": 0,
                "checkpoint.interval": 0, "checkpoint.save_dir": str(run_dir / "checkpoints"),
                "logging.log_dir": str(run_dir / "logs"), "logging.log_interval": 1, "logging.tensorboard": False,
                **spec["settings"]}  # fmt: skip
    command = [sys.executable]
    if ranks > 1:
        command += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    command += ["-m", "megatron_glm.cli.pretrain", "--config", str(ROOT / "run" / "configs" / spec["config"])]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"glm-pretrain failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["kind"] == "train" and r["step"] > 2]
    return {key: statistics.median(r[key] for r in steady)
            for key in ("tokens_per_second", "mfu", "data_wait_fraction", "step_time")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "base"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: 30 tiny, 6 base)")
    args = parser.parse_args()
    ensure_corpus()
    print("# glm-pretrain throughput (DeepSpeed ZeRO-1, CPU)")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; 1 rank uses all cores, "
        "2 ranks one thread each"
    )
    print(
        "\n| model | ranks | precision | step s | tokens/s | MFU | data wait |\n|---|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            steps = args.steps or (30 if model == "tiny" else 6)
            for precision in args.precision:
                for ranks in args.ranks:
                    m = run(model, ranks, steps, precision, Path(work))
                    print(f"| {model} | {ranks} | {precision} | {m['step_time']:.2f} | {m['tokens_per_second']:,.0f} | "
                          f"{m['mfu']:.1%} | {m['data_wait_fraction']:.2%} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
