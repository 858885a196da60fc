"""``glm-generate``: fill the [MASK]/[sMASK]/[gMASK] blanks of texts with a GLM checkpoint."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from data_tools.errors import DataError
from megatron_glm.cli.inference import DTYPES, is_output_rank, load_for_inference, read_jsonl, write_jsonl
from megatron_glm.config import add_override_argument, load_config
from megatron_glm.errors import run_cli
from megatron_glm.generation import STRATEGIES, GenerationConfig, generate, prompt_from_text
from megatron_glm.generation.prompts import check_fits
from megatron_glm.parallel import destroy_parallel, is_initialized

EXAMPLE = """Examples:
  glm-generate --config run/configs/glm-tiny.yaml --checkpoint outputs/demo/checkpoints \\
      --text "It is a truth universally [MASK] that a single man must be in want of a wife."
  glm-generate --config run/configs/glm-tiny.yaml --checkpoint outputs/demo/checkpoints \\
      --input prompts.jsonl --output answers.jsonl --strategy beam --num-beams 4
  torchrun --nproc-per-node 2 -m megatron_glm.cli.generate ...   (tensor-parallel over the 2 processes)

A text without a blank gets a [gMASK] appended: the model continues it."""


def build_parser(prog: str = "glm-generate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fill the blanks of texts with a GLM checkpoint (THUDM layout or one written by glm-pretrain). "
        "Blanks are filled left to right, later blanks seeing earlier answers; decoding uses a KV cache.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the model's config (shapes and tokenizer)")
    add_override_argument(parser, "model.kernels=torch")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory (its latest tag is used), tag directory or .pt file",
    )
    source = parser.add_argument_group("input and output")
    source.add_argument("--text", action="append", default=[], help="a text with blanks (repeatable)")
    source.add_argument("--input", help='JSON lines with a "text" field each')
    source.add_argument("--output", help="write JSON lines {text, filled, answers} here instead of printing")
    source.add_argument("--batch-size", type=int, default=8, help="texts decoded together (default 8)")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--strategy", choices=STRATEGIES, default="greedy", help="default greedy")
    decoding.add_argument("--max-tokens", type=int, default=32, help="longest answer per blank (default 32)")
    decoding.add_argument("--min-tokens", type=int, default=0, help="shortest answer per blank (default 0)")
    decoding.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (default 0.9)")
    decoding.add_argument(
        "--top-k", type=int, default=40, help="sample among the k likeliest (default 40; 0: all)"
    )
    decoding.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    decoding.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234)")
    decoding.add_argument("--num-beams", type=int, default=4, help="beam width (default 4)")
    decoding.add_argument(
        "--length-penalty", type=float, default=1.0, help="beam score = log P / length^penalty (default 1)"
    )
    decoding.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="forbid repeating an n-gram in an answer (default 0: off)",
    )
    decoding.add_argument(
        "--no-cache", action="store_true", help="recompute every step (slow; for comparison)"
    )
    decoding.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)"
    )
    return parser


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    config = GenerationConfig(
        strategy=args.strategy,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    config.check()
    return config


def main(argv: list[str] | None = None, prog: str = "glm-generate") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return run_cli(prog, lambda: _run(args, prog))
    finally:
        if is_initialized():
            destroy_parallel()


def _run(args: argparse.Namespace, prog: str) -> int:
    if not args.text and not args.input:
        raise DataError("nothing to do: give --text or --input")
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size} must be at least 1")
    config = generation_config(args)
    cfg = load_config(args.config, args.overrides)
    items = [(f"--text #{i + 1}", text) for i, text in enumerate(args.text)]
    if args.input:
        items += [(where, record["text"]) for where, record in read_jsonl(args.input, ("text",))]
    model, tokenizer = load_for_inference(cfg, args.checkpoint, args.dtype)
    for where, text in items:
        check_fits(
            prompt_from_text(text, tokenizer), config.max_tokens, cfg.model.max_position_embeddings, where
        )
    results = []
    batches = range(0, len(items), args.batch_size)
    for start in tqdm(
        batches, desc="generating", unit="batch", disable=len(batches) < 2 or not is_output_rank()
    ):
        texts = [text for _, text in items[start : start + args.batch_size]]
        results += generate(model, tokenizer, texts, config, use_cache=not args.no_cache)
    if not is_output_rank():
        return 0
    if args.output:
        write_jsonl(
            args.output,
            [{"text": text, "filled": r.text, "answers": r.answers} for (_, text), r in zip(items, results)],
        )
        print(f"wrote {len(results)} results to {args.output}")
    else:
        for (_, text), result in zip(items, results):
            print(f"{text}\n  -> {result.text}\n     answers: {result.answers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
