"""``glm-finetune``: cloze (PET-style) classification finetuning of a GLM checkpoint."""

from __future__ import annotations

import argparse
import sys

from data_tools.errors import DataError
from data_tools.tokenizer import load_tokenizer
from megatron_glm.cli.inference import is_output_rank, read_jsonl
from megatron_glm.config import add_override_argument, load_config
from megatron_glm.errors import run_cli
from megatron_glm.parallel import destroy_parallel, is_initialized

EXAMPLE = """Example (train.jsonl / dev.jsonl lines like {"text": "...", "label": "yes"}):
  glm-finetune cloze --config run/configs/glm-tiny.yaml --checkpoint outputs/demo/checkpoints \\
      --train train.jsonl --dev dev.jsonl --pattern "{text} Is it about her? [MASK]." \\
      --verbalizer yes=yes --verbalizer no=no --epochs 8 --output outputs/cloze \\
      --set training.micro_batch_size=8 --set training.global_batch_size=8 --set optimizer.lr=3e-3

The pattern's {field}s are filled from each line; [MASK] is where the answer goes. Each label's answer
(one or more tokens) is scored at the mask; the best-scoring label is the prediction. Training uses the
config's optimizer, batch sizes, precision and DeepSpeed settings (ZeRO 0-2, tensor parallel over the
launched processes); the best dev epoch is written to <output>/best in THUDM's layout."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-finetune",
        description="Finetune a GLM checkpoint for cloze classification (pattern + verbalizer).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("task", choices=("cloze",))
    parser.add_argument(
        "--config", required=True, help="the model's config (shapes, tokenizer, optimizer, batches)"
    )
    add_override_argument(parser, "optimizer.lr=1e-5")
    parser.add_argument(
        "--checkpoint", help="weights to start from (default: the config's checkpoint.init_from)"
    )
    parser.add_argument("--train", required=True, help="JSON lines with the pattern's fields and a label")
    parser.add_argument("--dev", required=True, help="JSON lines, the same fields; accuracy after each epoch")
    parser.add_argument("--pattern", required=True, help='e.g. "{text} Is it about her? [MASK]."')
    parser.add_argument(
        "--verbalizer",
        action="append",
        required=True,
        metavar="LABEL=ANSWER",
        help="one per label (repeatable)",
    )
    parser.add_argument("--label-field", default="label", help='the label\'s field (default "label")')
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training set (default 3)")
    parser.add_argument("--output", required=True, help="directory for the best weights (<output>/best)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_cli("glm-finetune", lambda: _run(args))
    finally:
        if is_initialized():
            destroy_parallel()


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from megatron_glm.finetune import ClozeTask, cloze_example, finetune_cloze
    from megatron_glm.training.distributed import init_distributed

    if args.epochs < 1:
        raise DataError(f"--epochs {args.epochs} must be at least 1")
    verbalizer = {}
    for item in args.verbalizer:
        label, sep, answer = item.partition("=")
        if not sep or not label or not answer:
            raise DataError(f"--verbalizer {item!r}: write LABEL=ANSWER, e.g. yes=Yes")
        verbalizer[label] = answer
    task = ClozeTask(args.pattern, verbalizer, args.label_field)
    cfg = load_config(args.config, args.overrides)
    if args.checkpoint:
        cfg = dataclasses.replace(
            cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=args.checkpoint)
        )
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    splits = {}
    for name, path in (("train", args.train), ("dev", args.dev)):
        # cloze_example checks each row's fields and label and names its line.
        splits[name] = [
            cloze_example(record, where, task, tokenizer) for where, record in read_jsonl(path, ())
        ]
    init_distributed()
    result = finetune_cloze(
        cfg, splits["train"], splits["dev"], tokenizer, epochs=args.epochs, output_dir=args.output
    )
    if is_output_rank():
        for epoch, (accuracy, loss) in enumerate(zip(result.dev_accuracy, result.train_loss), 1):
            print(f"epoch {epoch}: train loss {loss:.4f}, dev accuracy {accuracy:.4f}")
        print(f"best: epoch {result.best_epoch + 1}, weights in {result.best_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
