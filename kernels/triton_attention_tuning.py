"""The GLM attention kernels' tiles and autotuning: the tile shapes each kernel is timed on, which of them a launch
can run (``_fitting_configs``, the autotuner's early pruning) and the keys the choice is cached under.

Each kernel's first shape is its untuned default; the TMA and warp-specialized shapes are extra candidates on
Hopper. The kernels themselves are in ``triton_attention_kernels`` (forward) and
``triton_attention_backward_kernels``.
"""

from __future__ import annotations

import triton

from kernels.triton_support import autotune_configs, switched_on

# GPU tile shapes: (first block, second block, num_warps, num_stages), the first block being the one a program
# owns (queries in the forward and dQ, keys in dK/dV). The first shape of each list is the one used without
# autotuning (GLM_KERNELS_AUTOTUNE=0, the GPU tests): 64 x 32 on 8 warps compiles in about a second and, per
# ptxas on sm_90, spills no register in any variant of 16-bit inputs (head dims 32-128, with and without
# dropout), where the 128-row tiles on 4 warps spill at head dim 128 or with dropout, and take up to a minute
# to compile for fp32 inputs. 128-row tiles feed the tensor cores best at head dim 64; the 32- and 64-row ones
# with 8 warps keep the fp32 tiles of head dim 128 in registers. The autotuner times them all on the first call
# per key (fp32 inputs only the small ones, see ``_fitting_configs``) and drops shapes that do not fit.
FORWARD_SHAPES = [
    (64, 32, 8, 3),
    (128, 64, 4, 3),
    (128, 64, 4, 4),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 32, 4, 4),
    (64, 64, 4, 3),
    (64, 32, 4, 4),
]
# The backward's 128 x 32 tiles also with 5 stages, as Triton's fused-attention tutorial runs them on Hopper.
DQ_SHAPES = [
    (64, 32, 8, 3),
    (128, 32, 4, 3),
    (128, 32, 4, 5),
    (128, 32, 8, 3),
    (128, 64, 8, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 4),
]
DKDV_SHAPES = [
    (64, 32, 8, 3),
    (128, 32, 4, 3),
    (128, 32, 4, 5),
    (128, 64, 8, 3),
    (64, 64, 4, 3),
    (64, 64, 8, 3),
    (64, 32, 4, 4),
    (32, 64, 4, 3),
]
# Hopper's tensor memory accelerator (TMA): the tiles a program loads in its loop (K and V in the forward and dQ,
# Q and dO in dK/dV) also come through tensor descriptors (``tl.make_tensor_descriptor``: one bulk copy per tile
# into shared memory, bounds handled by the hardware, no address arithmetic in the threads) in these shapes. They
# are extra autotuning candidates, timed beside the pointer loads, on GPUs of compute capability 9+ and 16-byte
# aligned inputs only (``TMA_POSSIBLE``, in the tuning key); the first, untuned tile stays a pointer-load one.
FORWARD_TMA_SHAPES = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3)]
DQ_TMA_SHAPES = [(128, 32, 4, 3), (128, 32, 4, 5), (128, 64, 8, 3)]
DKDV_TMA_SHAPES = [(128, 32, 4, 3), (128, 32, 4, 5), (64, 64, 4, 3)]
# Hopper's warp specialization (``tl.range(warp_specialize=True)``): a kernel's loop split by Triton into
# partitions, one issuing the TMA copies and the others computing, with registers moved between them
# (``setmaxnreg``). Triton 3.6-3.8 specialize a loop only with 4 warps, with every tile (the forward's q too)
# read through descriptors, and with no second loop in the kernel: a warp-specialized kernel runs one loop over
# all its blocks, each masked (the mask of a fully visible block is all true, so the results are bitwise the
# two-loop kernel's). Triton makes two computing partitions of one warpgroup each and gives each half of the
# block a program owns, 64 rows of a 128-row block. A 64-row block it does not split: both partitions compute
# all of it, twice the work, and write the same outputs (seen in the TTGIR for sm_90 with Triton 3.6, 3.7 and
# 3.8; ``tests/test_kernels_compile.py`` checks that each candidate's partitions share its block). So only
# blocks of 128 rows are candidates. Autotuning candidates on the TMA conditions, as above, where the pass
# compiles them (``_fitting_configs``): the forward's without dropout (with dropout its pass fails on 128-row
# blocks), dK/dV's without dropout and without atomic dQ. dQ has none: its pass fails on 128-row blocks.
FORWARD_WS_SHAPES = [(128, 64, 4, 3), (128, 128, 4, 3)]
DQ_WS_SHAPES: list[tuple[int, int, int, int]] = []
# dK/dV (k and v by descriptors), its own block of keys first.
DKDV_WS_SHAPES = [(128, 64, 4, 3), (128, 32, 4, 3)]
# The warp-specialized candidates are timed only with GLM_KERNELS_WARP_SPECIALIZE=1. On the H200 (2026-11-28) the
# forward's 64 x 64 one (then a candidate: the block both partitions computed whole) gave outputs that differ from
# the same tile unspecialized (tests/test_kernels_attention.py); the 128-row ones have not run on a GPU yet.
WARP_SPECIALIZE: bool = switched_on("GLM_KERNELS_WARP_SPECIALIZE", default=False)
# fp32 tiles take twice the registers of 16-bit ones, and the "ieee" dot holds its operands in registers: for
# fp32 inputs only tiles of at most this many elements per warp are timed.
FP32_TILE_ELEMENTS_PER_WARP = 256


def _fitting_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's early pruning: the TMA candidates (warp-specialized ones too) only where the inputs allow
    them (``TMA_POSSIBLE``) and are 16-bit, the warp-specialized ones only where Triton's pass compiles them;
    every other config for 16-bit inputs; for fp32 inputs the small tiles, which compile in seconds (the 128-row
    ones spill tens of kilobytes and take up to a minute each)."""
    q = named_args.get("Q")
    if not kwargs.get("TMA_POSSIBLE", False) or (q is not None and q.element_size() >= 4):
        configs = [c for c in configs if not c.kwargs.get("USE_TMA", False)] or configs[:1]
    dropout, atomic = kwargs.get("HAS_DROPOUT", False), kwargs.get("ATOMIC_DQ", False)

    def specializes(config) -> bool:
        """Whether Triton 3.6-3.8 can warp-specialize this candidate: its pass fails on every kernel's 128-row
        blocks with dropout and on dK/dV's atomics."""
        if not config.kwargs.get("WS"):
            return True
        return not dropout and not ("DK" in named_args and atomic)

    configs = [c for c in configs if specializes(c)] or configs[:1]
    if q is None or q.element_size() < 4:
        return configs

    def elements_per_warp(config) -> int:
        first, second = (v for k, v in config.kwargs.items() if k.startswith("BLOCK_") and k != "BLOCK_D")
        return first * second // config.num_warps

    return [c for c in configs if elements_per_warp(c) <= FP32_TILE_ELEMENTS_PER_WARP] or configs[:1]


def _configs(
    owned: str,
    inner: str,
    shapes: list[tuple[int, int, int, int]],
    tma_shapes: list[tuple[int, int, int, int]],
    ws_shapes: list[tuple[int, int, int, int]],
    interpreter: tuple[int, int],
):
    # Only the warp-specialized candidates name WS; the others leave it at the kernels' default, False, so their
    # names stay those that checkpoints recorded as tile choices before these candidates, and a resume finds them.
    gpu = [
        triton.Config({owned: a, inner: b, "USE_TMA": tma, **switch}, num_warps=w, num_stages=s)
        for tma, switch, listed in (
            (False, {}, shapes),
            (True, {}, tma_shapes),
            (True, {"WS": True}, ws_shapes if WARP_SPECIALIZE else []),
        )
        for a, b, w, s in listed
    ]
    # The interpreter runs pointer loads; the tests switch its one config to TMA to check that path too.
    interpreter_config = triton.Config(
        {owned: interpreter[0], inner: interpreter[1], "USE_TMA": False}, num_warps=4
    )
    return autotune_configs(gpu, interpreter_config)


# The interpreter blocks differ between the kernels on purpose: the block-skipping bounds must not depend on
# the forward and backward sharing a tiling.
_FORWARD_CONFIGS = _configs(
    "BLOCK_M", "BLOCK_N", FORWARD_SHAPES, FORWARD_TMA_SHAPES, FORWARD_WS_SHAPES, interpreter=(64, 32)
)
_DQ_CONFIGS = _configs("BLOCK_M", "BLOCK_N", DQ_SHAPES, DQ_TMA_SHAPES, DQ_WS_SHAPES, interpreter=(32, 64))
_DKDV_CONFIGS = _configs(
    "BLOCK_N", "BLOCK_M", DKDV_SHAPES, DKDV_TMA_SHAPES, DKDV_WS_SHAPES, interpreter=(64, 32)
)
_PRUNING = {"early_config_prune": _fitting_configs}
_TUNING_KEY = [
    "query_length_bucket",
    "key_length_bucket",
    "HEAD_DIM",
    "HAS_DROPOUT",
    "HAS_LENGTHS",
    "TMA_POSSIBLE",
    "KEEP_BITS",
]
_DKDV_TUNING_KEY = _TUNING_KEY + ["ATOMIC_DQ"]
_DQ_TUNING_KEY = _TUNING_KEY + ["STORE_BITS"]
