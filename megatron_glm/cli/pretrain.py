"""``glm-pretrain``: GLM pretraining on DeepSpeed, launched by torchrun, deepspeed, srun or mpirun alike."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
import warnings

from megatron_glm.config import add_override_argument, load_config, validate_config
from megatron_glm.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm-pretrain",
        description="Pretrain GLM with blank infilling on DeepSpeed (ZeRO 0-3; tensor x pipeline x data "
        "parallelism). Every rank runs this command; the launcher sets the ranks.",
        epilog="Examples:\n"
        "  torchrun --nproc_per_node 8 -m megatron_glm.cli.pretrain --config run/configs/glm-large.yaml\n"
        "  srun python -m megatron_glm.cli.pretrain --config run/configs/glm-10b.yaml\n"
        "  mpirun -np 16 glm-pretrain --config run/configs/glm-2b.yaml --set parallel.tensor_parallel_size=2\n"
        "Resumes from checkpoint.save_dir's latest checkpoint when one exists. SIGTERM or SIGUSR1 saves a\n"
        "checkpoint at the next step and exits 0.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. run/configs/glm-tiny.yaml")
    add_override_argument(parser)
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment it also sets.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="only build (or find) the sample directory of the config's data section, print its path and "
        "exit: run it once before launching a job so that no rank waits for the build",
    )
    return parser


def triton_cache_environment(env: dict[str, str]) -> dict[str, str]:
    """The Triton settings glm-pretrain adds where the user set none.

    Autotuned tile choices are cached on disk, so a restarted job (on the same node) reuses them instead of
    timing the candidates again, which could pick other tiles and change the summation order (a resume
    would then not be exact). The cache is node-local (``$TMPDIR``), not a shared home directory that
    hundreds of ranks would compile into.
    """
    defaults = {
        "TRITON_CACHE_AUTOTUNING": "1",
        "TRITON_CACHE_DIR": os.path.join(tempfile.gettempdir(), f"glm-triton-{getpass.getuser()}"),
    }
    return {key: value for key, value in defaults.items() if key not in env}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("glm-pretrain", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    validate_config(cfg)
    if args.prepare_only:
        from megatron_glm.data import prepare_sample_directory

        print(
            prepare_sample_directory(
                cfg.data, cfg.model.tokenizer, builder=True, workers=os.cpu_count() or 1, progress=True
            ).path
        )
        return 0
    # DeepSpeed's ZeRO calls a torch collective that torch has renamed; the warning is not ours to fix.
    warnings.filterwarnings(
        "ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )
    os.environ.update(triton_cache_environment(dict(os.environ)))
    from megatron_glm.log import get_logger
    from megatron_glm.training.trainer import pretrain

    result = pretrain(cfg)
    get_logger("training").info(
        "%s at step %d; checkpoint %s", result.status, result.final_step, result.last_checkpoint
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
