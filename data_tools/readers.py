"""Corpus inputs: finding the files, cutting them into byte ranges for workers, and reading documents.

Formats:

* ``jsonl``: one JSON object per line, the document under a key (``"text"`` by default).
* ``text``: plain UTF-8 text with a document per file, per line, or per block of lines separated by
  blank lines (``text_document = "file" | "line" | "block"``).

Either may be gzip-compressed (recognized by its magic bytes). Line-based inputs that are not compressed
(JSON lines, text per line or per block) are cut at record boundaries, so one large file is read by
many workers; a compressed file, or a text file that is one document, is read whole by one worker.
Cutting never changes the documents or their order: concatenating the pieces gives the file back.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from data_tools.errors import DataError
from data_tools.progress import CorpusStats

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_DOCUMENT_UNITS = ("file", "line", "block")
_GZIP_MAGIC = b"\x1f\x8b"
_READ_SIZE = 1 << 20
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")
_SURROGATES = re.compile("[\ud800-\udfff]")
_MAX_EXAMPLES = 5


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: str
    size: int  # bytes on disk
    format: str  # "jsonl" | "text"
    compressed: bool


@dataclasses.dataclass(frozen=True)
class Segment:
    """Bytes ``[start, end)`` of one input file (the whole file when compressed)."""

    file: InputFile
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    json_key: str = "text"
    text_document: str = "file"
    errors: str = "strict"  # undecodable bytes: "strict" (error or skip) | "replace" (U+FFFD)
    skip_bad_lines: bool = False
    batch_bytes: int = 1 << 20  # text gathered per batch of documents


def full_segments(files: Sequence[InputFile]) -> list[Segment]:
    return [Segment(f, 0, f.size) for f in files]


# -- finding inputs -----------------------------------------------------------------------------------
def _detect_format(path: str, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def _walk(top: str) -> list[str]:
    """Files under ``top`` in path order (as ``find | sort`` would list them), hidden names skipped."""
    found = []
    for root, dirs, names in os.walk(top, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, n) for n in names if not n.startswith("."))
    return sorted(found, key=lambda path: Path(path).parts)


def discover_inputs(patterns: Sequence[str], input_format: str = "auto") -> list[InputFile]:
    """Files named by ``patterns`` (files, folders searched recursively, globs), in a deterministic order.

    Folders are read recursively in path order, skipping hidden names; a file named twice is read once.
    """
    if not patterns:
        raise DataError("no input given: pass --input FILE|FOLDER|GLOB (several allowed)")
    paths: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"{pattern}: the pattern matches no file")
            for match in matches:
                paths.extend(_walk(match) if os.path.isdir(match) else [match])
        elif os.path.isdir(pattern):
            paths.extend(_walk(pattern))
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise DataError(f"{pattern}: no such file or folder")
    files, seen = [], set()
    for path in paths:
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(path):
            continue
        seen.add(real)
        try:
            with open(path, "rb") as f:
                compressed = f.read(2) == _GZIP_MAGIC
            size = os.path.getsize(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot read input ({exc.strerror})") from exc
        files.append(InputFile(path, size, _detect_format(path, input_format), compressed))
    if not files:
        raise DataError(f"no input files found in {', '.join(patterns)}")
    return files


# -- cutting into pieces ------------------------------------------------------------------------------
def _splittable(file: InputFile, text_document: str) -> bool:
    return not file.compressed and (file.format == "jsonl" or text_document != "file")


def _align(segment: Segment, position: int, text_document: str) -> int:
    """The first record boundary at or after ``position`` inside ``segment`` (``segment.end`` if none)."""
    if position <= segment.start:
        return segment.start
    with open(segment.file.path, "rb") as f:
        f.seek(position - 1)
        f.readline()  # the rest of the line holding position - 1: the boundary is the next line start
        if segment.file.format == "jsonl" or text_document == "line":
            return min(f.tell(), segment.end)
        while f.tell() < segment.end:  # blocks end at a blank line
            line = f.readline()
            if not line or not line.strip():
                break
        return min(f.tell(), segment.end)


def split_segments(
    segments: Sequence[Segment], parts: int, text_document: str, min_part_bytes: int = 1
) -> list[list[Segment]]:
    """Cut the concatenation of ``segments`` into at most ``parts`` contiguous pieces of similar size.

    Cuts fall on record boundaries; a segment that cannot be cut goes whole to the piece holding
    most of it. There are at most ``total bytes / min_part_bytes`` pieces, and none is empty.
    """
    total = sum(s.size for s in segments)
    parts = max(1, min(parts, total // max(1, min_part_bytes)))
    targets = [total * k // parts for k in range(1, parts)]
    pieces: list[list[Segment]] = [[]]
    offset = 0  # bytes of the concatenation before the current segment
    t = 0
    for segment in segments:
        start = segment.start
        if _splittable(segment.file, text_document):
            while t < len(targets) and targets[t] < offset + segment.size:
                cut = _align(segment, segment.start + targets[t] - offset, text_document)
                t += 1
                if cut >= segment.end:
                    break
                if cut > start:
                    pieces[-1].append(Segment(segment.file, start, cut))
                    start = cut
                    pieces.append([])
        else:
            inside = []
            while t < len(targets) and targets[t] < offset + segment.size:
                inside.append(targets[t] - offset)
                t += 1
            if any(x < segment.size / 2 for x in inside) and pieces[-1]:
                pieces.append([])
        pieces[-1].append(Segment(segment.file, start, segment.end))
        if not _splittable(segment.file, text_document) and any(x >= segment.size / 2 for x in inside):
            pieces.append([])
        offset += segment.size
    return [p for p in pieces if any(s.size for s in p)]


# -- reading documents --------------------------------------------------------------------------------
@dataclasses.dataclass
class DocumentBatch:
    texts: list[str]  # stripped, non-empty documents
    input_bytes: int  # bytes of the input files on disk consumed since the previous batch (progress)


class Location:
    """Names ``file:line`` for a line counted from the start of a segment; counts earlier lines lazily."""

    def __init__(self, segment: Segment):
        self.segment = segment
        self._lines_before: int | None = 0 if segment.start == 0 else None

    def line_number(self, line_in_segment: int) -> int:
        if self._lines_before is None:
            count, remaining = 0, self.segment.start
            with open(self.segment.file.path, "rb") as f:
                while remaining:
                    block = f.read(min(_READ_SIZE, remaining))
                    count += block.count(b"\n")
                    remaining -= len(block)
            self._lines_before = count
        return self._lines_before + line_in_segment + 1

    def describe(self, line_in_segment: int) -> str:
        return f"{self.segment.file.path}:{self.line_number(line_in_segment)}"


class _Source:
    """A segment's bytes as blocks of whole lines, with the position in the file on disk."""

    def __init__(self, segment: Segment):
        self.segment = segment
        self._raw = open(segment.file.path, "rb")  # noqa: SIM115 -- closed by close()
        if segment.file.compressed:
            self._stream = gzip.GzipFile(fileobj=self._raw, mode="rb")
            self._remaining = None
        else:
            self._raw.seek(segment.start)
            self._stream = self._raw
            self._remaining = segment.size

    def disk_position(self) -> int:
        return self._raw.tell()

    def _read(self, size: int) -> bytes:
        if self._remaining is not None:
            size = min(size, self._remaining)
            if size <= 0:
                return b""
        try:
            data = self._stream.read(size)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"{self.segment.file.path}: corrupt or truncated gzip file ({exc}); re-create or remove it"
            ) from exc
        if self._remaining is not None:
            self._remaining -= len(data)
        return data

    def line_blocks(self) -> Iterator[bytes]:
        """Blocks ending with a newline (the last one may lack it); no line is split between blocks."""
        pending: list[bytes] = []
        while True:
            data = self._read(_READ_SIZE)
            if not data:
                if pending:
                    yield b"".join(pending)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending.append(data)
                continue
            pending.append(data[:cut])
            yield b"".join(pending)
            pending = [data[cut:]] if cut < len(data) else []

    def whole(self) -> bytes:
        return b"".join(iter(lambda: self._read(_READ_SIZE), b""))

    def close(self) -> None:
        self._stream.close()
        self._raw.close()


def _decode_line(
    raw: bytes, line: int, where: Location, options: ReadOptions, stats: CorpusStats
) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if options.errors == "replace":
            stats.repaired["lines with undecodable bytes replaced"] += 1
            return raw.decode("utf-8", errors="replace")
        if options.skip_bad_lines:
            _skip(stats, "invalid UTF-8", where, line)
            return None
        raise DataError(
            f"{where.describe(line)}: invalid UTF-8 at byte {exc.start} of the line ({exc.reason}); "
            "pass --errors replace to substitute U+FFFD, or --skip-bad-lines to skip such lines"
        ) from exc


def _decode_lines(
    data: bytes, first_line: int, where: Location, options: ReadOptions, stats: CorpusStats
) -> list[str | None]:
    """The lines of a block of whole lines; a skipped undecodable line is ``None``."""
    try:
        lines: list[str | None] = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raw_lines = data.split(b"\n")
        lines = [_decode_line(raw, first_line + i, where, options, stats) for i, raw in enumerate(raw_lines)]
    if data.endswith(b"\n"):
        lines.pop()  # split() leaves an empty string after the last newline
    return lines


def _decode_text(
    data: bytes, first_line: int, where: Location, options: ReadOptions, stats: CorpusStats
) -> str:
    """The text of a block of whole lines; a skipped undecodable line is left out."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raw_lines = data.split(b"\n")
        lines = [_decode_line(raw, first_line + i, where, options, stats) for i, raw in enumerate(raw_lines)]
        return "\n".join(line for line in lines if line is not None)


def _fix_surrogates(
    text: str, where: Location, line: int, options: ReadOptions, stats: CorpusStats
) -> str | None:
    """JSON escapes can encode lone surrogates, which are not text; handled like undecodable bytes."""
    if not _SURROGATES.search(text):
        return text
    if options.errors == "replace":
        stats.repaired["lone surrogates replaced"] += 1
        return _SURROGATES.sub("\ufffd", text)
    if options.skip_bad_lines:
        _skip(stats, "lone surrogate in JSON string", where, line)
        return None
    raise DataError(
        f"{where.describe(line)}: the JSON string holds a lone surrogate escape (\\ud800-\\udfff), "
        "which is not text; pass --errors replace to substitute U+FFFD, or --skip-bad-lines"
    )


def _skip(stats: CorpusStats, reason: str, where: Location, line: int) -> None:
    stats.skipped[reason] += 1
    if len(stats.examples) < _MAX_EXAMPLES:
        stats.examples.append(f"{where.describe(line)}: {reason}")


def _bad_line(
    message: str, reason: str, where: Location, line: int, options: ReadOptions, stats: CorpusStats
) -> None:
    if not options.skip_bad_lines:
        raise DataError(
            f"{where.describe(line)}: {message}; fix the line or pass --skip-bad-lines to skip such lines"
        )
    _skip(stats, reason, where, line)


def _json_documents(
    lines: list[str | None], first_line: int, where: Location, options: ReadOptions, stats: CorpusStats
) -> Iterator[str]:
    key = options.json_key
    for i, line in enumerate(lines):
        if line is None or not line or line.isspace():  # a skipped undecodable line, or a blank one
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            message = f"malformed JSON ({exc.msg} at column {exc.colno})"
            _bad_line(message, "malformed JSON", where, first_line + i, options, stats)
            continue
        if not isinstance(record, dict):
            message = f"expected a JSON object, got {type(record).__name__}"
            _bad_line(message, "not a JSON object", where, first_line + i, options, stats)
            continue
        value = record.get(key)
        if not isinstance(value, str):
            if key in record:
                message, reason = f"key {key!r} is {type(value).__name__}, not text", f"non-string {key!r}"
            else:
                message, reason = f"missing key {key!r}", f"missing key {key!r}"
            message += f" (keys: {', '.join(map(str, record))[:200]}); choose the key with --json-key"
            _bad_line(message, reason, where, first_line + i, options, stats)
            continue
        if "\\ud" in line or "\\uD" in line:
            value = _fix_surrogates(value, where, first_line + i, options, stats)
            if value is None:
                continue
        yield value


class _Batcher:
    """Gathers stripped, non-empty documents until a batch holds enough text."""

    def __init__(self, stats: CorpusStats):
        self.stats = stats
        self.texts: list[str] = []
        self.characters = 0

    def add(self, documents: Iterable[str | None], count_empty: bool = True) -> None:
        """Add documents (``None``: a skipped line, already counted); C-level loops, no per-item Python."""
        documents = list(documents)
        if None in documents:
            documents = [d for d in documents if d is not None]
        kept = list(filter(None, map(str.strip, documents)))
        if count_empty and len(kept) < len(documents):
            self.stats.skipped["empty document"] += len(documents) - len(kept)
        self.texts.extend(kept)
        self.characters += sum(map(len, kept))

    def take(self) -> list[str]:
        texts, self.texts, self.characters = self.texts, [], 0
        return texts


def _segment_documents(
    segment: Segment, options: ReadOptions, stats: CorpusStats, batcher: _Batcher
) -> Iterator[int]:
    """Add one segment's documents to ``batcher``; yields the bytes on disk read since the last yield,
    whenever the batcher may be full, and once at the end."""
    source = _Source(segment)
    where = Location(segment)
    position = source.disk_position()

    def consumed() -> int:
        nonlocal position
        previous, position = position, source.disk_position()
        return position - previous

    try:
        stats.input_bytes += segment.size
        if segment.file.format == "text" and options.text_document == "file":
            data = source.whole()
            stats.text_bytes += len(data)
            batcher.add([_decode_text(data, 0, where, options, stats)])
            yield consumed()
            return
        line = 0
        carried = ""  # block mode: the last block of a read may go on in the next one
        for block in source.line_blocks():
            stats.text_bytes += len(block)
            if segment.file.format == "jsonl":
                lines = _decode_lines(block, line, where, options, stats)
                batcher.add(_json_documents(lines, line, where, options, stats))
            elif options.text_document == "line":
                batcher.add(_decode_lines(block, line, where, options, stats))
            else:
                blocks = _BLANK_LINES.split(carried + _decode_text(block, line, where, options, stats))
                carried = blocks.pop()
                batcher.add(blocks, count_empty=False)  # whitespace between blocks is no document
            line += block.count(b"\n")
            yield consumed()
        batcher.add([carried], count_empty=False)
        yield consumed()
    finally:
        source.close()


def read_documents(
    segments: Sequence[Segment], options: ReadOptions, stats: CorpusStats
) -> Iterator[DocumentBatch]:
    """Batches of about ``options.batch_bytes`` of documents, in input order; a batch may span files, so
    a folder of small files still makes large batches. Adds input_bytes and text_bytes to ``stats``."""
    batcher = _Batcher(stats)
    pending_bytes = 0
    for segment in segments:
        for consumed in _segment_documents(segment, options, stats, batcher):
            pending_bytes += consumed
            if batcher.characters >= options.batch_bytes:
                yield DocumentBatch(batcher.take(), pending_bytes)
                pending_bytes = 0
    yield DocumentBatch(batcher.take(), pending_bytes)
