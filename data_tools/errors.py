"""The one exception type of the data tools (bad input files, bad flags, corrupt datasets) and the exit-code
rule every command of the project follows."""

from __future__ import annotations

import sys
from collections.abc import Callable

# Exit codes of every glm-* command: 2 when the command line or the config is invalid (nothing ran), 1 when
# the command ran and failed (its message says what to change), 130 when interrupted.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class DataError(Exception):
    """A problem with the user's data or options. The message says what, where (file:line) and how to fix it."""


def run_cli(
    prog: str,
    body: Callable[[], int | None],
    *,
    usage_errors: tuple[type[BaseException], ...] = (),
    failures: tuple[type[BaseException], ...] = (DataError,),
    where: str = "",
) -> int:
    """Run a command's ``body`` and turn the user's errors into ``prog: error: message`` and an exit code.

    ``usage_errors`` exit ``EXIT_USAGE``, ``failures`` ``EXIT_FAILED``: both are expected, so no traceback.
    Anything else is a bug and keeps its traceback. ``where`` (e.g. " (rank 3 of 8)") follows "error".
    """
    try:
        return body() or 0
    except usage_errors as exc:
        print(f"{prog}: error{where}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except failures as exc:
        print(f"{prog}: error{where}: {exc}", file=sys.stderr)
        return EXIT_FAILED
