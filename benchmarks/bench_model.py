"""Training-step throughput of GLM layers on this machine, side by side with HF BERT, and the MFU.

Both models get the same shape (layers, hidden, heads, sequence, batch), the same precision setup, the
same dropout and the same step: forward, loss, backward, fused ``torch.optim.AdamW`` step. In bf16 the
weights themselves are bf16 (what DeepSpeed's bf16 mode runs the model in). GLM runs once per kernel
backend (``--kernels``: Triton and/or torch); BERT uses torch's SDPA attention. Steps are timed in turns,
and the matmul peak is measured in the same run (the fastest square matmul in the same dtype, up to
8192^3 on a GPU and 1024^3 on a CPU, ``training.hardware.measure_matmul_peak``), so the MFU and the ratios do not depend on how busy the machine was at another time.

    python benchmarks/bench_model.py                        # glm-base shape: 12 x 768, 12 heads, T = 512
    python benchmarks/bench_model.py --preset glm-large     # 24 x 1024, 16 heads, T 512, batch 16, bf16
    python benchmarks/bench_model.py --layers 2 --batch 2   # a quick check

FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add; ``model_flops_per_token``):
GLM ``72 L h^2 + 12 L h T + 6 V h f`` where f is the fraction of positions with a loss (GLM computes
logits only there); BERT the same with f = 1 (its MLM head scores every position) plus ``6 h^2`` for
the head's dense transform. MFU = FLOPs per token x tokens/s / measured matmul peak.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from megatron_glm import parallel
from megatron_glm.config import ModelConfig, model_flops_per_token
from megatron_glm.model import GLMModel, glm_loss, loss_row_index
from megatron_glm.model.cuda_graphs import enable_layer_graphs
from megatron_glm.training.hardware import measure_matmul_peak
from megatron_glm.training.metrics import gpu_kernel_ms, stop_profiler
from megatron_glm.training.timeline import idle_report, profile_events

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# THUDM/GLM's GLM-Large recipe on one GPU: micro batch 16, bf16, dropout 0.1, Triton and torch kernels.
PRESETS = {
    "glm-large": {
        "layers": 24,
        "hidden": 1024,
        "heads": 16,
        "seq": 512,
        "batch": 16,
        "dtypes": "bf16",
        "kernels": "triton,torch",
        "steps": 10,
        "warmup": 3,
    },
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="a recipe's shapes; other flags override it"
    )
    parser.add_argument("--device", default="auto", help="cuda, cpu, or auto (a GPU when there is one)")
    parser.add_argument(
        "--kernels",
        default=None,
        help="GLM rows: triton, torch, triton-atomic (Triton with the attention's dQ added by atomics: "
        "model.deterministic_kernels=false) (default: triton,torch on a GPU, torch on a CPU)",
    )
    parser.add_argument(
        "--dropout",
        default="0.1",
        help="hidden and attention dropout of both models; several comma-separated values give a table row "
        "per value (--profile profiles the first)",
    )
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
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="on a GPU, also each model's whole step captured in one CUDA graph and replayed (a separate copy "
        "of the model): the step without the host's launch overhead; a model that cannot be captured gets "
        "a row that says why",
    )
    parser.add_argument(
        "--layer-graphs",
        action="store_true",
        help="on a GPU, also GLM rows with per-layer CUDA graphs (training.cuda_graphs: each layer's forward "
        "and backward captured at the first step, after warm-up passes, and replayed from then on)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the table, where each model's step spends its time (torch.profiler; run after all the "
        "timing, on models built again, so that no row is timed after a profile)",
    )
    args = parser.parse_args()
    explicit = {a.dest for a in parser._actions if any(flag in sys.argv for flag in a.option_strings)}
    for key, value in PRESETS.get(args.preset, {}).items():
        if key not in explicit:
            setattr(args, key, value)
    if args.layer_graphs:
        args.warmup = max(args.warmup, 2)  # the step that captures (and warms up), then a replay
    args.device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.device.type == "cuda" and args.device.index is None:
        # torch.cuda.set_device needs an index: "cuda" means the current device.
        args.device = torch.device("cuda", torch.cuda.current_device())
    if args.kernels is None:
        args.kernels = "triton,torch" if args.device.type == "cuda" else "torch"
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call, the GPU's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    return statistics.median(timed(step, device) for _ in range(steps))


def interleaved_medians(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per step of each model, timed in turns (A B A B ...) so drifts in the machine's load
    and clocks hit every model alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            times[label].append(timed(step, device))
    return {label: statistics.median(values) for label, values in times.items()}


def glm_batch(args: argparse.Namespace) -> dict:
    """Part A of (1 - loss_fraction) T tokens, then one long Part B: the loss sits on Part B."""
    g = torch.Generator().manual_seed(0)
    rows, length = args.batch, args.seq
    sep = length - max(1, round(args.loss_fraction * length))
    positions = torch.arange(length).clamp(max=sep - 1).expand(rows, length)
    block_positions = (torch.arange(length) - sep + 1).clamp(min=0).expand(rows, length)
    loss_mask = (torch.arange(length) >= sep).float().expand(rows, length).contiguous()
    batch = {
        "tokens": torch.randint(0, args.vocab, (rows, length), generator=g),
        "targets": torch.randint(0, args.vocab, (rows, length), generator=g),
        "position_ids": torch.stack([positions, block_positions], dim=1).contiguous(),
        "sep": torch.full((rows,), sep),
        "loss_mask": loss_mask,
        # As the data loader ships it: computed on the host, so selecting the loss rows needs no sync.
        "loss_index": loss_row_index(loss_mask),
    }
    return {key: value.to(args.device) for key, value in batch.items()}


def glm_step(
    args: argparse.Namespace,
    dtype: torch.dtype,
    kernels: str,
    dropout: float,
    capturable: bool = False,
    layer_graphs: bool = False,
) -> tuple[Callable[[], None], float]:
    backend, _, variant = kernels.partition("-")
    if (
        backend not in ("triton", "torch")
        or variant not in ("", "atomic")
        or (variant and backend != "triton")
    ):
        raise SystemExit(f"--kernels: {kernels!r} is not one of triton, torch, triton-atomic")
    config = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq,
        vocab_size=args.vocab,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        kernels=backend,
        deterministic_kernels=variant != "atomic",
    )
    model = GLMModel(config, args.vocab, device="meta")
    model.to_empty(device=args.device)
    model.reset_parameters(1234)
    model = model.to(dtype).train()
    if layer_graphs:
        enable_layer_graphs(model.transformer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=capturable)
    batch = glm_batch(args)
    forward = torch.compile(model) if args.compile else model

    def step() -> None:
        hidden = forward(batch["tokens"], batch["position_ids"], batch["sep"])
        glm_loss(model, hidden, batch["targets"], batch["loss_mask"], batch["loss_index"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    fraction = batch["loss_mask"].mean().item()
    return step, model_flops_per_token(config, args.vocab, args.seq, logit_fraction=fraction)


def bert_step(
    args: argparse.Namespace, dtype: torch.dtype, dropout: float, capturable: bool = False
) -> tuple[Callable[[], None], float]:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        attn_implementation="sdpa",
    )
    model = BertForMaskedLM(config).to(args.device, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=capturable)
    batch = glm_batch(args)
    labels = batch["targets"].masked_fill(batch["loss_mask"] == 0, -100)
    forward = torch.compile(model) if args.compile else model

    def step() -> None:
        forward(input_ids=batch["tokens"], labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    shape = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads)
    return step, model_flops_per_token(shape, args.vocab, args.seq) + 6.0 * args.hidden**2


def cuda_graph_of(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured in one CUDA graph (after three warm-up steps on a side stream, which also run Triton's
    autotuning); returns the graph's replay. Raises where the step cannot be captured (a host sync, an RNG
    state copy such as activation recomputation's)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # Attention dropout draws from the tensor-parallel RNG streams: each replay must advance them, as it
    # advances the default generator, which the graph registers by itself.
    for generator in parallel.get_rng_tracker().cuda_generators():
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def plain_rows(args: argparse.Namespace, dtype: torch.dtype, dropout: float) -> list[tuple]:
    """(label, step, FLOPs per token) of GLM's eager step with each of ``--kernels``."""
    return [
        (f"GLM, kernels={kernels}", *glm_step(args, dtype, kernels, dropout))
        for kernels in args.kernels.split(",")
    ]


def profile_steps(
    steps: dict[str, Callable[[], None]], device: torch.device, rows: int = 12, cuda_graphs: bool = False
) -> str:
    """The ops that take the most (GPU, else CPU) time over three steps of each model (``cuda_graphs``: the
    process has captured CUDA graphs, which decides whether CUPTI may be torn down after each profile)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    for label, step in steps.items():
        for _ in range(2):  # a fresh model: its first step sets up the optimizer's state
            step()
        synchronize(device)
        prof = profile(activities=activities)
        prof.__enter__()
        start = time.perf_counter()
        for _ in range(3):
            step()
        synchronize(device)
        wall = (time.perf_counter() - start) / 3
        stop_profiler(prof, cuda_graphs)
        averages = prof.key_averages()
        out.append(f"\n# profile of {label}, 3 steps, top {rows} by {key.replace('_', ' ')}")
        if device.type == "cuda":
            # Kernel time summed over the step against the step's wall time (profiled): a step whose GPU
            # is busy for much less than its wall time is bound by the host (Python, launches, syncs).
            busy = gpu_kernel_ms(averages) / 3
            out.append(
                f"# {label}: wall {wall * 1e3:.1f} ms per step under the profiler, GPU kernels {busy:.1f} ms"
            )
            idle = idle_report(profile_events(prof), steps=3)
            out.append("# " + idle.rstrip().replace("\n", "\n# "))
        out.append(averages.table(sort_by=key, row_limit=rows, max_name_column_width=60))
        out.append(host_profile(label, step, device, rows))
    return "\n".join(out)


def host_profile(label: str, step: Callable[[], None], device: torch.device, rows: int) -> str:
    """The Python functions where the host spends a step (cProfile over three steps, by own time): on a step
    bound by its host, which launch wrappers, hooks and library loops hold the GPU back."""
    import cProfile
    import io
    import pstats

    synchronize(device)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(3):
        step()
    profiler.disable()
    host = (time.perf_counter() - start) / 3
    synchronize(device)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    # pstats' header and the table, without the blank lines and the "Ordered by" preamble.
    table = [line for line in text.getvalue().splitlines() if line.strip() and "Ordered by" not in line]
    return (
        f"\n# host (Python) profile of {label}, 3 steps under cProfile: {host * 1e3:.1f} ms of host time per "
        f"step until its last launch; top {rows} functions by own time (tottime: in the function itself, "
        "cumtime: with what it calls; seconds over the 3 steps)\n" + "\n".join(table)
    )


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def main() -> None:
    args = parse_args()
    device = args.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    parallel.initialize_parallel(1, 1)
    parallel.seed_parallel_rng(1234)
    tokens = args.batch * args.seq
    bert = "HF BertForMaskedLM (SDPA)"
    print(
        f"# GLM vs HF BertForMaskedLM, training step (fwd + loss + bwd + fused AdamW), {args.layers} layers, "
        f"h {args.hidden}, {args.heads} heads, T {args.seq}, batch {args.batch}, vocab {args.vocab}, "
        f"loss on {args.loss_fraction:.0%} of positions"
    )
    versions = f"torch {torch.__version__}"
    if device.type == "cuda":
        import triton

        versions += f", triton {triton.__version__}, CUDA {torch.version.cuda}"
    else:
        versions += f", {args.threads} threads"
    print(f"# {device_description(device)}; {versions}{', torch.compile' if args.compile else ''}")
    print(
        "# FLOPs/token: GLM 72Lh^2 + 12LhT + 6Vh*f (f = loss fraction), BERT the same with f = 1 plus 6h^2; "
        f"MFU = FLOPs/token x tokens/s / matmul peak (same dtype, this run); median of {args.steps} "
        "interleaved steps\n"
    )
    print(
        "| model | dtype | dropout | step ms | tokens/s | TFLOP/s | matmul peak TFLOP/s | MFU | speed vs BERT |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    dropouts = [float(value) for value in str(args.dropout).split(",")]
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        peak = measure_matmul_peak(device, dtype, budget_s=3.0)
        for dropout in dropouts:
            rows = plain_rows(args, dtype, dropout)
            if args.layer_graphs and device.type == "cuda":
                for kernels in args.kernels.split(","):
                    label = f"GLM, kernels={kernels}, layer graphs"
                    try:
                        step, flops_per_token = glm_step(args, dtype, kernels, dropout, layer_graphs=True)
                        for _ in range(2):  # the step that captures the layers, then a replay
                            step()
                        torch.cuda.synchronize(device)
                        rows.append((label, step, flops_per_token))
                    except Exception as error:  # noqa: BLE001 (reported as the row's result)
                        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}"
                        print(f"| {label} | {name} | {dropout:g} | capture failed: {reason} | | | | | |")
                        torch.cuda.synchronize(device)
            if not args.no_bert:
                rows.append((bert, *bert_step(args, dtype, dropout)))
            if args.cuda_graph and device.type == "cuda":
                builders = [
                    (
                        f"GLM, kernels={kernels}",
                        functools.partial(glm_step, args, dtype, kernels, dropout, True),
                    )
                    for kernels in args.kernels.split(",")
                ]
                if not args.no_bert:
                    builders.append((bert, functools.partial(bert_step, args, dtype, dropout, True)))
                for label, build in builders:
                    try:
                        step, flops_per_token = build()
                        rows.append((f"{label}, CUDA graph", cuda_graph_of(step), flops_per_token))
                    except Exception as error:  # noqa: BLE001 (reported as the row's result)
                        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}"
                        print(
                            f"| {label}, CUDA graph | {name} | {dropout:g} | capture failed: {reason} | | | | | |"
                        )
                        torch.cuda.synchronize(device)
            steps = {label: step for label, step, _ in rows}
            seconds = interleaved_medians(steps, args.steps, args.warmup, device)
            for label, _, flops_per_token in rows:
                throughput = tokens / seconds[label]
                achieved = flops_per_token * throughput
                ratio = f"{seconds[bert] / seconds[label]:.2f}x" if not args.no_bert else "-"
                print(
                    f"| {label} | {name} | {dropout:g} | {seconds[label] * 1e3:.1f} | {throughput:,.0f} | "
                    f"{achieved / 1e12:.2f} | {peak / 1e12:.1f} | {achieved / peak:.1%} | {ratio} |"
                )
            del rows, steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if device.type == "cuda":
        print(f"\n# peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    # The profiles last, on models built again, after every timing: CUPTI's callbacks slow the launches after a
    # profile (see megatron_glm.training.metrics.stop_profiler), which used to slow every row timed after one.
    if args.profile:
        for name in args.dtypes.split(","):
            rows = plain_rows(args, DTYPES[name], dropouts[0])
            if not args.no_bert:
                rows.append((bert, *bert_step(args, DTYPES[name], dropouts[0])))
            graphs = device.type == "cuda" and (args.cuda_graph or args.layer_graphs)
            print(profile_steps({label: step for label, step, _ in rows}, device, cuda_graphs=graphs))
            del rows
    parallel.destroy_parallel()


if __name__ == "__main__":
    main()
