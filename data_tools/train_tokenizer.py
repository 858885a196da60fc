"""glm-train-tokenizer: train a byte-level BPE on a corpus and append GLM's command tokens.

``python -m data_tools.train_tokenizer --input corpus/ --vocab-size 32000 --output tokenizer/tokenizer.json``

The text vocabulary (``--vocab-size`` entries, the 256 byte symbols included) comes first; the command
tokens follow in GPT-2's order: ``<|endoftext|>`` (eos = pad), ``<|startofpiece|>``, ``<|endofpiece|>``,
``[CLS]``, ``[MASK]``, ``[SEP]``, ``[UNK]``, ``[gMASK]``, ``[sMASK]``, ``[dBLOCK]``. The written
``tokenizer.json`` holds them, so ``--tokenizer path/to/tokenizer.json`` of every other tool gets the same
ids. Inputs are read as ``glm-preprocess`` reads them (JSON lines, text, gzip, folders, globs), with the
same punctuation standardization.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers.implementations import ByteLevelBPETokenizer

from data_tools.errors import DataError, run_cli
from data_tools.progress import CorpusStats
from data_tools.readers import (
    TEXT_DOCUMENT_UNITS,
    ReadOptions,
    discover_inputs,
    full_segments,
    read_documents,
)
from data_tools.sentences import standardize_punctuation
from data_tools.tokenizer import GLMTokenizer


def _documents(
    inputs: list[str], input_format: str, options: ReadOptions, standardize: bool, stats: CorpusStats
) -> Iterator[str]:
    segments = full_segments(discover_inputs(inputs, input_format))
    for batch in read_documents(segments, options, stats):
        stats.documents += len(batch.texts)
        for document in batch.texts:
            yield standardize_punctuation(document) if standardize else document


def train_tokenizer(
    inputs: list[str],
    output: str | os.PathLike,
    vocab_size: int,
    *,
    min_frequency: int = 2,
    input_format: str = "auto",
    options: ReadOptions | None = None,
    standardize: bool = True,
    progress: bool = True,
) -> GLMTokenizer:
    """Train, append the command tokens, write ``output`` atomically and return the loaded tokenizer."""
    if vocab_size <= 256:
        raise DataError(f"--vocab-size {vocab_size}: a byte-level BPE needs more than the 256 byte symbols")
    options = options or ReadOptions()
    stats = CorpusStats()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _documents(inputs, input_format, options, standardize, stats),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=progress,
        special_tokens=[],
    )
    if stats.documents == 0:
        raise DataError(f"no documents in {', '.join(inputs)}: nothing to train on")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(output.name + f".tmp-{os.getpid()}")
    try:
        bpe.save(str(staging))
        tokenizer = GLMTokenizer.from_name(str(staging))
        tokenizer.save(staging)  # now with the command tokens, so their ids are fixed in the file
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    return GLMTokenizer.from_name(str(output))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-train-tokenizer",
        description="Train a byte-level BPE tokenizer on a corpus; GLM's command tokens are appended after "
        "the text vocabulary. Use the output with --tokenizer PATH (or model.tokenizer: PATH).",
        epilog="Example:\n  glm-train-tokenizer --input data/raw/ --vocab-size 32000 --output tokenizers/mine/tokenizer.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-i",
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="files, folders or quoted globs (JSON lines, plain text, .gz)",
    )
    parser.add_argument("-o", "--output", required=True, help="the tokenizer.json to write")
    parser.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        help="size of the text vocabulary (the 10 command tokens come on top)",
    )
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="merges seen fewer times are not learned"
    )
    parser.add_argument(
        "--format",
        dest="input_format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="input format (auto: by file name, as glm-preprocess)",
    )
    parser.add_argument("--json-key", default="text", help="the JSON field holding the document")
    parser.add_argument(
        "--text-document",
        choices=TEXT_DOCUMENT_UNITS,
        default="file",
        help="plain text: a document per file, line or blank-line-separated block",
    )
    parser.add_argument(
        "--errors",
        choices=("strict", "replace"),
        default="strict",
        help="undecodable UTF-8: stop with file:line, or replace with U+FFFD",
    )
    parser.add_argument(
        "--no-standardize-punctuation",
        action="store_true",
        help="keep curly quotes and en dashes (glm-preprocess standardizes them by default)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("glm-train-tokenizer", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    options = ReadOptions(json_key=args.json_key, text_document=args.text_document, errors=args.errors)
    tokenizer = train_tokenizer(
        args.input,
        args.output,
        args.vocab_size,
        min_frequency=args.min_frequency,
        input_format=args.input_format,
        options=options,
        standardize=not args.no_standardize_punctuation,
        progress=not args.no_progress,
    )
    command = tokenizer.command
    print(
        f"wrote {args.output}: {tokenizer.text_vocab_size} text tokens + command tokens "
        f"(eos {command.eos}, sop {command.sop}, eop {command.eop}, [CLS] {command.cls}, [MASK] {command.mask}, "
        f"[gMASK] {command.gmask}, [sMASK] {command.smask}); embedding table {tokenizer.padded_vocab_size()} rows"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
