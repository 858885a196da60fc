"""Build sample directories: packed samples plus K precomputed span-mask variants per sample.

``build_or_load_samples`` is what the trainer calls (on every rank; see its doc), ``python -m
data_tools.build_samples`` the CLI. The directory is named by a hash of everything that determines its
contents (corpus fingerprints, tokenizer, sequence length, objective config, variants, split, seed and
the format version), written under a temporary name and renamed into place only when complete, so a
directory that exists is complete and is reused as is.

Building reads only the corpus indices (.idx: document and sentence boundaries), never the tokens.
Sample s, variant v of corpus i in split p draws its spans from ``span_rng(seed, i, p, s, v)``; chunks of
samples are independent, so ``workers`` processes give the same bytes as one.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.errors import DataError
from data_tools.indexed import IndexedDataset
from data_tools.objectives import ObjectiveConfig
from data_tools.packing import (
    CorpusDocuments,
    PackedChunk,
    blend_counts,
    blend_index,
    corpus_documents,
    pack_documents,
    sentence_bounds,
    split_documents,
)
from data_tools.sample_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    SPLIT_NAMES,
    NpyWriter,
    check_corpus_tokenizer,
    corpus_fingerprints,
    fingerprint_key,
    spans_dtype,
    tokenizer_identity,
    write_json_atomic,
)
from data_tools.sample_stats import SplitStatistics
from data_tools.spans import draw_spans, span_rng
from data_tools.tokenizer import load_tokenizer

MIN_SEQ_LENGTH = 8
CHUNK_SAMPLES = 2048  # samples per unit of work handed to a worker process


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """A corpus prefix (``<path>.bin/.idx``) and its blend weight."""

    path: str
    weight: float = 1.0


@dataclasses.dataclass
class SampleSpec:
    """Everything that determines a sample directory's contents."""

    corpora: Sequence[CorpusSpec]
    tokenizer: str
    seq_length: int
    objectives: ObjectiveConfig
    num_variants: int
    split: Sequence[float] = (949.0, 50.0, 1.0)
    seed: int = 1234

    def validate(self) -> None:
        found = [f"objectives.{field}: {message}" for field, message in self.objectives.problems()]
        if not self.corpora:
            found.append("corpora: none given; pass at least one corpus prefix")
        if len(self.corpora) > np.iinfo(np.int16).max:
            found.append(
                f"corpora: at most {np.iinfo(np.int16).max} corpora can be blended, got {len(self.corpora)}"
            )
        if any(c.weight < 0 for c in self.corpora) or (
            self.corpora and sum(c.weight for c in self.corpora) <= 0
        ):
            found.append(
                f"corpus weights {[c.weight for c in self.corpora]} must be non-negative, not all zero"
            )
        if self.seq_length < MIN_SEQ_LENGTH:
            found.append(f"seq_length: must be at least {MIN_SEQ_LENGTH}, got {self.seq_length}")
        if self.num_variants < 0:
            found.append(
                f"num_variants: must be >= 0 (0 = packing only, for online masking), got {self.num_variants}"
            )
        if len(self.split) != 3 or any(x < 0 for x in self.split) or sum(self.split) <= 0:
            found.append(
                f"split: expected three non-negative proportions (train, valid, test), got {list(self.split)}"
            )
        if not 0 <= self.seed < 2**63:
            found.append(f"seed: must lie in [0, 2**63), got {self.seed}")
        if found:
            raise DataError("invalid sample-building options:\n" + "\n".join(f"  {line}" for line in found))


def open_corpora(corpora: Sequence[CorpusSpec]) -> list[IndexedDataset]:
    return [IndexedDataset(c.path) for c in corpora]


def describe_inputs(spec: SampleSpec) -> dict:
    """The canonical description that names the directory (corpus identity by content, not by path)."""
    spec.validate()
    tokenizer = load_tokenizer(spec.tokenizer)
    for corpus in spec.corpora:
        dataset = IndexedDataset(corpus.path)  # fails early with a clear message when missing or corrupt
        check_corpus_tokenizer(corpus.path, tokenizer)
        if spec.objectives.sentence_prob > 0 and dataset.sequence_count == dataset.num_documents:
            raise DataError(
                f"{corpus.path}: one sequence per document (preprocessed without sentence splitting), but the "
                "sentence objective needs sentence boundaries; re-run glm-preprocess with sentence "
                "splitting or set sentence_prob to 0"
            )
    total_weight = sum(c.weight for c in spec.corpora)
    total_split = sum(spec.split)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "corpora": [
            {"fingerprints": corpus_fingerprints(c.path), "weight": c.weight / total_weight}
            for c in spec.corpora
        ],
        "tokenizer": tokenizer_identity(tokenizer),
        "seq_length": spec.seq_length,
        "objectives": dataclasses.asdict(spec.objectives),
        "num_variants": spec.num_variants,
        "split": [x / total_split for x in spec.split],
        "seed": spec.seed,
    }


def inputs_hash(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def directory_name(inputs: dict) -> str:
    return f"glm-samples-{inputs_hash(inputs)[:16]}"


@dataclasses.dataclass
class _ChunkTask:
    prefix: str
    corpus: int
    split: int
    chunk: PackedChunk
    seed: int
    seq_length: int
    num_variants: int
    objectives: ObjectiveConfig


@dataclasses.dataclass
class _ChunkDraws:
    objective: np.ndarray
    suffix: np.ndarray
    used_length: np.ndarray
    span_counts: np.ndarray
    spans: np.ndarray
    raw_lengths: np.ndarray


def _draw_chunk(task: _ChunkTask) -> _ChunkDraws:
    corpus = IndexedDataset(task.prefix)
    chunk, k = task.chunk, task.num_variants
    n = chunk.num_samples
    objective = np.zeros((n, k), np.uint8)
    suffix = np.zeros((n, k), np.uint8)
    used = np.zeros((n, k), np.int32)
    counts = np.zeros(n * k, np.int64)
    raw = np.zeros(n, np.int64)
    spans: list[np.ndarray] = []

    def bounds_of(document: int) -> np.ndarray:
        return sentence_bounds(corpus, document)

    for i in range(n):
        structure = chunk.structure(i, bounds_of)
        raw[i] = structure.length
        sample = chunk.first_sample + i
        for v in range(k):
            draw = draw_spans(
                span_rng(task.seed, task.corpus, task.split, sample, v),
                structure,
                task.objectives,
                task.seq_length,
            )
            objective[i, v], suffix[i, v], used[i, v] = draw.objective, draw.suffix, draw.used_length
            counts[i * k + v] = len(draw.spans)
            spans.append(draw.spans)
    flat = np.concatenate(spans) if spans else np.zeros((0, 2), np.int64)
    return _ChunkDraws(objective, suffix, used, counts, flat, raw)


def _ordered(tasks: Iterator[_ChunkTask], pool, window: int) -> Iterator[tuple[_ChunkTask, _ChunkDraws]]:
    """Results in task order; with a pool, up to ``window`` chunks are in flight."""
    if pool is None:
        for task in tasks:
            yield task, _draw_chunk(task)
        return
    pending: collections.deque = collections.deque()
    try:
        for task in tasks:
            pending.append((task, pool.submit(_draw_chunk, task)))
            while len(pending) > window:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    except BrokenProcessPool as exc:
        raise DataError(
            "a glm-build-samples worker process died (killed, or out of memory); nothing was "
            "written: run again, with fewer --workers if memory is short"
        ) from exc


class _CorpusSplitWriter:
    """The arrays of one (split, corpus) directory, appended chunk by chunk."""

    def __init__(self, directory: Path, num_variants: int, span_dtype: np.dtype):
        directory.mkdir(parents=True)
        self.offsets = NpyWriter(directory / "sample_offsets.npy", np.int64)
        self.segments = NpyWriter(directory / "segments.npy", np.int64, (3,))
        self.eos = NpyWriter(directory / "segment_eos.npy", np.uint8)
        self.objective = NpyWriter(directory / "objective.npy", np.uint8, (num_variants,))
        self.suffix = NpyWriter(directory / "suffix.npy", np.uint8, (num_variants,))
        self.used = NpyWriter(directory / "used_length.npy", np.int32, (num_variants,))
        self.span_offsets = NpyWriter(directory / "span_offsets.npy", np.int64)
        self.spans = NpyWriter(directory / "spans.npy", span_dtype, (2,))
        self.offsets.append(np.zeros(1, np.int64))
        self.span_offsets.append(np.zeros(1, np.int64))
        self.segment_total = 0
        self.span_total = 0

    def append(self, chunk: PackedChunk, draws: _ChunkDraws) -> None:
        self.offsets.append(chunk.offsets[1:] + self.segment_total)
        self.segments.append(chunk.segments)
        self.eos.append(chunk.eos)
        self.segment_total += len(chunk.segments)
        self.objective.append(draws.objective)
        self.suffix.append(draws.suffix)
        self.used.append(draws.used_length)
        self.span_offsets.append(np.cumsum(draws.span_counts) + self.span_total)
        self.spans.append(draws.spans)
        self.span_total += len(draws.spans)

    def close(self) -> dict:
        for writer in (
            self.offsets,
            self.segments,
            self.eos,
            self.objective,
            self.suffix,
            self.used,
            self.span_offsets,
            self.spans,
        ):
            writer.close()
        return {"samples": self.offsets.rows - 1, "segments": self.segment_total, "spans": self.span_total}


def _build_split(
    folder: Path,
    split_id: int,
    spec: SampleSpec,
    corpora: list[IndexedDataset],
    documents: list[CorpusDocuments],
    orders: list[np.ndarray],
    pool,
    window: int,
    bar: tqdm,
) -> dict:
    """Pack and mask one split of every corpus, then write its blend; returns the split's meta entry."""
    stats = SplitStatistics(spec.seq_length)
    span_dtype = spans_dtype(spec.seq_length)
    per_corpus = []
    for corpus_id, corpus_spec in enumerate(spec.corpora):
        writer = _CorpusSplitWriter(folder / f"corpus-{corpus_id}", spec.num_variants, span_dtype)
        chunks = pack_documents(
            corpora[corpus_id], documents[corpus_id], orders[corpus_id], spec.seq_length - 1, CHUNK_SAMPLES
        )
        tasks = (
            _ChunkTask(
                corpus_spec.path,
                corpus_id,
                split_id,
                chunk,
                spec.seed,
                spec.seq_length,
                spec.num_variants,
                spec.objectives,
            )
            for chunk in chunks
        )
        for task, draws in _ordered(tasks, pool, window):
            writer.append(task.chunk, draws)
            stats.add(
                draws.objective,
                draws.suffix,
                draws.used_length,
                draws.span_counts,
                draws.spans[:, 1],
                draws.raw_lengths,
            )
            bar.update(task.chunk.num_samples)
        counts = writer.close()
        counts["documents"] = len(orders[corpus_id])
        per_corpus.append(counts)
    picks = blend_counts([c["samples"] for c in per_corpus], [c.weight for c in spec.corpora])
    blend_corpus, blend_pick = blend_index(picks)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "blend_corpus.npy", blend_corpus)
    np.save(folder / "blend_index.npy", blend_pick)
    return {
        "blend_size": len(blend_corpus),
        "blend_counts": picks,
        "corpora": per_corpus,
        "statistics": stats.as_dict(),
    }


def build_samples(
    spec: SampleSpec,
    output: str | os.PathLike,
    *,
    workers: int = 1,
    progress: bool = False,
    inputs: dict | None = None,
) -> Path:
    """Build the sample directory ``output`` (which must not exist); return its path.

    The directory is assembled under a temporary name next to ``output`` and renamed when complete. If
    another process finished the same directory first, its copy is kept and this one discarded.
    """
    started = time.time()
    inputs = inputs if inputs is not None else describe_inputs(spec)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    corpora = open_corpora(spec.corpora)
    capacity = spec.seq_length - 1  # the longest layout is the document suffix one: used length + 1
    # A pool that notices a dead worker (BrokenProcessPool) instead of waiting for it forever.
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 1 else None)  # fmt: skip
    try:
        tmp.mkdir()
        documents = [corpus_documents(c) for c in corpora]
        orders = [
            split_documents(d, spec.split, spec.seed, fingerprint_key(info["fingerprints"]))
            for d, info in zip(documents, inputs["corpora"])
        ]
        estimate = sum(int((d.ends - d.starts).sum()) + 2 * len(d.ids) for d in documents) // capacity + 1
        bar = tqdm(total=estimate, unit="sample", disable=not progress, desc="glm-build-samples")
        splits_meta = {
            name: _build_split(
                tmp / name,
                index,
                spec,
                corpora,
                documents,
                [o[index] for o in orders],
                pool,
                2 * workers,
                bar,
            )
            for index, name in enumerate(SPLIT_NAMES)
        }
        bar.close()
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "hash": inputs_hash(inputs),
            "inputs": inputs,
            "corpora": [
                {
                    "path": str(Path(c.path).resolve()),
                    "weight": c.weight,
                    "tokens": int(corpus.num_tokens),
                    "documents": corpus.num_documents,
                    "sentences": corpus.sequence_count,
                }
                for c, corpus in zip(spec.corpora, corpora)
            ],
            "seq_length": spec.seq_length,
            "capacity": capacity,
            "num_variants": spec.num_variants,
            "seed": spec.seed,
            "spans_dtype": spans_dtype(spec.seq_length).name,
            "splits": splits_meta,
            "build": {
                "seconds": round(time.time() - started, 3),
                "workers": workers,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        }
        write_json_atomic(tmp / META_FILE, meta)
        try:
            os.rename(tmp, output)
        except OSError:
            if not (output / META_FILE).is_file():
                raise
            shutil.rmtree(tmp)  # another process completed the same directory first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return output


def build_or_load_samples(
    corpora: Sequence[CorpusSpec | tuple[str, float] | str],
    tokenizer: str,
    seq_length: int,
    objectives: ObjectiveConfig,
    num_variants: int,
    split: Sequence[float],
    seed: int,
    cache_dir: str | os.PathLike,
    *,
    builder: bool = True,
    workers: int = 1,
    progress: bool = False,
    wait_timeout_s: float = 6 * 3600.0,
    poll_s: float = 2.0,
) -> Path:
    """The sample directory for these inputs under ``cache_dir``, built if missing; returns its path.

    Safe on every rank of a job: ranks with ``builder=True`` build when the directory is missing (two
    builders race harmlessly: the first complete rename wins); the others wait until it appears (up to
    ``wait_timeout_s``). With a shared file system pass ``builder=(rank == 0)``; with node-local cache
    directories ``builder=(local_rank == 0)``. Building before the launch (``python -m
    data_tools.build_samples`` with the same options and cache directory) makes this a lookup.
    """
    specs = [
        c if isinstance(c, CorpusSpec) else CorpusSpec(c) if isinstance(c, str) else CorpusSpec(*c)
        for c in corpora
    ]
    spec = SampleSpec(specs, tokenizer, seq_length, objectives, num_variants, tuple(split), seed)
    inputs = describe_inputs(spec)
    path = Path(cache_dir) / directory_name(inputs)
    if (path / META_FILE).is_file():
        return path
    failure = path.parent / f".{path.name}.failed"
    if builder:
        failure.unlink(missing_ok=True)
        try:
            return build_samples(spec, path, workers=workers, progress=progress, inputs=inputs)
        except BaseException as exc:
            # Tell the ranks waiting for this directory, instead of letting them wait for the timeout.
            failure.parent.mkdir(parents=True, exist_ok=True)
            failure.write_text(f"{type(exc).__name__}: {exc}\n")
            raise
    deadline = time.monotonic() + wait_timeout_s
    # A failure marker older than this was left by an earlier job (the builder removes it when it starts).
    stale_before = time.time() - 60.0
    while not (path / META_FILE).is_file():
        if failure.is_file() and failure.stat().st_mtime >= stale_before:
            raise DataError(f"building {path} failed on the builder rank: {failure.read_text().strip()}")
        if time.monotonic() > deadline:
            raise DataError(
                f"waited {wait_timeout_s:.0f} s for {path} to be built by the builder rank; build it "
                "before launching with python -m data_tools.build_samples (same options and "
                "--cache-dir) or check that the builder rank sees the same cache directory"
            )
        time.sleep(poll_s)
    return path
