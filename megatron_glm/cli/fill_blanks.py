"""``glm-fill-blanks``: the original name of ``glm-generate`` (same options; greedy by default)."""

from __future__ import annotations

import sys

from megatron_glm.cli.generate import main as generate_main


def main(argv: list[str] | None = None) -> int:
    return generate_main(argv, prog="glm-fill-blanks")


if __name__ == "__main__":
    sys.exit(main())
