"""DeepSpeed's optimizer step inside glm-pretrain's engine: DeepSpeed's own against ours (``training/fused_zero.py``
for the ZeRO optimizer, ``training/fused_bf16.py`` for bf16 ZeRO-1's BF16 optimizer, which has no other variant
here), side by side in one process per configuration.

    python benchmarks/bench_optimizer_step.py                      # bf16 ZeRO-2, fp32 ZeRO-1, fp32 ZeRO-2
    python benchmarks/bench_optimizer_step.py --configs bf16:2 --layers 24 --hidden 1024

For each configuration one rank builds ``TrainingEngine`` (24 layers by default: 293 parameter tensors, as
glm-large) and reports, for DeepSpeed's step and for ours:

- the data operations dispatched inside ``deepspeed_engine.step()`` (a ``TorchDispatchMode`` count; views and
  allocations left out): on a GPU each one is a kernel launch, host time on a step bound by its host;
- the tensor values read on the host inside it (``.item()``, ``bool()``, ...): on a GPU each one waits for the
  backward to finish;
- the median time of a whole ``train_step`` (forward, backward, step), the two variants alternating in blocks of
  steps on the same engine, the results read after each step.

On a CPU every operation runs inline and a read waits for nothing, so the times differ by little there; the
operation and read counts are those a GPU would see.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Operations that move no data: left out of the count.
_METADATA = {
    "aten.view",
    "aten.t",
    "aten.transpose",
    "aten.detach",
    "aten.slice",
    "aten.expand",
    "aten._unsafe_view",
    "aten.as_strided",
    "aten.select",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.alias",
    "aten.reshape",
    "aten.narrow",
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.lift_fresh",
}


def _measure(rank: int, world_size: int, precision: str, zero_stage: int, args: dict) -> dict:
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_glm import parallel
    from megatron_glm.config import load_config, padded_vocab_size, parallel_layout
    from megatron_glm.training.engine import TrainingEngine
    from megatron_glm.training.fused_zero import REPLACED_METHODS, fuse_zero_optimizer
    from tests.host_reads import host_reads_recorded
    from tests.tiny_glm import TINY_SETTINGS, engine_batches

    overrides = [
        *TINY_SETTINGS,
        f"model.num_layers={args['layers']}",
        f"model.hidden_size={args['hidden']}",
        "model.kernels=torch",
        f"training.precision={precision}",
        "training.micro_batch_size=2",
        "training.global_batch_size=2",
        "training.train_steps=100000",
        f"parallel.zero_stage={zero_stage}",
    ]
    cfg = load_config(None, overrides)
    layout = parallel_layout(cfg, world_size)
    parallel.initialize_parallel(1, 1)
    parallel.seed_parallel_rng(cfg.training.seed)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    engine = TrainingEngine(cfg, layout, padded_vocab_size(cfg.model, 1), device)
    ds = engine.deepspeed_engine
    optimizer = ds.optimizer
    ours_available = REPLACED_METHODS[0] in vars(optimizer)
    check_grad_overflow = DeepSpeedBF16Config().check_grad_overflow  # what glm-pretrain's config leaves it at

    def use(variant: str) -> None:
        if not ours_available:
            return
        if variant == "ours":
            fuse_zero_optimizer(optimizer)
        else:  # DeepSpeed's methods and its per-gradient test, as deepspeed.initialize left them
            for name in REPLACED_METHODS:
                vars(optimizer).pop(name, None)
            optimizer.glm_norm_decides = False
            optimizer.check_grad_overflow = check_grad_overflow if precision == "bf16" else False

    counts: collections.Counter = collections.Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name not in _METADATA:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    real_step, reads, recording = ds.step, [], [False]

    def step(*step_args, **step_kwargs):
        if not recording[0]:
            return real_step(*step_args, **step_kwargs)
        with _Count(), host_reads_recorded(reads):
            return real_step(*step_args, **step_kwargs)

    ds.step = step
    batches = engine_batches(pin=cuda)

    def train_step() -> float:
        """A step, its loss read at once (on a GPU: the step's work finished)."""
        return engine.train_step(batches).loss

    # Without a ZeRO optimizer of DeepSpeed's (bf16 ZeRO-1) only ours runs: fused_bf16 replaced the BF16 optimizer's.
    variants = ("deepspeed", "ours") if ours_available else ("ours",)
    results = {}
    for variant in variants:
        use(variant)
        for _ in range(3):  # the optimizer's state, the first allocations
            train_step()
        counts.clear()
        reads.clear()
        recording[0] = True
        train_step()
        recording[0] = False
        results[variant] = {"ops": sum(counts.values()), "reads": len(reads), "times": []}
    for round_index in range(args["rounds"]):
        for variant in variants if round_index % 2 == 0 else variants[::-1]:
            use(variant)
            train_step()
            for _ in range(args["steps"]):
                start = time.perf_counter()
                train_step()
                results[variant]["times"].append(time.perf_counter() - start)
    parallel.destroy_parallel()
    for result in results.values():
        result["ms"] = statistics.median(result.pop("times")) * 1e3
    name = type(optimizer).__name__
    return {"results": results, "optimizer": name, "params": sum(1 for _ in ds.module.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        default="bf16:2,fp32:1,fp32:2",
        help="precision:ZeRO stage pairs, comma-separated (bf16 ZeRO-1 runs the BF16 optimizer, ours only)",
    )
    parser.add_argument(
        "--layers", type=int, default=24, help="transformer layers (24: 293 parameter tensors)"
    )
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (4 heads)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=8, help="blocks per variant, alternating")
    args = parser.parse_args()

    from tests.multiproc import run_ranks

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"# DeepSpeed's optimizer step in glm-pretrain's engine; {device}; {args.layers} layers, hidden {args.hidden}"
    )
    print(
        "| precision | ZeRO | optimizer | step | data operations in the step | host reads in the step | train_step ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for item in args.configs.split(","):
        precision, stage = item.split(":")
        (out,) = run_ranks(_measure, 1, precision, int(stage), vars(args))
        for variant, result in out["results"].items():
            label = "DeepSpeed's" if variant == "deepspeed" else "ours"
            print(
                f"| {precision} | {stage} | {out['optimizer']} ({out['params']} tensors) | {label} | "
                f"{result['ops']:,} | {result['reads']} | {result['ms']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
