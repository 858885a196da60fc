"""Compile an autotuned kernel's candidate tiles in parallel processes before the autotuner times them.

Triton's autotuner compiles its candidates one after the other on the first call per tuning key, in the
training process: for the attention kernels that is 20 compiles of one to several seconds each (forward, dQ
and dK/dV), and again for every head dim, dtype and dropout setting, which is most of a job's first step.
Here, when the autotuner is about to time the candidates of a key, the ones not yet compiled in this process
are first compiled in worker processes into Triton's on-disk cache; the autotuner's own compiles then load
them from there. The result is bit for bit what the sequential compiles give: the same Triton compiles the
same specializations under the same cache keys.

How: with ``triton.knobs.runtime.jit_cache_hook`` set (in this thread only), a ``warmup`` launch of each
candidate hands over Triton's serialized specialization (``specialization_data``) instead of compiling; each
worker points Triton at a stand-in driver that reports this process's GPU target (workers never touch the
GPU) and compiles its share through ``JITFunction.preload``. Anything that goes wrong on the way only makes
the autotuner compile in-process, as it always did (with one warning per process).

``GLM_KERNELS_COMPILE_WORKERS`` sets the number of worker processes; by default the CPUs this process may run
on, divided by the ranks on the node (``LOCAL_WORLD_SIZE``); ``0`` or ``1`` turns it off.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
import warnings

WORKERS_ENV = "GLM_KERNELS_COMPILE_WORKERS"

_disabled_reason: str | None = None
_submitted: set[str] = set()  # specializations already handed to workers by this process


def default_workers() -> int:
    """Worker processes per rank: ``GLM_KERNELS_COMPILE_WORKERS``, else this process's CPUs over the node's ranks."""
    value = os.environ.get(WORKERS_ENV, "").strip()
    if value:
        try:
            return max(int(value), 0)
        except ValueError:
            raise ValueError(
                f"{WORKERS_ENV}={value!r}: expected a number of worker processes (0 turns it off)"
            ) from None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(cpus // max(ranks_on_node, 1), 1)


def install(tuner) -> bool:
    """Make ``tuner`` (a ``triton.autotune`` object) compile its untimed candidates in parallel before timing
    them. Returns whether it was installed (not for one-candidate tuners or a Triton without the hooks)."""
    from triton import knobs

    if len(getattr(tuner, "configs", ())) < 2 or not hasattr(tuner, "_bench"):
        return False
    if not hasattr(knobs.runtime, "jit_cache_hook") or not hasattr(_jit_function(tuner), "preload"):
        return False
    original = tuner._bench

    def bench(*args, config, **meta):
        if _disabled_reason is None:
            precompile(tuner, args, meta)
        return original(*args, config=config, **meta)

    tuner._bench = bench
    return True


def precompile(tuner, args: tuple, meta: dict, workers: int | None = None) -> int:
    """Compile into Triton's cache, in parallel, every candidate of ``tuner`` for these arguments that this
    process has neither compiled nor handed to workers yet (``args``, ``meta``: what the autotuner passes to a
    candidate's launch, without the candidate's own parameters). Returns how many were compiled."""
    global _disabled_reason
    workers = default_workers() if workers is None else workers
    if workers < 2:
        return 0
    try:
        specs = [spec for spec in capture(tuner, args, meta) if spec not in _submitted]
        if len(specs) < 2:
            return 0
        _submitted.update(specs)
        failures = compile_in_workers(_jit_function(tuner), specs, workers)
    except Exception as error:  # noqa: BLE001 - an optimisation: never worse than compiling in-process
        failures = [f"{type(error).__name__}: {error}"]
        specs = []
    if failures and len(failures) >= max(len(specs), 1):
        _disabled_reason = failures[0]
        warnings.warn(
            f"parallel compilation of Triton autotuning candidates failed ({failures[0][-500:]}); the autotuner "
            f"compiles them one by one in this process instead ({WORKERS_ENV}=0 makes that the rule)",
            RuntimeWarning,
            stacklevel=2,
        )
        return 0
    return len(specs) - len(failures)


def capture(tuner, args: tuple, meta: dict) -> list[str]:
    """Triton's serialized specialization of every candidate of ``tuner`` (after its pruning) that this process
    has not compiled, without compiling any."""
    from triton import knobs

    fn = _jit_function(tuner)
    configs = tuner.prune_configs({k: v for k, v in meta.items() if k not in ("grid", "warmup")})
    captured: list[str] = []
    thread = threading.get_ident()
    previous = knobs.runtime.jit_cache_hook

    def hook(**kwargs):
        if threading.get_ident() != thread:  # another thread's compile: not ours to intercept
            return previous(**kwargs) if previous is not None else None
        captured.append(kwargs["compile"]["specialization_data"])
        return True  # skip the compile

    knobs.runtime.jit_cache_hook = hook
    try:
        for config in configs:
            fn.run(*args, **{**meta, **config.all_kwargs(), "warmup": True})
    finally:
        knobs.runtime.jit_cache_hook = previous
    return list(dict.fromkeys(captured))


def compile_in_workers(fn, specs: list[str], workers: int) -> list[str]:
    """Compile ``specs`` (serialized specializations of the JIT function ``fn``) in up to ``workers``
    processes; returns the errors of the ones that failed."""
    from triton import knobs
    from triton.runtime import driver

    target = driver.active.get_current_target()
    job = {
        "module": fn.module,
        "name": fn.fn.__qualname__,
        "target": [target.backend, target.arch, target.warp_size],
        # This process's cache, also where it was set in code rather than by TRITON_CACHE_DIR.
        "cache_dir": knobs.cache.dir,
    }
    # Ranks of one node compile the same candidates into one cache: start each at another place in the list.
    ranks_on_node = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    start = int(os.environ.get("LOCAL_RANK", "0") or 0) % ranks_on_node * len(specs) // ranks_on_node
    ordered = specs[start:] + specs[:start]
    count = min(workers, len(ordered))
    return _POOL.run([{**job, "specs": ordered[i::count]} for i in range(count)])


class _WorkerPool:
    """Worker processes (``python -m kernels.precompile``) kept between batches of compiles, since a worker
    takes a second or two to start (importing torch and hashing Triton); closed after ``IDLE_SECONDS`` without
    work and at exit."""

    IDLE_SECONDS = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: list[tuple[subprocess.Popen, object]] = []
        self._timer: threading.Timer | None = None
        self._owner = os.getpid()
        atexit.register(self.close)

    def run(self, jobs: list[dict]) -> list[str]:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            while len(self._workers) < len(jobs):
                self._workers.append(self._start())
            # Hand out all the work first, then collect: the workers compile concurrently.
            busy = self._workers[: len(jobs)]
            for (process, _), job in zip(busy, jobs):
                process.stdin.write(json.dumps(job) + "\n")
                process.stdin.flush()
            failures, dead = [], []
            for (process, log), job in zip(busy, jobs):
                line = process.stdout.readline()
                try:
                    errors = json.loads(line)["errors"]
                except (ValueError, KeyError):
                    process.wait()
                    log.seek(0)
                    tail = log.read()[-2000:].strip()
                    errors = [f"worker exited {process.returncode}: {tail}"] * len(job["specs"])
                    dead.append((process, log))
                failures += [e for e in errors if e]
            for worker in dead:
                self._workers.remove(worker)
                worker[1].close()
            self._timer = threading.Timer(self.IDLE_SECONDS, self.close)
            self._timer.daemon = True
            self._timer.start()
            return failures

    def close(self) -> None:
        # Idle workers wait on stdin; they are stopped, not just sent EOF, since a process forked from this one
        # after they started (a data loader's worker) holds their stdin open too. A forked copy of this pool is
        # not the owner of the workers and leaves them alone.
        with self._lock:
            if os.getpid() != self._owner:
                self._workers = []
                return
            for process, log in self._workers:
                process.kill()
                process.wait()
                process.stdin.close()
                process.stdout.close()
                log.close()
            self._workers = []

    @staticmethod
    def _start() -> tuple[subprocess.Popen, object]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        env.pop("TRITON_INTERPRET", None)
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - open while the worker lives; closed by close()
        process = subprocess.Popen(
            [sys.executable, "-m", "kernels.precompile"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        return process, log


_POOL = _WorkerPool()


def _jit_function(tuner):
    from triton.runtime.jit import JITFunction

    fn = tuner
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


class _TargetDriver:
    """What ``JITFunction.preload`` asks of Triton's driver, without a GPU: the parent's target, device 0."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


def _worker() -> None:
    """Compile the jobs read from stdin, one JSON line each; answer each with one line: an error (or None) per
    specialization."""
    import importlib

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    for line in sys.stdin:
        job = json.loads(line)
        knobs.cache.dir = job["cache_dir"]
        driver.set_active(_TargetDriver(GPUTarget(*job["target"])))
        fn = _jit_function(getattr(importlib.import_module(job["module"]), job["name"]))
        errors = []
        for spec in job["specs"]:
            try:
                fn.preload(spec)
                errors.append(None)
            except Exception as error:  # noqa: BLE001 - reported to the parent, which compiles it itself
                errors.append(f"{type(error).__name__}: {error}")
        print(json.dumps({"errors": errors}), flush=True)


if __name__ == "__main__":
    _worker()
