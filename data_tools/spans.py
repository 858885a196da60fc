"""Span samplers of GLM's blank-infilling objectives: the one implementation behind offline and online masking.

A packed sample is ``[CLS] doc [eos] [CLS] doc [eos] ...`` (the last document may be cut without its
``eos``). ``draw_spans`` picks, for one sample and one mask variant, the objective, the blanked spans
and the *used length* L: the prefix of the sample that is laid out so that Part A + Part B fill the
sequence length T exactly (``L + 2 x spans`` for span infilling, ``L + 1`` for the document suffix
layout). Everything is drawn from the ``random.Random`` the caller passes, seeded by ``span_rng`` from
(seed, corpus, split, sample, variant), so the result does not depend on worker counts or order.

Rules (THUDM/GLM ``ConstructBlockStrategy``, with the deviations marked):

* token level: span lengths ~ Poisson(avg_span_length) truncated to 1..max_span_length-1, drawn until
  they cover ``int(token_ratio x L)`` where L = T - 2 x (spans so far) (the reference uses the raw sample
  length; here L is the length actually laid out). Lengths are shuffled and placed per document: the
  shorter documents take lengths while they fit ``int(token_ratio x document length)``, the longest
  takes the rest; inside a document spans are separated by at least one unmasked token, and neither the
  ``[CLS]``, the ``eos`` nor the last token of the prefix is masked. Lengths that cannot be placed are
  dropped and L grows by two per dropped span (the reference drops the whole sample).
* sentence level: whole corpus sentences (the .idx sequences, not a punctuation heuristic), shuffled and
  taken until they cover ``int(sentence_ratio x L)``; at least one.
* document level: one span of ``randint(int(document_min_ratio x L), L - 2)`` tokens, either the suffix
  of the prefix (prefix-LM layout; with probability document_suffix_prob, and always when the prefix holds
  more than one document) or placed at a random offset inside the document.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import random
from collections.abc import Callable, Sequence

import numpy as np

from data_tools.objectives import Objective, ObjectiveConfig

_MASK64 = (1 << 64) - 1
# Independent random streams: span drawing (offline or online) and load-time layout choices.
STREAM_SPANS = 1
STREAM_LAYOUT = 2


def stream_rng(seed: int, stream: int, *parts: int) -> random.Random:
    """A ``random.Random`` for one (seed, stream, parts...) key; distinct keys give distinct seeds."""
    key = 0
    for shift, part in enumerate((seed, stream, *parts)):
        if not 0 <= part <= _MASK64:
            raise ValueError(f"random key part {part} outside [0, 2**64)")
        key |= int(part) << (64 * shift)
    return random.Random(key)


def span_rng(seed: int, corpus: int, split: int, sample: int, variant: int) -> random.Random:
    """The generator ``draw_spans`` uses for one mask variant of one sample."""
    return stream_rng(seed, STREAM_SPANS, corpus, split, sample, variant)


@functools.lru_cache(maxsize=16)
def span_length_cdf(avg_span_length: float, max_span_length: int) -> tuple[float, ...]:
    """Cumulative weights of Poisson(avg) at lengths 1..max-1 (normalized); index i is length i + 1."""
    log_lambda = math.log(avg_span_length)
    weights = [
        math.exp(k * log_lambda - avg_span_length - math.lgamma(k + 1)) for k in range(1, max_span_length)
    ]
    total = sum(weights)
    cumulative, running = [], 0.0
    for w in weights:
        running += w / total
        cumulative.append(running)
    cumulative[-1] = 1.0
    return tuple(cumulative)


def _draw_length(rng: random.Random, cdf: Sequence[float]) -> int:
    return min(bisect.bisect_right(cdf, rng.random()), len(cdf) - 1) + 1


@dataclasses.dataclass
class SampleStructure:
    """Where the documents of one packed sample lie.

    Chunk j is ``[CLS]`` + tokens ``[starts[j], ends[j])`` of corpus document ``documents[j]`` (absolute
    token offsets in the corpus) + ``eos`` when ``has_eos[j]``. ``sentence_bounds(d)`` returns the absolute
    token offsets where document d's sentences start, followed by the document's end.
    """

    documents: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    has_eos: np.ndarray
    sentence_bounds: Callable[[int], np.ndarray] | None = None

    def __post_init__(self) -> None:
        sizes = 1 + (self.ends - self.starts) + self.has_eos.astype(np.int64)
        self.chunk_offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        self.length = int(sizes.sum())

    def text_regions(self, used_length: int) -> tuple[list[int], list[int]]:
        """(start, size) per chunk of the maskable text inside the prefix: no [CLS], eos or last token."""
        last = used_length - 1
        region_starts, region_sizes = [], []
        for offset, start, end in zip(self.chunk_offsets.tolist(), self.starts.tolist(), self.ends.tolist()):
            if offset >= used_length:
                break
            first = offset + 1
            region_starts.append(first)
            region_sizes.append(max(0, min(first + end - start, last) - first))
        return region_starts, region_sizes

    def document_end_before(self, position: int) -> bool:
        """Whether some chunk's eos lies strictly before ``position``."""
        eos_positions = self.chunk_offsets + 1 + (self.ends - self.starts)
        return bool(np.any(self.has_eos & (eos_positions < position)))

    def sentences(self, limit: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Sentences inside the first ``limit`` tokens, in sample coordinates.

        Returns (complete, pieces): ``complete`` are whole corpus sentences; ``pieces`` are all sentence
        parts clipped to the chunks and to ``limit`` (a superset, used when no whole sentence fits).
        """
        if self.sentence_bounds is None:
            raise ValueError("this SampleStructure carries no sentence boundaries")
        complete, pieces = [], []
        for offset, document, start, end in zip(
            self.chunk_offsets.tolist(), self.documents.tolist(), self.starts.tolist(), self.ends.tolist()
        ):
            if offset + 1 >= limit:
                break
            bounds = np.asarray(self.sentence_bounds(document), dtype=np.int64)
            lo = max(int(np.searchsorted(bounds, start, side="right")) - 1, 0)
            hi = int(np.searchsorted(bounds, end, side="left"))
            shift = offset + 1 - start
            for s, e in zip(bounds[lo:hi].tolist(), bounds[lo + 1 : hi + 1].tolist()):
                clipped_s, clipped_e = max(s, start) + shift, min(e, end) + shift
                whole = s >= start and e <= end and e + shift <= limit
                clipped_e = min(clipped_e, limit)
                if clipped_e > clipped_s:
                    pieces.append((clipped_s, clipped_e))
                    if whole:
                        complete.append((clipped_s, clipped_e))
        return complete, pieces


@dataclasses.dataclass(frozen=True, eq=False)
class SpanDraw:
    """One mask variant of one sample: spans are (start, length) rows sorted by start, in sample coordinates."""

    objective: Objective
    suffix: bool
    used_length: int
    spans: np.ndarray

    @property
    def layout_length(self) -> int:
        return self.used_length + (1 if self.suffix else 2 * len(self.spans))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SpanDraw)
            and (self.objective, self.suffix, self.used_length)
            == (other.objective, other.suffix, other.used_length)
            and np.array_equal(self.spans, other.spans)
        )


def _as_spans(pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    return np.asarray(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def sample_spans(
    rng: random.Random, lengths: Sequence[int], region_size: int, offset: int
) -> list[tuple[int, int]]:
    """Place spans of ``lengths`` (in this order) in ``region_size`` tokens with >= 1 free token between them.

    As the reference: k offsets drawn i.i.d. from 0..(size - sum - k + 1), sorted, spans laid left to right.
    """
    free = region_size - sum(lengths) - len(lengths) + 1
    places = sorted(rng.randrange(free + 1) for _ in lengths)
    spans, cursor = [], offset
    for place, length in zip(places, lengths):
        spans.append((cursor + place, length))
        cursor += length + 1
    return spans


def place_spans(
    rng: random.Random,
    lengths: Sequence[int],
    region_starts: Sequence[int],
    region_sizes: Sequence[int],
    ratio: float,
) -> list[tuple[int, int]]:
    """Distribute ``lengths`` over documents: the shorter ones up to ``int(ratio x size)``, the longest the rest.

    Lengths that fit nowhere are left out (the caller sees fewer spans than lengths).
    """
    order = sorted(range(len(region_sizes)), key=region_sizes.__getitem__)
    spans: list[tuple[int, int]] = []
    taken = 0
    for rank, region in enumerate(order):
        size = region_sizes[region]
        total = count = 0
        longest = rank == len(order) - 1
        budget = size if longest else int(size * ratio)
        while taken + count < len(lengths):
            length = lengths[taken + count]
            # Spans need a separating gap each (count of them before this one) to fit in the document.
            if total + length > budget or total + length + count > size:
                break
            total += length
            count += 1
        if count:
            spans += sample_spans(rng, lengths[taken : taken + count], size, region_starts[region])
            taken += count
    return spans


def _choose_objective(rng: random.Random, config: ObjectiveConfig) -> Objective:
    u = rng.random()
    mixture = [(objective, p) for objective, p in config.mixture().items() if p > 0]
    cumulative = 0.0
    for objective, p in mixture:
        cumulative += p
        if u < cumulative:
            return objective
    return mixture[-1][0]  # u beyond a sum that rounds below 1


def _token_spans(
    rng: random.Random, structure: SampleStructure, config: ObjectiveConfig, seq_length: int
) -> SpanDraw:
    raw = structure.length
    cdf = span_length_cdf(config.avg_span_length, config.max_span_length)
    single = rng.random() < config.single_span_prob
    lengths: list[int] = []
    covered = 0
    if single:
        lengths.append(_draw_length(rng, cdf))
    else:
        while covered < int(config.token_ratio * min(raw, seq_length - 2 * len(lengths))):
            lengths.append(_draw_length(rng, cdf))
            covered += lengths[-1]
    used = min(raw, seq_length - 2 * len(lengths))
    rng.shuffle(lengths)
    region_starts, region_sizes = structure.text_regions(used)
    spans = place_spans(rng, lengths, region_starts, region_sizes, config.token_ratio)
    return SpanDraw(Objective.TOKEN, False, min(raw, seq_length - 2 * len(spans)), _as_spans(spans))


def _accept_sentences(
    rng: random.Random, candidates: list[tuple[int, int]], raw: int, seq_length: int, ratio: float
) -> list[tuple[int, int]]:
    """Shuffle, then take sentences until they cover the ratio of the prefix that the takes leave."""
    rng.shuffle(candidates)
    chosen: list[tuple[int, int]] = []
    covered = furthest = 0
    for start, end in candidates:
        used = min(raw, seq_length - 2 * (len(chosen) + 1))
        if max(furthest, end) > used:
            continue
        chosen.append((start, end))
        covered += end - start
        furthest = max(furthest, end)
        if covered >= int(ratio * used):
            break
    return chosen


def _sentence_spans(
    rng: random.Random, structure: SampleStructure, config: ObjectiveConfig, seq_length: int
) -> SpanDraw:
    raw = structure.length
    complete, pieces = structure.sentences(min(raw, seq_length - 2))
    chosen = _accept_sentences(rng, complete, raw, seq_length, config.sentence_ratio)
    if not chosen:
        chosen = _accept_sentences(rng, pieces, raw, seq_length, config.sentence_ratio)
    spans = [(start, end - start) for start, end in chosen]
    return SpanDraw(Objective.SENTENCE, False, min(raw, seq_length - 2 * len(spans)), _as_spans(spans))


def _document_spans(
    rng: random.Random, structure: SampleStructure, config: ObjectiveConfig, seq_length: int
) -> SpanDraw:
    raw = structure.length
    suffix_length = min(raw, seq_length - 1)
    suffix = structure.document_end_before(suffix_length - 1) or rng.random() < config.document_suffix_prob
    used = suffix_length if suffix else min(raw, seq_length - 2)
    longest = used - 2
    if longest < 1:
        return SpanDraw(Objective.DOCUMENT, False, min(raw, seq_length), _as_spans([]))
    shortest = max(1, min(int(config.document_min_ratio * used), longest))
    generated = rng.randint(shortest, longest)
    if suffix:
        return SpanDraw(Objective.DOCUMENT, True, used, _as_spans([(used - generated, generated)]))
    region_starts, region_sizes = structure.text_regions(used)
    spans = place_spans(rng, [generated], region_starts, region_sizes, config.token_ratio)
    return SpanDraw(Objective.DOCUMENT, False, min(raw, seq_length - 2 * len(spans)), _as_spans(spans))


_SAMPLERS = {
    Objective.TOKEN: _token_spans,
    Objective.SENTENCE: _sentence_spans,
    Objective.DOCUMENT: _document_spans,
}


def draw_spans(
    rng: random.Random, structure: SampleStructure, config: ObjectiveConfig, seq_length: int
) -> SpanDraw:
    """Choose the objective from the mixture, then its spans and used length for a layout of ``seq_length``."""
    objective = _choose_objective(rng, config)
    return _SAMPLERS[objective](rng, structure, config, seq_length)
