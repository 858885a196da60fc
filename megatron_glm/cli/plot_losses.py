"""``glm-plot-losses``: the loss curves of a run (train, and evaluation per objective) as a PNG."""

from __future__ import annotations

import argparse
import sys

from megatron_glm.errors import run_cli
from megatron_glm.evaluation.loss_curves import write_loss_curves_png


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-plot-losses",
        description="Draw the train loss and the evaluation loss of each objective (token, sentence, "
        "document, all) recorded by glm-pretrain in metrics.jsonl into a PNG.",
        epilog="Example:\n  glm-plot-losses outputs/demo/logs/metrics.jsonl   # writes outputs/demo/logs/loss-curves.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("metrics", help="the metrics.jsonl of a run (in its logging.log_dir)")
    parser.add_argument(
        "-o", "--output", default=None, help="the PNG to write (default: loss-curves.png beside the metrics)"
    )
    parser.add_argument("--title", default=None, help="the picture's title")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(
        "glm-plot-losses",
        lambda: print(f"loss curves: {write_loss_curves_png(args.metrics, args.output, title=args.title)}"),
    )


if __name__ == "__main__":
    sys.exit(main())
