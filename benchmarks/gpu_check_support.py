"""What the GPU check's stages share (``benchmarks/gpu_check.py``): the report and running a stage's command."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "run" / "demo" / "corpus" / "austen-chapters.jsonl"


class Report:
    """Prints each stage as it runs and keeps the markdown report."""

    def __init__(self, path: Path, budget: float, work: Path | None = None):
        self.path = path
        self.budget = budget
        self.lines: list[str] = []
        self.failures: list[str] = []
        self.start = time.perf_counter()
        # The report is meant to be shared (docs/gpu-check/): this machine's paths in it become portable names,
        # the longest first (the work folder and the packages may lie inside the repository).
        names = {
            sys.executable: "python3",
            sysconfig.get_paths()["purelib"] + os.sep: "<site-packages>/",
            str(ROOT) + os.sep: "",
        }
        if work is not None:
            names[str(Path(work).resolve())] = "$WORK"
        self._names = sorted(names.items(), key=lambda item: -len(item[0]))

    def portable(self, text: str) -> str:
        """``text`` with this machine's interpreter, site-packages, repository and work folder paths named."""
        for path, name in self._names:
            text = text.replace(path, name)
        return text

    def add(self, text: str = "") -> None:
        text = self.portable(text)
        print(text, flush=True)
        self.lines.append(text)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        os.replace(tmp, self.path)

    def fail(self, stage: str, why: str) -> None:
        self.failures.append(f"{stage}: {why}")
        self.add(f"**FAILED** {stage}: {why}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, cap: float) -> float:
        """A stage's time limit: ``cap``, or what remains of the budget (at least 10 s)."""
        return max(10.0, min(cap, self.budget - self.elapsed()))


def child_env(smoke: bool, cuda: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    # The caller's PYTHONPATH (with gpu-deps/ on a GPU node) after the repository.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("TRITON_INTERPRET", "1")
    # Tile choices are timed once and reused by the later stages and the resumed run: every stage uses the
    # cache folder glm-pretrain uses (its node-local default), so what the step benchmark tuned and compiled
    # the training runs find.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from megatron_glm.cli.pretrain import triton_cache_environment

    env.update(triton_cache_environment(env))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(
    report: Report, command: list[str], env: dict[str, str], timeout: float, log: Path
) -> tuple[int, str]:
    """Run ``command``, echo and log its output; (exit status, output). Status 124 when it timed out."""
    report.add(f"\n    $ {' '.join(command)}")
    start = time.perf_counter()
    timeout = report.left(timeout)
    with open(log, "w") as out:
        # Its own process group, so that a timeout ends its children too (pytest-xdist workers, data-loader
        # workers), which would otherwise keep the GPU busy under the later stages.
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = 124
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # leftovers of a finished command
    text = log.read_text(errors="replace")
    report.add(f"    (exit {status} after {time.perf_counter() - start:.0f} s; log {log.name})")
    return status, text


def run_tables(
    report: Report,
    name: str,
    command: list[str],
    env: dict[str, str],
    timeout: float,
    log: Path,
    prefixes: tuple[str, ...] = ("|", "#"),
) -> tuple[int, str]:
    """``run`` a benchmark, copy its output lines that start with ``prefixes`` (its tables and headings) into the
    report, and record a failure named ``name`` if it did not exit cleanly; (exit status, output)."""
    status, text = run(report, command, env, timeout, log)
    report.add("")
    for line in text.splitlines():
        if line.startswith(prefixes):
            report.add(line)
    if status != 0:
        report.fail(name, f"exit {status} (see {log.name})")
    return status, text
