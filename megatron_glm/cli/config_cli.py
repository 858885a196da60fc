"""``glm-config``: show a merged config, or validate it for a world size and report the model's size."""

from __future__ import annotations

import argparse
import sys

from megatron_glm.config import (
    add_override_argument,
    count_parameters,
    describe_parameters,
    dump_config,
    load_config,
    padded_vocab_size,
    parallel_layout,
    validate_config,
)
from megatron_glm.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-config",
        description="Show or validate a GLM training config (YAML plus --set overrides).",
        epilog="Examples:\n  glm-config validate run/configs/glm-10b.yaml --world-size 400\n"
        "  glm-config show run/configs/glm-tiny.yaml --set training.micro_batch_size=4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("show", "print the merged config as YAML"),
        ("validate", "check every rule and print the parameter count and layout"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config file, e.g. run/configs/glm-base.yaml")
        add_override_argument(p, "parallel.tensor_parallel_size=2")
        if name == "validate":
            p.add_argument(
                "--world-size",
                type=int,
                default=None,
                help="number of ranks the job will run on; checks the batch and parallel layout",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("glm-config", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.command == "show":
        sys.stdout.write(dump_config(cfg))
        return 0
    validate_config(cfg, args.world_size)
    tp = cfg.parallel.tensor_parallel_size
    vocab = padded_vocab_size(cfg.model, tp)
    params = count_parameters(cfg.model, vocab)
    print(f"{cfg.name}: valid")
    print(f"  parameters: {params:,} ({describe_parameters(params)}), vocab rows {vocab}")
    if args.world_size is not None:
        layout = parallel_layout(cfg, args.world_size)
        print(
            f"  layout: world {layout.world_size} = tp {layout.tensor_parallel_size} x "
            f"pp {layout.pipeline_parallel_size} x dp {layout.data_parallel_size}; "
            f"gradient accumulation {layout.gradient_accumulation_steps}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
