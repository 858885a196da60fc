"""``glm-eval``: zero-shot LAMBADA-style last-word accuracy and windowed perplexity of a GLM checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from tqdm import tqdm

from data_tools.errors import DataError
from megatron_glm.cli.inference import DTYPES, is_output_rank, load_for_inference, read_jsonl
from megatron_glm.config import add_override_argument, load_config
from megatron_glm.errors import run_cli
from megatron_glm.evaluation.zero_shot import corpus_stream, last_word_accuracy, perplexity
from megatron_glm.parallel import destroy_parallel, is_initialized

EXAMPLE = """Examples:
  glm-eval lambada --config run/configs/glm-tiny.yaml --checkpoint outputs/demo/checkpoints --input lambada.jsonl
  glm-eval perplexity --config run/configs/glm-tiny.yaml --checkpoint outputs/demo/checkpoints \\
      --corpus outputs/demo/corpus/austen --window 128 --stride 32

lambada: JSON lines {"text": ...}; the last whitespace-separated word is predicted from the rest.
perplexity: a corpus written by glm-preprocess (its path prefix); documents joined by the end-of-text token.
--unidirectional reads the context left to right (only [CLS] is bidirectional Part A)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-eval",
        description="Zero-shot evaluation of a GLM checkpoint: last-word accuracy (LAMBADA style) or perplexity.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("task", choices=("lambada", "perplexity"))
    parser.add_argument("--config", required=True, help="the model's config (shapes and tokenizer)")
    add_override_argument(parser, "model.kernels=torch")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory, tag directory or .pt file")
    parser.add_argument("--input", help='lambada: JSON lines with a "text" field')
    parser.add_argument("--corpus", help="perplexity: the path prefix of a glm-preprocess corpus (.bin/.idx)")
    parser.add_argument(
        "--window", type=int, default=None, help="perplexity: tokens per window (default: seq_length)"
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="perplexity: tokens predicted per window (default window/4)"
    )
    parser.add_argument("--unidirectional", action="store_true", help="context read left to right")
    parser.add_argument(
        "--mask", choices=("gmask", "mask"), default="gmask", help="blank token (default gmask)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)"
    )
    parser.add_argument("--output", help="also write the result as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_cli("glm-eval", lambda: _run(args))
    finally:
        if is_initialized():
            destroy_parallel()


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size} must be at least 1")
    cfg = load_config(args.config, args.overrides)
    gmask = args.mask == "gmask"
    if args.task == "lambada":
        if not args.input:
            raise DataError("lambada needs --input (JSON lines with a 'text' field)")
        texts = [(where, record["text"]) for where, record in read_jsonl(args.input, ("text",))]
        model, tokenizer = load_for_inference(cfg, args.checkpoint, args.dtype)
        result = last_word_accuracy(
            model,
            tokenizer,
            texts,
            unidirectional=args.unidirectional,
            gmask=gmask,
            batch_size=args.batch_size,
        )
    else:
        if not args.corpus:
            raise DataError("perplexity needs --corpus (the path prefix of a glm-preprocess corpus)")
        window = args.window or cfg.data.seq_length
        stride = args.stride or max(1, window // 4)
        model, tokenizer = load_for_inference(cfg, args.checkpoint, args.dtype)
        try:
            stream = corpus_stream(args.corpus, tokenizer.command)
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{args.corpus}: cannot read the corpus ({exc}); give the prefix glm-preprocess wrote"
            ) from exc
        with tqdm(desc="windows", unit="window", disable=not is_output_rank()) as progress:
            result = perplexity(
                model,
                stream,
                tokenizer.command,
                tokenizer.num_tokens,
                window=window,
                stride=stride,
                unidirectional=args.unidirectional,
                gmask=gmask,
                batch_size=args.batch_size,
                progress=progress,
            )
    summary = {"task": args.task, "unidirectional": args.unidirectional, **dataclasses.asdict(result)}
    if is_output_rank():
        print(json.dumps(summary))
        if args.output:
            from pathlib import Path

            from megatron_glm.checkpoint import write_text_atomic

            write_text_atomic(Path(args.output), json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
