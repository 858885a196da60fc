"""Host time per call of the Triton kernels' launch path: what a training step bound by its host pays per layer.

A step whose GPU finishes its kernels sooner than the host can launch them runs at the host's pace
(`docs/benchmarks.md`: GLM-Large's step with Triton kernels on an H200). This measures the host side of one
forward+backward of GLM attention on the packed projection (dropout 0.1), of the LayerNorm with the residual
add and the dropout before it, and of the dropout-add after the MLP, next to torch's `F.dropout`,
`F.layer_norm` and `F.scaled_dot_product_attention` (causal) on the same tensors, and of the tensor-parallel
RNG fork that each layer's attention dropout runs in, as the mean wall time of many calls issued back to back
without synchronizing: on a GPU that is the time the host spends per call while the GPU runs behind it.

    python benchmarks/bench_launch_overhead.py            # a GPU: the real launches
    python benchmarks/bench_launch_overhead.py --stub     # any machine: our wrappers alone, launches stubbed

``--stub`` replaces the Triton kernels by no-ops (CPU tensors, no interpreter), so it measures our Python
wrappers and autograd without Triton's launcher; the torch rows then include their CPU compute, at tiny
shapes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

STACK_LAYERS = 4


class _NoCompiledKernel:
    """Stands in for a compiled Triton kernel: its launcher does nothing."""

    function = packed_metadata = None

    @staticmethod
    def run(*args) -> None:
        return None


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing and returns a compiled kernel whose launches
    do nothing, so our direct launches are timed too."""

    def __init__(self, kernel) -> None:
        import triton

        # The autotuner's choice: the first tile the stubbed kernel offers (the host code sizes its grid by it).
        self.best_config = getattr(kernel, "configs", [triton.Config({})])[0]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _NoCompiledKernel()


def _stub_kernels() -> None:
    import kernels.triton_attention as attention
    import kernels.triton_layer_norm as layer_norm

    for launcher in (
        layer_norm._forward,
        layer_norm._backward,
        layer_norm._dropout_add,
        layer_norm._dropout_backward,
        attention._forward,
        attention._backward_preprocess,
        attention._backward_dkdv,
        attention._backward_dq,
    ):
        launcher.kernel = _NoLaunch(launcher.kernel)
        launcher._stream_of = lambda device: 0  # no CUDA driver to ask


def host_microseconds(fn: Callable[[], None], calls: int, repeats: int, device: torch.device) -> float:
    """The fastest over ``repeats`` of the mean host time of ``calls`` back-to-back calls (no sync in between)."""
    for _ in range(10):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # outside the timed loop: the queue drains between repeats
    # The fastest repeat: on a shared host, other work only ever adds time to a repeat.
    return min(means)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stub", action="store_true", help="stub the Triton launches out (CPU tensors)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.stub:
        _stub_kernels()
        device, dtype = torch.device("cpu"), torch.float32
        # Tiny: on a CPU the torch rows compute for real.
        rows, width, batch, heads, length, head_dim = 8, 1024, 1, 2, 64, 64
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        # GLM-Large's shapes, but few rows: the host's cost does not depend on the size.
        rows, width, batch, heads, length, head_dim = 512, 1024, 1, 16, 128, 64
    else:
        print("No CUDA GPU: run with --stub to time the wrappers alone.", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    from kernels.triton_attention import glm_attention_qkv_triton
    from kernels.triton_layer_norm import dropout_add_triton, layer_norm_triton

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    x, residual = leaf(rows, width), leaf(rows, width)
    weight, bias, x_bias = leaf(width), leaf(width), leaf(width)
    grad = torch.randn(rows, width, device=device, dtype=dtype)
    q, k, v = (leaf(batch, heads, length, head_dim) for _ in range(3))
    qkv = leaf(batch, length, 3, heads, head_dim)  # the model's packed projection output
    grad_out = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)
    sep = torch.full((batch,), length // 2, device=device, dtype=torch.int32)

    def ours_layer_norm() -> None:
        # The post-attention LayerNorm in training: LN(residual + dropout(x + the dense layer's bias)) and the
        # residual stream.
        y, summed = layer_norm_triton(x, weight, bias, 1e-5, residual, dropout_p=0.1, x_bias=x_bias)
        torch.autograd.backward([y, summed], [grad, grad])

    def torch_layer_norm() -> None:
        summed = residual + F.dropout(x + x_bias, 0.1)
        y = F.layer_norm(summed, (width,), weight, bias, 1e-5)
        torch.autograd.backward([y, summed], [grad, grad])

    def ours_dropout_add() -> None:
        dropout_add_triton(x, residual, 0.1, x_bias).backward(grad)

    def torch_dropout_add() -> None:
        (residual + F.dropout(x + x_bias, 0.1)).backward(grad)

    def ours_attention() -> None:
        glm_attention_qkv_triton(qkv, sep, dropout_p=0.1).backward(grad_out)

    def torch_attention() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1).backward(grad_out)

    from megatron_glm import parallel

    parallel.initialize_parallel(1, 1)
    parallel.seed_parallel_rng(1234)
    tracker = parallel.get_rng_tracker()

    def rng_fork() -> None:
        # What every layer's attention dropout does around its kernel: swap the tensor-parallel RNG stream in
        # and out of the default generators.
        with tracker.fork():
            pass

    # A stack of GLM layers on the Triton kernels, as training runs it (dropout 0.1): the host's cost per layer,
    # with each layer's last add in the next LayerNorm and layer by layer. Stubbed, the tensors are CPU ones,
    # which kernels.resolve_backend would send to the interpreter: point it at the Triton path.
    import kernels
    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMTransformer

    if args.stub:
        kernels.resolve_backend = lambda requested, device: "torch" if requested == "torch" else "triton"
    hidden_size, hidden_heads = (64, 4) if args.stub else (1024, 16)
    config = ModelConfig(
        num_layers=STACK_LAYERS,
        hidden_size=hidden_size,
        num_attention_heads=hidden_heads,
        max_position_embeddings=length,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        kernels="triton",
    )
    stack = GLMTransformer(config, device=device, dtype=dtype).train()
    embeddings = leaf(batch, length, hidden_size)
    position_ids = torch.zeros(batch, 2, length, device=device, dtype=torch.long)
    grad_stack = torch.randn(batch, length, hidden_size, device=device, dtype=dtype)

    def layer_stack(defer: bool) -> Callable[[], None]:
        def call() -> None:
            stack.defer_residual_adds = defer
            stack(embeddings, position_ids, sep).backward(grad_stack)

        return call

    where = (
        "CPU, Triton launches stubbed (through Triton's dispatch: a no-op stand-in; direct: our launch path up "
        "to a no-op launcher)"
        if args.stub
        else torch.cuda.get_device_name(device)
    )
    print(f"# host time per forward+backward call, {where}; torch {torch.__version__}")
    print(f"# mean of {args.calls} back-to-back calls, the fastest of {args.repeats} repeats\n")
    print("| call | host us per fwd+bwd |")
    print("|---|---|")
    import kernels.triton_support as support

    def through_triton_dispatch(fn: Callable[[], None]) -> Callable[[], None]:
        # GLM_KERNELS_DIRECT_LAUNCH=0 for these calls: every launch through the autotuner and JITFunction.run.
        def call() -> None:
            support.DIRECT_LAUNCH = False
            try:
                fn()
            finally:
                support.DIRECT_LAUNCH = True

        return call

    for label, fn in (
        ("ours: bias + dropout 0.1 + residual + LayerNorm (Triton, direct launches)", ours_layer_norm),
        (
            "ours: bias + dropout 0.1 + residual + LayerNorm (Triton, through Triton's dispatch)",
            through_triton_dispatch(ours_layer_norm),
        ),
        ("torch: bias add + F.dropout + add + F.layer_norm", torch_layer_norm),
        ("ours: bias + dropout 0.1 + add (Triton, direct launches)", ours_dropout_add),
        ("torch: bias add + F.dropout + add", torch_dropout_add),
        ("ours: GLM attention on packed qkv, dropout 0.1 (Triton, direct launches)", ours_attention),
        (
            "ours: GLM attention on packed qkv, dropout 0.1 (Triton, through Triton's dispatch)",
            through_triton_dispatch(ours_attention),
        ),
        ("torch: SDPA causal, dropout 0.1", torch_attention),
        ("ours: the attention dropout's RNG fork (no work inside)", rng_fork),
    ):
        print(f"| {label} | {host_microseconds(fn, args.calls, args.repeats, device):.0f} |")
    for label, defer in (
        ("each layer's last add in the next LayerNorm", True),
        ("layer by layer", False),
    ):
        layer_us = host_microseconds(layer_stack(defer), args.calls, args.repeats, device) / STACK_LAYERS
        print(
            f"| ours: a GLM layer in a stack of {STACK_LAYERS}, dropout 0.1, {label} (per layer) | {layer_us:.0f} |"
        )
    parallel.destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
