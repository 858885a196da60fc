"""The GPU code path, checked on any machine: the Triton kernels compile for NVIDIA sm_80 and sm_90, and the
default attention tiles do not spill registers on sm_90.

The interpreter runs the kernels' Python semantics, not Triton's compiler, so a construct it accepts can still
fail to compile (a non-constexpr global, a type that changes inside a loop). Triton ships ptxas, so compiling
ahead of time for a GPU target needs no GPU (``kernels/aot.py``). The compile runs in a subprocess with the interpreter off, since
``@triton.jit`` picks interpreter or compiler when the kernel modules are imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # an end-to-end run; `make test-fast` leaves it out

REPOSITORY = Path(__file__).resolve().parents[1]


def _compile(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int, capability: int):
    from kernels.aot import compile_kernel

    compiled = compile_kernel(kernel, dtype, constexprs, num_warps, num_stages, capability)
    assert compiled.asm["cubin"], f"{kernel.fn.__name__}: no cubin for sm_{capability}"
    return compiled


def _check_dropout_loops(forward_kernel, dq_kernel, dkdv_kernel) -> None:
    """In-kernel dropout as ``triton_attention_dropout`` lays it out, in the SASS of the loops (sm_90, 64 x 64
    tiles on 4 warps, the H200's choice): the forward draws each Philox call in the thread that holds its keys, so
    no decision goes through shared memory (only the bytes kept for the backward are stored there, on their way
    to global memory), and Philox runs once, not once for the probabilities and again for the bytes (and so does
    the dQ kernel that stores them where the forward kept none); the forward and dK/dV select the kept
    probabilities in fp32, not as 16-bit halves taken apart (``PRMT``) and put together."""
    from kernels.aot import loop_bodies, sass

    def loops(kernel, owned: str, inner: str, keep_bits: bool, store_bits: bool = False) -> list[list[str]]:
        constexprs = {
            "HEAD_DIM": 64, "BLOCK_D": 64, "HAS_LENGTHS": False, "HAS_DROPOUT": True, "EMULATE_BF16": False,
            "DOT_PRECISION": None, "TMA_POSSIBLE": False, "USE_TMA": False, "KEEP_BITS": keep_bits,
            "ATOMIC_DQ": False, "STORE_BITS": store_bits, owned: 64, inner: 64,
        }  # fmt: skip
        bodies = loop_bodies(sass(_compile(kernel, "bf16", constexprs, 4, 3, 90)))
        assert len(bodies) == 2, f"{kernel.fn.__name__}: {len(bodies)} loops, expected its two"
        return [
            [line.split()[1] if line.startswith("@") else line.split()[0] for line in body] for body in bodies
        ]

    forward, dq = forward_kernel, dq_kernel
    replayed, stored = loops(forward, "BLOCK_M", "BLOCK_N", False), loops(forward, "BLOCK_M", "BLOCK_N", True)
    # The dQ kernel where the forward kept no bits: it draws them as the forward does and stores them for dK/dV.
    dq_replayed, dq_stored = (
        loops(dq, "BLOCK_M", "BLOCK_N", False),
        loops(dq, "BLOCK_M", "BLOCK_N", False, True),
    )
    for name, pairs in (("forward", zip(replayed, stored)), ("dQ", zip(dq_replayed, dq_stored))):
        for drawn, kept in pairs:
            shared_stores = [op for op in drawn if op.startswith("STS")]
            assert not shared_stores, f"{name}: dropout decisions through shared memory ({shared_stores})"
            assert "PRMT" not in drawn, f"{name}: the kept probabilities selected as 16-bit halves"
            assert all(op == "STS.U8" for op in kept if op.startswith("STS")), f"{name}: more than the bytes"
            philox, philox_kept = drawn.count("IMAD.HI.U32"), kept.count("IMAD.HI.U32")
            assert philox > 0 and philox_kept < 1.5 * philox, (
                f"{name}: Philox twice ({philox_kept}, {philox})"
            )
    for body in loops(dkdv_kernel, "BLOCK_N", "BLOCK_M", True):
        assert "PRMT" not in body, "dK/dV: the kept probabilities selected as 16-bit halves"


def compile_kernels() -> None:
    """Every kernel with every feature switched on, for Hopper; the forward for Ampere too."""
    from kernels import triton_attention_backward_kernels as backward
    from kernels import triton_attention_kernels as attention
    from kernels import triton_attention_tuning as tuning
    from kernels import triton_layer_norm as layer_norm
    from kernels import triton_layer_norm_kernels as ln_kernels
    from kernels.aot import partition_rows, registers

    features = {
        "HAS_LENGTHS": True,
        "HAS_DROPOUT": True,
        "EMULATE_BF16": False,
        "DOT_PRECISION": None,
        "TMA_POSSIBLE": False,
        "USE_TMA": False,
        "KEEP_BITS": True,
        "ATOMIC_DQ": True,  # dK/dV's (the other kernels take no such switch)
    }
    head_64 = {"HEAD_DIM": 64, "BLOCK_D": 64, **features}
    forward = (attention.attention_forward_kernel, "BLOCK_M", "BLOCK_N", tuning.FORWARD_SHAPES[0])
    dq = (backward.attention_backward_dq_kernel, "BLOCK_M", "BLOCK_N", tuning.DQ_SHAPES[0])
    dkdv = (backward.attention_backward_dkdv_kernel, "BLOCK_N", "BLOCK_M", tuning.DKDV_SHAPES[0])
    for capability, kernels in ((90, (forward, dq, dkdv)), (80, (forward,))):
        for kernel, owned, inner, (first, second, warps, stages) in kernels:
            _compile(kernel, "bf16", {**head_64, owned: first, inner: second}, warps, stages, capability)
    # The untuned tiles (the GPU tests', and training's with GLM_KERNELS_AUTOTUNE=0) keep everything in
    # registers on Hopper at the largest head dim, with dropout: a spilling default is slow to run and to compile.
    head_128 = {**head_64, "HEAD_DIM": 128, "BLOCK_D": 128}
    for kernel, owned, inner, (first, second, warps, stages) in (forward, dq, dkdv):
        compiled = _compile(kernel, "bf16", {**head_128, owned: first, inner: second}, warps, stages, 90)
        spilled = registers(compiled, 90).spilled_bytes
        assert spilled == 0, (
            f"{kernel.fn.__name__} {first}x{second}: {spilled} bytes of spill stores on sm_90"
        )
    # Hopper's TMA candidates: the loop's tiles through tensor descriptors, at head dims 64 and 128 (the
    # autotuner drops a candidate that fails to compile, but one that compiles to something ptxas rejects, or
    # spills heavily, is better found here).
    tma = {"TMA_POSSIBLE": True, "USE_TMA": True}
    for kernel, owned, inner, shapes in (
        (attention.attention_forward_kernel, "BLOCK_M", "BLOCK_N", tuning.FORWARD_TMA_SHAPES),
        (backward.attention_backward_dq_kernel, "BLOCK_M", "BLOCK_N", tuning.DQ_TMA_SHAPES),
        (backward.attention_backward_dkdv_kernel, "BLOCK_N", "BLOCK_M", tuning.DKDV_TMA_SHAPES),
    ):
        first, second, warps, stages = shapes[0]
        for head in (head_64, head_128):
            constexprs = {**head, **tma, owned: first, inner: second}
            compiled = _compile(kernel, "bf16", constexprs, warps, stages, 90)
            assert "tensormap" in compiled.asm["ptx"], f"{kernel.fn.__name__}: no TMA descriptor in the PTX"
    # The warp-specialized candidates really are: Triton splits the loop into partitions and moves registers
    # between them (setmaxnreg), and its computing partitions share the block a program owns instead of each
    # computing all of it (Triton 3.6-3.8 do that to a 64-row block: twice the work). The forward's and dK/dV's
    # (dQ has none), without dropout and atomic dQ, the only way they specialize. Shapes as (BLOCK_M, BLOCK_N).
    specialized = [
        (attention.attention_forward_kernel, shape, shape[0]) for shape in tuning.FORWARD_WS_SHAPES
    ]
    specialized += [  # dK/dV's shapes list its own (key) block first
        (backward.attention_backward_dkdv_kernel, (inner, owned, warps, stages), owned)
        for owned, inner, warps, stages in tuning.DKDV_WS_SHAPES
    ]
    for kernel, (first, second, warps, stages), owned in specialized:
        switches = {"WS": True, "HAS_DROPOUT": False, "ATOMIC_DQ": False, "BLOCK_M": first, "BLOCK_N": second}
        compiled = _compile(kernel, "bf16", {**head_64, **tma, **switches}, warps, stages, 90)
        name = f"{kernel.fn.__name__} {first}x{second}"
        assert "setmaxnreg" in compiled.asm["ptx"], f"{name}: not specialized"
        rows = partition_rows(compiled)
        assert len(rows) > 1 and sum(rows) == owned, (
            f"{name}: computing partitions of {rows} rows for a block of {owned}"
        )
    _check_dropout_loops(
        attention.attention_forward_kernel,
        backward.attention_backward_dq_kernel,
        backward.attention_backward_dkdv_kernel,
    )
    # fp32 inputs without TF32, and a head dim padded to a power of two.
    fp32 = {**features, "HAS_DROPOUT": False, "HEAD_DIM": 80, "BLOCK_D": 128, "DOT_PRECISION": "ieee"}
    _compile(attention.attention_forward_kernel, "fp32", {**fp32, "BLOCK_M": 64, "BLOCK_N": 32}, 4, 3, 90)
    preprocess = {"HEAD_DIM": 80, "BLOCK_D": 128, "BLOCK_M": 64, "ATOMIC_DQ": True, "EMULATE_BF16": False}
    _compile(backward.attention_backward_preprocess_kernel, "bf16", preprocess, 4, 3, 90)
    _compile(backward.attention_backward_dq_convert_kernel, "bf16", preprocess, 4, 3, 90)
    # The cross entropy over GLM's vocabulary (bf16 logits), with and without label smoothing.
    from kernels import triton_cross_entropy as ce

    for smoothing in (False, True):
        flags = {"HAS_SMOOTHING": smoothing, "BLOCK_V": 4096}
        for kernel, constexprs in (
            (ce.cross_entropy_forward_kernel, flags),
            (ce.cross_entropy_backward_kernel, {**flags, "EMULATE_BF16": False}),
        ):
            spilled = registers(_compile(kernel, "bf16", constexprs, ce.NUM_WARPS, 3, 90), 90).spilled_bytes
            assert spilled == 0, f"{kernel.fn.__name__}: {spilled} bytes of spill stores on sm_90"
    # LayerNorm on the heuristic's warps (the GPU tests' and the autotuner's first choice), with nothing spilled:
    # the fused backward up to FUSED_BACKWARD_MAX_WIDTH, the split one (dx per row, then dweight and dbias by
    # column blocks) beyond, where the fused one cannot hold its row and partial sums in registers. The
    # variants of the post-attention LayerNorm in training: the dense layer's bias, the dropout and the residual
    # add before it. (Compiled as launched: the width a multiple of 16, so that the row loads are vectorized;
    # compiled for any width, the widest rows spilled 12-52 bytes.)
    for width in (4096, layer_norm.FUSED_BACKWARD_MAX_WIDTH, layer_norm.MAX_WIDTH):
        flags = {"EMULATE_BF16": False, "BLOCK_N": width, "HAS_DROPOUT": True}
        forward_warps = ln_kernels.num_warps_for(width, False)
        forward = {"HAS_X_BIAS": True, "HAS_RESIDUAL": True, **flags}
        kernels = [(ln_kernels.layer_norm_forward_kernel, forward, forward_warps)]
        # The dropout-add after the MLP (with its bias), forward and backward, on the warps they launch with.
        kernels.append(
            (
                ln_kernels.dropout_add_kernel,
                {"HAS_X_BIAS": True, "EMULATE_BF16": False, "BLOCK_N": width},
                forward_warps,
            )
        )
        kernels.append(
            (ln_kernels.dropout_backward_kernel, {"EMULATE_BF16": False, "BLOCK_N": width}, forward_warps)
        )
        if width <= layer_norm.FUSED_BACKWARD_MAX_WIDTH:
            backward = (
                ln_kernels.layer_norm_backward_kernel,
                {"HAS_DSUMMED": True, "PROGRAMS_PER_SM": 2, **flags},
            )
            backward_warps = ln_kernels.num_warps_for(width, True)
            # With the input bias the program keeps a third row of partial sums.
            kernels.append((backward[0], {**backward[1], "HAS_X_BIAS": False}, backward_warps))
            kernels.append((backward[0], {**backward[1], "HAS_X_BIAS": True}, backward_warps))
            # The pipelined row loop (ROW_STAGES 2) really is: the rows' loads become asynchronous copies into
            # shared memory (cp.async), on Hopper and Ampere, with nothing spilled.
            for capability in (90, 80):
                pipelined = _compile(
                    backward[0],
                    "bf16",
                    {**backward[1], "HAS_X_BIAS": True, "ROW_STAGES": 2},
                    backward_warps,
                    3,
                    capability,
                )
                assert "cp.async" in pipelined.asm["ptx"], (
                    f"fused backward at {width}: row loop not pipelined"
                )
                if capability == 90:
                    spilled = registers(pipelined, 90).spilled_bytes
                    assert spilled == 0, f"pipelined fused backward at {width}: {spilled} bytes"
        else:
            # dx of a 16K row, with and without the dropout (x, dy, w and the Philox state in registers).
            dx = ln_kernels.layer_norm_backward_dx_kernel
            kernels.append((dx, {"HAS_DSUMMED": True, **flags, "HAS_DROPOUT": False}, forward_warps))
            kernels.append((dx, {"HAS_DSUMMED": True, **flags}, forward_warps))
            block_r, block_c, warps = ln_kernels.DWDB_TILE
            dwdb = {"HAS_X_BIAS": True, "BLOCK_R": block_r, "BLOCK_C": block_c}
            kernels.append((ln_kernels.layer_norm_backward_dwdb_kernel, dwdb, warps))
            # Its pipelined loop over row blocks (the autotuner's other candidates), as the fused backward's.
            for stages in (2, 3):
                dwdb_kernel = ln_kernels.layer_norm_backward_dwdb_kernel
                pipelined = _compile(dwdb_kernel, "bf16", {**dwdb, "ROW_STAGES": stages}, warps, 3, 90)
                assert "cp.async" in pipelined.asm["ptx"], (
                    f"dweight/dbias over {stages} stages: not pipelined"
                )
                spilled = registers(pipelined, 90).spilled_bytes
                assert spilled == 0, f"dweight/dbias over {stages} stages: {spilled} bytes"
        for kernel, constexprs, warps in kernels:
            spilled = registers(_compile(kernel, "bf16", constexprs, warps, 3, 90), 90).spilled_bytes
            assert spilled == 0, (
                f"{kernel.fn.__name__} at width {width}: {spilled} bytes of spill stores on sm_90"
            )


def test_kernels_compile_for_nvidia_gpus():
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [
        sys.executable,
        "-c",
        "from tests.test_kernels_compile import compile_kernels; compile_kernels()",
    ]
    result = subprocess.run(
        command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
