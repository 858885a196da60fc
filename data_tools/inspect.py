"""glm-inspect: statistics of a corpus or a sample directory, and samples rendered as text.

    python -m data_tools.inspect outputs/demo/corpus/austen          # a .bin/.idx prefix
    python -m data_tools.inspect outputs/samples/glm-samples-0123abcd --show 3     # a sample directory
    python -m data_tools.inspect ... --json

A corpus: tokens, documents, sentences, sentence- and document-length distributions. A sample directory
(recomputed from its arrays, per split): per objective the share of sample variants, masked fraction of
the used length, spans per sample, mean span length and span-length histogram; the padding fraction.
``--show N`` lays out the first N samples of the split's stream as training sees them: Part A with its
mask tokens, Part B as ``<sop> ... <eop>`` pieces, and with ``--positions`` every token's
(position, block position).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from data_tools.errors import DataError, run_cli
from data_tools.indexed import IndexedDataset
from data_tools.layout import GLMLayout
from data_tools.sample_format import META_FILE, SPLIT_NAMES, read_corpus_sidecar
from data_tools.sample_reader import SampleDirectory, SplitSamples
from data_tools.sample_stats import HISTOGRAM_BINS, SplitStatistics
from data_tools.tokenizer import GLMTokenizer, load_tokenizer

_QUANTILES = (0.5, 0.9, 0.99)
_CHUNK = 1 << 16


def _distribution(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"count": 0}
    result = {
        "count": int(values.size),
        "mean": float(values.mean()),
        "min": int(values.min()),
        "max": int(values.max()),
    }
    for q in _QUANTILES:
        result[f"p{int(q * 100)}"] = float(np.quantile(values, q))
    edges = 2 ** np.arange(int(np.log2(max(int(values.max()), 1))) + 2)
    counts, _ = np.histogram(values, bins=np.concatenate(([0], edges)))
    result["log2_histogram"] = {f"<{int(e)}": int(c) for e, c in zip(edges, counts) if c}
    return result


def _tokenizer_name(recorded: object) -> str | None:
    """The tokenizer name in a corpus sidecar (glm-preprocess writes an object with ``name``)."""
    if isinstance(recorded, dict):
        recorded = recorded.get("name")
    return recorded if isinstance(recorded, str) else None


def corpus_statistics(prefix: str) -> dict:
    corpus = IndexedDataset(prefix)
    sentence_lengths = np.asarray(corpus.sequence_lengths, dtype=np.int64)
    bounds = np.asarray(corpus.document_indices, dtype=np.int64)
    cumulative = np.concatenate(([0], np.cumsum(sentence_lengths)))
    sidecar = read_corpus_sidecar(prefix) or {}
    return {
        "corpus": prefix,
        "tokenizer": _tokenizer_name(sidecar.get("tokenizer")),
        "dtype": corpus.dtype.name,
        "tokens": int(corpus.num_tokens),
        "documents": corpus.num_documents,
        "sentences": corpus.sequence_count,
        "sentence_tokens": _distribution(sentence_lengths),
        "document_tokens": _distribution(cumulative[bounds[1:]] - cumulative[bounds[:-1]]),
        "document_sentences": _distribution(np.diff(bounds)),
    }


def split_statistics(samples: SplitSamples) -> dict:
    """Statistics of one split recomputed from its arrays, chunk by chunk, summed over corpora."""
    directory = samples.directory
    k = directory.num_variants
    stats = SplitStatistics(directory.seq_length)
    for corpus, size in enumerate(samples.corpus_sizes):
        offsets = samples.array("sample_offsets", corpus)
        segments = samples.array("segments", corpus)
        eos = samples.array("segment_eos", corpus)
        span_offsets = samples.array("span_offsets", corpus)
        for first in range(0, size, _CHUNK):
            last = min(first + _CHUNK, size)
            rows = slice(int(offsets[first]), int(offsets[last]))
            segment_lengths = 1 + segments[rows, 2] - segments[rows, 1] + eos[rows]
            owner = np.repeat(np.arange(last - first), np.diff(offsets[first : last + 1]))
            raw = np.bincount(owner, weights=segment_lengths, minlength=last - first).astype(np.int64)
            span_rows = slice(int(span_offsets[first * k]), int(span_offsets[last * k]))
            stats.add(
                samples.array("objective", corpus)[first:last],
                samples.array("suffix", corpus)[first:last],
                samples.array("used_length", corpus)[first:last],
                np.diff(span_offsets[first * k : last * k + 1]),
                np.asarray(samples.array("spans", corpus)[span_rows, 1]),
                raw,
            )
    return stats.as_dict()


def directory_statistics(directory: SampleDirectory) -> dict:
    meta = directory.meta
    return {
        "directory": str(directory.path),
        "hash": meta["hash"],
        "seq_length": directory.seq_length,
        "num_variants": directory.num_variants,
        "seed": directory.seed,
        "tokenizer": meta["inputs"]["tokenizer"]["name"],
        "corpora": meta["corpora"],
        "objectives": meta["inputs"]["objectives"],
        "splits": {name: split_statistics(directory.split(name)) for name in SPLIT_NAMES},
    }


# -- text rendering ---------------------------------------------------------------------------------------


def _format_distribution(name: str, d: dict) -> str:
    if not d.get("count"):
        return f"| {name} | 0 | | | | | |"
    return (
        f"| {name} | {d['count']} | {d['mean']:.1f} | {d['p50']:.0f} | {d['p90']:.0f} | {d['p99']:.0f} | "
        f"{d['max']} |"
    )


def format_corpus_statistics(stats: dict) -> str:
    lines = [
        f"corpus {stats['corpus']} ({stats['dtype']} tokens, tokenizer {stats['tokenizer']})",
        f"tokens {stats['tokens']}, documents {stats['documents']}, sentences {stats['sentences']}",
        "",
        "| distribution | count | mean | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        _format_distribution("sentence tokens", stats["sentence_tokens"]),
        _format_distribution("document tokens", stats["document_tokens"]),
        _format_distribution("document sentences", stats["document_sentences"]),
    ]
    return "\n".join(lines)


def _format_histogram(histogram: list[int], shown: int = 16) -> str:
    cells = [
        f"{length + 1}{'+' if length + 1 == HISTOGRAM_BINS else ''}:{count}"
        for length, count in enumerate(histogram)
        if count
    ]
    return " ".join(cells[:shown]) + (" ..." if len(cells) > shown else "")


def format_directory_statistics(stats: dict) -> str:
    lines = [
        f"sample directory {stats['directory']}",
        f"seq_length {stats['seq_length']}, {stats['num_variants']} variant(s), seed {stats['seed']}, "
        f"tokenizer {stats['tokenizer']}",
        "corpora: " + ", ".join(f"{c['path']} (weight {c['weight']:g})" for c in stats["corpora"]),
    ]
    for name, split in stats["splits"].items():
        lines += [
            "",
            f"## {name}: {split['samples']} samples, {split['raw_tokens']} tokens, "
            f"padding fraction {split['padding_fraction']:.4f}, "
            f"unused tail fraction {split['unused_tail_fraction']:.4f}",
        ]
        if not split["objectives"]:
            continue
        lines += [
            "| objective | share | masked fraction | spans / sample | mean span length | suffix layout | "
            "span length: count |",
            "|---|---|---|---|---|---|---|",
        ]
        for objective, o in split["objectives"].items():
            lines.append(
                f"| {objective} | {o['share']:.3f} | {o['masked_fraction']:.4f} | "
                f"{o['spans_per_sample']:.2f} | {o['mean_span_length']:.2f} | "
                f"{o['suffix_layout_share']:.2f} | {_format_histogram(o['span_length_histogram'])} |"
            )
    return "\n".join(lines)


def render_layout(layout: GLMLayout, tokenizer: GLMTokenizer, positions: bool) -> list[str]:
    """Part A with its mask tokens, then Part B as ``<sop> span <eop>`` pieces (decoded targets)."""
    command = tokenizer.command
    real = int(np.count_nonzero(layout.position_ids[1])) + layout.sep
    tokens, targets = layout.tokens[:real].tolist(), layout.targets[:real].tolist()
    if positions:
        pairs = zip(tokens, layout.position_ids[0, :real].tolist(), layout.position_ids[1, :real].tolist())
        cells = [f"{tokenizer.id_to_token(t)}({p},{b})" for t, p, b in pairs]
        return ["Part A: " + " ".join(cells[: layout.sep]), "Part B: " + " ".join(cells[layout.sep :])]
    part_a, masks, run = [], set(command.mask_ids()), []
    for token in tokens[: layout.sep]:
        if token in masks:
            part_a += [tokenizer.decode(run), tokenizer.id_to_token(token)]
            run = []
        else:
            run.append(token)
    part_a.append(tokenizer.decode(run))
    starts = [i for i in range(layout.sep, real) if tokens[i] == command.sop] + [real]
    pieces = []
    for start, end in zip(starts[:-1], starts[1:]):
        body = [t for t in targets[start:end] if t != command.eop]
        closing = " <eop>" if targets[end - 1] == command.eop else ""
        pieces.append(f"<sop> {tokenizer.decode(body)}{closing}")
    return ["Part A: " + " ".join(p for p in part_a if p), "Part B: " + " ".join(pieces)]


def show_samples(
    directory: SampleDirectory, split: str, count: int, epoch: int, tokenizer: GLMTokenizer, positions: bool
) -> str:
    samples = directory.split(split)
    if len(samples) == 0:
        raise DataError(f"split {split!r} of {directory.path} has no samples to show")
    lines = []
    for offset in range(min(count, len(samples))):
        ref = samples.locate(epoch * len(samples) + offset, shuffle=split == "train")
        draw = samples.draw(ref)
        layout = samples.layout(ref, draw, tokenizer.command, directory.objectives)
        layout_kind = " (suffix layout)" if draw.suffix else ""
        lines += [
            f"--- {split} position {epoch * len(samples) + offset}: corpus {ref.corpus} sample {ref.sample} "
            f"variant {ref.pass_ % directory.num_variants}; {draw.objective.name.lower()} objective"
            f"{layout_kind}, {len(draw.spans)} span(s), used {draw.used_length} tokens, sep {layout.sep}"
        ]
        lines += render_layout(layout, tokenizer, positions)
    return "\n".join(lines)


def show_documents(prefix: str, count: int, tokenizer: GLMTokenizer) -> str:
    corpus = IndexedDataset(prefix)
    lines = []
    for document in range(min(count, corpus.num_documents)):
        first, last = corpus.document_sequence_range(document)
        sentences = [tokenizer.decode(corpus[i].tolist()) for i in range(first, last)]
        lines.append(f"--- document {document} ({last - first} sentences): " + " | ".join(sentences))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="a corpus prefix (<prefix>.bin/.idx) or a sample directory")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="render N samples (or documents)")
    parser.add_argument("--split", default="train", choices=SPLIT_NAMES, help="split for --show")
    parser.add_argument("--epoch", type=int, default=0, help="epoch for --show (selects order and variant)")
    parser.add_argument(
        "--positions", action="store_true", help="with --show: each token's (position, block)"
    )
    parser.add_argument("--tokenizer", help="tokenizer for --show (default: the recorded one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("glm-inspect", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if (path / META_FILE).is_file():
        directory = SampleDirectory(path, verify=False)
        stats = directory_statistics(directory)
        text = json.dumps(stats, indent=2) if args.json else format_directory_statistics(stats)
        if args.show:
            tokenizer = load_tokenizer(args.tokenizer or stats["tokenizer"])
            directory.check_tokenizer(tokenizer)
            text += "\n\n" + show_samples(
                directory, args.split, args.show, args.epoch, tokenizer, args.positions
            )
    else:
        prefix = str(path.with_suffix("")) if path.suffix in (".bin", ".idx") else str(path)
        stats = corpus_statistics(prefix)
        text = json.dumps(stats, indent=2) if args.json else format_corpus_statistics(stats)
        if args.show:
            name = args.tokenizer or stats["tokenizer"]
            if not isinstance(name, str):
                raise DataError(f"{prefix}: no tokenizer recorded in {prefix}.meta.json; pass --tokenizer")
            text += "\n\n" + show_documents(prefix, args.show, load_tokenizer(name))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
