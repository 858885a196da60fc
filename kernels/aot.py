"""The Triton kernels compiled ahead of time for an NVIDIA GPU target, on any machine (no GPU needed).

Triton ships ptxas, so a kernel compiles for sm_80 or sm_90 on a CPU-only machine, and ``ptxas -v`` reports the
registers per thread and the bytes of register spill stores, which otherwise only the driver reports when it
loads the kernel on a GPU. ``tests/test_kernels_compile.py`` uses this to check that the kernels compile and
that the default tiles do not spill; ``benchmarks/kernel_registers.py`` prints the table for every tile.

Import this module with the interpreter off (``TRITON_INTERPRET`` unset or 0): ``@triton.jit`` chooses
interpreter or compiler when the kernel modules are first imported.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import Autotuner

# Pointer arguments that are not of the input's element type.
POINTER_TYPES = {
    "Lse": "*fp32",
    "Delta": "*fp32",
    "Sep": "*i32",
    "Lengths": "*i32",
    "Seed": "*i64",
    "KeepBits": "*u8",
    "DQAccum": "*fp32",
    "Mean": "*fp32",
    "Rstd": "*fp32",
    "PartialDW": "*fp32",
    "PartialDB": "*fp32",
    "Targets": "*i64",
    "Loss": "*fp32",
    "RowMax": "*fp32",
    "LogSum": "*fp32",
    "DLoss": "*fp32",
}
FLOAT_ARGUMENTS = {"softmax_scale", "dropout_scale", "eps", "smoothing"}
# Integer arguments that are multiples of 16 in the model (hidden sizes, padded vocabularies), which Triton then
# specializes as such at launch (``tt.divisibility``): a row mask ``cols < width`` is then known to hold for
# runs of 16 columns, so loads are vectorized and can be pipelined, as on the GPU.
MULTIPLES_OF_16 = {"width", "vocab"}


@dataclasses.dataclass(frozen=True)
class Registers:
    """What ptxas reports for one compiled kernel."""

    per_thread: int
    spilled_bytes: int
    shared_bytes: int


def compile_kernel(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int, capability: int):
    """``kernel`` (a ``@triton.jit`` function or its autotuner) compiled for ``sm_<capability>`` with ``dtype``
    (``"bf16"``, ``"fp16"``, ``"fp32"``) inputs and ``constexprs``; specialized as Triton specializes a launch in
    the model: tensors 16-byte aligned, strides, lengths, widths and vocabularies multiples of 16. Switches in
    ``constexprs`` that the kernel does not take are left out, so one set of feature flags serves every kernel."""
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    # Switches the kernel takes with a default (``WS: tl.constexpr = False``) keep it unless given.
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(fn.fn).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    constexprs = {**defaults, **{name: value for name, value in constexprs.items() if name in fn.arg_names}}
    signature, attributes = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name[0].isupper():
            signature[name] = POINTER_TYPES.get(name, f"*{dtype}")
        else:
            signature[name] = "fp32" if name in FLOAT_ARGUMENTS else "i32"
        if (
            name[0].isupper()
            or name.startswith("stride")
            or name.endswith(("_length", "_bucket"))
            or name in MULTIPLES_OF_16
        ):
            attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs=attributes,
    )
    return triton.compile(
        source,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def registers(compiled, capability: int) -> Registers:
    """ptxas's register report for ``compiled`` (from ``compile_kernel``)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        report = subprocess.run(
            [get_ptxas(capability).path, f"-arch={arch}", "-v", ptx.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    used = re.findall(r"Used (\d+) registers", report)
    spills = re.findall(r"(\d+) bytes spill stores", report)
    if not used or not spills:
        raise RuntimeError(f"no register report from ptxas:\n{report}")
    return Registers(int(used[-1]), max(int(n) for n in spills), compiled.metadata.shared)


def partition_rows(compiled) -> list[int]:
    """The rows each computing partition of a warp-specialized kernel (from ``compile_kernel``) works on, from its
    TTGIR: the rows of the first matmul in each ``partitionN`` region. Empty for a kernel that is not specialized.
    Partitions that share a program's block split its rows, so these add up to the block."""
    regions = re.split(r"\n\s*partition\d+\(", compiled.asm["ttgir"])[1:]
    matmuls = (re.search(r"warp_group_dot [^\n]*-> tensor<(\d+)x", region) for region in regions)
    return [int(match.group(1)) for match in matmuls if match]


def sass(compiled) -> list[str]:
    """The SASS of ``compiled`` (from ``compile_kernel``), one entry per line of ``nvdisasm`` (the one Triton ships):
    labels (``.L_x_12:``) and instructions (``FFMA R1, R2, R3, R4``, predicate included, without the ``;``)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run(
            [knobs.nvidia.nvdisasm.path, "-c", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    lines = []
    for line in text.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        instruction = re.search(r"/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if label:
            lines.append(label.group(1) + ":")
        elif instruction:
            lines.append(instruction.group(1))
    return lines


def loop_bodies(lines: list[str]) -> list[list[str]]:
    """The loops of a kernel's SASS (``sass``), in program order: the instructions from a label to a branch back to
    it, both included. A loop's instruction count is what each thread issues per iteration, the figure that bounds
    a loop whose tensor-core work is small."""
    labels, instructions, loops = {}, [], []
    for line in lines:
        if line.endswith(":"):
            labels[line[:-1]] = len(instructions)
            continue
        instructions.append(line)
        target = re.search(r"\bBRA\b.*?`?\(?(\.L_x_\d+)", line)
        if target and labels.get(target.group(1), len(instructions)) < len(instructions) - 1:
            loops.append(instructions[labels[target.group(1)] :])
    return loops


def matmul_work(compiled, num_warps: int) -> int:
    """The tensor-core FLOPs a program of ``compiled`` (from ``compile_kernel``, sm_90, tiles loaded by pointers)
    executes per iteration of its loop over blocks, from the HGMMA instructions of its SASS (0 where it has none:
    sm_80, or tiles too small for Hopper's warpgroup matmuls). Every warpgroup (4 warps) issues each HGMMA of its
    loop, and the kernel's two loops (over fully visible and over masked blocks) do the same work. Against the
    FLOPs the tile needs, this shows matmuls that several warpgroups compute whole. (TMA and warp-specialized
    kernels wait on barriers in loops of their own, which this reading of the SASS does not tell apart.)"""
    shapes = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
    loops = [
        sum(2 * int(m) * int(n) * int(k) for line in body for m, n, k in shapes.findall(line))
        for body in loop_bodies(sass(compiled))
    ]
    return max(loops, default=0) * max(num_warps // 4, 1)
