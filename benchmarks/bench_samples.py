"""Sample building time and data-loader throughput at glm-base shapes.

    python benchmarks/bench_samples.py                       # Austen tokenized and repeated to ~100 MB of text
    python benchmarks/bench_samples.py --target-mb 2 --batches 20          # a quick check
    python benchmarks/bench_samples.py --corpus outputs/bench/corpus_text_sentence --mixture glm-10b

1. builds the sample directory (K variants) with each ``--workers`` count, from scratch, timed;
2. times the dataset + collate path (``GLMDataset`` -> ``collate_glm_batch``) at T = ``--seq-length``,
   micro batch ``--micro-batch``, in-process (the cost one loader process pays per batch) and through a
   DataLoader with 2 workers.

What matters is that a loader never bottlenecks a training step: compare "ms per batch" (one process)
with the model's step time at the same micro batch; DataLoader workers divide the former.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.indexed import IndexedDataset, IndexedDatasetWriter, token_dtype  # noqa: E402
from data_tools.objectives import ObjectiveConfig  # noqa: E402
from data_tools.samples import CorpusSpec, SampleSpec, build_samples  # noqa: E402
from data_tools.tokenizer import load_tokenizer  # noqa: E402
from megatron_glm.data import GLMBatchSampler, GLMDataset, build_data_loader, collate_glm_batch  # noqa: E402

AUSTEN = Path(__file__).resolve().parents[1] / "run" / "demo" / "corpus" / "austen-chapters.jsonl"
MIXTURES = {
    "glm-base": ObjectiveConfig(),
    "glm-10b": ObjectiveConfig(
        token_prob=0.5,
        sentence_prob=0.3,
        document_prob=0.2,
        document_min_ratio=0.25,
        task_mask=True,
        block_mask_prob=0.1,
    ),
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def repeated_austen(prefix: Path, target_mb: float, tokenizer: str) -> tuple[str, float]:
    """Austen's chapters (one sequence per naively split sentence), repeated to ~target_mb of text."""
    tok = load_tokenizer(tokenizer)
    chapters = [json.loads(line)["text"] for line in AUSTEN.read_text().splitlines()]
    encoded = [
        [ids for ids in tok.encode_batch([s for s in _SENTENCE_END.split(text) if s.strip()]) if ids]
        for text in chapters
    ]
    text_mb = sum(len(t.encode()) for t in chapters) / 1e6
    copies = max(1, round(target_mb / text_mb))
    with IndexedDatasetWriter(prefix, token_dtype(tok.num_tokens)) as writer:
        for _ in range(copies):
            for sentences in encoded:
                for ids in sentences:
                    writer.add_sequence(ids)
                writer.end_document()
    (Path(str(prefix) + ".meta.json")).write_text(json.dumps({"tokenizer": tok.name}))
    return str(prefix), copies * text_mb


def time_batches(iterator, count: int) -> float:
    next(iterator)  # warm-up: worker start, first memory maps
    started = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", help="a corpus prefix (default: build the repeated Austen corpus)")
    parser.add_argument(
        "--target-mb", type=float, default=100.0, help="text size of the repeated Austen corpus"
    )
    parser.add_argument("--tokenizer", default="bert-base-uncased")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--num-variants", type=int, default=4)
    parser.add_argument("--mixture", choices=sorted(MIXTURES), default="glm-base")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="sample-building processes")
    parser.add_argument("--batches", type=int, default=200, help="batches timed per loader configuration")
    parser.add_argument("--work-dir", default="outputs/bench/samples")
    args = parser.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.corpus:
        prefix, text_mb = args.corpus, float("nan")
    else:
        started = time.perf_counter()
        prefix, text_mb = repeated_austen(
            work / f"austen-{args.target_mb:g}mb", args.target_mb, args.tokenizer
        )
        print(
            f"corpus: {text_mb:.1f} MB of text tokenized and written in {time.perf_counter() - started:.1f} s"
        )
    corpus = IndexedDataset(prefix)
    spec = SampleSpec(
        [CorpusSpec(prefix)],
        args.tokenizer,
        args.seq_length,
        MIXTURES[args.mixture],
        args.num_variants,
        (949, 50, 1),
        1234,
    )

    rows = []
    directory = None
    for workers in args.workers:
        output = work / f"samples-w{workers}"
        shutil.rmtree(output, ignore_errors=True)
        started = time.perf_counter()
        build_samples(spec, output, workers=workers)
        seconds = time.perf_counter() - started
        meta = json.loads((output / "meta.json").read_text())
        samples = sum(s["blend_size"] for s in meta["splits"].values())
        variants = samples * args.num_variants
        rows.append(
            f"| build samples, {workers} process(es) | {seconds:.2f} s | {samples / seconds:,.0f} samples/s, "
            f"{variants / seconds:,.0f} variants/s, {corpus.num_tokens / seconds / 1e6:.2f} M corpus tokens/s |"
        )
        directory = output
    padding = json.loads((directory / "meta.json").read_text())["splits"]["train"]["statistics"][
        "padding_fraction"
    ]

    dataset = GLMDataset(directory, "train", args.tokenizer)
    sampler = GLMBatchSampler(micro_batch_size=args.micro_batch, global_batch_size=args.micro_batch)
    in_process = iter(collate_glm_batch([dataset[q] for q in positions]) for positions in sampler)
    seconds = time_batches(in_process, args.batches)
    rows.append(
        f"| dataset + collate, in process | {1000 * seconds / args.batches:.2f} ms/batch | "
        f"{args.batches / seconds:,.1f} batches/s, {args.batches * args.micro_batch / seconds:,.0f} samples/s |"
    )
    loader = build_data_loader(
        dataset,
        GLMBatchSampler(micro_batch_size=args.micro_batch, global_batch_size=args.micro_batch),
        num_workers=2,
    )
    seconds = time_batches(iter(loader), args.batches)
    rows.append(
        f"| DataLoader, 2 workers | {1000 * seconds / args.batches:.2f} ms/batch | "
        f"{args.batches / seconds:,.1f} batches/s |"
    )

    print(
        f"\nhardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}"
    )
    print(
        f"corpus {prefix}: {corpus.num_tokens:,} tokens, {corpus.num_documents:,} documents, "
        f"{corpus.sequence_count:,} sentences; mixture {args.mixture}, T = {args.seq_length}, "
        f"K = {args.num_variants}, micro batch {args.micro_batch}; train padding fraction {padding:.5f}"
    )
    print("\n| stage | time | rate |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
