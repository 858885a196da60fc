"""Training-step throughput of GLM layers on this machine, side by side with HF BERT, and the MFU.

Both models get the same shape (layers, hidden, heads, sequence, batch), the same precision setup and
the same step: forward, loss, backward, ``torch.optim.AdamW`` step. In bf16 the weights themselves are
bf16 (what DeepSpeed's bf16 mode runs the model in). The matmul peak is measured in the same run
(median of 2048^3 matmuls in the same dtype), so the MFU and the ratio do not depend on how busy the
machine was at another time.

    python benchmarks/bench_model.py                        # glm-base shape: 12 x 768, 12 heads, T = 512
    python benchmarks/bench_model.py --layers 2 --batch 2   # a quick check

FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add; ``model_flops_per_token``):
GLM ``72 L h^2 + 12 L h T + 6 V h f`` where f is the fraction of positions with a loss (GLM computes
logits only there); BERT the same with f = 1 (its MLM head scores every position) plus ``6 h^2`` for
the head's dense transform. MFU = FLOPs per token x tokens/s / measured matmul peak.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from megatron_glm import parallel
from megatron_glm.config import ModelConfig, model_flops_per_token
from megatron_glm.model import GLMModel, glm_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=30592, help="padded BERT vocabulary of GLM-Base")
    parser.add_argument(
        "--loss-fraction",
        type=float,
        default=0.18,
        help="fraction of positions in Part B (with a loss); token-mode GLM at 15%% masking",
    )
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-bert", action="store_true", help="skip the HF BERT baseline")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    return parser.parse_args()


def median_seconds(step: Callable[[], None], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each model, timed in turns (A B A B ...) so drifts in the machine's load
    hit every model alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def matmul_peak(dtype: torch.dtype, size: int = 2048) -> float:
    """FLOP/s of a ``size``^3 matmul in ``dtype`` (median of 5)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), steps=5, warmup=1)
    return 2.0 * size**3 / seconds


def glm_batch(args: argparse.Namespace) -> dict:
    """Part A of (1 - loss_fraction) T tokens, then one long Part B: the loss sits on Part B."""
    g = torch.Generator().manual_seed(0)
    batch, length = args.batch, args.seq
    sep = length - max(1, round(args.loss_fraction * length))
    positions = torch.arange(length).clamp(max=sep - 1).expand(batch, length)
    block_positions = (torch.arange(length) - sep + 1).clamp(min=0).expand(batch, length)
    loss_mask = (torch.arange(length) >= sep).float().expand(batch, length).contiguous()
    return {
        "tokens": torch.randint(0, args.vocab, (batch, length), generator=g),
        "targets": torch.randint(0, args.vocab, (batch, length), generator=g),
        "position_ids": torch.stack([positions, block_positions], dim=1).contiguous(),
        "sep": torch.full((batch,), sep),
        "loss_mask": loss_mask,
    }


def glm_step(args: argparse.Namespace, dtype: torch.dtype) -> tuple[Callable[[], None], float]:
    config = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq,
        vocab_size=args.vocab,
        kernels="torch",
    )
    model = GLMModel(config, args.vocab, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = glm_batch(args)
    forward = torch.compile(model) if args.compile else model

    def step() -> None:
        hidden = forward(batch["tokens"], batch["position_ids"], batch["sep"])
        glm_loss(model, hidden, batch["targets"], batch["loss_mask"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    fraction = batch["loss_mask"].mean().item()
    return step, model_flops_per_token(config, args.vocab, args.seq, logit_fraction=fraction)


def bert_step(args: argparse.Namespace, dtype: torch.dtype) -> tuple[Callable[[], None], float]:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq,
    )
    model = BertForMaskedLM(config).to(dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = glm_batch(args)
    labels = batch["targets"].masked_fill(batch["loss_mask"] == 0, -100)
    forward = torch.compile(model) if args.compile else model

    def step() -> None:
        forward(input_ids=batch["tokens"], labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    shape = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads)
    return step, model_flops_per_token(shape, args.vocab, args.seq) + 6.0 * args.hidden**2


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    parallel.initialize_parallel(1, 1)
    parallel.seed_parallel_rng(1234)
    tokens = args.batch * args.seq
    print(
        f"# GLM vs HF BertForMaskedLM, training step (fwd + bwd + AdamW), {args.layers} layers, h {args.hidden}, "
        f"{args.heads} heads, T {args.seq}, batch {args.batch}, vocab {args.vocab}, loss on "
        f"{args.loss_fraction:.0%} of positions"
    )
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} threads{', torch.compile' if args.compile else ''}"
    )
    print(
        "# FLOPs/token: GLM 72Lh^2 + 12LhT + 6Vh*f (f = loss fraction), BERT the same with f = 1 plus 6h^2; "
        "MFU = FLOPs/token x tokens/s / matmul peak (2048^3, same dtype, this run)\n"
    )
    print("| model | dtype | step ms | tokens/s | GFLOP/s | matmul peak GFLOP/s | MFU | speed vs BERT |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        peak = matmul_peak(dtype)
        rows = [("GLM (ours)", *glm_step(args, dtype))]
        if not args.no_bert:
            rows.append(("HF BertForMaskedLM", *bert_step(args, dtype)))
        seconds = interleaved_medians({label: step for label, step, _ in rows}, args.steps, args.warmup)
        for label, _, flops_per_token in rows:
            throughput = tokens / seconds[label]
            achieved = flops_per_token * throughput
            ratio = f"{seconds['HF BertForMaskedLM'] / seconds[label]:.2f}x" if not args.no_bert else "-"
            print(
                f"| {label} | {name} | {seconds[label] * 1e3:.0f} | {throughput:.0f} | {achieved / 1e9:.1f} | "
                f"{peak / 1e9:.1f} | {achieved / peak:.1%} | {ratio} |"
            )
    parallel.destroy_parallel()


if __name__ == "__main__":
    main()
