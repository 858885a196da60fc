"""``glm-eval-blanks``: top-1 accuracy on held-out single-token blanks, beside the unigram baseline and the
untrained model (see ``megatron_glm.evaluation.blank_accuracy``)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from data_tools.errors import DataError
from data_tools.tokenizer import load_tokenizer
from megatron_glm.checkpoint import find_checkpoint_files, load_thudm_checkpoint
from megatron_glm.config import ConfigError, add_override_argument, load_config, padded_vocab_size
from megatron_glm.data import prepare_sample_directory
from megatron_glm.errors import run_cli
from megatron_glm.evaluation.blank_accuracy import (
    build_blank_set,
    format_accuracy_table,
    held_out_windows,
    predict_blanks,
    score_target_set,
    word_tokens,
)
from megatron_glm.model import GLMModel
from megatron_glm.parallel import initialize_parallel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-eval-blanks",
        description="Top-1 accuracy of a GLM checkpoint on single-token blanks of held-out text (the "
        "config's valid split: documents the model never trained on), printed beside the unigram "
        "baseline (always the most frequent target) and the untrained model (initial weights). Each "
        "blank is a [MASK] in Part A; the answer is the prediction at [sop], as in pretraining.",
        epilog="Example:\n  glm-eval-blanks --config run/configs/glm-demo.yaml --checkpoint outputs/demo/checkpoints",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the model's config (shapes, tokenizer, data)")
    add_override_argument(parser, "model.kernels=torch")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory (its latest tag is used), tag directory or .pt file",
    )
    parser.add_argument(
        "--split", choices=("valid", "test"), default="valid", help="held-out split (default valid)"
    )
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens of text per window, [CLS] included (default: data.seq_length - 2, so that a window "
        "with its blank's [sop] and answer is as long as a training sequence)",
    )
    parser.add_argument("--blanks-per-window", type=int, default=2, help="blanks drawn per window (2)")
    parser.add_argument("--max-blanks", type=int, default=1000, help="at most this many blanks (1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the blank positions (0)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass (64)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("glm-eval-blanks", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    if args.context is None:
        args.context = cfg.data.seq_length - 2
    for name, least in (("context", 3), ("blanks_per_window", 1), ("max_blanks", 1), ("batch_size", 1)):
        if getattr(args, name) < least:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {least}")
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    directory = prepare_sample_directory(cfg.data, cfg.model.tokenizer)
    windows = held_out_windows(directory, args.split, tokenizer, args.context)
    if not windows:
        raise DataError(
            f"the {args.split} split of {directory.path} has no samples: give data.split a larger "
            f"{args.split} share"
        )
    blanks = build_blank_set(
        windows,
        tokenizer,
        blanks_per_window=args.blanks_per_window,
        max_blanks=args.max_blanks,
        seed=args.seed,
    )
    initialize_parallel(1, 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab_size = padded_vocab_size(cfg.model)
    untrained = GLMModel(cfg.model, vocab_size, seed=cfg.training.seed, device=device).float()
    trained = GLMModel(cfg.model, vocab_size, device="meta")
    trained.to_empty(device=device)
    load_thudm_checkpoint(trained, args.checkpoint)
    checkpoint_name = str(find_checkpoint_files(args.checkpoint)[0].parent)
    answers = {
        "untrained model (initial weights)": predict_blanks(
            untrained, blanks, tokenizer, batch_size=args.batch_size
        ),
        f"trained model ({checkpoint_name})": predict_blanks(
            trained.float(), blanks, tokenizer, batch_size=args.batch_size
        ),
    }
    all_tokens = torch.ones(len(blanks), dtype=torch.bool)
    words = word_tokens(tokenizer)[blanks.targets]
    scores = [
        score_target_set("all tokens", blanks.targets, all_tokens, answers),
        score_target_set("words only (no punctuation)", blanks.targets, words, answers),
    ]
    title = (
        f"Top-1 accuracy on {len(blanks):,} single-token blanks of held-out text ({args.split} split: "
        f"documents never trained on; {args.context}-token windows; "
        f"{time.perf_counter() - started:.0f}s)"
    )
    print(format_accuracy_table(scores, tokenizer, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
