"""Benchmark glm-preprocess against the bare tokenizer on the same text, and its peak memory.

In one run, on the same documents:

* bare: ``GLMTokenizer.encode_batch`` (HF tokenizers' native parallel batch encoder, all cores) over the
  documents in 1 MB batches; only the encode calls are timed (no reading, no sentence splitting, no writing);
* glm-preprocess with 1 and 2 workers (``--workers``), timed end to end inside a fresh process: reading,
  cleaning, sentence splitting, tokenizing, writing the shards, merging, meta.json;
* peak RSS of glm-preprocess (1 worker) on a small and on the full input: flat memory means about equal.

Undecodable bytes become U+FFFD (``--errors replace``; the GCIDE dictionary holds a few cp1252 bytes).
MB/s = UTF-8 bytes of text / wall seconds; "vs bare" = pipeline MB/s / bare MB/s (aim: >= 0.80;
Megatron's preprocess_data.py reaches about 0.65 of its tokenizer).

The corpus: real English text built from Debian packages by the shared ``build_bench_corpus.sh``
(``apt-get update`` once, then ``build_bench_corpus.sh bench-data all``: about 125 MB of plain text in
``bench-data/txt``, git-ignored). Any folder or file of text (or JSON lines, ``--format jsonl``) works:

    python benchmarks/bench_preprocess.py bench-data/txt --size-mb 100 --small-mb 10
    python benchmarks/bench_preprocess.py run/demo/corpus --format jsonl --size-mb 4 --small-mb 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.preprocess import PreprocessOptions, preprocess  # noqa: E402
from data_tools.progress import CorpusStats  # noqa: E402
from data_tools.readers import ReadOptions, discover_inputs, full_segments, read_documents  # noqa: E402
from data_tools.tokenizer import load_tokenizer  # noqa: E402


def _cut_input(source: str, input_format: str, size: int, path: Path) -> int:
    """Write the first ``size`` bytes of the inputs' concatenation to ``path``, cut at a record boundary."""
    separator = b"\n" if input_format == "jsonl" else b"\n\n"
    written = 0
    with open(path, "wb") as out:
        for file in discover_inputs([source], input_format):
            data = Path(file.path).read_bytes()
            if file.compressed:
                raise SystemExit(f"{file.path}: give the benchmark uncompressed text")
            if written + len(data) > size:
                cut = data.find(separator, size - written)
                data = data[: cut + len(separator)] if cut >= 0 else data
            out.write(data.rstrip(b"\n") + separator)
            written += len(data) + len(separator)
            if written >= size:
                break
    return path.stat().st_size


def _peak_rss_kb() -> int:
    """This process's peak resident memory since exec (VmHWM). getrusage's ru_maxrss would also count the
    benchmark parent's memory at the fork, which Linux carries over into a child's maximum."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(options_json: str) -> None:
    """Run glm-preprocess in this fresh process; print its timing, counts and peak memory as JSON."""
    options = PreprocessOptions(**json.loads(options_json))
    started = time.perf_counter()
    stats = preprocess(options)
    seconds = time.perf_counter() - started
    own = _peak_rss_kb()
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"seconds": seconds, "stats": stats.to_json(), "rss_kb": own, "worker_rss_kb": workers}))


def _run_pipeline(path: Path, prefix: Path, workers: int, args) -> dict:
    options = dict(inputs=[str(path)], output_prefix=str(prefix), tokenizer=args.tokenizer, workers=workers,
                   input_format=args.format, text_document=args.text_document,
                   wrapped_lines=args.wrapped_lines, errors="replace", progress=False)  # fmt: skip
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(options)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise SystemExit(f"glm-preprocess failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _bare(path: Path, args) -> dict:
    """encode_batch over the same documents, 1 MB per call; only the encode calls are timed."""
    tokenizer = load_tokenizer(args.tokenizer)
    read = ReadOptions(text_document=args.text_document, errors="replace")
    stats = CorpusStats()
    segments = full_segments(discover_inputs([str(path)], args.format))
    batches = [batch.texts for batch in read_documents(segments, read, stats) if batch.texts]
    tokenizer.encode_batch(batches[0][:8])  # warm the thread pool
    seconds, tokens = 0.0, 0
    for texts in batches:
        started = time.perf_counter()
        encoded = tokenizer.encode_batch(texts)
        seconds += time.perf_counter() - started
        tokens += sum(map(len, encoded))
    text_bytes = path.stat().st_size  # the bytes the pipeline reads, for the same MB/s basis
    return {
        "seconds": seconds,
        "tokens": tokens,
        "documents": sum(map(len, batches)),
        "text_bytes": text_bytes,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _row(name, workers, seconds, text_bytes, tokens, documents, bare_mbps, rss=""):
    mbps = text_bytes / 1e6 / seconds
    share = f"{mbps / bare_mbps:.2f}" if bare_mbps else "1.00"
    return (f"| {name} | {workers} | {seconds:.2f} | {mbps:.2f} | {tokens / seconds:,.0f} | "
            f"{documents / seconds:,.0f} | {share} | {rss} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", nargs="?", default="bench-data/txt", help="a folder or file of text")
    parser.add_argument("--format", choices=("text", "jsonl"), default="text")
    parser.add_argument("--text-document", choices=("file", "line", "block"), default="block")
    parser.add_argument("--wrapped-lines", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tokenizer", default="bert-base-uncased")
    parser.add_argument("--size-mb", type=float, default=100.0, help="text for the throughput runs")
    parser.add_argument("--small-mb", type=float, default=10.0, help="text for the small memory run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        big, small = workdir / "big.txt", workdir / "small.txt"
        big_bytes = _cut_input(args.input, args.format, int(args.size_mb * 1e6), big)
        small_bytes = _cut_input(args.input, args.format, int(args.small_mb * 1e6), small)
        bare = _bare(big, args)
        bare_mbps = bare["text_bytes"] / 1e6 / bare["seconds"]
        rows = [_row("bare encode_batch", "-", bare["seconds"], bare["text_bytes"], bare["tokens"],
                     bare["documents"], 0.0)]  # fmt: skip
        rss = {}
        for workers in args.workers:
            run = _run_pipeline(big, workdir / f"out{workers}", workers, args)
            s = run["stats"]
            memory = f"{run['rss_kb'] / 1024:.0f} MB" + (
                f" (+ {run['worker_rss_kb'] / 1024:.0f} MB per worker)" if workers > 1 else ""
            )
            rows.append(_row("glm-preprocess", workers, run["seconds"], s["text_bytes"], s["tokens"],
                             s["documents"], bare_mbps, memory))  # fmt: skip
            if workers == 1:
                rss[big_bytes] = run["rss_kb"]
        small_run = _run_pipeline(small, workdir / "small", 1, args)
        rss[small_bytes] = small_run["rss_kb"]
        # The same documents ten times over: only the corpus size changes, not the largest document.
        repeated = workdir / "repeated.txt"
        with open(repeated, "wb") as out:
            for _ in range(10):
                out.write(small.read_bytes())
        repeated_run = _run_pipeline(repeated, workdir / "repeated", 1, args)
        repeated_rss = (repeated.stat().st_size, repeated_run["rss_kb"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"## glm-preprocess vs bare tokenizer ({args.tokenizer})\n")
    print(f"- machine: {_cpu_name()}, {cores} cores available; Python {platform.python_version()}")
    print(f"- input: {args.input}, first {big_bytes / 1e6:.1f} MB ({args.format}, document per "
          f"{args.text_document}, wrapped lines {args.wrapped_lines})")  # fmt: skip
    print("- MB/s = text bytes / wall seconds; vs bare = MB/s / bare MB/s (aim >= 0.80)\n")
    print("| run | workers | seconds | MB/s | tokens/s | docs/s | vs bare | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| input (1 worker) | peak RSS |\n|---|---|")
    for size, kb in sorted(rss.items()):
        print(f"| {size / 1e6:.1f} MB | {kb / 1024:.0f} MB |")
    print(
        f"| {repeated_rss[0] / 1e6:.1f} MB (the {small_bytes / 1e6:.1f} MB input 10 times) | "
        f"{repeated_rss[1] / 1024:.0f} MB |"
    )
    print(
        "\nPeak memory follows the largest document (a whole document is read and prepared at once; the "
        "tokenizer sees it in pieces of 256K characters), not the corpus size."
    )


if __name__ == "__main__":
    main()
