"""GPU benchmark of the fused kernels: GLM attention and LayerNorm, Triton against torch, side by side in one run.

    python benchmarks/bench_kernels_gpu.py              # one GPU; prints markdown tables, about 1-3 minutes
    TRITON_INTERPRET=1 python benchmarks/bench_kernels_gpu.py --smoke   # CPU: tiny sizes, proves the script runs

Attention: 16 heads (8 at head dim 128), bf16, about 16K tokens per step (batch = 16384 / T), forward and
forward+backward, at T 512-8192 and head dims 64 and 128 (``--lengths``, ``--head-dims``):
  ours        kernels.glm_attention (Triton) with sep = 0 (causal) and sep = T/2 (GLM), and with dropout 0.1:
              the backward reading the keep bits the forward stored (the default up to
              GLM_KERNELS_DROPOUT_MASK_MAX_MIB, 64 MiB per call, here below T 4096 at D 64), ("bits from dQ")
              the forward keeping none, the dQ kernel drawing the mask first and storing it for dK/dV (the
              default past that size), and ("replayed") both backward kernels drawing it again from Philox
              (GLM_KERNELS_DROPOUT_BACKWARD_MASK_MAX_MIB=0); and
              ("atomic dQ") with dQ added by the dK/dV kernel with atomics (deterministic=False,
              model.deterministic_kernels: false), without and with dropout
  sdpa-mask   torch scaled_dot_product_attention with the equivalent dense boolean mask (our torch path),
              without and with dropout 0.1 (up to T 4096: the mask is B x T x T)
  sdpa-causal torch scaled_dot_product_attention(is_causal=True): the flash path, the speed to match; also
              with dropout 0.1 (torch's flash kernel has dropout)
  flex        torch FlexAttention with the prefix-LM BlockMask ``(kv <= q) | (kv < sep[b])``, torch.compile'd,
              the block mask built once per batch shape (FlexAttention has no dropout)
The summary table gives ours (sep = T/2) over sdpa-causal and over flex, and ours with dropout (both ways) over
ours without.
FLOPs count only the visible (query, key) pairs, for every row: 4*D per pair forward (QK^T and PV), 10*D per
pair backward (five matmuls), so forward+backward = 14*D*pairs*B*H. Pairs for sep s: s^2 + (T(T+1) - s(s+1))/2
(T(T+1)/2 when causal). The masked SDPA computes all T^2 pairs; it is credited with the visible ones only.

LayerNorm: bf16, rows x width = 64M elements (larger than L2), forward+backward. GB/s counts the minimum traffic:
plain LN reads x and writes y, then reads x, dy and writes dx (5 tensors); with the fused residual add it reads
x, residual and writes y, x + residual, then reads x + residual, dy, d(x + residual) and writes dx (8 tensors).
torch's residual variant is `F.layer_norm(x + residual)`, credited with the same bytes. The "+bias +residual
+dropout" rows are the post-attention LayerNorm in training, `LN(residual + dropout(x + bias, 0.1))` with the
attention's dense bias (`skip_bias_add`): ours adds the bias and drops in the kernel (and again in the backward,
writing x's gradient through the mask and summing the bias's: 9 tensors), torch adds the bias and runs `F.dropout`
first, and sums the bias's gradient; both are credited with 9 tensors. The yardstick is the GPU's
device-to-device copy bandwidth, measured in the same run (`dst.copy_(src)` of one such tensor: its bytes read
plus written over the time); the LayerNorm summary gives Triton over torch and Triton's GB/s as a share of it.

A deadline (--budget seconds, default 200) skips what is left once it passes; an alarm 40 s later aborts the
run, printing the rows measured so far, so one run always ends within 4 minutes. The attention runs each length
at every head dim before the next length, so a short budget leaves out the longest lengths, not a head dim.
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

import kernels.triton_attention_backward_kernels
import kernels.triton_attention_kernels
import kernels.triton_layer_norm  # noqa: F401 - the three register their autotuned kernels in AUTOTUNED
import kernels.triton_layer_norm_kernels
from kernels import glm_attention, glm_attention_torch, layer_norm, layer_norm_torch, triton_support
from kernels.triton_support import AUTOTUNED


class Deadline(Exception):
    """Raised by the alarm that ends a run which outlived its budget by a minute."""


def _raise_deadline(signum, frame) -> None:
    raise Deadline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(
    fn: Callable[[], object], device: torch.device, min_seconds: float, max_iterations: int
) -> float:
    """Median milliseconds of ``fn`` after two warm-up calls (which also run Triton's autotuning and compiling)."""
    for _ in range(2):
        fn()
    _sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - started < min_seconds and len(times) < max_iterations):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def visible_pairs(length: int, sep: int) -> int:
    return sep * sep + (length * (length + 1) - sep * (sep + 1)) // 2


def relative_difference(
    first: Callable, second: Callable, inputs: list[torch.Tensor], grads: list[torch.Tensor]
) -> float:
    """Largest ``max|a - b| / max|b|`` over the outputs and input gradients of two implementations."""
    results = []
    for fn in (first, second):
        for t in inputs:
            t.grad = None
        outputs = fn()
        outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
        torch.autograd.backward(outputs, grads[: len(outputs)])
        results.append(
            [o.detach().float() for o in outputs] + [t.grad.float() for t in inputs if t.grad is not None]
        )
    return max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(*results))


def _time_pair(
    forward: Callable, forward_backward: Callable, args, device: torch.device
) -> tuple[float, float]:
    with torch.no_grad():
        forward_ms = measure_ms(forward, device, args.min_seconds, args.max_iterations)
    return forward_ms, measure_ms(forward_backward, device, args.min_seconds, args.max_iterations)


def _flex_prefix_lm(length: int, batch: int, heads: int, device: torch.device) -> Callable | None:
    """FlexAttention under GLM's mask with sep = T/2: the BlockMask built once, the kernel compiled."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if device.type != "cuda":
        return None
    sep = torch.full((batch,), length // 2, device=device, dtype=torch.int64)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < sep[b])

    block_mask = create_block_mask(prefix_lm, batch, None, length, length, device=device)
    compiled = _compiled_flex(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


@functools.cache
def _compiled_flex(flex_attention: Callable) -> Callable:
    # One compiled kernel per (T, head dim): allow more recompiles than dynamo's default of 8.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    return torch.compile(flex_attention, dynamic=False)


def _attention_variants(
    length: int, batch: int, heads: int, device: torch.device
) -> list[tuple[str, Callable | None, int]]:
    """(name, attention(q, k, v) or None where it does not apply, sep used for the FLOP count)."""
    half = torch.full((batch,), length // 2, device=device, dtype=torch.int64)
    zero = torch.zeros(batch, device=device, dtype=torch.int64)

    def ours(
        sep: torch.Tensor, dropout_p: float = 0.0, deterministic: bool = True, mask: str = "forward"
    ) -> Callable:
        """``mask``: who stores the dropout decisions: the forward, the backward's dQ kernel, or none."""
        limits = {"forward": (2**62, 0), "dQ": (0, 2**62), "none": (0, 0)}[mask]

        def attention(q, k, v):
            # The forward decides whether to keep its decisions and returns the autograd node, whose backward
            # reads the backward's limit when it runs: both stay set until the caller's backward is done.
            triton_support.DROPOUT_MASK_MAX_BYTES, triton_support.DROPOUT_BACKWARD_MASK_MAX_BYTES = limits
            return glm_attention(
                q, k, v, sep, dropout_p=dropout_p, backend="triton", deterministic=deterministic
            )

        return attention

    def masked(dropout_p: float) -> Callable | None:
        if length > 4096:
            return None
        return lambda q, k, v: glm_attention_torch(q, k, v, half, dropout_p=dropout_p)

    def causal(dropout_p: float) -> Callable:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)

    # What issue 11's targets compare first: when the time budget runs out, the rows at the end go first.
    return [
        ("ours sep=T/2", ours(half), length // 2),
        ("sdpa-causal", causal(0.0), 0),
        ("ours sep=T/2 atomic dQ", ours(half, deterministic=False), length // 2),
        ("flex prefix-LM sep=T/2", _flex_prefix_lm(length, batch, heads, device), length // 2),
        ("ours sep=T/2 dropout 0.1", ours(half, 0.1), length // 2),
        ("ours sep=T/2 dropout 0.1 atomic dQ", ours(half, 0.1, deterministic=False), length // 2),
        ("sdpa-causal dropout 0.1", causal(0.1), 0),
        ("ours sep=T/2 dropout 0.1 bits from dQ", ours(half, 0.1, mask="dQ"), length // 2),
        ("ours sep=T/2 dropout 0.1 replayed", ours(half, 0.1, mask="none"), length // 2),
        ("sdpa-mask sep=T/2 dropout 0.1", masked(0.1), length // 2),
        ("sdpa-mask sep=T/2", masked(0.0), length // 2),
        ("ours sep=0", ours(zero), 0),
    ]


def attention_rows(
    args, device: torch.device, deadline: float, length: int, head_dim: int, speeds: dict
) -> list[str]:
    """The table rows of one (T, head dim); fwd+bwd TFLOP/s of each variant go into ``speeds[(T, D)]``. The
    variants set the dropout mask's size limits as they go; they are as they were afterwards."""
    limits = triton_support.DROPOUT_MASK_MAX_BYTES, triton_support.DROPOUT_BACKWARD_MASK_MAX_BYTES
    try:
        return _attention_rows(args, device, deadline, length, head_dim, speeds)
    finally:
        triton_support.DROPOUT_MASK_MAX_BYTES, triton_support.DROPOUT_BACKWARD_MASK_MAX_BYTES = limits


def _attention_rows(
    args, device: torch.device, deadline: float, length: int, head_dim: int, speeds: dict
) -> list[str]:
    batch = max(1, args.tokens // length)
    heads = args.heads if head_dim <= 64 else args.heads // 2
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch, heads, length, head_dim)
    q, k, v, grad_out = (
        torch.randn(shape, device=device, dtype=args.dtype, generator=generator) for _ in range(4)
    )
    inputs = [t.requires_grad_() for t in (q, k, v)]
    lead = f"| {length} | {head_dim} | {batch}x{heads}"
    if time.monotonic() > deadline:
        return [f"{lead} | all | skipped: time budget | | | | |"]
    variants = _attention_variants(length, batch, heads, device)
    by_name = {name: attention for name, attention, _ in variants}
    if args.variants:
        variants = [variant for variant in variants if variant[0] in args.variants]
    ours, reference = (
        by_name["ours sep=T/2"],
        by_name["sdpa-mask sep=T/2"] or by_name["flex prefix-LM sep=T/2"],
    )
    difference = (
        relative_difference(lambda: ours(*inputs), lambda: reference(*inputs), inputs, [grad_out])
        if reference is not None
        else math.nan
    )
    measured = speeds.setdefault((length, head_dim), {})
    rows = []
    for name, attention, sep in variants:
        if attention is None:
            continue
        if time.monotonic() > deadline:
            rows.append(f"{lead} | {name} | skipped: time budget | | | | |")
            continue

        def forward(attention=attention) -> torch.Tensor:
            return attention(*inputs)

        def forward_backward(attention=attention) -> None:
            for t in inputs:
                t.grad = None
            attention(*inputs).backward(grad_out)

        try:
            forward_ms, total_ms = _time_pair(forward, forward_backward, args, device)
        except torch.cuda.OutOfMemoryError:
            rows.append(f"{lead} | {name} | out of memory | | | | |")
            torch.cuda.empty_cache()
            continue
        except Exception as error:  # noqa: BLE001 (a baseline that fails here, e.g. flex compiling, is reported)
            rows.append(f"{lead} | {name} | failed: {type(error).__name__}: {str(error)[:120]} | | | | |")
            continue
        flops = 4 * head_dim * visible_pairs(length, sep) * batch * heads
        measured[name] = 3.5 * flops / total_ms / 1e9
        rows.append(
            f"{lead} | {name} | {forward_ms:.3f} | {flops / forward_ms / 1e9:.1f} | "
            f"{total_ms:.3f} | {measured[name]:.1f} | {f'{difference:.1e}' if name == 'ours sep=T/2' else ''} |"
        )
    return rows


def summary_rows(speeds: dict) -> list[str]:
    """Per (T, D): ours over sdpa-causal and flex (fwd+bwd TFLOP/s), ours with dropout over ours without."""

    def ratio(cell: dict, first: str, second: str) -> str:
        return f"{cell[first] / cell[second]:.2f}x" if first in cell and second in cell else "-"

    rows = []
    for (length, head_dim), cell in sorted(speeds.items()):
        rows.append(
            f"| {length} | {head_dim} | {ratio(cell, 'ours sep=T/2', 'sdpa-causal')} | "
            f"{ratio(cell, 'ours sep=T/2', 'flex prefix-LM sep=T/2')} | "
            f"{ratio(cell, 'ours sep=T/2 atomic dQ', 'sdpa-causal')} | "
            f"{ratio(cell, 'ours sep=T/2 dropout 0.1 atomic dQ', 'ours sep=T/2 atomic dQ')} | "
            f"{ratio(cell, 'ours sep=T/2 dropout 0.1', 'ours sep=T/2')} | "
            f"{ratio(cell, 'ours sep=T/2 dropout 0.1 bits from dQ', 'ours sep=T/2')} | "
            f"{ratio(cell, 'ours sep=T/2 dropout 0.1 replayed', 'ours sep=T/2')} | "
            f"{ratio(cell, 'sdpa-causal dropout 0.1', 'sdpa-causal')} | "
            f"{ratio(cell, 'ours sep=T/2 dropout 0.1', 'sdpa-mask sep=T/2 dropout 0.1')} |"
        )
    return rows


def copy_bandwidth(args, device: torch.device) -> float:
    """GB/s of a device-to-device copy of one LayerNorm-sized tensor: read plus written bytes over the time."""
    source = torch.randn(args.elements, device=device).to(args.dtype)
    target = torch.empty_like(source)
    milliseconds = measure_ms(lambda: target.copy_(source), device, args.min_seconds, args.max_iterations)
    return 2 * source.numel() * source.element_size() / milliseconds / 1e6


SUFFIXES = ("", " +residual", " +bias +residual +dropout")


def layer_norm_summary(norm_speeds: dict, copy_gbps: float) -> list[str]:
    """Per width: Triton over torch in fwd+bwd time, and Triton's fwd+bwd GB/s as a share of the copy's."""

    def cell(width: int, name: str) -> float | None:
        return norm_speeds.get((width, name))

    rows = []
    for width in sorted({w for w, _ in norm_speeds}):
        parts = []
        for suffix in SUFFIXES:
            ours, theirs = cell(width, "triton" + suffix), cell(width, "torch" + suffix)
            parts.append(f"{ours / theirs:.2f}x" if ours and theirs else "-")
        for suffix in SUFFIXES:
            ours = cell(width, "triton" + suffix)
            parts.append(f"{100 * ours / copy_gbps:.0f}%" if ours and copy_gbps else "-")
        rows.append(f"| {width} | " + " | ".join(parts) + " |")
    return rows


def layer_norm_rows(
    args, device: torch.device, deadline: float, width: int, norm_speeds: dict | None = None
) -> list[str]:
    count = max(1, args.elements // width)
    generator = torch.Generator(device=device).manual_seed(0)
    x, residual, grad_y, grad_summed = (
        torch.randn(count, width, device=device, dtype=args.dtype, generator=generator) for _ in range(4)
    )
    weight = 1 + 0.1 * torch.randn(width, device=device, dtype=args.dtype, generator=generator)
    bias = 0.1 * torch.randn(width, device=device, dtype=args.dtype, generator=generator)
    x_bias = 0.1 * torch.randn(width, device=device, dtype=args.dtype, generator=generator)
    inputs = [t.requires_grad_() for t in (x, residual, weight, bias, x_bias)]
    variants = [
        ("triton", False, lambda: layer_norm(x, weight, bias, 1e-5, backend="triton")),
        ("torch", False, lambda: layer_norm_torch(x, weight, bias, 1e-5)),
        ("triton +residual", True, lambda: layer_norm(x, weight, bias, 1e-5, residual, backend="triton")),
        ("torch +residual", True, lambda: layer_norm_torch(x, weight, bias, 1e-5, residual)),
        (
            "triton +bias +residual +dropout",
            True,
            lambda: layer_norm(
                x, weight, bias, 1e-5, residual, backend="triton", dropout_p=0.1, x_bias=x_bias
            ),
        ),
        (
            "torch +bias +residual +dropout",
            True,
            lambda: layer_norm_torch(
                torch.nn.functional.dropout(x + x_bias, 0.1), weight, bias, 1e-5, residual
            ),
        ),
    ]
    skipped = [f"| {width} | {count} | {name} | skipped: time budget | | | | |" for name, _, _ in variants]
    if time.monotonic() > deadline:
        return skipped
    grads = [grad_y, grad_summed]
    differences = [relative_difference(variants[i][2], variants[i + 1][2], inputs, grads) for i in (0, 2)]
    tensor_bytes = x.element_size() * count * width
    rows = []
    for index, (name, fused, forward) in enumerate(variants):
        if time.monotonic() > deadline:
            rows.append(skipped[index])
            continue

        def forward_backward(forward=forward, fused=fused) -> None:
            for t in inputs:
                t.grad = None
            out = forward()
            torch.autograd.backward(list(out) if fused else [out], grads[: 1 + fused])

        forward_ms, total_ms = _time_pair(forward, forward_backward, args, device)
        forward_tensors, total_tensors = (4, 8) if fused else (2, 5)
        if name.endswith("+dropout"):
            total_tensors = 9
        if norm_speeds is not None:
            norm_speeds[(width, name)] = total_tensors * tensor_bytes / total_ms / 1e6
        rows.append(
            f"| {width} | {count} | {name} | {forward_ms:.3f} | {forward_tensors * tensor_bytes / forward_ms / 1e6:.0f} | "
            f"{total_ms:.3f} | {total_tensors * tensor_bytes / total_ms / 1e6:.0f} | "
            # (The dropout pair draws different masks: no difference to report.)
            f"{f'{differences[index // 2]:.1e}' if index % 2 == 0 and index < 4 else ''} |"
        )
    return rows


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, few iterations: checks the script runs (CPU ok)"
    )
    parser.add_argument(
        "--budget", type=float, default=200.0, help="seconds after which remaining rows are skipped"
    )
    parser.add_argument(
        "--lengths", default=None, help="attention sequence lengths (default 512,1024,2048,4096,8192)"
    )
    parser.add_argument("--head-dims", default=None, help="attention head dims (default 64,128)")
    parser.add_argument(
        "--variants",
        default=None,
        help="attention rows to run, comma-separated names as in the table (default: all, in that order)",
    )
    parser.add_argument(
        "--widths", default=None, help="LayerNorm widths (default 1024,4096,8192,16384); 'none' skips them"
    )
    parser.add_argument(
        "--min-seconds", type=float, default=None, help="timing per measurement (default 0.2)"
    )
    args = parser.parse_args(argv)
    args.dtype = torch.bfloat16
    if args.smoke:
        lengths, head_dims, args.tokens, args.heads = [64, 96], [32], 192, 2
        widths, args.elements = [256, 1000], 4096
        min_seconds, args.max_iterations = 0.0, 3
    else:
        lengths, head_dims, args.tokens, args.heads = [512, 1024, 2048, 4096, 8192], [64, 128], 16384, 16
        widths, args.elements = [1024, 4096, 8192, 16384], 64 * 2**20
        min_seconds, args.max_iterations = 0.2, 200

    def numbers(text: str | None, default: list[int]) -> list[int]:
        if text is None:
            return default
        return [] if text.strip().lower() == "none" else [int(x) for x in text.split(",") if x.strip()]

    args.lengths = numbers(args.lengths, lengths)
    args.head_dims = numbers(args.head_dims, head_dims)
    if args.variants is not None:
        args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
        known = {name for name, _, _ in _attention_variants(64, 1, 1, torch.device("cpu"))}
        unknown = [name for name in args.variants if name not in known]
        if unknown:
            parser.error(f"--variants: unknown {unknown}; the rows are: {', '.join(sorted(known))}")
    args.widths = numbers(args.widths, widths)
    args.min_seconds = min_seconds if args.min_seconds is None else args.min_seconds
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print(
            "No CUDA GPU: run with --smoke (and TRITON_INTERPRET=1) to check the script on CPU.",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    deadline = started + args.budget
    # The hard guard: whatever hangs or runs long, the run ends 40 s after the budget.
    signal.signal(signal.SIGALRM, _raise_deadline)
    signal.alarm(int(args.budget) + 40)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or 'unknown'})"
    )
    print(f"# Kernel benchmark on {name}\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, dtype bf16")
    print(f"command: python benchmarks/bench_kernels_gpu.py {' '.join(sys.argv[1:])}\n")
    attention, norms, speeds, norm_speeds, copy_gbps = {}, [], {}, {}, 0.0
    try:
        # LayerNorm first: it is quick, while the attention's first calls also autotune.
        if args.widths:
            copy_gbps = copy_bandwidth(args, device)
        for width in args.widths:
            norms += layer_norm_rows(args, device, deadline, width, norm_speeds)
        # Each length for every head dim before the next length: when the budget runs out, the longest lengths
        # go unmeasured, not a whole head dim.
        for length in args.lengths:
            for head_dim in args.head_dims:
                attention[head_dim, length] = attention_rows(args, device, deadline, length, head_dim, speeds)
    except Deadline:
        print("ABORTED: the hard time limit passed; rows below are those measured before it.\n")
    finally:
        signal.alarm(0)
    print(
        f"## GLM attention: ~{args.tokens} tokens per step, {args.heads} heads at D 64, half as many at D 128\n"
    )
    print(
        "TFLOP/s count visible (query, key) pairs only: forward 4*D per pair, forward+backward 14*D per pair."
    )
    print(
        "rel diff: largest max|ours - sdpa-mask| / max|sdpa-mask| (flex beyond T 4096) over out, dq, dk, dv at "
        "sep=T/2 (both bf16).\n"
    )
    print(
        "| T | D | batch x heads | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(row for key in sorted(attention) for row in attention[key]))
    print("\n### Ratios of fwd+bwd TFLOP/s\n")
    print(
        "| T | D | ours / sdpa-causal | ours / flex | ours atomic dQ / sdpa-causal | ours atomic dQ: dropout / none "
        "| ours dropout / ours | ours dropout, bits from dQ / ours | ours dropout replayed / ours "
        "| sdpa-causal dropout / sdpa-causal | ours dropout / sdpa-mask dropout |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(summary_rows(speeds)))
    if args.widths:  # --widths none: no LayerNorm tables
        print(f"\n## LayerNorm: {args.elements} elements per tensor\n")
        print(
            "GB/s over the minimum traffic: plain 2 tensors fwd, 5 fwd+bwd; with residual 4 fwd, 8 fwd+bwd; "
            "with residual and dropout 4 fwd, 9 fwd+bwd."
        )
        print("rel diff: largest max|triton - torch| / max|torch| over outputs and gradients (both bf16).\n")
        print("| width | rows | implementation | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | rel diff |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(norms))
        print(
            f"\nDevice-to-device copy of one such tensor (`copy_`, read + written bytes): {copy_gbps:.0f} GB/s.\n"
        )
        print(
            "| width | triton speed / torch, fwd+bwd | +residual | +bias +residual +dropout | triton fwd+bwd GB/s, % of copy "
            "| +residual | +bias +residual +dropout |"
        )
        print("|---|---|---|---|---|---|---|")
        print("\n".join(layer_norm_summary(norm_speeds, copy_gbps)))
    print(
        "\n## Tiles and warps the autotuner chose (attention key: length buckets, head dim, flags, dtypes; "
        "LayerNorm key: width, residual, dtypes)\n"
    )
    # The split LayerNorm backward's dweight/dbias kernel tunes only its loop's stages (its tile is fixed, so the
    # sums are the same whichever it picks): not recorded in checkpoints, so not in AUTOTUNED; listed here too.
    tuned = {
        **AUTOTUNED,
        "layer_norm_backward_dwdb": kernels.triton_layer_norm_kernels.layer_norm_backward_dwdb_kernel,
    }
    for name, kernel in tuned.items():
        for key, config in kernel.cache.items():
            print(f"- {name} {key}: {config}")
    print(f"\nwall time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
