"""Rank-aware logging: one setup for every entry point.

By default only global rank 0 prints (to stderr and, with a log directory, to ``rank-0.log``); with
``all_ranks`` every rank writes its own ``rank-<r>.log`` and prints with a ``[rank r]`` prefix.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LOGGER_NAME = "megatron_glm"


def _env_rank() -> int:
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(
    rank: int | None = None,
    log_dir: str | os.PathLike | None = None,
    all_ranks: bool = False,
    level: str = "info",
) -> logging.Logger:
    """Configure the ``megatron_glm`` logger for this process and return it. Safe to call again."""
    rank = _env_rank() if rank is None else rank
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False
    prefix = "[rank %(rank)d] " if all_ranks else ""
    formatter = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
    rank_filter = _RankFilter(rank)
    if rank == 0 or all_ranks:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        stream.addFilter(rank_filter)
        logger.addHandler(stream)
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(Path(log_dir) / f"rank-{rank}.log")
            file_handler.setFormatter(
                logging.Formatter("%(asctime)s [rank %(rank)d] %(levelname)s %(name)s: %(message)s")
            )
            file_handler.addFilter(rank_filter)
            logger.addHandler(file_handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def get_logger(name: str | None = None) -> logging.Logger:
    """A child of the ``megatron_glm`` logger (``get_logger("training")`` -> ``megatron_glm.training``)."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
