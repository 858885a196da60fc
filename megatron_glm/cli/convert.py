"""``glm-convert``: move GLM checkpoints between layouts and formats (THUDM/GLM, safetensors, Hugging Face)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from megatron_glm.checkpoint import CheckpointError
from megatron_glm.checkpoint.convert import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPES,
    check_against_config,
    checkpoint_source,
    export_hf,
    export_safetensors,
    export_thudm,
    hf_model_config,
    hf_source,
    source_config,
)
from megatron_glm.checkpoint.reshard import reshard
from megatron_glm.checkpoint.sat import export_sat, sat_model_fields, sat_source
from megatron_glm.errors import ConfigError, run_cli

_EPILOG = """\
Sources: a glm-pretrain save directory (its latest checkpoint), one of its step directories, a THUDM/GLM
download (a directory with mp_rank_XX_model_states.pt files, or one such file), or a universal checkpoint
written by glm-convert reshard (its fp32 master weights). The head count and
tokenizer come from the config.yaml saved with glm-pretrain checkpoints, or from --config.

Examples:
  glm-convert export --to hf outputs/demo/checkpoints exported/glm-tiny-hf
  glm-convert export --to thudm --model-parallel-size 2 outputs/demo/checkpoints exported/glm-tiny-mp2
  glm-convert export --to safetensors --dtype bf16 outputs/demo/checkpoints exported/glm-tiny.safetensors
  glm-convert import --from hf exported/glm-tiny-hf imported/glm-tiny   # then checkpoint.init_from=imported/glm-tiny
  glm-convert import --from thudm --config run/configs/glm-large.yaml glm-large/ imported/glm-large
  glm-convert export --to sat outputs/demo/checkpoints exported/glm-sat   # SwissArmyTransformer's GLMModel
  glm-convert import --from sat exported/glm-sat imported/glm-from-sat
  glm-convert reshard --tensor-parallel-size 4 outputs/demo/checkpoints resharded/demo-tp4
      # then: glm-pretrain --config resharded/demo-tp4/<step>/config.yaml  (on TP x PP x DP ranks)
"""


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 1048576")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-convert",
        description="Convert GLM checkpoints: export to THUDM/GLM's layout (any model-parallel size), one "
        "safetensors file or a Hugging Face directory; import THUDM/GLM or Hugging Face weights as a "
        "checkpoint glm-pretrain can start from (checkpoint.init_from) at any parallel layout.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a checkpoint in another format")
    export.add_argument(
        "--to", required=True, choices=("safetensors", "thudm", "hf", "sat"), help="target format"
    )
    importer = commands.add_parser(
        "import", help="make THUDM/GLM or HF weights a glm-pretrain starting point"
    )
    importer.add_argument(
        "--from", dest="origin", required=True, choices=("thudm", "hf", "sat"), help="source format"
    )
    resharder = commands.add_parser(
        "reshard",
        help="move a training checkpoint (optimizer state included) to another TP x PP layout",
        description="Convert a glm-pretrain checkpoint saved at any TP x PP x DP layout (ZeRO stage 0, 1, 2 or "
        "3, fp32 or bf16) into a universal checkpoint: full fp32 master weights and Adam moments "
        "under THUDM keys, Adam's step, the LR schedule and the data position. Its config.yaml is the "
        "source's with the target layout and checkpoint.save_dir set to OUTPUT, so `glm-pretrain --config "
        "OUTPUT/<step>/config.yaml` resumes there (at ZeRO stage 0, 1, 2 or 3, any data-parallel size; ZeRO-0 "
        "needs training.precision fp32). glm-convert export and import read the output. "
        "Random states: a rank's streams belong to its place in the old layout and are not mapped; the "
        "resumed run re-seeds every rank as a fresh run at the new layout would, from training.seed + step "
        "(deterministic; exact continuation without dropout, other dropout masks with it).",
    )
    resharder.add_argument(
        "source", type=Path, help="glm-pretrain save directory (its latest checkpoint) or step directory"
    )
    resharder.add_argument("output", type=Path, help="new save directory (must not exist unless --overwrite)")
    resharder.add_argument("--tensor-parallel-size", type=int, required=True, help="target TP size")
    resharder.add_argument("--pipeline-parallel-size", type=int, default=1, help="target PP size (default 1)")
    resharder.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        help="target ZeRO stage, 0 to 3 (default: the source's; 0 only for fp32 runs)",
    )
    resharder.add_argument(
        "--trust-checkpoint", action="store_true", help="allow files beyond the tensor/metadata allowlist"
    )
    resharder.add_argument("--overwrite", action="store_true", help="replace an existing output")
    for sub in (export, importer):
        sub.add_argument("source", type=Path, help="checkpoint directory or file")
        sub.add_argument("output", type=Path, help="output path (must not exist unless --overwrite)")
        sub.add_argument(
            "--config",
            type=Path,
            help="YAML config of the model (heads, tokenizer); "
            "default: the config.yaml saved with the checkpoint",
        )
        sub.add_argument(
            "--model-parallel-size",
            type=int,
            default=1,
            help="model-parallel files to write (thudm and sat export, import; default 1)",
        )
        sub.add_argument(
            "--dtype",
            choices=("keep", *DTYPES),
            default="keep",
            help="dtype of the written weights (default: the source's)",
        )
        sub.add_argument(
            "--trust-checkpoint",
            action="store_true",
            help="allow source files holding Python objects beyond the tensor/metadata allowlist "
            "(unpickling them can run code: only for files you trust)",
        )
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output")
    export.add_argument(
        "--max-shard-size",
        type=_size,
        default=DEFAULT_MAX_SHARD_BYTES,
        help="hf: split model.safetensors into shards above this size (default 5GB)",
    )
    return parser


def run(args: argparse.Namespace) -> Path:
    if args.output.exists() and not args.overwrite:
        raise CheckpointError(f"{args.output} already exists; choose another output or pass --overwrite")
    if args.command == "reshard":
        for flag, size in (
            ("--tensor", args.tensor_parallel_size),
            ("--pipeline", args.pipeline_parallel_size),
        ):
            if size < 1:
                raise ConfigError(f"{flag}-parallel-size {size}: must be at least 1")
        return reshard(
            args.source,
            args.output,
            tensor_parallel_size=args.tensor_parallel_size,
            pipeline_parallel_size=args.pipeline_parallel_size,
            zero_stage=args.zero_stage,
            trust=args.trust_checkpoint,
        )
    if args.model_parallel_size < 1:
        raise ConfigError(f"--model-parallel-size {args.model_parallel_size}: must be at least 1")
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    trust = args.trust_checkpoint
    if args.command == "import" and args.origin == "hf":
        source = hf_source(args.source, trust=trust)
        model = hf_model_config(args.source)
        check_against_config(source.model_shape(), model, source.where)
        expected = source_config(args.source, args.config) if args.config else None
        check_against_config(source.model_shape(), expected, source.where)
        return export_thudm(
            source,
            args.output,
            model_parallel_size=args.model_parallel_size,
            num_attention_heads=model.num_attention_heads,
            dtype=dtype,
        )
    if args.command == "import" and args.origin == "sat":
        source = sat_source(args.source, trust=trust)
        fields = sat_model_fields(args.source)
        check_against_config(source.model_shape(), source_config(args.source, args.config), source.where)
        return export_thudm(
            source,
            args.output,
            model_parallel_size=args.model_parallel_size,
            num_attention_heads=fields["num_attention_heads"],
            dtype=dtype,
        )
    source = checkpoint_source(args.source, trust=trust)  # THUDM layout, or reshard's universal checkpoint
    model = source_config(args.source, args.config)
    if model is not None:
        check_against_config(source.model_shape(), model, source.where)
    heads = model.num_attention_heads if model is not None else None
    target = "thudm" if args.command == "import" else args.to
    if target == "safetensors":
        return export_safetensors(source, args.output, dtype=dtype)
    if target == "thudm":
        return export_thudm(
            source,
            args.output,
            model_parallel_size=args.model_parallel_size,
            num_attention_heads=heads,
            dtype=dtype,
        )
    if model is None:
        raise CheckpointError(
            f"{args.source}: no config.yaml saved with this checkpoint; pass --config with the model's "
            "num_attention_heads and tokenizer"
        )
    if target == "sat":
        return export_sat(
            source, args.output, model, model_parallel_size=args.model_parallel_size, dtype=dtype
        )
    return export_hf(source, args.output, model, dtype=dtype, max_shard_bytes=args.max_shard_size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("glm-convert", lambda: print(f"wrote {run(args)}"))


if __name__ == "__main__":
    sys.exit(main())
