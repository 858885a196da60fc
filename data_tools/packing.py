"""Which tokens form each sample: document splits, packing ``[CLS] doc [eos] ...`` and the corpus blend.

* Split: the corpus's non-empty documents are permuted with the seed (and the corpus fingerprint, so a
  corpus splits the same way in every blend) and cut into train/valid/test by proportion.
* Packing: documents in that order are packed as ``[CLS] doc [eos] [CLS] doc [eos] ...`` into samples of
  at most ``capacity`` tokens. A document that does not fit is cut at the sample's end and continues in
  the next sample after a fresh ``[CLS]``; the continuation starts at the beginning of the sentence that
  was cut (so that sentence is repeated), unless that sentence began before the cut-off chunk or reaches
  back more than ``capacity // 2`` tokens, in which case it starts exactly at the cut. Every document
  token lies in some sample; nothing is sampled with replacement.
* Blend: each split of each corpus contributes ``count_i`` picks per blend epoch (largest-remainder
  rounding of ``weight_i x total``); picks are interleaved evenly and deterministically (no RNG), as
  Megatron's greedy blending index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from data_tools.indexed import IndexedDataset
from data_tools.spans import SampleStructure


@dataclasses.dataclass
class CorpusDocuments:
    """Token ranges of a corpus's non-empty documents (absolute token offsets in the .bin)."""

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray


def corpus_documents(corpus: IndexedDataset) -> CorpusDocuments:
    bounds = np.asarray(corpus.document_indices, dtype=np.int64)
    has_sequences = np.flatnonzero(bounds[1:] > bounds[:-1])
    first, last = bounds[has_sequences], bounds[has_sequences + 1] - 1
    itemsize = corpus.dtype.itemsize
    starts = np.asarray(corpus.sequence_pointers[first], dtype=np.int64) // itemsize
    ends = np.asarray(corpus.sequence_pointers[last], dtype=np.int64) // itemsize + np.asarray(
        corpus.sequence_lengths[last], dtype=np.int64
    )
    nonempty = ends > starts
    return CorpusDocuments(has_sequences[nonempty], starts[nonempty], ends[nonempty])


def sentence_bounds(corpus: IndexedDataset, document: int) -> np.ndarray:
    """Absolute token offsets where document's sentences (sequences) start, then the document's end."""
    first, last = corpus.document_sequence_range(document)
    itemsize = corpus.dtype.itemsize
    starts = np.asarray(corpus.sequence_pointers[first:last], dtype=np.int64) // itemsize
    end = int(corpus.sequence_pointers[last - 1]) // itemsize + int(corpus.sequence_lengths[last - 1])
    return np.append(starts, end)


def split_boundaries(count: int, proportions: Sequence[float]) -> list[int]:
    """Cut ``count`` items into consecutive ranges by ``proportions`` (rounded cumulative fractions)."""
    total = float(sum(proportions))
    cumulative = np.cumsum(np.asarray(proportions, dtype=np.float64)) / total
    return [0] + [int(round(f * count)) for f in cumulative[:-1]] + [count]


def split_documents(
    documents: CorpusDocuments, proportions: Sequence[float], seed: int, corpus_key: int
) -> list[np.ndarray]:
    """Indices into ``documents`` of each split, in the (seeded) order they are packed."""
    generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, corpus_key, 0x5F17])))
    order = generator.permutation(len(documents.ids))
    bounds = split_boundaries(len(order), proportions)
    return [order[bounds[i] : bounds[i + 1]] for i in range(len(proportions))]


@dataclasses.dataclass
class PackedChunk:
    """A run of consecutive samples: sample i is segments ``[offsets[i], offsets[i+1])``.

    Segment rows are (document id, token start, token end) with absolute token offsets; ``eos`` marks
    segments that end their document (an ``eos`` follows them in the sample).
    """

    first_sample: int
    offsets: np.ndarray
    segments: np.ndarray
    eos: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    def structure(self, index: int, bounds_of: Callable[[int], np.ndarray] | None = None) -> SampleStructure:
        rows = slice(int(self.offsets[index]), int(self.offsets[index + 1]))
        segments = self.segments[rows]
        return SampleStructure(
            segments[:, 0], segments[:, 1], segments[:, 2], self.eos[rows].astype(bool), bounds_of
        )


def pack_documents(
    corpus: IndexedDataset,
    documents: CorpusDocuments,
    order: np.ndarray,
    capacity: int,
    chunk_samples: int = 4096,
) -> Iterator[PackedChunk]:
    """Pack the documents ``order`` indexes into samples of at most ``capacity`` tokens (see module doc)."""
    ids, starts, ends = (
        documents.ids[order].tolist(),
        documents.starts[order].tolist(),
        documents.ends[order].tolist(),
    )
    offsets, segments, eos = [0], [], []
    first_sample = 0
    fill = 0

    def close_sample() -> None:
        offsets.append(len(segments))

    def flush() -> PackedChunk:
        nonlocal offsets, segments, eos, first_sample
        chunk = PackedChunk(
            first_sample,
            np.asarray(offsets, np.int64),
            np.asarray(segments, np.int64).reshape(-1, 3),
            np.asarray(eos, np.uint8),
        )
        first_sample += chunk.num_samples
        offsets, segments, eos = [0], [], []
        return chunk

    for document, position, end in zip(ids, starts, ends):
        bounds = None  # the document's sentence boundaries, read at its first cut
        while position < end:
            room = capacity - fill
            if room < 2:  # not even [CLS] + one token: close the sample
                close_sample()
                fill = 0
                if len(offsets) > chunk_samples:
                    yield flush()
                continue
            if end - position + 2 <= room:
                segments.append((document, position, end))
                eos.append(1)
                fill += end - position + 2
                break
            cut = position + room - 1
            segments.append((document, position, cut))
            eos.append(0)
            close_sample()
            fill = 0
            if len(offsets) > chunk_samples:
                yield flush()
            if bounds is None:
                bounds = sentence_bounds(corpus, document)
            position = _continuation_start(bounds, position, cut, capacity)
    if len(segments) > offsets[-1]:
        close_sample()
    if len(offsets) > 1:
        yield flush()


def _continuation_start(bounds: np.ndarray, chunk_start: int, cut: int, capacity: int) -> int:
    """Where a document cut at ``cut`` resumes: the start of the cut sentence, if not too far back."""
    sentence_start = int(bounds[np.searchsorted(bounds, cut, side="right") - 1])
    if chunk_start < sentence_start and cut - sentence_start <= capacity // 2:
        return sentence_start
    return cut


def blend_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Picks per corpus in one blend epoch of ``sum(sizes)`` samples (largest remainder).

    Corpora without samples in this split get no picks; the others share the weights.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    weights = np.where(sizes > 0, np.asarray(weights, dtype=np.float64), 0.0)
    total = int(sizes.sum())
    if total == 0 or weights.sum() == 0:
        return [0] * len(sizes)
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts.tolist()


def blend_index(counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(corpus, pick number) for each blend position: corpus i's k-th pick sits near (k + 1/2) / count_i."""
    keys, corpus, pick = [], [], []
    for i, count in enumerate(counts):
        k = np.arange(count, dtype=np.int64)
        keys.append((k + 0.5) / max(count, 1))
        corpus.append(np.full(count, i, dtype=np.int16))
        pick.append(k)
    if not keys:
        return np.zeros(0, np.int16), np.zeros(0, np.int64)
    order = np.argsort(np.concatenate(keys), kind="stable")
    return np.concatenate(corpus)[order], np.concatenate(pick)[order]
