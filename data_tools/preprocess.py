"""glm-preprocess: raw text to a Megatron MMIDIDX corpus, one sequence per sentence, documents in the index.

``python -m data_tools.preprocess --input corpus/ --output-prefix data/corpus --tokenizer bert-base-uncased``

How it runs: the inputs (this rank's share of them in multi-node mode) are cut at record boundaries into
units; each unit is read, cleaned, split into sentences, tokenized in batches and written to its own
shard by one of ``--workers`` processes, so there is no single writer. The shards are then concatenated
in input order into ``<prefix>.bin/.idx``, so the output is the same byte for byte for any number of
workers, and the same as merging the rank outputs of a multi-node run.

Everything is written under temporary names (a ``<prefix>.tmp-<pid>/`` folder and ``*.tmp-<pid>`` files,
removed on any error or Ctrl-C/SIGTERM) and renamed at the end: the ``.idx`` appears last, and a
``.meta.json`` from an earlier run is removed before the new pair is committed.

``<prefix>.meta.json`` (written last, atomically) tells the sample builder what the corpus holds:

================  ================================================================================
field             meaning
================  ================================================================================
format            ``"megatron-mmidx-v1"``
writer            ``"glm-preprocess"``, ``meta_version`` 1
tokenizer         ``name`` (as given to ``load_tokenizer``), ``num_tokens``, ``text_vocab_size``,
                  ``padded_vocab_size`` (multiple of 128), ``command_tokens`` (name -> id)
token_dtype       ``"uint16"`` or ``"int32"``
sequence_unit     ``"sentence"`` or ``"document"`` (``--no-split-sentences``)
appended_tokens   ``[]``: nothing is added to documents (no [CLS], no eos)
settings          the text options (json_key, input_format, text_document, split_sentences,
                  wrapped_lines, standardize_punctuation, errors, skip_bad_lines)
counts            documents, sequences, tokens, text_bytes, input_bytes, input_files,
                  skipped and repaired (reason -> count), skipped_examples (file:line)
rank, world_size  which share of the inputs this output holds (0 and 1 for a whole corpus)
merged_from       the shard prefixes, for outputs of ``--merge``
command, created  the command line and the UTC time; ``seconds`` the wall time
================  ================================================================================
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import os
import shlex
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_tools.corpus_encoder import CorpusEncoder, TextOptions
from data_tools.errors import EXIT_FAILED, EXIT_INTERRUPTED, DataError
from data_tools.indexed import IndexedDatasetWriter, merge_indexed, rename_dataset, token_dtype
from data_tools.progress import CorpusStats, Progress, format_summary
from data_tools.readers import (
    TEXT_DOCUMENT_UNITS,
    ReadOptions,
    Segment,
    discover_inputs,
    full_segments,
    read_documents,
    split_segments,
)
from data_tools.shards import merge_shards, meta_path, rank_output_prefix, write_meta
from data_tools.tokenizer import GLMTokenizer, load_tokenizer
from data_tools.workers import run_tasks

_UNITS_PER_WORKER = 4  # more units than workers balances uneven files


@dataclasses.dataclass
class PreprocessOptions:
    inputs: list[str]
    output_prefix: str
    tokenizer: str
    json_key: str = "text"
    input_format: str = "auto"  # "auto" | "jsonl" | "text"
    text_document: str = "file"  # plain text: a document per "file" | "line" | "block"
    split_sentences: bool = True
    wrapped_lines: bool = False
    standardize_punctuation: bool = True
    errors: str = "strict"
    skip_bad_lines: bool = False
    workers: int = 1
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    log_interval: float = 30.0
    batch_bytes: int = 1 << 20  # text per tokenizer call
    min_unit_bytes: int = 1 << 20  # inputs are cut into units of at least this size
    command: str = ""

    def text_options(self) -> TextOptions:
        return TextOptions(self.split_sentences, self.wrapped_lines, self.standardize_punctuation)

    def read_options(self) -> ReadOptions:
        return ReadOptions(
            self.json_key, self.text_document, self.errors, self.skip_bad_lines, self.batch_bytes
        )

    def settings(self) -> dict:
        """The options that shape the corpus content (shards must agree on them to be merged)."""
        return {
            "json_key": self.json_key,
            "input_format": self.input_format,
            "text_document": self.text_document,
            "split_sentences": self.split_sentences,
            "wrapped_lines": self.wrapped_lines,
            "standardize_punctuation": self.standardize_punctuation,
            "errors": self.errors,
            "skip_bad_lines": self.skip_bad_lines,
        }

    def validate(self) -> None:
        if self.output_prefix.endswith((".bin", ".idx")):
            raise DataError(f"--output-prefix {self.output_prefix!r} is a prefix: leave out .bin/.idx")
        if self.workers < 1:
            raise DataError(f"--workers must be at least 1, got {self.workers}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DataError(
                f"rank {self.rank} is not in 0..{self.world_size - 1} (world size {self.world_size})"
            )
        if self.input_format not in ("auto", "jsonl", "text"):
            raise DataError(f"unknown input format {self.input_format!r}: use auto, jsonl or text")
        if self.text_document not in TEXT_DOCUMENT_UNITS:
            raise DataError(
                f"unknown --text-document {self.text_document!r}: use {', '.join(TEXT_DOCUMENT_UNITS)}"
            )
        if self.errors not in ("strict", "replace"):
            raise DataError(f"unknown --errors {self.errors!r}: use strict or replace")
        if not self.json_key:
            raise DataError("--json-key must not be empty")


@dataclasses.dataclass(frozen=True)
class _Unit:
    """One worker task: consecutive segments of input written to one shard."""

    segments: tuple[Segment, ...]
    shard_prefix: str
    tokenizer: str
    text: TextOptions
    read: ReadOptions
    dtype: str


@functools.lru_cache(maxsize=4)
def _encoder(tokenizer: str, text: TextOptions) -> CorpusEncoder:
    return CorpusEncoder(load_tokenizer(tokenizer), text)


def _glibc_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def _release_free_memory() -> None:
    """glibc keeps the tokenizer's freed buffers in per-thread arenas; without handing them back, resident
    memory creeps up with the corpus although live memory is flat (measured: 175 -> 210 MB over 100 MB)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _prepared_batches(unit: _Unit, encoder: CorpusEncoder, stats: CorpusStats):
    for batch in read_documents(unit.segments, unit.read, stats):
        yield batch, encoder.prepare(batch.texts) if batch.texts else []


def encode_unit(unit: _Unit, report) -> CorpusStats:
    """Read, split, tokenize and write one unit to its shard; ``report(bytes, documents, tokens)``.

    A helper thread reads and prepares the next batch (Python, holding the GIL) while this one is in the
    tokenizer (native code, GIL released), so the Python work hides behind tokenizing.
    """
    encoder = _encoder(unit.tokenizer, unit.text)
    stats = CorpusStats()  # the reading thread's counts
    empty_after_tokenization = 0
    batches = _prepared_batches(unit, encoder, stats)
    with IndexedDatasetWriter(unit.shard_prefix, unit.dtype) as writer, ThreadPoolExecutor(1) as reader:
        upcoming = reader.submit(next, batches, None)
        while (item := upcoming.result()) is not None:
            upcoming = reader.submit(next, batches, None)
            batch, prepared = item
            encoded = encoder.encode_prepared(prepared)
            base = writer.sequence_count
            writer.add_sequences(encoded.tokens, encoded.sequence_lengths)
            writer.add_document_boundaries(encoded.document_ends + base)
            stats.documents += encoded.document_count
            stats.sequences += encoded.sequence_lengths.size
            stats.tokens += encoded.tokens.size
            empty_after_tokenization += encoded.empty_documents
            report(batch.input_bytes, encoded.document_count, encoded.tokens.size)
            del encoded, prepared
            _release_free_memory()
    if empty_after_tokenization:
        stats.skipped["empty after tokenization"] += empty_after_tokenization
    return stats


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _tokenizer_threads(workers: int) -> str:
    return os.environ.get("RAYON_NUM_THREADS") or str(max(1, available_cores() // workers))


def tokenizer_meta(tokenizer: GLMTokenizer) -> dict:
    return {
        "name": tokenizer.name,
        "num_tokens": tokenizer.num_tokens,
        "text_vocab_size": tokenizer.text_vocab_size,
        "padded_vocab_size": tokenizer.padded_vocab_size(),
        "command_tokens": dataclasses.asdict(tokenizer.command),
    }


def preprocess(options: PreprocessOptions) -> CorpusStats:
    """Write ``options.output_prefix`` (or this rank's share of it) and its meta.json; returns the counts."""
    started = time.monotonic()
    options.validate()
    tokenizer = load_tokenizer(options.tokenizer)
    dtype = token_dtype(tokenizer.padded_vocab_size())
    segments = full_segments(discover_inputs(options.inputs, options.input_format))
    if options.world_size > 1:
        pieces = split_segments(segments, options.world_size, options.text_document)
        segments = pieces[options.rank] if options.rank < len(pieces) else []
    output = rank_output_prefix(options.output_prefix, options.rank, options.world_size)
    parts = options.workers * _UNITS_PER_WORKER if options.workers > 1 else 1
    unit_segments = split_segments(segments, parts, options.text_document, options.min_unit_bytes) or [[]]
    workdir = Path(f"{output}.tmp-{os.getpid()}")
    label = "glm-preprocess" + (
        f" rank {options.rank}/{options.world_size}" if options.world_size > 1 else ""
    )
    progress = Progress(sum(s.size for s in segments), label, options.progress, options.log_interval)
    try:
        workdir.mkdir(parents=True)
        units = [
            _Unit(
                tuple(s),
                str(workdir / f"unit-{i:06d}"),
                options.tokenizer,
                options.text_options(),
                options.read_options(),
                dtype.name,
            )
            for i, s in enumerate(unit_segments)
        ]
        if options.workers == 1 or len(units) == 1:
            results = [encode_unit(unit, progress.update) for unit in units]
        else:
            env = {"RAYON_NUM_THREADS": _tokenizer_threads(options.workers)}
            results = run_tasks(encode_unit, units, options.workers, progress.update, env)
        progress.close()
        stats = CorpusStats()
        for result in results:
            stats += result
        meta_path(output).unlink(missing_ok=True)
        shards = [unit.shard_prefix for unit in units]
        if len(shards) == 1:
            rename_dataset(shards[0], output)
        else:
            merge_indexed(shards, output)
        write_meta(
            meta_path(output),
            tokenizer=tokenizer_meta(tokenizer),
            token_dtype=dtype.name,
            sequence_unit="sentence" if options.split_sentences else "document",
            settings=options.settings(),
            # a file cut between ranks counts in the rank holding its start, so rank counts add up
            counts=stats.to_json() | {"input_files": sum(s.start == 0 for s in segments)},
            rank=options.rank,
            world_size=options.world_size,
            command=options.command,
            seconds=round(time.monotonic() - started, 3),
        )
        return stats
    finally:
        progress.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _env_rank() -> tuple[int, int, str]:
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        rank, size = os.environ.get(rank_var, ""), os.environ.get(size_var, "")
        if rank.isdigit() and size.isdigit():
            return int(rank), int(size), f"{rank_var}/{size_var}"
    return 0, 1, ""


_EPILOG = """\
examples:
  # JSON lines (the "text" field), several files and a folder, 8 worker processes
  %(prog)s --input a.jsonl b.jsonl.gz shards/ --output-prefix data/corpus \\
      --tokenizer bert-base-uncased --workers 8

  # a folder of plain-text books, one document per file; a glob of hard-wrapped text, a document per
  # blank-line-separated paragraph block
  %(prog)s --input books/ --format text --output-prefix data/books --tokenizer gpt2
  %(prog)s --input 'gutenberg/**/*.txt' --text-document block --wrapped-lines \\
      --output-prefix data/gutenberg --tokenizer gpt2

  # one sequence per document instead of per sentence, a custom tokenizer, the "content" field
  %(prog)s -i crawl.jsonl -o data/crawl --tokenizer my/tokenizer.json --json-key content --no-split-sentences

  # multi-node: each SLURM task takes its share of the inputs, then one merge
  srun -N 4 --ntasks-per-node 1 %(prog)s -i corpus/ -o data/corpus --tokenizer gpt2 --workers 32
  %(prog)s --merge -o data/corpus      # data/corpus_rank00000-of-00004 ... -> data/corpus

output:
  <prefix>.bin/.idx   Megatron-LM MMIDIDX v1 (readable by Megatron-LM and GPT-NeoX): uint16 tokens when
                      the padded vocabulary fits in 65536 ids, else int32. One sequence per sentence;
                      document boundaries in document_indices.
  <prefix>.meta.json  tokenizer (name, vocabulary sizes, command-token ids), counts, settings, command.
  Nothing is appended to documents (no [CLS], no eos): the sample builder adds them, using the
  document and sentence boundaries of the index.
  The output is identical for any --workers, and a merged multi-node run equals a single run.
  Until the end everything is under temporary names (<prefix>.tmp-<pid>/, *.tmp-<pid>), removed on an
  error, Ctrl-C or SIGTERM; an .idx next to a .bin always means a complete pair.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-preprocess",
        description="Tokenize raw text into a Megatron MMIDIDX corpus for GLM pretraining: one sequence "
        "per sentence, documents in the index. Parallel (one shard per worker, merged at the end), "
        "streaming (memory does not grow with the corpus), and safe to interrupt (nothing final is "
        "written before the end).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = parser.add_argument_group("inputs and output")
    io.add_argument(
        "-i",
        "--input",
        dest="inputs",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="files, folders (read recursively, hidden names skipped) or quoted globs ('**' allowed); "
        "repeatable. gzip-compressed files are recognized by their content",
    )
    io.add_argument(
        "-o",
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="write PREFIX.bin, PREFIX.idx and PREFIX.meta.json (with a world size > 1: "
        "PREFIX_rank<r>-of-<W>.*)",
    )
    io.add_argument(
        "--tokenizer",
        metavar="NAME",
        help="bert-base-uncased, gpt2, or the path of a tokenizer.json; literal '[MASK]' in the text "
        "stays text. Required unless --merge",
    )
    io.add_argument(
        "--format",
        dest="input_format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="input format; auto: .jsonl/.json/.ndjson (optionally .gz) are JSON lines, anything "
        "else plain text (default: auto)",
    )
    io.add_argument(
        "--json-key",
        default="text",
        metavar="KEY",
        help="the field of each JSON line that holds the document (default: text)",
    )
    io.add_argument(
        "--text-document",
        choices=TEXT_DOCUMENT_UNITS,
        default="file",
        help="plain text: a document per file, per line, or per block of lines separated by blank "
        "lines (default: file)",
    )
    text = parser.add_argument_group("text")
    text.add_argument(
        "--no-split-sentences",
        dest="split_sentences",
        action="store_false",
        help="one sequence per document instead of one per sentence (the sentence-level GLM "
        "objective then has no sentence boundaries)",
    )
    text.add_argument(
        "--wrapped-lines",
        action="store_true",
        help="single line breaks are line wrapping (only blank lines end a paragraph), as in "
        "hard-wrapped plain text; by default every line break ends a sentence",
    )
    text.add_argument(
        "--no-standardize-punctuation",
        dest="standardize_punctuation",
        action="store_false",
        help="keep curly quotes and en dashes; by default they become ASCII, as GLM does for English corpora",
    )
    bad = parser.add_argument_group("bad input")
    bad.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="undecodable UTF-8 (and lone surrogates in JSON): strict stops with file:line (or skips "
        "the line with --skip-bad-lines), replace substitutes U+FFFD and counts it (default: strict)",
    )
    bad.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip malformed JSON lines, lines without the key, and undecodable lines, counting them "
        "in the summary, instead of stopping at the first one",
    )
    run = parser.add_argument_group("parallelism and progress")
    run.add_argument(
        "--workers",
        type=int,
        default=available_cores(),
        metavar="N",
        help="worker processes, each writing its own shard (large files are cut at line boundaries); "
        "each worker's tokenizer uses cores/N threads, so 1 worker tokenizes on all cores but does "
        f"its reading and sentence splitting on one (default: the available cores, here {available_cores()})",
    )
    env_rank, env_world, env_source = _env_rank()
    run.add_argument(
        "--rank",
        type=int,
        default=env_rank,
        help="this node's share of the inputs (default: $RANK, else $SLURM_PROCID, else 0)",
    )
    run.add_argument(
        "--world-size",
        type=int,
        default=env_world,
        help="number of shares (default: $WORLD_SIZE, else $SLURM_NTASKS, else 1)",
    )
    run.add_argument(
        "--merge",
        action="store_true",
        help="merge shards into --output-prefix instead of preprocessing: the --input prefixes (or "
        "globs of .idx files) in order, the prefixes listed in --manifest, or by default all "
        "PREFIX_rank<r>-of-<W> outputs",
    )
    run.add_argument(
        "--manifest", metavar="FILE", help="with --merge: a file listing shard prefixes, one per line"
    )
    run.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar or progress lines (the summary is still printed)",
    )
    run.add_argument(
        "--log-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="when stderr is not a terminal, print a progress line this often (default: 30)",
    )
    parser.set_defaults(rank_source=env_source)
    return parser


def _raise_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join(["glm-preprocess", *(sys.argv[1:] if argv is None else argv)])
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)  # clean up on kill as on Ctrl-C
    started = time.monotonic()
    try:
        if args.merge:
            output, stats, unit = merge_shards(args.output_prefix, args.inputs, args.manifest, command)
        else:
            if not args.tokenizer:
                raise DataError("--tokenizer is required (bert-base-uncased, gpt2, or a tokenizer.json)")
            options = PreprocessOptions(
                inputs=args.inputs, output_prefix=args.output_prefix, tokenizer=args.tokenizer,
                json_key=args.json_key, input_format=args.input_format, text_document=args.text_document,
                split_sentences=args.split_sentences, wrapped_lines=args.wrapped_lines,
                standardize_punctuation=args.standardize_punctuation, errors=args.errors,
                skip_bad_lines=args.skip_bad_lines, workers=args.workers, rank=args.rank,
                world_size=args.world_size, progress=args.progress, log_interval=args.log_interval,
                command=command,
            )  # fmt: skip
            if options.world_size > 1:
                source = f" (from ${args.rank_source.replace('/', '/$')})" if args.rank_source else ""
                print(f"glm-preprocess: rank {options.rank} of {options.world_size}{source}", file=sys.stderr)
            stats = preprocess(options)
            output = rank_output_prefix(options.output_prefix, options.rank, options.world_size)
            unit = "sentence" if options.split_sentences else "document"
    except DataError as exc:
        print(f"glm-preprocess: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("glm-preprocess: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print(f"glm-preprocess summary\n{format_summary(stats, time.monotonic() - started, output, unit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
