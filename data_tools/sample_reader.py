"""Read a sample directory: which sample a stream position holds, its span variant, and its GLM layout.

Stream position q of a split (the count of samples consumed before it) lies in epoch ``e = q // N``
(N = blend size). Training order shuffles each epoch with a keyed Feistel permutation of ``[0, N)``
(seeded by seed, split and epoch; O(1) memory, random access, the same on every rank and worker).
Blend position p is corpus i's pick k, i.e. pass ``t = e x count_i + k`` over that corpus: sample
``t mod n_i`` in its ``t // n_i``-th pass. Precomputed masks use variant ``pass mod K``; online masking
draws variant ``pass`` with the same sampler (fresh masks every pass, as THUDM/GLM). The Part-B span
order and ``[dBLOCK]`` draws come from a generator seeded by (seed, corpus, split, sample, pass).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_tools.errors import DataError
from data_tools.indexed import IndexedDataset
from data_tools.layout import GLMLayout, build_glm_layout
from data_tools.objectives import Objective, ObjectiveConfig
from data_tools.packing import sentence_bounds
from data_tools.sample_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    corpus_fingerprints,
    same_tokenizer,
    split_index,
    tokenizer_identity,
)
from data_tools.spans import STREAM_LAYOUT, SampleStructure, SpanDraw, draw_spans, span_rng, stream_rng
from data_tools.tokenizer import CommandTokens, GLMTokenizer

_MASK64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 4


def _mix64(value: int) -> int:
    """SplitMix64's finalizer: a fast, well-mixing bijection of 64-bit integers."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def epoch_key(seed: int, split: int, epoch: int) -> int:
    return _mix64(_mix64(_mix64(seed) ^ split) ^ epoch)


def shuffled_position(position: int, size: int, key: int) -> int:
    """The image of ``position`` under a keyed pseudo-random permutation of ``[0, size)``."""
    if size <= 1:
        return position
    half = ((size - 1).bit_length() + 1) // 2
    mask = (1 << half) - 1
    round_keys = [_mix64(key ^ r) for r in range(_FEISTEL_ROUNDS)]
    value = position
    while True:  # cycle-walk until the value falls back inside [0, size)
        left, right = value >> half, value & mask
        for round_key in round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & mask)
        value = (left << half) | right
        if value < size:
            return value


@dataclasses.dataclass(frozen=True)
class SampleRef:
    """Sample ``sample`` of corpus ``corpus`` in its ``pass_``-th pass over that corpus."""

    corpus: int
    sample: int
    pass_: int


class SampleDirectory:
    """An opened sample directory. Corpus files are checked against the fingerprints recorded at build.

    ``corpus_paths`` relocates the corpora (same order as at build) when they moved. Pickling keeps only
    paths: DataLoader workers re-open the memory maps.
    """

    def __init__(self, path: str | Path, corpus_paths: Sequence[str] | None = None, verify: bool = True):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise DataError(
                f"{self.path}: not a sample directory (no {META_FILE}); build one with "
                "python -m data_tools.build_samples"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{meta_path}: unreadable ({exc}); delete the directory and rebuild it") from exc
        if self.meta.get("format") != FORMAT_NAME or self.meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{meta_path}: format {self.meta.get('format')!r} version "
                f"{self.meta.get('format_version')!r}; this code reads {FORMAT_NAME!r} version "
                f"{FORMAT_VERSION}: rebuild the sample directory"
            )
        recorded = [c["path"] for c in self.meta["corpora"]]
        if corpus_paths is not None and len(corpus_paths) != len(recorded):
            raise DataError(
                f"{self.path} was built from {len(recorded)} corpora, {len(corpus_paths)} paths given"
            )
        self.corpus_paths = [str(p) for p in (corpus_paths or recorded)]
        self.seq_length = int(self.meta["seq_length"])
        self.num_variants = int(self.meta["num_variants"])
        self.seed = int(self.meta["seed"])
        self.objectives = ObjectiveConfig(**self.meta["inputs"]["objectives"])
        self._corpora: list[IndexedDataset] | None = None
        if verify:
            self.verify_corpora()

    def verify_corpora(self) -> None:
        for i, prefix in enumerate(self.corpus_paths):
            self.corpus(i)
            expected = self.meta["inputs"]["corpora"][i]["fingerprints"]
            actual = corpus_fingerprints(prefix)
            for kind in ("idx", "bin"):
                if actual[kind] != expected[kind]:
                    raise DataError(
                        f"{prefix}.{kind} changed since the sample directory {self.path} was built from "
                        "it; rebuild the samples (python -m data_tools.build_samples) or restore the "
                        "corpus"
                    )

    def check_tokenizer(self, tokenizer: GLMTokenizer) -> None:
        built = self.meta["inputs"]["tokenizer"]
        if not same_tokenizer(built, tokenizer_identity(tokenizer)):
            raise DataError(
                f"{self.path / META_FILE}: samples were built for tokenizer {built['name']!r} "
                f"({built['num_tokens']} tokens) but the model uses {tokenizer.name!r} "
                f"({tokenizer.num_tokens} tokens); set model.tokenizer to match or rebuild the samples"
            )

    def corpus(self, i: int) -> IndexedDataset:
        if self._corpora is None:
            self._corpora = [IndexedDataset(p) for p in self.corpus_paths]
        return self._corpora[i]

    def split(self, name: str) -> SplitSamples:
        return SplitSamples(self, name)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_corpora"] = None
        return state


class SplitSamples:
    """The samples of one split, over all corpora of the blend."""

    def __init__(self, directory: SampleDirectory, name: str):
        self.directory = directory
        self.name = name
        self.split_id = split_index(name)
        info = directory.meta["splits"][name]
        self.blend_counts = [int(c) for c in info["blend_counts"]]
        self.corpus_sizes = [int(c["samples"]) for c in info["corpora"]]
        self.size = int(info["blend_size"])
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    def array(self, name: str, corpus: int | None = None) -> np.ndarray:
        key = (-1 if corpus is None else corpus, name)
        if key not in self._arrays:
            folder = self.directory.path / self.name
            if corpus is not None:
                folder = folder / f"corpus-{corpus}"
            self._arrays[key] = np.load(folder / f"{name}.npy", mmap_mode="r")
        return self._arrays[key]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    # -- which sample ---------------------------------------------------------------------------------
    def locate(self, position: int, shuffle: bool) -> SampleRef:
        """The sample at stream ``position`` (epochs concatenated; shuffled per epoch when ``shuffle``)."""
        if self.size == 0:
            raise DataError(
                f"split {self.name!r} of {self.directory.path} has no samples; adjust the split "
                "proportions or add data"
            )
        epoch, index = divmod(position, self.size)
        if shuffle:
            index = shuffled_position(index, self.size, epoch_key(self.directory.seed, self.split_id, epoch))
        corpus = int(self.array("blend_corpus")[index])
        passes = epoch * self.blend_counts[corpus] + int(self.array("blend_index")[index])
        return SampleRef(corpus, passes % self.corpus_sizes[corpus], passes // self.corpus_sizes[corpus])

    # -- its contents ---------------------------------------------------------------------------------
    def segments(self, corpus: int, sample: int) -> tuple[np.ndarray, np.ndarray]:
        offsets = self.array("sample_offsets", corpus)
        rows = slice(int(offsets[sample]), int(offsets[sample + 1]))
        return np.asarray(self.array("segments", corpus)[rows]), np.asarray(
            self.array("segment_eos", corpus)[rows]
        )

    def structure(self, corpus: int, sample: int) -> SampleStructure:
        segments, eos = self.segments(corpus, sample)
        dataset = self.directory.corpus(corpus)
        return SampleStructure(
            segments[:, 0],
            segments[:, 1],
            segments[:, 2],
            eos.astype(bool),
            lambda document: sentence_bounds(dataset, document),
        )

    def tokens(
        self, corpus: int, sample: int, command_cls: int, command_eos: int, length: int | None = None
    ) -> np.ndarray:
        """The packed sample ``[CLS] doc [eos] ...`` (int64), cut to ``length`` tokens when given."""
        segments, eos = self.segments(corpus, sample)
        dataset = self.directory.corpus(corpus)
        pieces = []
        for (_, start, end), closes in zip(segments.tolist(), eos.tolist()):
            pieces.append([command_cls])
            pieces.append(dataset.tokens(start, end))
            if closes:
                pieces.append([command_eos])
        sample_tokens = np.concatenate(pieces).astype(np.int64)
        return sample_tokens if length is None else sample_tokens[:length]

    def stored_draw(self, corpus: int, sample: int, variant: int) -> SpanDraw:
        k = self.directory.num_variants
        if not 0 <= variant < k:
            raise DataError(
                f"{self.directory.path} holds {k} precomputed variants; variant {variant} requested "
                "(use online masking to draw more)"
            )
        row = sample * k + variant
        offsets = self.array("span_offsets", corpus)
        spans = np.asarray(
            self.array("spans", corpus)[int(offsets[row]) : int(offsets[row + 1])], dtype=np.int64
        )
        return SpanDraw(
            Objective(int(self.array("objective", corpus)[sample, variant])),
            bool(self.array("suffix", corpus)[sample, variant]),
            int(self.array("used_length", corpus)[sample, variant]),
            spans,
        )

    def online_draw(self, corpus: int, sample: int, variant: int, objectives: ObjectiveConfig) -> SpanDraw:
        rng = span_rng(self.directory.seed, corpus, self.split_id, sample, variant)
        return draw_spans(rng, self.structure(corpus, sample), objectives, self.directory.seq_length)

    def draw(self, ref: SampleRef, online_objectives: ObjectiveConfig | None = None) -> SpanDraw:
        """The spans of ``ref``: precomputed variant ``pass mod K``, or drawn online for variant ``pass``."""
        if online_objectives is not None:
            return self.online_draw(ref.corpus, ref.sample, ref.pass_, online_objectives)
        if self.directory.num_variants == 0:
            raise DataError(
                f"{self.directory.path} was built without span variants (num_variants 0); enable "
                "online masking or rebuild with num_variants > 0"
            )
        return self.stored_draw(ref.corpus, ref.sample, ref.pass_ % self.directory.num_variants)

    def layout(
        self, ref: SampleRef, draw: SpanDraw, command: CommandTokens, objectives: ObjectiveConfig
    ) -> GLMLayout:
        """The padded GLM layout of ``ref`` with ``draw``'s spans (layout options from ``objectives``)."""
        tokens = self.tokens(ref.corpus, ref.sample, command.cls, command.eos, draw.used_length)
        rng = stream_rng(self.directory.seed, STREAM_LAYOUT, ref.corpus, self.split_id, ref.sample, ref.pass_)
        return build_glm_layout(
            tokens,
            draw.spans,
            draw.objective,
            command,
            suffix=draw.suffix,
            task_mask=objectives.task_mask,
            rng=rng,
            shuffle_spans=objectives.shuffle_spans,
            block_positions=objectives.block_positions,
            block_mask_prob=objectives.block_mask_prob,
            pad_to=self.directory.seq_length,
        )
