"""Counters of a preprocessing run, its live progress display, and the closing summary."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter

from tqdm import tqdm


@dataclasses.dataclass
class CorpusStats:
    """What a run (or one piece of it) read and wrote; pieces add up with ``+=``."""

    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    text_bytes: int = 0  # bytes of text read (after decompression)
    input_bytes: int = 0  # bytes of the input files on disk
    skipped: Counter = dataclasses.field(default_factory=Counter)  # reason -> count
    repaired: Counter = dataclasses.field(default_factory=Counter)  # repair -> count
    examples: list[str] = dataclasses.field(default_factory=list)  # where the first skipped bad lines were

    def __iadd__(self, other: CorpusStats) -> CorpusStats:
        self.documents += other.documents
        self.sequences += other.sequences
        self.tokens += other.tokens
        self.text_bytes += other.text_bytes
        self.input_bytes += other.input_bytes
        self.skipped.update(other.skipped)
        self.repaired.update(other.repaired)
        self.examples.extend(other.examples[: max(0, 5 - len(self.examples))])
        return self

    def to_json(self) -> dict:
        return {
            "documents": self.documents,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "text_bytes": self.text_bytes,
            "input_bytes": self.input_bytes,
            "skipped": dict(sorted(self.skipped.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "skipped_examples": list(self.examples),
        }

    @classmethod
    def from_json(cls, data: dict) -> CorpusStats:
        return cls(
            documents=data["documents"],
            sequences=data["sequences"],
            tokens=data["tokens"],
            text_bytes=data["text_bytes"],
            input_bytes=data["input_bytes"],
            skipped=Counter(data.get("skipped", {})),
            repaired=Counter(data.get("repaired", {})),
            examples=list(data.get("skipped_examples", [])),
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A tqdm bar on a terminal (MB/s and ETA from input bytes, docs/s and tokens/s beside); in a log
    file (SLURM, nohup) a plain line every ``log_interval`` seconds instead."""

    def __init__(self, total_bytes: int, label: str, enabled: bool = True, log_interval: float = 30.0):
        self.total_bytes = max(1, total_bytes)
        self.label = label
        self.enabled = enabled
        self.log_interval = log_interval
        self.start = time.monotonic()
        self.bytes = 0
        self.documents = 0
        self.tokens = 0
        self._last_print = self.start
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, desc=label, file=sys.stderr, dynamic_ncols=True
            )

    def update(self, input_bytes: int, documents: int, tokens: int) -> None:
        self.bytes += input_bytes
        self.documents += documents
        self.tokens += tokens
        if not self.enabled:
            return
        now = time.monotonic()
        elapsed = max(now - self.start, 1e-9)
        rates = f"{self.documents / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s"
        if self._bar is not None:
            self._bar.update(input_bytes)
            if now - self._last_print > 0.5:
                self._bar.set_postfix_str(rates, refresh=False)
                self._last_print = now
        elif now - self._last_print >= self.log_interval:
            self._last_print = now
            share = self.bytes / self.total_bytes
            eta = _duration(elapsed * (1 - share) / share) if share > 0 else "?"
            print(
                f"[{self.label}] {100 * share:5.1f}% {self.bytes / 1e6:,.1f} of "
                f"{self.total_bytes / 1e6:,.1f} MB, "
                f"{self.bytes / 1e6 / elapsed:.2f} MB/s, {rates}, ETA {eta}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_summary(stats: CorpusStats, seconds: float, output: str, sequence_unit: str) -> str:
    """The closing table: counts, skipped items by reason, repairs and throughput."""
    seconds = max(seconds, 1e-9)
    rows = [
        ("output", output),
        ("documents", f"{stats.documents:,}"),
        (f"sequences ({sequence_unit}s)", f"{stats.sequences:,}"),
        ("tokens", f"{stats.tokens:,}"),
        ("input", f"{stats.input_bytes / 1e6:,.1f} MB on disk, {stats.text_bytes / 1e6:,.1f} MB of text"),
        (
            "skipped",
            ", ".join(f"{reason}: {n:,}" for reason, n in sorted(stats.skipped.items())) or "nothing",
        ),
    ]
    if stats.repaired:
        rows.append(("repaired", ", ".join(f"{what}: {n:,}" for what, n in sorted(stats.repaired.items()))))
    rows += [(f"  at {where.rsplit(': ', 1)[0]}", where.rsplit(": ", 1)[1]) for where in stats.examples]
    rows.append(
        (
            "time",
            f"{_duration(seconds)} ({stats.text_bytes / 1e6 / seconds:,.2f} MB/s, "
            f"{stats.documents / seconds:,.0f} docs/s, {stats.tokens / seconds:,.0f} tokens/s)",
        )
    )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
