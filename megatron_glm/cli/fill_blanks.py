"""``glm-fill-blanks``: fill the [MASK]/[sMASK]/[gMASK] blanks of texts with a trained GLM (greedy)."""

from __future__ import annotations

import argparse
import sys

import torch

from data_tools.tokenizer import load_tokenizer
from megatron_glm.checkpoint import load_thudm_checkpoint
from megatron_glm.config import add_override_argument, load_config, padded_vocab_size
from megatron_glm.errors import run_cli
from megatron_glm.generation import fill_blanks
from megatron_glm.model import GLMModel
from megatron_glm.parallel import initialize_parallel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-fill-blanks",
        description="Fill the blanks of texts with a GLM checkpoint (THUDM layout or one written by glm-pretrain).",
        epilog="Example:\n  glm-fill-blanks --config run/configs/glm-tiny.yaml --checkpoint outputs/demo/checkpoints \\\n"
        '      --text "It is a truth universally [MASK] that a single man must be in want of a wife."',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the model's config (shapes and tokenizer)")
    add_override_argument(parser, "model.kernels=torch")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory (its latest tag is used), tag directory or .pt file",
    )
    parser.add_argument(
        "--text",
        action="append",
        required=True,
        help="text with blanks; without a blank a [gMASK] continuation is generated (repeatable)",
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="longest answer per blank (default 32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("glm-fill-blanks", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    initialize_parallel(1, 1)
    model = GLMModel(cfg.model, padded_vocab_size(cfg.model), device="meta")
    model.to_empty(device="cuda" if torch.cuda.is_available() else "cpu")
    load_thudm_checkpoint(model, args.checkpoint)
    for text in args.text:
        result = fill_blanks(model.float(), tokenizer, text, max_tokens=args.max_tokens)
        print(f"{text}\n  -> {result.text}\n     answers: {result.answers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
