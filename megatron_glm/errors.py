"""The errors a user of megatron_glm can meet, and how the commands report them.

Each says what was wrong, where (file:line, config key, rank, file name) and what to change. Commands catch
``USER_ERRORS`` and print the message without a traceback; the exit code follows one rule
(``data_tools.errors``): 2 for an invalid command line or config, 1 for a command that ran and failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from data_tools.errors import DataError
from data_tools.errors import run_cli as _run_cli
from kernels.errors import KernelError


class GLMError(Exception):
    """Base of megatron_glm's user errors."""


class ConfigError(GLMError):
    """An invalid configuration. The message names the key (and file:line when it came from a file)."""


class CheckpointError(GLMError):
    """A checkpoint that cannot be read, written or converted; the message names the file and what to change."""


class LaunchError(GLMError):
    """The launcher's environment is incomplete or inconsistent."""


class ParallelStateError(GLMError):
    """The parallel layout does not fit the world, or the state is used before it is initialized."""


class TrainingError(GLMError):
    """Training cannot go on (for example a non-finite loss under the "stop" policy)."""


# Errors whose message is enough: the user has something to change, a traceback would only hide it.
USER_ERRORS: tuple[type[Exception], ...] = (GLMError, DataError, KernelError)


def rank_suffix() -> str:
    """ " (rank r of w)" inside a multi-rank job (any launcher that sets RANK/WORLD_SIZE), else ""."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run a megatron_glm command: a ``ConfigError`` exits 2, the other user errors 1, with the rank."""
    return _run_cli(prog, body, usage_errors=(ConfigError,), failures=USER_ERRORS, where=rank_suffix())
