"""What this rank's device can do: the matmul peak (the MFU denominator) and native bf16 support.

Both are asked at start by glm-pretrain and the benchmarks. The peak measurement is bounded in time on any
device: a CPU that emulates bf16 runs a 2048^3 matmul in minutes, so the size grows only while one matmul
stays short.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

# The largest square matmul timed (what saturates the device) and the time one matmul may take before the
# size stops growing; the whole measurement stays within about `budget_s`.
_MAX_SIZE = {"cuda": 8192, "cpu": 1024}
# A GPU needs a longer look to reach its clock and saturate; a CPU core is at its peak within 1024^3.
_BUDGET_S = {"cuda": 1.0, "cpu": 0.3}
_MIN_SIZE = 128


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_matmul(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    a @ b
    _synchronize(device)
    return time.perf_counter() - start


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, budget_s: float | None = None) -> float:
    """FLOP/s of the fastest square matmul on ``device`` in ``dtype``, measured in about ``budget_s``
    (default: 1 s on a GPU, 0.3 s on a CPU).

    The size doubles from 128 while one matmul takes less than a tenth of the budget (and up to 8192 on
    GPUs, 1024 on CPUs); the largest size is then timed as often as the rest of the budget allows. The first
    call at each size pays for kernel selection and packing and is not counted.
    """
    max_size = _MAX_SIZE.get(device.type, _MAX_SIZE["cpu"])
    budget_s = budget_s if budget_s is not None else _BUDGET_S.get(device.type, _BUDGET_S["cpu"])
    # A private generator: how many numbers the probe draws depends on the device's speed, and the global
    # streams (dropout) must not, or two runs of one seed would differ.
    generator = torch.Generator(device=device).manual_seed(0)
    deadline = time.perf_counter() + budget_s
    size = _MIN_SIZE
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
        _time_matmul(a, b, device)  # warm-up
        seconds = _time_matmul(a, b, device)
        if size >= max_size or seconds > budget_s / 10 or time.perf_counter() > deadline:
            break
        size *= 2
    best = seconds
    while time.perf_counter() + best < deadline:
        best = min(best, _time_matmul(a, b, device))
    return 2 * size**3 / best


def _cpu_flags() -> set[str]:
    """The feature flags the kernel reports for this CPU (x86 "flags", Arm "Features"); empty if unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16(capability: str, cpu_flags: set[str], machine: str) -> bool:
    """Whether torch runs bf16 matmuls in hardware on this CPU (otherwise it emulates them, ~1000x slower).

    ``capability`` is the vector ISA torch dispatches to (``torch.backends.cpu.get_cpu_capability()``:
    "AVX2", "AVX512", ...); ``cpu_flags`` what the CPU reports. On x86, native bf16 needs torch's AVX-512
    kernels and the CPU's AVX512_BF16 or AMX-BF16; on Arm, the BF16 extension.
    """
    if machine in ("x86_64", "AMD64", "i686"):
        return capability.upper().startswith("AVX512") and bool({"avx512_bf16", "amx_bf16"} & cpu_flags)
    if machine in ("aarch64", "arm64"):
        return "bf16" in cpu_flags
    return False


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a GPU that supports it, or a CPU (see ``cpu_has_native_bf16``)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16(torch.backends.cpu.get_cpu_capability(), _cpu_flags(), platform.machine())


def emulated_bf16_warning(
    device: torch.device, measure: Callable[[torch.dtype], float] | None = None
) -> str | None:
    """A warning for bf16 requested on a device that only emulates it, with the measured slowdown; None when
    the device computes bf16 natively."""
    if native_bf16(device):
        return None
    measure = measure or (lambda dtype: measure_matmul_peak(device, dtype))
    fp32, bf16 = measure(torch.float32), measure(torch.bfloat16)
    return (
        f"training.precision=bf16 on a {device.type} without native bf16 (torch dispatches "
        f"{torch.backends.cpu.get_cpu_capability() if device.type == 'cpu' else device}): bf16 matmuls are "
        f"emulated, measured {bf16 / 1e9:.2f} GFLOP/s against {fp32 / 1e9:.2f} GFLOP/s in fp32 "
        f"({fp32 / bf16:.1f}x slower). Set training.precision=fp32 on this machine."
    )


def fp32_matmul_warning(device: torch.device) -> str | None:
    """A warning for fp32 training on a GPU whose fp32 matmuls run without tensor cores (TF32 not allowed);
    None elsewhere."""
    if device.type != "cuda" or torch.backends.cuda.matmul.allow_tf32:
        return None
    return (
        f"training.precision=fp32 on {torch.cuda.get_device_name(device)}: fp32 matmuls run without tensor cores "
        "(TF32 is off, torch's default), at a small fraction of the bf16 rate. Set training.precision=bf16 (the "
        "recipes' choice), or allow TF32 for fp32 matmuls with TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1."
    )
