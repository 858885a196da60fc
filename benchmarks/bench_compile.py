"""Compile time of the attention kernels' autotuning candidates: one by one in-process (as Triton's autotuner
compiles them) against ``kernels/precompile.py``'s worker processes.

    python benchmarks/bench_compile.py                         # bf16, head dim 64, dropout: glm-large's step
    python benchmarks/bench_compile.py --workers 2,4,8,16 --head-dim 128

A training process compiles, on its first step, every candidate tile of the forward, dQ and dK/dV kernels for
its dtype, head dim and flags (20 kernels), before timing them; the evaluation's forward without dropout and
every other head dim add as many again. Each row starts from an empty Triton cache (a fresh
``TRITON_CACHE_DIR``) in a fresh process: "one by one" compiles each candidate in-process; "N workers" hands
them to the parallel compile (the worker processes start once per process, as in training, and their start
is counted) and then makes the same in-process compiles, which load the binaries from the cache. On a GPU
machine the target is its GPU; without one (``--arch``, default sm_90) a stand-in driver reports the target and
nothing is launched either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ["attention_forward_kernel", "attention_backward_dq_kernel", "attention_backward_dkdv_kernel"]
POINTER_DTYPES = {"Lse": "float32", "Delta": "float32", "Sep": "int32", "Lengths": "int32", "Seed": "int64",
                  "KeepBits": "uint8", "DQAccum": "float32"}  # fmt: skip


def _arguments(fn, dtype, head_dim: int, dropout: bool):
    """A launch's arguments as the model makes them at T 512: 16-byte aligned tensors, strides and lengths that
    are multiples of 16 (Triton specializes on that), the dropout threshold of p = 0.1."""
    import torch

    args = []
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            break
        if name[0].isupper():
            kind = getattr(torch, POINTER_DTYPES.get(name, ""), dtype)
            args.append(torch.zeros(1024, dtype=kind))
        elif name in ("softmax_scale", "dropout_scale"):
            args.append(0.125 if name == "softmax_scale" else 1 / 0.9)
        elif name == "dropout_threshold":
            args.append(6554)
        elif name == "num_heads":
            args.append(16)
        elif name.startswith(("stride", "query_length", "key_length")):
            args.append(512)
        else:
            raise ValueError(f"{fn.__name__}: no stand-in value for argument {name}")
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, 1 << (head_dim - 1).bit_length()),
        "HAS_LENGTHS": False,
        "HAS_DROPOUT": dropout,
        "EMULATE_BF16": False,
        "DOT_PRECISION": None if dtype != torch.float32 else "tf32",
        "TMA_POSSIBLE": dtype != torch.float32,  # the TMA candidates too (pruned for fp32)
        "KEEP_BITS": dropout,
        "grid": (1,),
        "warmup": False,
    }
    if "ATOMIC_DQ" in fn.arg_names:
        meta["ATOMIC_DQ"] = False  # the default, deterministic backward
    return tuple(args), meta


def measure(mode: str, workers: int, dtype_name: str, head_dim: int, dropout: bool, arch: int) -> dict:
    """In this (fresh) process: compile every candidate of the three kernels; seconds per kernel."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from kernels import precompile

    if not torch.cuda.is_available():
        driver.set_active(precompile._TargetDriver(GPUTarget("cuda", arch, 32)))
    import kernels.triton_attention_backward_kernels
    import kernels.triton_attention_kernels  # noqa: F401 - both register their kernels in AUTOTUNED
    from kernels.triton_support import AUTOTUNED

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    seconds, candidates = {}, {}
    for name in KERNELS:
        tuner = AUTOTUNED[name.removesuffix("_kernel")]
        args, meta = _arguments(tuner.fn, dtype, head_dim, dropout)
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(meta)
        start = time.perf_counter()
        if mode == "parallel":
            precompile.precompile(tuner, args, meta, workers=workers)
        for config in configs:
            tuner.fn.run(*args, **{**meta, **config.all_kwargs(), "warmup": True})
        seconds[name] = time.perf_counter() - start
        candidates[name] = len(configs)
        tuner.nargs = None
    return {"seconds": seconds, "candidates": candidates}


def _run_fresh(mode: str, workers: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="glm-bench-compile-") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache, "TRITON_INTERPRET": "0", "GLM_KERNELS_AUTOTUNE": "1"}
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks.bench_compile import measure; "
            "print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), "
            "sys.argv[6] == '1', int(sys.argv[7]))))"
        )
        command = [sys.executable, "-c", code, str(ROOT), mode, str(workers), args.dtype, str(args.head_dim),
                   "1" if args.dropout else "0", str(args.arch)]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(f"bench_compile: the {mode} run failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--workers", default=None, help="comma-separated worker counts (default: 2 and all CPUs)"
    )
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--no-dropout", dest="dropout", action="store_false", help="the kernels without dropout"
    )
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability to compile for without a GPU"
    )
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({2, cpus})

    import torch

    target = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"sm_{args.arch} (no GPU: compile only)"
    )
    print(
        f"# compile time of the attention kernels' autotuning candidates, {args.dtype}, head dim {args.head_dim}, "
        f"{'with' if args.dropout else 'without'} dropout; target {target}; {platform.machine()}, {cpus} CPUs; "
        f"empty Triton cache per row\n"
    )
    rows = [("one by one (Triton's autotuner)", _run_fresh("sequential", 0, args))]
    rows += [(f"{n} worker processes", _run_fresh("parallel", n, args)) for n in workers]
    header = " | ".join(f"{name.removeprefix('attention_').removesuffix('_kernel')} s" for name in KERNELS)
    print(f"| compile | {header} | total s | speed-up |")
    print("|---|" + "---|" * (len(KERNELS) + 2))
    baseline = sum(rows[0][1]["seconds"].values())
    for label, result in rows:
        total = sum(result["seconds"].values())
        cells = " | ".join(f"{result['seconds'][name]:.1f}" for name in KERNELS)
        print(f"| {label} | {cells} | {total:.1f} | {baseline / total:.2f}x |")
    counts = ", ".join(f"{name}: {rows[0][1]['candidates'][name]}" for name in KERNELS)
    print(f"\ncandidates per kernel: {counts}")


if __name__ == "__main__":
    main()
