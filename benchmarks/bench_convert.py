"""Peak host memory of glm-convert export on a glm-2b-shaped checkpoint (issue 12, item 5).

Builds a THUDM-layout checkpoint of random weights (default: glm-2b's shape, 36 layers x hidden 2048,
32 heads, GPT-2's 50304-row vocabulary, bf16, model-parallel size 2) tensor by tensor in a temporary
directory, runs each ``glm-convert export`` in its own process and reports that process's peak resident
memory (``/usr/bin/time``'s ``%M``, i.e. ``ru_maxrss``: everything resident, memory-mapped source pages
included) and the peaks of its anonymous and file-backed resident memory (``RssAnon`` / ``RssFile`` of
``/proc/<pid>/status``, sampled every 10 ms). The claim checked: the peak stays near the largest source
file, never twice the model. Everything is deleted at the end.

    python benchmarks/bench_convert.py                  # glm-2b, bf16 (~3.9 GB of weights, ~8 GB of disk)
    python benchmarks/bench_convert.py --layers 2 --hidden 256 --heads 4   # a quick try
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_glm.checkpoint.files import shard_file_name, write_trackers  # noqa: E402
from megatron_glm.checkpoint.layout import expected_keys, shard_shape  # noqa: E402
from megatron_glm.checkpoint.streaming import TensorPlan  # noqa: E402
from megatron_glm.checkpoint.thudm import stream_module_file  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 1024**3


def full_shapes(layers: int, hidden: int, vocab: int, positions: int) -> dict[str, tuple[int, ...]]:
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "input_layernorm.bias": (hidden,),
        "attention.query_key_value.weight": (3 * hidden, hidden),
        "attention.query_key_value.bias": (3 * hidden,),
        "attention.dense.weight": (hidden, hidden),
        "attention.dense.bias": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "post_attention_layernorm.bias": (hidden,),
        "mlp.dense_h_to_4h.weight": (4 * hidden, hidden),
        "mlp.dense_h_to_4h.bias": (4 * hidden,),
        "mlp.dense_4h_to_h.weight": (hidden, 4 * hidden),
        "mlp.dense_4h_to_h.bias": (hidden,),
    }
    shapes = {}
    for key in expected_keys(layers, block_position_encoding=True):
        if key == "word_embeddings.weight":
            shapes[key] = (vocab, hidden)
        elif key.endswith("position_embeddings.weight"):
            shapes[key] = (positions + 1, hidden)
        elif key.startswith("transformer.final_layernorm"):
            shapes[key] = (hidden,)
        else:
            shapes[key] = per_layer[key.split(".", 3)[3]]
    return shapes


def build_source(
    directory: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, model_parallel_size: int
) -> list[Path]:
    """THUDM MP=k files of random weights, each tensor drawn and written before the next."""
    generator = torch.Generator().manual_seed(0)
    tag = directory / "release"
    tag.mkdir(parents=True)
    files = []
    for rank in range(model_parallel_size):
        plans = [
            TensorPlan(key, shard_shape(shape, key, model_parallel_size), dtype)
            for key, shape in shapes.items()
        ]

        def draw(key: str) -> torch.Tensor:
            shape = shard_shape(shapes[key], key, model_parallel_size)
            return (torch.randn(shape, generator=generator) * 0.02).to(dtype)

        files.append(tag / shard_file_name(rank))
        stream_module_file(files[-1], plans, draw, model_parallel_size)
    write_trackers(directory, "release")
    return files


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.machine()


def _status_kib(pid: int) -> dict[str, int]:
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile"):
                    found[name] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return found


def _child(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except FileNotFoundError:
        return None
    return int(children[0]) if children else None


def measure(command: list[str], log: Path, code: Path = ROOT) -> dict[str, float]:
    """Run ``command`` under ``/usr/bin/time`` (its output into ``log``): wall time, peak RSS (``%M``: the
    ``ru_maxrss`` of a process that time forked, so none of this script's memory is counted) and the sampled
    peaks of RssAnon / RssFile (bytes)."""
    env = {**os.environ, "PYTHONPATH": str(code)}  # and cwd: ``python -m`` puts the cwd first on sys.path
    start = time.perf_counter()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            ["/usr/bin/time", "-f", "MAXRSS_KIB=%M", *command],
            env=env,
            cwd=code,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        peak = {"RssAnon": 0, "RssFile": 0}
        while process.poll() is None:
            child = _child(process.pid)
            for name, value in (_status_kib(child) if child else {}).items():
                if name in peak:
                    peak[name] = max(peak[name], value)
            time.sleep(0.01)
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{text[-3000:]}")
    maxrss = int(text.rpartition("MAXRSS_KIB=")[2].split()[0])
    return {
        "seconds": seconds,
        "maxrss": maxrss * 1024,
        "anon": peak["RssAnon"] * 1024,
        "file": peak["RssFile"] * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--source-model-parallel-size", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="where to build (default: a new temporary directory)")
    parser.add_argument(
        "--code",
        type=Path,
        default=ROOT,
        help="source tree whose glm-convert is measured (e.g. an older commit's `git archive`; default: this one)",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        shapes = full_shapes(args.layers, args.hidden, args.vocab, args.positions)
        params = sum(torch.Size(s).numel() for s in shapes.values())
        source = workdir / "source"
        start = time.perf_counter()
        files = build_source(source, shapes, DTYPES[args.dtype], args.source_model_parallel_size)
        built = time.perf_counter() - start
        model_bytes = sum(f.stat().st_size for f in files)
        largest = max(f.stat().st_size for f in files)
        config = workdir / "config.yaml"
        config.write_text(
            f"model:\n  num_layers: {args.layers}\n  hidden_size: {args.hidden}\n  num_attention_heads: "
            f"{args.heads}\n  max_position_embeddings: {args.positions}\n  tokenizer: gpt2\n  vocab_size: "
            f"{args.vocab}\n"
        )
        print(
            f"source: {params / 1e9:.2f}B parameters, {args.dtype}, THUDM MP={args.source_model_parallel_size}: "
            f"{model_bytes / GIB:.2f} GiB, largest file {largest / GIB:.2f} GiB (built in {built:.0f} s)"
        )
        print(
            f"machine: {cpu_name()}, {os.cpu_count()} CPUs, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM, torch {torch.__version__}"
        )
        targets = {
            "imports only (--help)": ["--help"],
            "hf": ["--to", "hf"],
            "safetensors": ["--to", "safetensors"],
            "thudm MP=1": ["--to", "thudm", "--model-parallel-size", "1"],
        }
        rows = []
        for name, arguments in targets.items():
            output = workdir / "output"
            command = [sys.executable, "-m", "megatron_glm.cli.convert", "export", *arguments]
            if arguments != ["--help"]:
                command += ["--config", str(config), str(source), str(output)]
            result = measure(command, workdir / "convert.log", args.code.resolve())
            rows.append((name, result))
            if output.is_dir():
                shutil.rmtree(output)
            elif output.exists():
                output.unlink()
        baseline = rows[0][1]["maxrss"]
        print()
        print(
            "| export | seconds | peak RSS (ru_maxrss) | above imports | peak RssAnon | peak RssFile "
            "| RSS / largest file | RSS / model |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, r in rows:
            print(
                f"| {name} | {r['seconds']:.0f} | {r['maxrss'] / GIB:.2f} GiB | {(r['maxrss'] - baseline) / GIB:.2f} GiB "
                f"| {r['anon'] / GIB:.2f} GiB | {r['file'] / GIB:.2f} GiB | {r['maxrss'] / largest:.2f} "
                f"| {r['maxrss'] / model_bytes:.2f} |"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
