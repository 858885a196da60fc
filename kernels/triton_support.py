"""What the Triton kernels share: interpreter detection, autotune configs and launch helpers.

Imported only when a Triton kernel is about to run, so ``import kernels`` works without triton.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

# @triton.jit decides at decoration time whether a kernel runs in the interpreter, so read the switch
# once, when the kernel modules are imported.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
# GLM_KERNELS_AUTOTUNE=0 gives every kernel one fixed tile shape on GPUs (the first of its list) instead of
# timing them all on the first call per shape: the kernel tests set it, so that a GPU test run compiles one
# variant per shape (tests/conftest.py). Training and the benchmarks autotune.
AUTOTUNE: bool = os.environ.get("GLM_KERNELS_AUTOTUNE", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)


def autotune_configs(
    gpu_configs: list[triton.Config], interpreter_config: triton.Config
) -> list[triton.Config]:
    """The configs to autotune over: all on GPUs; the first alone with GLM_KERNELS_AUTOTUNE=0; the interpreter,
    which cannot benchmark, gets exactly one of its own."""
    if INTERPRET:
        return [interpreter_config]
    return gpu_configs if AUTOTUNE else gpu_configs[:1]


# Host-side arithmetic of the launches. triton.cdiv and triton.next_power_of_2 are Triton functions that cost
# a few microseconds per call from Python; a training step makes thousands of these calls, on the host's
# critical path when the step is bound by kernel launches.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def length_bucket(length: int) -> int:
    """Autotune key for a sequence length: the next power of two, so dynamic lengths do not re-tune every step."""
    return next_power_of_2(length)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching, since Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def emulate_bf16(dtype: torch.dtype) -> bool:
    """Whether kernels on ``dtype`` run bf16 by hand: in the interpreter, which cannot compute on bf16 (it sees
    the bit patterns) and truncates fp32 -> bf16 where GPUs round to nearest even."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str | None:
    """``input_precision`` of ``tl.dot``: fp32 operands use TF32 only when torch allows it for its own matmuls;
    16-bit operands go to the tensor cores as they are (None: the default) and accumulate in fp32."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return None


@triton.jit
def _round_fp32_to_bf16_bits(x):
    """fp32 values rounded to the nearest bf16 (ties to even), still held in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Round fp32 ``x`` to ``DTYPE`` to nearest even, as a GPU's conversion does."""
    if EMULATE_BF16:
        x = _round_fp32_to_bf16_bits(x)
    return x.to(DTYPE)


@triton.jit
def dot_operand(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 ``x`` rounded to the input dtype for ``tl.dot``; when emulating bf16 it stays in fp32 (exactly)."""
    if EMULATE_BF16:
        return _round_fp32_to_bf16_bits(x)
    return x.to(DTYPE)
