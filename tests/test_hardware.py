"""The device probe at start: native-bf16 detection, the bounded matmul peak, the emulated-bf16 warning."""

import os
import subprocess
import sys
import time

import pytest
import torch

from megatron_glm.training import hardware
from megatron_glm.training.hardware import cpu_has_native_bf16, emulated_bf16_warning, measure_matmul_peak

# Environment that makes torch on any x86 CPU behave as on one without AVX-512: torch's own kernels at AVX2
# and oneDNN capped at AVX2, so bf16 matmuls are emulated (what an AVX2-only EPYC does).
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(
    "capability,flags,machine,expected",
    [
        ("AVX512", {"avx2", "avx512f", "avx512_bf16"}, "x86_64", True),  # Zen 4, Cooper Lake
        ("AVX512", {"avx2", "avx512f", "amx_bf16", "amx_tile"}, "x86_64", True),  # Sapphire Rapids
        ("AVX512", {"avx2", "avx512f"}, "x86_64", False),  # Skylake/Ice Lake server: AVX-512 without bf16
        ("AVX2", {"avx2", "fma"}, "x86_64", False),  # Zen 2/3 EPYC
        ("AVX2", {"avx2", "avx512f", "avx512_bf16"}, "x86_64", False),  # torch limited to its AVX2 kernels
        ("DEFAULT", {"bf16", "sve"}, "aarch64", True),  # Graviton 3
        ("DEFAULT", {"asimd"}, "aarch64", False),  # Graviton 2
        ("DEFAULT", set(), "ppc64le", False),
    ],
)
def test_native_bf16_decision(capability, flags, machine, expected):
    assert cpu_has_native_bf16(capability, flags, machine) is expected


def test_matmul_peak_is_measured_within_its_budget():
    start = time.perf_counter()
    peak = measure_matmul_peak(torch.device("cpu"), torch.float32, budget_s=0.5)
    elapsed = time.perf_counter() - start
    # A 2-core CPU does 10-200 GFLOP/s in fp32; the budget may be overrun by one matmul at most.
    assert 1e8 < peak < 1e13
    assert elapsed < 3.0


def test_emulated_bf16_is_measured_quickly_and_reported():
    """On a CPU that emulates bf16 (forced here), detection says so, the peak stays bounded in time (a fixed
    2048^3 bf16 matmul would take minutes) and the warning gives the measured slowdown and suggests fp32."""
    script = (
        "import time, torch\n"
        "from megatron_glm.training import hardware\n"
        "cpu = torch.device('cpu')\n"
        "assert not hardware.native_bf16(cpu), torch.backends.cpu.get_cpu_capability()\n"
        "start = time.perf_counter()\n"
        "hardware.measure_matmul_peak(cpu, torch.bfloat16, budget_s=1.0)\n"
        "print('elapsed', time.perf_counter() - start)\n"
        "print(hardware.emulated_bf16_warning(cpu))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **AVX2_ONLY},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert float(lines[0].split()[1]) < 5.0
    assert "without native bf16" in lines[1] and "training.precision=fp32" in lines[1]
    assert "x slower" in lines[1]


def test_warning_only_when_bf16_is_emulated(monkeypatch):
    peaks = {torch.float32: 100e9, torch.bfloat16: 0.2e9}
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    assert emulated_bf16_warning(torch.device("cpu"), peaks.__getitem__) is None
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    message = emulated_bf16_warning(torch.device("cpu"), peaks.__getitem__)
    assert "0.20 GFLOP/s against 100.00 GFLOP/s" in message and "500.0x slower" in message


def test_probe_leaves_the_global_random_streams_alone():
    """The probe's draws depend on the device's speed; dropout draws from the global stream, so runs of
    one seed agree only if the probe does not touch it."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    measure_matmul_peak(torch.device("cpu"), torch.float32, budget_s=0.2)
    assert torch.equal(torch.get_rng_state(), before)


def test_fp32_on_a_gpu_without_tf32_is_warned_about(monkeypatch):
    from megatron_glm.training.hardware import fp32_matmul_warning

    assert fp32_matmul_warning(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    matmul = torch.backends.cuda.matmul
    allowed = matmul.allow_tf32  # a property of torch's backend module: set and restored by hand
    try:
        matmul.allow_tf32 = False
        message = fp32_matmul_warning(torch.device("cuda", 0))
        assert "NVIDIA H200" in message and "training.precision=bf16" in message
        assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1" in message
        matmul.allow_tf32 = True
        assert fp32_matmul_warning(torch.device("cuda", 0)) is None
    finally:
        matmul.allow_tf32 = allowed
