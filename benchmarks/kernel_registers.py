"""Registers, spills and compile time of the attention kernels' tiles for an NVIDIA GPU, on any machine (no GPU).

    python benchmarks/kernel_registers.py                      # every tile, sm_90, bf16, head dims 64 and 128
    python benchmarks/kernel_registers.py --dtypes fp32 --head-dims 32,64,128 --arch 80
    python benchmarks/kernel_registers.py --test-selection     # the GPU tests' variants on the default tiles
    python benchmarks/kernel_registers.py --test-selection --old-kernels old.py   # ... against another version
    python benchmarks/kernel_registers.py --loops --head-dims 64   # SASS instructions per loop iteration

Each kernel is compiled ahead of time (``kernels/aot.py``: Triton's compiler and the ptxas it ships) and
``ptxas -v`` reports registers per thread and bytes of spill stores; shared memory is Triton's figure. On sm_90
the "matmul work" column divides the tensor-core FLOPs a program executes per loop iteration (``aot.matmul_work``)
by those its tile needs: above 1, several warpgroups compute the same rows. A tile that
spills keeps part of its working set in local memory, and one past 255 registers at a large tile compiles slowly
(up to a minute per kernel for fp32 "ieee" dots). Compile times are this machine's, from an empty Triton cache
(a fresh ``TRITON_CACHE_DIR`` per run), single-threaded as Triton compiles.

``--test-selection`` compiles, with each kernel's first (untuned) tile as the GPU tests run them, the attention
variants (dtype x head dim x flags) that ``tests/test_kernels_attention*.py`` build, and prints their total
compile time: most of a GPU test run is compiling.

``--loops`` counts the SASS instructions (Triton's ``nvdisasm``) in each loop of the three kernels on one tile
(``--loop-tile``, default 64 x 64 on 4 warps, 3 stages), without dropout and with it (bits stored, or drawn
again): what each thread issues per key or query block, which bounds a loop whose matmuls are small. To compare
versions, run it in a checkout of each (the kernels import their dropout helpers from their own package).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import types
from pathlib import Path

# Before triton is imported: the compiler, not the interpreter, and a cache of this run's own.
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="glm-kernel-registers-")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.aot import compile_kernel, matmul_work, registers  # noqa: E402

# (name, kernel attribute, the block a program owns, the inner block, shape list attribute)
KERNELS = [
    ("fwd", "attention_forward_kernel", "BLOCK_M", "BLOCK_N", "FORWARD_SHAPES"),
    ("dQ", "attention_backward_dq_kernel", "BLOCK_M", "BLOCK_N", "DQ_SHAPES"),
    ("dK/dV", "attention_backward_dkdv_kernel", "BLOCK_N", "BLOCK_M", "DKDV_SHAPES"),
]
# Hopper's TMA candidates of the same kernels (shape list attributes), for 16-bit inputs on sm_90.
TMA_SHAPES = {
    "FORWARD_SHAPES": "FORWARD_TMA_SHAPES",
    "DQ_SHAPES": "DQ_TMA_SHAPES",
    "DKDV_SHAPES": "DKDV_TMA_SHAPES",
}


def _module(path: Path | None):
    """The attention kernels (this checkout's, or another version's file) with their tile lists, which older
    versions kept in the kernels' file and this one in ``kernels/triton_attention_tuning.py``. This checkout keeps
    the backward kernels in ``triton_attention_backward_kernels.py``; older versions' files hold all of them."""
    from kernels import triton_attention_backward_kernels, triton_attention_kernels, triton_attention_tuning

    kernels = {**vars(triton_attention_tuning), **vars(triton_attention_backward_kernels)}
    if path is None:
        module = triton_attention_kernels
    else:
        spec = importlib.util.spec_from_file_location("attention_kernels_under_test", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return types.SimpleNamespace(**{**kernels, **vars(module)})


def _flags(
    dtype: str,
    head_dim: int,
    lengths: bool,
    dropout: bool,
    module=None,
    tma: bool = False,
    keep_bits: bool = True,
    atomic_dq: bool = False,
    store_bits: bool = False,
) -> dict:
    flags = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, 1 << (head_dim - 1).bit_length()),
        "HAS_LENGTHS": lengths,
        "HAS_DROPOUT": dropout,
        "EMULATE_BF16": False,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else None,
    }
    if module is None or hasattr(
        module, "FORWARD_TMA_SHAPES"
    ):  # kernels from before the TMA candidates lack them
        flags.update({"TMA_POSSIBLE": tma, "USE_TMA": tma})
    if module is None or hasattr(
        module, "stored_keep"
    ):  # kernels from before the stored dropout mask lack it
        flags["KEEP_BITS"] = dropout and keep_bits
    if module is None or hasattr(module, "attention_backward_dq_convert_kernel"):  # and before atomic dQ
        flags["ATOMIC_DQ"] = atomic_dq
    if module is None or hasattr(module, "_DQ_TUNING_KEY"):  # and before dQ stored the bits for dK/dV
        flags["STORE_BITS"] = store_bits  # dQ's switch (the other kernels do not take it)
    return flags


def _compile(module, kernel: str, owned: str, inner: str, shape, dtype, flags, arch):
    first, second, warps, stages = shape
    started = time.perf_counter()
    compiled = compile_kernel(
        getattr(module, kernel), dtype, {**flags, owned: first, inner: second}, warps, stages, arch
    )
    seconds = time.perf_counter() - started
    pointer_loads = not flags.get("USE_TMA") and not flags.get("WS")  # what ``matmul_work`` reads
    work = matmul_work(compiled, warps) if pointer_loads and arch >= 90 else 0
    return registers(compiled, arch), seconds, work


# The matmuls per iteration of each kernel's loop (dK/dV one more with atomic dQ).
MATMULS = {"fwd": 2, "dQ": 3, "dK/dV": 4}


def _work_ratio(name: str, shape, flags: dict, work: int) -> str:
    """Tensor-core work executed per loop iteration over the work the tile needs ("-" without HGMMA, or not read:
    TMA tiles, whose matmuls are laid out as their pointer-load twins', and warp-specialized ones, whose
    partitions ``tests/test_kernels_compile.py`` checks)."""
    if not work:
        return "-"
    matmuls = MATMULS[name] + (name == "dK/dV" and bool(flags.get("ATOMIC_DQ")))
    return f"{work / (2 * shape[0] * shape[1] * flags['BLOCK_D'] * matmuls):.2f}"


def tile_table(args) -> None:
    module = _module(args.old_kernels)
    print(
        f"# Attention kernels on sm_{args.arch}: registers per thread, spills, shared memory, compile time\n"
    )
    print("Matmul work: the tensor-core FLOPs a program executes per iteration of its loop (sm_90's HGMMA) over "
          "those its tile needs; above 1, several warpgroups compute the same rows (pointer-load tiles).\n")  # fmt: skip
    print("| kernel | tile (first x second, warps, stages) | dtype | head dim | dropout | registers | spill bytes "
          "| shared KB | compile s | matmul work |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        for head_dim in args.head_dims:
            # Without dropout; with it, the backward reading the forward's keep bits or drawing them again; dK/dV
            # adding dQ with atomics (model.deterministic_kernels: false), without dropout and with the stored bits.
            modes = ((False, False, False), (True, True, False), (True, False, False), (False, False, True),
                     (True, True, True))  # fmt: skip
            for dropout, keep_bits, atomic in modes:
                if keep_bits and not hasattr(module, "stored_keep"):
                    continue
                if atomic and not hasattr(module, "attention_backward_dq_convert_kernel"):
                    continue
                for name, kernel, owned, inner, shapes in KERNELS:
                    if atomic and name != "dK/dV":
                        continue
                    tma_shapes = getattr(module, TMA_SHAPES[shapes], [])
                    # The warp-specialized candidates (TMA ones), as the autotuner's pruning keeps them.
                    ws_list = {"fwd": "FORWARD_WS_SHAPES", "dQ": "DQ_WS_SHAPES", "dK/dV": "DKDV_WS_SHAPES"}[
                        name
                    ]
                    ws_shapes = getattr(module, ws_list, [])
                    if dropout or atomic:  # Triton's pass fails there (``_fitting_configs``)
                        ws_shapes = []
                    if dtype == "fp32" or args.arch < 90:
                        tma_shapes = ws_shapes = []
                    candidates = [(shape, False, False) for shape in getattr(module, shapes)]
                    candidates += [(shape, True, False) for shape in tma_shapes]
                    candidates += [(shape, True, True) for shape in ws_shapes]
                    for index, (shape, tma, ws) in enumerate(candidates):
                        flags = _flags(dtype, head_dim, False, dropout, module, tma, keep_bits, atomic)
                        if ws:
                            flags["WS"] = True
                        mode = "0.1, stored bits" if keep_bits else "0.1, replayed" if dropout else "-"
                        mode += ", atomic dQ" if atomic else ""
                        tile = f"{shape[0]} x {shape[1]}, {shape[2]}, {shape[3]}" + (
                            " (default)" if index == 0 else " TMA, WS" if ws else " TMA" if tma else ""
                        )
                        try:
                            report, seconds, work = _compile(
                                module, kernel, owned, inner, shape, dtype, flags, args.arch
                            )
                        except Exception as error:  # noqa: BLE001 (a tile that does not compile is a row)
                            print(f"| {name} | {tile} | {dtype} | {head_dim} | {mode} | failed: "
                                  f"{type(error).__name__} | | | | |")  # fmt: skip
                            continue
                        print(
                            f"| {name} | {tile} | {dtype} | {head_dim} | {mode} | "
                            f"{report.per_thread} | {report.spilled_bytes} | {report.shared_bytes / 1024:.0f} | "
                            f"{seconds:.1f} | {_work_ratio(name, shape, flags, work)} |",
                            flush=True,
                        )


def test_selection(args) -> None:
    from tests.test_kernels_attention import CASES, FP16_CASES

    module = _module(args.old_kernels)
    variants = set()
    for name, (_, _, _, _, head_dim, _, lengths) in CASES.items():
        for dtype in ("fp32", "bf16") + (("fp16",) if name in FP16_CASES else ()):
            variants.add((dtype, head_dim, lengths is not None, False, False, False))
    # The dropout tests (the forward's keep bits read back): fp32 at head dim 16, the bf16 statistics test; the
    # mask drawn again in the backward, with lengths (the stored-against-replayed test); the atomic-dQ tests,
    # whose dK/dV kernels are variants of their own (their forwards are the ones above).
    variants |= {
        ("fp32", 16, False, True, True, False),
        ("bf16", 64, False, True, True, False),
        ("fp32", 16, True, True, False, False),
    }
    # ... and the dQ kernel drawing the mask and storing it for dK/dV (the same test).
    store_variants = {("fp32", 16, True, True, False, False)} if hasattr(module, "_DQ_TUNING_KEY") else set()
    if hasattr(module, "attention_backward_dq_convert_kernel"):
        variants |= {
            ("fp32", 32, True, False, False, True),
            ("bf16", 16, True, True, True, True),
            ("fp32", 48, False, True, True, True),
            ("bf16", 32, False, False, False, True),
        }
    total, slowest = 0.0, []
    runs = [(variant, False) for variant in sorted(variants)] + [
        (variant, True) for variant in store_variants
    ]
    for (dtype, head_dim, lengths, dropout, keep_bits, atomic), store_bits in runs:
        for name, kernel, owned, inner, shapes in KERNELS:
            if atomic and name != "dK/dV" or store_bits and name != "dQ":
                continue
            shape = getattr(module, shapes)[0]
            report, seconds, _ = _compile(
                module,
                kernel,
                owned,
                inner,
                shape,
                dtype,
                _flags(
                    dtype,
                    head_dim,
                    lengths,
                    dropout,
                    module,
                    keep_bits=keep_bits,
                    atomic_dq=atomic,
                    store_bits=store_bits,
                ),
                args.arch,
            )
            total += seconds
            slowest.append((seconds, name, dtype, head_dim, shape, report.spilled_bytes))
    source = args.old_kernels or "kernels/triton_attention_kernels.py"
    print(f"# The GPU tests' attention variants on their default tiles ({source}), sm_{args.arch}\n")
    print(
        f"{len(slowest)} kernel variants ({len(runs)} flag sets) compile in {total:.0f} s on this machine.\n"
    )
    print("| compile s | kernel | dtype | head dim | tile | spill bytes |")
    print("|---|---|---|---|---|---|")
    for seconds, name, dtype, head_dim, shape, spilled in sorted(slowest, reverse=True)[: args.top]:
        print(
            f"| {seconds:.1f} | {name} | {dtype} | {head_dim} | {shape[0]} x {shape[1]}, {shape[2]} | {spilled} |"
        )


def loop_table(args) -> None:
    from kernels.aot import loop_bodies, sass

    module = _module(args.old_kernels)
    first, second, warps, stages = (int(n) for n in args.loop_tile.split(","))
    print(f"# SASS instructions per loop iteration, sm_{args.arch}, {first} x {second} tiles, {warps} warps, "
          f"{stages} stages (each kernel's loops in program order)\n")  # fmt: skip
    print("| kernel | dtype | head dim | dropout | instructions per loop |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes:
        for head_dim in args.head_dims:
            modes = (
                (False, False, False, "-"),
                (True, True, False, "0.1, stored bits"),
                (True, False, False, "0.1, replayed"),
                (True, False, True, "0.1, drawn and stored by dQ"),
            )
            for dropout, keep_bits, store_bits, mode in modes:
                for name, kernel, owned, inner, _ in KERNELS:
                    if store_bits and (name != "dQ" or not hasattr(module, "_DQ_TUNING_KEY")):
                        continue
                    flags = _flags(
                        dtype, head_dim, False, dropout, module, keep_bits=keep_bits, store_bits=store_bits
                    )
                    compiled = compile_kernel(
                        getattr(module, kernel), dtype, {**flags, owned: first, inner: second}, warps, stages,
                        args.arch,
                    )  # fmt: skip
                    counts = " / ".join(str(len(body)) for body in loop_bodies(sass(compiled)))
                    print(f"| {name} | {dtype} | {head_dim} | {mode} | {counts} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability: 90 (Hopper) or 80 (Ampere)")
    parser.add_argument("--dtypes", default="bf16", help="input dtypes: bf16, fp16, fp32")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--test-selection", action="store_true", help="the GPU tests' variants, compile time")
    parser.add_argument("--top", type=int, default=6, help="--test-selection: the slowest compiles listed")
    parser.add_argument("--loops", action="store_true", help="SASS instructions per loop iteration")
    parser.add_argument(
        "--loop-tile", default="64,64,4,3", help="--loops: the tile as first,second,warps,stages"
    )
    parser.add_argument(
        "--old-kernels",
        type=Path,
        default=None,
        help="another triton_attention_kernels.py to compile instead",
    )
    args = parser.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.head_dims = [int(d) for d in args.head_dims.split(",") if d.strip()]
    if args.loops:
        loop_table(args)
    elif args.test_selection:
        test_selection(args)
    else:
        tile_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
