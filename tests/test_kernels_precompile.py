"""Parallel compilation of the autotuner's candidates (``kernels/precompile.py``), checked without a GPU.

The kernels compile for sm_90 on any machine (Triton ships ptxas), so the whole path runs here: the autotuner's
first timing call hands every candidate to worker processes, which fill Triton's on-disk cache; the autotuner's
own compiles then find every candidate there, and what they find is the binary an in-process compile gives.
A stand-in driver reports the sm_90 target and a benchmarker that launches nothing (there is no GPU to launch
on). The script runs in a subprocess with the interpreter off, since ``@triton.jit`` picks interpreter or
compiler when the kernel modules are imported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kernels import precompile

REPOSITORY = Path(__file__).resolve().parents[1]


def _cache_files(folder: str) -> set[str]:
    return {os.path.join(root, name) for root, _, names in os.walk(folder) for name in names}


def _forward_launch():
    """Arguments of a bf16, head-dim-64 attention forward with dropout, as the autotuner passes them to a
    candidate's launch (``args``, ``meta``)."""
    import torch

    batch, heads, length, head_dim = 2, 4, 128, 64
    q, k, v, out = (torch.zeros(batch, heads, length, head_dim, dtype=torch.bfloat16) for _ in range(4))
    lse = torch.zeros(batch, heads, length)
    sep = torch.zeros(batch, dtype=torch.int32)
    lengths = torch.zeros(batch, dtype=torch.int32)
    seed = torch.zeros(2, dtype=torch.int64)
    strides = [s for t in (q, k, v, out) for s in t.stride()[:3]]
    args = (
        q,
        k,
        v,
        out,
        lse,
        sep,
        lengths,
        seed,
        torch.zeros(batch * heads, length, length // 8, dtype=torch.uint8),  # dropout bits (unread here)
        *strides,
        heads,
        length,
        length,
        0.125,
        6554,
        1.1,
        128,
        128,
    )
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": head_dim,
        "HAS_LENGTHS": False,
        "HAS_DROPOUT": False,  # the warp-specialized candidates too (they do not specialize with dropout)
        "EMULATE_BF16": False,
        "DOT_PRECISION": None,
        "TMA_POSSIBLE": True,  # the TMA candidates too
        "KEEP_BITS": False,
        "grid": (1,),
        "warmup": False,
    }
    return args, meta


def precompile_through_the_autotuner(sequential_cache: str) -> None:
    """Run in a subprocess (interpreter off, GLM_KERNELS_AUTOTUNE=1, TRITON_CACHE_DIR fresh)."""
    import warnings

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class NoGPU(precompile._TargetDriver):
        def get_benchmarker(self):
            return lambda kernel_call, quantiles, **timing: [1.0, 1.0, 1.0]  # times nothing, launches nothing

    driver.set_active(NoGPU(GPUTarget("cuda", 90, 32)))
    import kernels.triton_attention  # noqa: F401 - its launchers install the parallel compile
    from kernels.triton_attention_kernels import attention_forward_kernel as tuner

    assert tuner._bench.__qualname__.startswith("install."), (
        "the launcher did not install the parallel compile"
    )
    args, meta = _forward_launch()
    cache = os.environ["TRITON_CACHE_DIR"]
    tuner.nargs = dict(zip(tuner.arg_names, args))
    configs = tuner.prune_configs(meta)
    # Every candidate, the warp-specialized ones included.
    assert len(configs) == len(tuner.configs) > 2
    assert any(c.kwargs.get("WS") for c in configs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed parallel compile warns: make it fail the test
        tuner._bench(*args, config=configs[0], **meta)  # the autotuner's first timing call
    filled = _cache_files(cache)
    assert filled, "the workers wrote nothing to Triton's cache"
    for config in configs[1:]:
        tuner._bench(*args, config=config, **meta)
    assert _cache_files(cache) == filled, "later timing calls compiled again"

    # The autotuner's in-process compiles now find every candidate in the cache: nothing new is written.
    compiled = [tuner.fn.run(*args, **{**meta, **c.all_kwargs(), "warmup": True}) for c in configs]
    assert all(kernel is not None for kernel in compiled)
    assert _cache_files(cache) == filled, "a candidate was not in the cache the workers filled"
    assert len({kernel.hash for kernel in compiled}) == len(configs)

    # And it is what an in-process compile of the same candidate gives, byte for byte.
    knobs.cache.dir = sequential_cache
    tuner.fn.device_caches.clear()  # forget the in-memory kernels: compile again
    for config, kernel in list(zip(configs, compiled))[:2]:
        again = tuner.fn.run(*args, **{**meta, **config.all_kwargs(), "warmup": True})
        assert again.asm["cubin"] == kernel.asm["cubin"], f"{config}: another binary than in-process"

    # The workers keep running between batches; a batch goes to the cache this process uses at the time.
    moved = sequential_cache + "-moved"
    knobs.cache.dir = moved
    # Two candidates suffice to see where the batch goes (all of them compiled above).
    specializations = precompile.capture(tuner, args, meta)[:2]
    assert precompile.compile_in_workers(tuner.fn, specializations, workers=2) == []
    assert _cache_files(moved), "the workers wrote to another cache than this process's"

    # A specialization a worker cannot compile is reported, not raised; the autotuner then compiles it itself.
    errors = precompile.compile_in_workers(tuner.fn, ['{"name": "not a kernel"}', "not json"], workers=2)
    assert len(errors) == 2 and all(errors), errors

    # Idle workers are stopped when the pool closes (after a minute without work, and at exit), also where a
    # process forked after they started, as a data loader's worker is, holds their stdin open.
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    try:
        closer = threading.Thread(target=precompile._POOL.close, daemon=True)
        closer.start()
        closer.join(timeout=30)
        assert not closer.is_alive(), "closing the idle workers hung"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


@pytest.mark.slow
def test_candidates_compile_in_workers_into_the_cache_the_autotuner_reads(tmp_path):
    environment = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "GLM_KERNELS_AUTOTUNE": "1",
        "GLM_KERNELS_COMPILE_WORKERS": "2",
        "GLM_KERNELS_WARP_SPECIALIZE": "1",  # the warp-specialized candidates compile in the workers too
        "TRITON_CACHE_DIR": str(tmp_path / "parallel"),
    }
    command = [
        sys.executable,
        "-c",
        "from tests.test_kernels_precompile import precompile_through_the_autotuner as run; "
        f"run({str(tmp_path / 'sequential')!r})",
    ]
    result = subprocess.run(
        command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_worker_count_follows_the_environment(monkeypatch):
    monkeypatch.setenv(precompile.WORKERS_ENV, "3")
    assert precompile.default_workers() == 3
    monkeypatch.setenv(precompile.WORKERS_ENV, "0")
    assert precompile.default_workers() == 0
    monkeypatch.setenv(precompile.WORKERS_ENV, "many")
    with pytest.raises(ValueError, match=precompile.WORKERS_ENV):
        precompile.default_workers()
    monkeypatch.delenv(precompile.WORKERS_ENV)
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert precompile.default_workers() == cpus
    # Ranks of one node share its CPUs.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 2))
    assert precompile.default_workers() == 1


def test_workers_start_only_for_two_or_more_new_candidates(monkeypatch):
    # One worker, or fewer than two candidates not yet handed out, gain nothing over compiling in-process:
    # nothing is captured, or no worker starts.
    captured, compiled = [], []
    monkeypatch.setattr(precompile, "_jit_function", lambda tuner: tuner)
    monkeypatch.setattr(precompile, "capture", lambda tuner, args, meta: captured.append(1) or list(tuner))
    monkeypatch.setattr(
        precompile, "compile_in_workers", lambda fn, specs, workers: compiled.append(list(specs)) or []
    )
    monkeypatch.setattr(precompile, "_submitted", set())
    assert precompile.precompile(["a", "b"], (), {}, workers=1) == 0
    assert captured == [] and compiled == []
    assert precompile.precompile(["a"], (), {}, workers=4) == 0
    assert compiled == []
    assert precompile.precompile(["a", "b", "c"], (), {}, workers=4) == 3
    assert compiled == [["a", "b", "c"]]
    # Handed out once: the autotuner's later timing calls of the same key start nothing.
    assert precompile.precompile(["a", "b", "c"], (), {}, workers=4) == 0
    assert compiled == [["a", "b", "c"]]
    assert precompile._disabled_reason is None


def test_every_autotuner_times_a_candidate_for_the_configured_time(monkeypatch):
    """Every autotuned kernel times its candidates through ``time_candidate``: the active driver's benchmarker for
    ``AUTOTUNE_REP_MS`` after a quarter of it (Triton's default, 100 ms after 25 per candidate, spent ~5 s per
    tuning key on the attention's 30-40 candidates: minutes in a benchmark over lengths, head dims and dropout)."""
    from triton.runtime import Autotuner, driver

    from kernels import (
        triton_attention_backward_kernels,
        triton_attention_kernels,
        triton_layer_norm_kernels,
        triton_support,
    )

    tuners = [
        value
        for module in (triton_attention_kernels, triton_attention_backward_kernels, triton_layer_norm_kernels)
        for value in vars(module).values()
        if isinstance(value, Autotuner)
    ]
    assert len(tuners) == 7
    assert all(tuner.do_bench is triton_support.time_candidate for tuner in tuners)

    timed = []

    class Driver:
        def get_benchmarker(self):
            def bench(kernel_call, warmup, rep, quantiles):
                timed.append((warmup, rep, quantiles))
                kernel_call()
                return times

            return bench

    monkeypatch.setattr(driver, "_active", Driver())
    monkeypatch.setattr(triton_support, "AUTOTUNE_REP_MS", 40.0)
    calls, times = [], [0.5, 0.4, 0.6]
    assert triton_support.time_candidate(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == times
    assert timed == [(10.0, 40.0, (0.5, 0.2, 0.8))] and calls == [1]


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
def test_a_bad_autotuning_time_is_refused_by_name(monkeypatch, value):
    from kernels import triton_support

    def read() -> float:
        name = "GLM_KERNELS_AUTOTUNE_REP_MS"
        return triton_support._environment_number(name, 40.0, "a time in milliseconds", zero_allowed=False)

    monkeypatch.setenv("GLM_KERNELS_AUTOTUNE_REP_MS", value)
    with pytest.raises(ValueError, match="GLM_KERNELS_AUTOTUNE_REP_MS"):
        read()
    monkeypatch.setenv("GLM_KERNELS_AUTOTUNE_REP_MS", "12.5")
    assert read() == 12.5
