"""``glm-finetune``: cloze classification or seq2seq finetuning of a GLM checkpoint."""

from __future__ import annotations

import argparse
import sys

from data_tools.errors import DataError
from data_tools.tokenizer import load_tokenizer
from megatron_glm.cli.inference import is_output_rank, read_jsonl
from megatron_glm.config import ConfigError, add_override_argument, load_config
from megatron_glm.errors import run_cli
from megatron_glm.parallel import destroy_parallel, is_initialized

CLOZE_EXAMPLE = """Example (train.jsonl / dev.jsonl lines like {"text": "...", "label": "yes"}):
  glm-finetune cloze --config run/configs/glm-tiny.yaml --checkpoint outputs/demo/checkpoints \\
      --train train.jsonl --dev dev.jsonl --pattern "{text} Is it about her? [MASK]." \\
      --verbalizer yes=yes --verbalizer no=no --epochs 8 --output outputs/cloze \\
      --set training.micro_batch_size=8 --set training.global_batch_size=8 --set optimizer.lr=3e-3

The pattern's {field}s are filled from each line; [MASK] is where the answer goes. Each label's answer
(one or more tokens) is scored at the mask; the best-scoring label is the prediction. The best dev
accuracy's epoch is written to <output>/best in THUDM's layout."""

SEQ2SEQ_EXAMPLE = """Example (train.jsonl / dev.jsonl lines like {"source": "...", "target": "..."}):
  glm-finetune seq2seq --config run/configs/glm-tiny.yaml --checkpoint outputs/demo/checkpoints \\
      --train train.jsonl --dev dev.jsonl --epochs 10 --label-smoothing 0.1 --num-beams 4 \\
      --output outputs/seq2seq --set training.micro_batch_size=8 --set training.global_batch_size=8

Each source is laid out as THUDM's seq2seq task, Part A "[CLS] source [gMASK] [eos]" (--mask MASK for
[MASK]); the target follows [sop] in Part B and the loss is on the target and its [eop]. After each epoch
the dev sources are decoded by beam search and scored against their targets by ROUGE-1/2/L F1 on words;
the best ROUGE-L epoch is written to <output>/best in THUDM's layout."""

COMMON = """Training uses the config's optimizer, schedule, batch sizes, precision and DeepSpeed settings (ZeRO 0-2,
tensor parallel over the launched processes). Every row is checked before training starts: a bad row
is named by file:line and nothing is written."""


def _shared_arguments(parser: argparse.ArgumentParser, row: str) -> None:
    parser.add_argument(
        "--config", required=True, help="the model's config (shapes, tokenizer, optimizer, batches)"
    )
    add_override_argument(parser, "optimizer.lr=1e-5")
    parser.add_argument(
        "--checkpoint", help="weights to start from (default: the config's checkpoint.init_from)"
    )
    parser.add_argument("--train", required=True, help=f"JSON lines, {row}")
    parser.add_argument("--dev", required=True, help="JSON lines, the same fields; scored after each epoch")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training set (default 3)")
    parser.add_argument("--output", required=True, help="directory for the best weights (<output>/best)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-finetune",
        description="Finetune a GLM checkpoint: cloze classification (pattern + verbalizer) or seq2seq "
        "(source -> target generated at a blank). " + COMMON,
        epilog="See glm-finetune cloze --help and glm-finetune seq2seq --help.",
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="{cloze,seq2seq}")
    cloze = tasks.add_parser(
        "cloze",
        help="PET-style classification, answers scored at the pattern's [MASK]",
        description="Cloze classification finetuning (PET style). " + COMMON,
        epilog=CLOZE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _shared_arguments(cloze, "the pattern's fields and a label per line")
    cloze.add_argument("--pattern", required=True, help='e.g. "{text} Is it about her? [MASK]."')
    cloze.add_argument(
        "--verbalizer",
        action="append",
        required=True,
        metavar="LABEL=ANSWER",
        help="one per label (repeatable)",
    )
    cloze.add_argument("--label-field", default="label", help='the label\'s field (default "label")')

    seq2seq = tasks.add_parser(
        "seq2seq",
        help="source -> target generated after [gMASK] (or [MASK]), dev ROUGE of beam search",
        description="Seq2seq finetuning (THUDM/GLM tasks/seq2seq). " + COMMON,
        epilog=SEQ2SEQ_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _shared_arguments(seq2seq, "a source and a target per line")
    seq2seq.add_argument("--source-field", default="source", help='default "source"')
    seq2seq.add_argument("--target-field", default="target", help='default "target"')
    seq2seq.add_argument(
        "--mask",
        choices=("gMASK", "MASK"),
        default="gMASK",
        help="the blank after the source (default gMASK)",
    )
    seq2seq.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="eps in (1 - eps) CE + eps mean_vocab(-log p), THUDM's (its configs use 0.1; default 0: off)",
    )
    decoding = seq2seq.add_argument_group("dev decoding (beam search)")
    decoding.add_argument("--num-beams", type=int, default=4, help="beam width (default 4)")
    decoding.add_argument(
        "--length-penalty", type=float, default=1.0, help="beam score = log P / length^penalty (default 1)"
    )
    decoding.add_argument(
        "--max-target-tokens",
        type=int,
        help="longest generated target (default: the longest target of train and dev, in tokens)",
    )
    decoding.add_argument(
        "--min-target-tokens", type=int, default=0, help="shortest generated target (default 0)"
    )
    decoding.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="forbid repeating n-grams of this size (default 0: off)",
    )
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

    from megatron_glm.finetune.common import check_finetune_config
    from megatron_glm.training.distributed import init_distributed

    if args.epochs < 1:
        raise ConfigError(f"--epochs {args.epochs} must be at least 1")
    prepare = _prepare_cloze if args.task == "cloze" else _prepare_seq2seq
    train_fn = prepare(args)  # checks the task's options before anything is loaded
    cfg = load_config(args.config, args.overrides)
    if args.checkpoint:
        cfg = dataclasses.replace(
            cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=args.checkpoint)
        )
    check_finetune_config(cfg)  # the engine's rules, before the rows are read and the ranks meet
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    run = train_fn(cfg, tokenizer)  # reads and checks every row (named by file:line)
    init_distributed()
    result = run()
    if is_output_rank():
        for epoch, (metrics, loss) in enumerate(zip(result.dev, result.train_loss), 1):
            scores = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
            print(f"epoch {epoch}: train loss {loss:.4f}, dev {scores}")
        print(f"best: epoch {result.best_epoch + 1} ({result.metric}), weights in {result.best_dir}")
    return 0


def _prepare_cloze(args: argparse.Namespace):
    from megatron_glm.finetune import ClozeTask, cloze_example, finetune_cloze

    verbalizer = {}
    for item in args.verbalizer:
        label, sep, answer = item.partition("=")
        if not sep or not label or not answer:
            raise DataError(f"--verbalizer {item!r}: write LABEL=ANSWER, e.g. yes=Yes")
        verbalizer[label] = answer
    task = ClozeTask(args.pattern, verbalizer, args.label_field)

    def read(cfg, tokenizer):
        splits = {
            name: [cloze_example(record, where, task, tokenizer) for where, record in read_jsonl(path, ())]
            for name, path in (("train", args.train), ("dev", args.dev))
        }
        return lambda: finetune_cloze(
            cfg, splits["train"], splits["dev"], tokenizer, epochs=args.epochs, output_dir=args.output
        )

    return read


def _prepare_seq2seq(args: argparse.Namespace):
    from megatron_glm.finetune import finetune_seq2seq, seq2seq_example
    from megatron_glm.finetune.seq2seq import check_inputs
    from megatron_glm.generation import GenerationConfig, GenerationError

    if not 0.0 <= args.label_smoothing < 1.0:
        raise ConfigError(f"--label-smoothing {args.label_smoothing} must lie in [0, 1)")
    if args.max_target_tokens is not None and args.max_target_tokens < 1:
        raise ConfigError(f"--max-target-tokens {args.max_target_tokens} must be at least 1")

    def read(cfg, tokenizer):
        fields = {"mask": args.mask, "source_field": args.source_field, "target_field": args.target_field}
        splits = {
            name: [
                seq2seq_example(record, where, tokenizer, **fields) for where, record in read_jsonl(path, ())
            ]
            for name, path in (("train", args.train), ("dev", args.dev))
        }
        longest = max((len(e.target) for split in splits.values() for e in split), default=1)
        generation = GenerationConfig(
            strategy="beam",
            max_tokens=args.max_target_tokens or longest,
            min_tokens=args.min_target_tokens,
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
        )
        try:
            generation.check()
        except GenerationError as exc:  # an option of this command line: a usage error
            raise ConfigError(f"dev decoding: {exc}") from exc
        check_inputs(cfg, [*splits["train"], *splits["dev"]], generation)
        return lambda: finetune_seq2seq(
            cfg,
            splits["train"],
            splits["dev"],
            tokenizer,
            generation,
            epochs=args.epochs,
            output_dir=args.output,
            label_smoothing=args.label_smoothing,
        )

    return read


if __name__ == "__main__":
    sys.exit(main())
