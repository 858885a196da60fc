"""A small fail-fast process pool: tasks go to N spawned workers, progress and results come back.

Unlike ``multiprocessing.Pool``, a failure anywhere ends the run at once: a task's exception is
re-raised in the parent with the worker's message (a ``DataError`` stays a ``DataError``), a worker
that dies (killed, out of memory) is noticed within a second, and the other workers are terminated.
Workers ignore Ctrl-C (the parent handles it and stops them) and exit if the parent disappears.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from data_tools.errors import DataError

# A task function is called as fn(task, report) where report(*progress) sends progress to the parent.
TaskFunction = Callable[[Any, Callable[..., None]], Any]


class _Reporter:
    def __init__(self, results: multiprocessing.Queue, parent: int):
        self._results = results
        self._parent = parent

    def __call__(self, *progress: Any) -> None:
        if os.getppid() != self._parent:  # the parent was killed: stop instead of working for nobody
            os._exit(1)
        self._results.put(("progress", progress))


def _worker_main(fn: TaskFunction, tasks: multiprocessing.Queue, results: multiprocessing.Queue,
                 env: dict[str, str], parent: int) -> None:  # fmt: skip
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(env)
    report = _Reporter(results, parent)
    while (item := tasks.get()) is not None:
        index, task = item
        try:
            results.put(("done", (index, fn(task, report))))
        except DataError as exc:
            results.put(("data_error", (index, str(exc))))
            return
        except BaseException:
            results.put(("crash", (index, traceback.format_exc())))
            return


def run_tasks(
    fn: TaskFunction,
    tasks: Sequence[Any],
    workers: int,
    on_progress: Callable[..., None],
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(task, report)`` for every task on ``workers`` spawned processes; results in task order.

    ``fn`` must be a module-level function. ``env`` is set in each worker before any task runs.
    """
    context = multiprocessing.get_context("spawn")
    task_queue, result_queue = context.Queue(), context.Queue()
    for item in enumerate(tasks):
        task_queue.put(item)
    workers = max(1, min(workers, len(tasks)))
    for _ in range(workers):
        task_queue.put(None)
    processes = [
        context.Process(
            target=_worker_main, args=(fn, task_queue, result_queue, env or {}, os.getpid()), daemon=True
        )
        for _ in range(workers)
    ]
    results: list[Any] = [None] * len(tasks)
    remaining = len(tasks)
    try:
        for process in processes:
            process.start()
        last_check = time.monotonic()
        while remaining:
            if time.monotonic() - last_check > 1.0:  # a killed worker sends nothing: look for it
                _check_alive(processes)
                last_check = time.monotonic()
            try:
                kind, payload = result_queue.get(timeout=1.0)
            except queue.Empty:
                _check_alive(processes)
                if all(process.exitcode is not None for process in processes):
                    raise RuntimeError("all preprocessing workers exited with tasks unfinished") from None
                continue
            if kind == "progress":
                on_progress(*payload)
            elif kind == "done":
                index, result = payload
                results[index] = result
                remaining -= 1
            elif kind == "data_error":
                raise DataError(payload[1])
            else:
                raise RuntimeError(f"a preprocessing worker failed on task {payload[0]}:\n{payload[1]}")
        return results
    finally:
        started = [process for process in processes if process.pid is not None]
        for process in started:
            if process.is_alive():
                process.terminate()
        for process in started:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        task_queue.cancel_join_thread()
        result_queue.cancel_join_thread()


def _check_alive(processes: list) -> None:
    for number, process in enumerate(processes):
        if process.exitcode not in (None, 0):
            raise DataError(_death_message(number, process.exitcode))


def _death_message(number: int, exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (SIGKILL usually means the machine ran out of memory)" if name == "SIGKILL" else ""
        return f"preprocessing worker {number} was killed by {name}{hint}; no output was written"
    return f"preprocessing worker {number} exited with code {exitcode}; no output was written"
