"""LayerNorm (optionally fused with the residual add): the Triton kernels against torch, on CUDA tensors where
a GPU is present and otherwise on CPU tensors in the Triton interpreter (tests/conftest.py turns it on).

Tolerance: outputs and gradients are compared with a float64 evaluation of the torch implementation; the
kernel may be off by at most twice what torch itself is off in the same dtype, plus two unit roundoffs of the
largest value (both round an fp32 result once to the output dtype, possibly on opposite sides).
"""

from __future__ import annotations

import pytest
import torch

from kernels import KernelError, layer_norm, layer_norm_torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
EPS = 1e-5


def _inputs(shape, dtype, with_residual, seed=0, device=DEVICE):
    generator = torch.Generator().manual_seed(seed)
    width = shape[-1]
    x = (torch.randn(*shape, generator=generator) * 2 + 0.5).to(device, dtype)
    residual = torch.randn(*shape, generator=generator).to(device, dtype) if with_residual else None
    weight = (1 + 0.2 * torch.randn(width, generator=generator)).to(device, dtype)
    bias = (0.2 * torch.randn(width, generator=generator)).to(device, dtype)
    return x, residual, weight, bias


def _randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _forward_backward(fn, x, residual, weight, bias, grads):
    """Outputs, then gradients of x, weight, bias (and residual): ``grads`` pairs with the outputs (None skips one)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    residual_leaf = None if residual is None else residual.detach().clone().requires_grad_()
    outputs = fn(leaves[0], leaves[1], leaves[2], residual_leaf)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    result = [o.detach() for o in outputs] + [leaf.grad for leaf in leaves]
    return result + ([residual_leaf.grad] if residual_leaf is not None else [])


def _torch_ln(x, weight, bias, residual):
    return layer_norm_torch(x, weight, bias, EPS, residual)


def _triton_ln(x, weight, bias, residual):
    return layer_norm(x, weight, bias, EPS, residual, backend="triton")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(2, 3, 100), (7, 1024)], ids=["ragged_width", "rows_over_programs"])
def test_triton_matches_torch(shape, with_residual, dtype):
    x, residual, weight, bias = _inputs(shape, dtype, with_residual)
    grads = [_randn(*shape, seed=1), _randn(*shape, seed=2)]
    exact_inputs = [None if t is None else t.double() for t in (x, residual, weight, bias)]
    exact = _forward_backward(_torch_ln, *exact_inputs, grads)
    same_dtype = _forward_backward(_torch_ln, x, residual, weight, bias, grads)
    ours = _forward_backward(_triton_ln, x, residual, weight, bias, grads)
    names = ["y", "summed"][: 1 + with_residual] + ["dx", "dweight", "dbias"] + ["dresidual"] * with_residual
    assert len(ours) == len(names)
    for name, want, theirs, got in zip(names, exact, same_dtype, ours):
        assert got.dtype == dtype and got.shape == want.shape, name
        torch_error = (theirs.double() - want).abs().max().item()
        bound = 2 * torch_error + 2 * UNIT_ROUNDOFF[dtype] * want.abs().max().item()
        error = (got.double() - want).abs().max().item()
        assert error <= bound, (
            f"{name}: max error {error:.3g} > {bound:.3g} (torch in {dtype}: {torch_error:.3g})"
        )
    if with_residual:
        # The residual stream must be exactly torch's x + residual: later layers add to it.
        assert torch.equal(ours[1], same_dtype[1])


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rows_16k_wide(with_residual):
    x, residual, weight, bias = _inputs((3, 16384), torch.float32, with_residual)
    grads = [_randn(3, 16384, seed=1), _randn(3, 16384, seed=2)]
    want = _forward_backward(_torch_ln, x, residual, weight, bias, grads)
    got = _forward_backward(_triton_ln, x, residual, weight, bias, grads)
    for a, b in zip(got, want):
        # dweight and dbias sum 3 rows; every other value is a 16K-term reduction in fp32.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradient_of_the_normalised_output_alone():
    """When only LN(x + residual) is used, x and residual still get the full gradient (no d(summed) term)."""
    x, residual, weight, bias = _inputs((5, 96), torch.float32, True)
    grads = [_randn(5, 96), None]
    want = _forward_backward(_torch_ln, x, residual, weight, bias, grads)
    got = _forward_backward(_triton_ln, x, residual, weight, bias, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_is_the_torch_implementation():
    x, residual, weight, bias = _inputs((4, 32), torch.float32, True, device=torch.device("cpu"))
    got, want = layer_norm(x, weight, bias, EPS, residual), layer_norm_torch(x, weight, bias, EPS, residual)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_unservable_calls_raise_kernel_error():
    x, residual, weight, bias = _inputs((2, 32), torch.float32, True)
    with pytest.raises(KernelError, match="residual must match"):
        layer_norm(x, weight, bias, EPS, residual[:1], backend="triton")
    with pytest.raises(KernelError, match="weight and bias must be"):
        layer_norm(x, weight[:16], bias, EPS, backend="triton")
    wide, _, wide_weight, wide_bias = _inputs((1, 16385), torch.float32, False)
    with pytest.raises(KernelError, match="16384"):
        layer_norm(wide, wide_weight, wide_bias, EPS, backend="triton")


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_autotuner_times_the_width_heuristic_and_its_neighbours(monkeypatch, backward):
    # On GPUs each LayerNorm kernel times the warps the width heuristic picks and half and twice as many (the
    # fused backward each with 2, 4 or 8 programs per SM, 2 or 4 past width 2048, and each with its row loop
    # as it is and pipelined), the heuristic's choice first with 2 programs per SM and the loop as it is; with
    # GLM_KERNELS_AUTOTUNE=0 (the GPU tests) that choice alone.
    import triton

    from kernels import triton_layer_norm_kernels as ln

    programs = (2, 4, 8) if backward else (None,)
    stages = (None, 2) if backward else (None,)
    configs = [
        triton.Config(
            {**({} if p is None else {"PROGRAMS_PER_SM": p}), **({} if s is None else {"ROW_STAGES": s})},
            num_warps=w,
        )
        for w in ln.WARPS
        for p in programs
        for s in stages
    ]
    if backward:  # the multi-row candidates, unpipelined
        configs += [
            triton.Config({"PROGRAMS_PER_SM": p, "ROWS_PER_STEP": r}, num_warps=w)
            for w in ln.WARPS
            for p in programs
            for r in (2, 4)
        ]
    prune = ln.warps_candidates(backward)["early_config_prune"]

    def tiles(width):
        return [
            (
                c.num_warps,
                c.kwargs.get("PROGRAMS_PER_SM"),
                c.kwargs.get("ROW_STAGES"),
                c.kwargs.get("ROWS_PER_STEP"),
            )
            for c in prune(configs, {}, BLOCK_N=width)
        ]

    for width in (256, 1024, 4096, 8192):
        preferred = ln.num_warps_for(width, backward)
        per_sm = ((2, 4, 8) if width <= 2048 else (2, 4)) if backward else (None,)
        monkeypatch.setattr(ln, "AUTOTUNE", True)
        timed = tiles(width)
        assert timed[0] == (preferred, per_sm[0], None, None)
        warps = {w for w in (preferred // 2, preferred, preferred * 2) if w in ln.WARPS}
        expected = [(w, p, s, None) for w in warps for p in per_sm for s in stages]
        if backward and width <= 2048:
            # Several rows per step where each thread holds at most 16 values of each tile.
            expected += [
                (w, p, None, r) for w in warps for p in per_sm for r in (2, 4) if r * width <= 512 * w
            ]
        assert sorted(timed, key=str) == sorted(expected, key=str)
        monkeypatch.setattr(ln, "AUTOTUNE", False)
        assert tiles(width) == [(preferred, per_sm[0], None, None)]
    # The interpreter's single config is left alone.
    assert prune(configs[:1], {}, BLOCK_N=4096) == configs[:1]


def test_split_backward_times_its_pipelined_loop_only_when_autotuning(monkeypatch):
    # The split backward's dweight/dbias kernel has one tile (it fixes the order of the sums); on GPUs the
    # autotuner times its loop as it is and pipelined over 2 and 3 stages, and the GPU tests run the first.
    import triton

    from kernels import triton_layer_norm_kernels as ln

    configs = [triton.Config({}, num_warps=4)] + [
        triton.Config({"ROW_STAGES": s}, num_warps=4) for s in (2, 3)
    ]
    monkeypatch.setattr(ln, "AUTOTUNE", True)
    assert ln.dwdb_stages(configs, {}) == configs
    monkeypatch.setattr(ln, "AUTOTUNE", False)
    assert ln.dwdb_stages(configs, {}) == configs[:1]


def test_backward_on_more_programs_per_sm_matches_torch(monkeypatch):
    # The fused backward's grid follows the tile the autotuner ran (programs per SM): the host must add up the
    # partial sums of exactly the programs that ran. Here a tile of 3 programs per SM (6 on the interpreter's
    # stand-in of 2 SMs) over 111 rows: runs of 19 rows, the last one shorter.
    import triton

    from kernels import triton_layer_norm as ln

    monkeypatch.setattr(
        ln.layer_norm_backward_kernel, "configs", [triton.Config({"PROGRAMS_PER_SM": 3}, num_warps=4)]
    )
    shape, dtype = (3, 37, 96), torch.float32
    x, residual, weight, bias = _inputs(shape, dtype, True, seed=7)
    grads = [_randn(*shape, seed=8), _randn(*shape, seed=9)]
    expected = _forward_backward(_torch_ln, x, residual, weight, bias, grads)
    got = _forward_backward(_triton_ln, x, residual, weight, bias, grads)
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [False, True], ids=["fused_backward", "split_backward"])
def test_pipelined_row_loops_give_what_the_loops_as_they_are_give(monkeypatch, split):
    # The backward's pipelined candidates (ROW_STAGES: the next rows' loads issued while these are worked on; the
    # fused backward's row loop, the split backward's dweight/dbias loop over row blocks) compute the same sums in
    # the same order: bitwise the gradients of the same tiles unpipelined. On a GPU this runs the compiled
    # pipelines (the GPU check runs this file); in the interpreter, the same loops.
    import triton

    from kernels import triton_layer_norm as ln

    if split:
        monkeypatch.setattr(ln, "FUSED_BACKWARD_MAX_WIDTH", 64)
        kernel, launcher, tile = ln.layer_norm_backward_dwdb_kernel, ln._backward_dwdb, {}
        warps = ln.DWDB_TILE[2]
    else:
        kernel, launcher, tile = ln.layer_norm_backward_kernel, ln._backward, {"PROGRAMS_PER_SM": 3}
        warps = 4
    shape, dtype = (3, 37, 200 if split else 96), torch.bfloat16
    x, residual, weight, bias = _inputs(shape, dtype, True, seed=11)
    grads = [_randn(*shape, seed=12), _randn(*shape, seed=13)]
    results = []
    for stages in ({}, {"ROW_STAGES": 2}, {"ROW_STAGES": 3}):
        monkeypatch.setattr(kernel, "configs", [triton.Config({**tile, **stages}, num_warps=warps)])
        monkeypatch.setattr(kernel, "cache", {})
        # The direct launcher keeps the compiled kernel of its first call: ROW_STAGES is no key of its own.
        monkeypatch.setattr(launcher, "_variants", {})
        results.append(_forward_backward(_triton_ln, x, residual, weight, bias, grads))
    for pipelined in results[1:]:
        for unpipelined, same in zip(results[0], pipelined):
            assert torch.equal(unpipelined, same)


@pytest.mark.parametrize("rows_per_step", [2, 4])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_several_rows_per_step_give_what_one_row_per_step_gives(monkeypatch, rows_per_step, dropout_p):
    # The fused backward's multi-row candidates (ROWS_PER_STEP: narrow rows a few at a time) against its one-row
    # loop, with the input bias, the residual and the dropout (its decisions drawn for several rows at once must
    # be each row's own): 6 programs over 111 rows own runs of 19, the last one 16, so every step count leaves a
    # partial step of masked rows, which must neither be read nor written nor counted in the sums. dx and the
    # residual's gradient are each row's own computation; the sums over rows (dweight, dbias, the input bias's
    # gradient) are added in another order.
    import triton

    from kernels import triton_layer_norm as ln

    shape, dtype = (3, 37, 96), torch.float32
    x, residual, weight, bias = _inputs(shape, dtype, True, seed=21)
    x_bias = 0.5 * _randn(shape[-1], seed=22)
    grads = [_randn(*shape, seed=23), _randn(*shape, seed=24)]

    def ours(x, weight, bias, residual, x_bias):
        return layer_norm(
            x, weight, bias, EPS, residual, backend="triton", dropout_p=dropout_p, x_bias=x_bias
        )

    results = []
    for tile in ({"PROGRAMS_PER_SM": 3}, {"PROGRAMS_PER_SM": 3, "ROWS_PER_STEP": rows_per_step}):
        monkeypatch.setattr(ln.layer_norm_backward_kernel, "configs", [triton.Config(tile, num_warps=4)])
        monkeypatch.setattr(ln.layer_norm_backward_kernel, "cache", {})
        monkeypatch.setattr(ln._backward, "_variants", {})  # a new tile, not the first call's compiled kernel
        torch.manual_seed(5)  # the kernels draw their dropout seed from torch's generator
        results.append(_biased_forward_backward(ours, x, residual, weight, bias, x_bias, grads))
    (one, several) = results
    names = ["y", "summed", "dx", "dweight", "dbias", "dresidual", "dx_bias"]
    for name, want, have in zip(names, one, several, strict=True):
        if name in ("dweight", "dbias", "dx_bias"):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5, msg=name)
        else:
            torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-6, msg=name)
    if dropout_p:  # the dropped positions get no gradient, and they are the same ones
        assert torch.equal(several[2] == 0, one[2] == 0)
        assert (one[2] == 0).float().mean() > 0.1


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_split_backward_matches_torch(monkeypatch, with_residual):
    # Rows wider than FUSED_BACKWARD_MAX_WIDTH (16K-wide ones) take the split backward: dx per row, then dweight
    # and dbias by column blocks over runs of rows. Forced here at a narrow, ragged width and a row count that
    # is no multiple of the tiles, so that every edge of the column blocks and row runs is crossed.
    from kernels import triton_layer_norm as ln

    monkeypatch.setattr(ln, "FUSED_BACKWARD_MAX_WIDTH", 64)
    shape, dtype = (3, 37, 200), torch.float32
    x, residual, weight, bias = _inputs(shape, dtype, with_residual, seed=4)
    grads = [_randn(*shape, seed=5)] + ([_randn(*shape, seed=6)] if with_residual else [])
    expected = _forward_backward(_torch_ln, x, residual, weight, bias, grads)
    got = _forward_backward(_triton_ln, x, residual, weight, bias, grads)
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


def _kernel_mask(fn, shape, dtype, seed):
    """The keep mask a dropout kernel draws for ``torch.manual_seed(seed)``: dropping ones into zeros leaves the
    kept elements (scaled) and zeros elsewhere."""
    torch.manual_seed(seed)
    summed = fn(torch.ones(shape, device=DEVICE, dtype=dtype), torch.zeros(shape, device=DEVICE, dtype=dtype))
    return summed != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split", [False, True], ids=["fused_backward", "split_backward"])
def test_dropout_before_the_residual_add_is_ln_of_residual_plus_the_masked_input(monkeypatch, split, dtype):
    """LN(residual + dropout(x)) in one kernel: the same outputs and gradients as torch's LayerNorm of the residual
    plus x masked by the kernel's own mask and scaled, and the backward replays the forward's mask."""
    from kernels import triton_layer_norm as ln

    if split:
        monkeypatch.setattr(ln, "FUSED_BACKWARD_MAX_WIDTH", 64)
    p, seed, shape = 0.25, 3, (3, 37, 200)
    scale = 1.0 / (1.0 - p)
    x, residual, weight, bias = _inputs(shape, dtype, True, seed=4)

    def ours(x, weight, bias, residual):
        torch.manual_seed(seed)
        return layer_norm(x, weight, bias, EPS, residual, backend="triton", dropout_p=p)

    keep = _kernel_mask(
        lambda x, r: ours(x, torch.ones_like(weight), torch.zeros_like(bias), r)[1], shape, dtype, seed
    )
    assert 0.15 < 1 - keep.float().mean().item() < 0.35  # some dropped, most kept

    def masked_in_torch(x, weight, bias, residual):
        # The dropped x rounded to x's dtype, as torch's dropout stores it.
        dropped = torch.where(keep, x.to(torch.promote_types(x.dtype, torch.float32)) * scale, 0.0).to(
            x.dtype
        )
        return layer_norm_torch(dropped, weight, bias, EPS, residual)

    grads = [_randn(*shape, seed=5), _randn(*shape, seed=6)]
    # As test_triton_matches_torch: within twice torch's own error in the dtype (against float64) plus two units.
    exact = _forward_backward(masked_in_torch, *(t.double() for t in (x, residual, weight, bias)), grads)
    same_dtype = _forward_backward(masked_in_torch, x, residual, weight, bias, grads)
    got = _forward_backward(ours, x, residual, weight, bias, grads)
    for name, want, theirs, have in zip(
        ["y", "summed", "dx", "dweight", "dbias", "dresidual"], exact, same_dtype, got
    ):
        torch_error = (theirs.double() - want).abs().max().item()
        bound = 2 * torch_error + 2 * UNIT_ROUNDOFF[dtype] * want.abs().max().item()
        error = (have.double() - want).abs().max().item()
        assert have.dtype == dtype and error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"
    assert torch.equal(got[1], same_dtype[1])  # the residual stream exactly torch's residual + dropout(x)
    # The residual's gradient is dsummed; x's is that through the forward's mask and scale, rounded as torch's
    # dropout backward rounds it: zero exactly where an element was dropped.
    dx, dresidual = got[2], got[5]
    assert torch.equal(dx, torch.where(keep, dresidual.float() * scale, 0.0).to(dtype))
    assert torch.all(dresidual[~keep] != 0)


def test_dropout_add_is_the_residual_plus_the_masked_input():
    from kernels import dropout_add

    p, seed, shape, dtype = 0.1, 11, (4, 33, 96), torch.float32
    scale = 1.0 / (1.0 - p)

    def ours(x, residual):
        torch.manual_seed(seed)
        return dropout_add(x, residual, p, backend="triton")

    keep = _kernel_mask(ours, shape, dtype, seed)
    x, residual = _randn(*shape, seed=1).requires_grad_(), _randn(*shape, seed=2).requires_grad_()
    out = ours(x, residual)
    assert torch.equal(out, residual + torch.where(keep, x * scale, 0.0))
    grad = _randn(*shape, seed=3)
    out.backward(grad)
    assert torch.equal(x.grad, torch.where(keep, grad * scale, 0.0)) and torch.equal(residual.grad, grad)
    # The torch path draws its own mask; without dropout both are the plain sum.
    assert torch.equal(dropout_add(x, residual, 0.0, backend="triton"), x + residual)


def test_in_kernel_dropout_drops_p_of_every_column_position_and_follows_the_seed():
    """Each Philox call covers 8 columns (two 16-bit uniforms per 32-bit output): every one of the 8 positions,
    and every row, must drop at the rate p; the same seed draws the same mask, another seed another."""
    from kernels import dropout_add

    p, shape = 0.1, (64, 1024)

    def mask(seed):
        return _kernel_mask(lambda x, r: dropout_add(x, r, p, backend="triton"), shape, torch.float32, seed)

    dropped = ~mask(0)
    assert abs(dropped.float().mean().item() - p) < 0.006  # 65536 elements: 5 standard deviations
    by_position = dropped.view(64, 128, 8).float().mean(dim=(0, 1))
    assert torch.all((by_position - p).abs() < 0.017), by_position  # 8192 each
    assert not torch.equal(dropped[0], dropped[1])  # rows draw their own numbers
    assert torch.equal(mask(0), ~dropped) and not torch.equal(mask(1), ~dropped)


def test_dropout_needs_a_residual():
    x, _, weight, bias = _inputs((2, 64), torch.float32, False)
    for backend in ("triton", "torch"):
        with pytest.raises(KernelError, match="needs a residual"):
            layer_norm(x, weight, bias, EPS, backend=backend, dropout_p=0.1)


def _biased_forward_backward(fn, x, residual, weight, bias, x_bias, grads):
    """Outputs of ``fn(x, weight, bias, residual, x_bias)``, then the gradients of x, weight, bias, residual, x_bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, residual, x_bias)]
    outputs = fn(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4])
    torch.autograd.backward(list(outputs), [g.to(o.dtype) for o, g in zip(outputs, grads)])
    return [o.detach() for o in outputs] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("split", [False, True], ids=["fused_backward", "split_backward"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["no_dropout", "dropout"])
def test_input_bias_is_added_before_the_dropout_and_gets_the_summed_gradient(monkeypatch, p, split, dtype):
    """LN(residual + dropout(x + x_bias)), the bias a row-parallel linear layer leaves out (skip_bias_add): the
    same outputs and gradients as torch's add, dropout and LayerNorm in turn, and the bias's gradient is x's
    summed over the rows (the kernel's partial sums, or the split backward's column sums)."""
    from kernels import triton_layer_norm as ln

    if split:
        monkeypatch.setattr(ln, "FUSED_BACKWARD_MAX_WIDTH", 64)
    seed, shape = 3, (3, 37, 200)
    scale = 1.0 / (1.0 - p)
    x, residual, weight, bias = _inputs(shape, dtype, True, seed=4)
    x_bias = (0.5 * _randn(shape[-1], seed=7)).to(dtype)

    def ours(x, weight, bias, residual, x_bias):
        torch.manual_seed(seed)
        return layer_norm(x, weight, bias, EPS, residual, backend="triton", dropout_p=p, x_bias=x_bias)

    # The kernel's mask: ones biased by zero, dropped into a zero residual.
    ones, zeros = (
        torch.ones(shape, device=DEVICE, dtype=dtype),
        torch.zeros(shape, device=DEVICE, dtype=dtype),
    )
    keep = (
        ours(ones, torch.ones_like(weight), torch.zeros_like(bias), zeros, torch.zeros_like(x_bias))[1] != 0
    )
    assert keep.all() if p == 0 else 0.15 < 1 - keep.float().mean().item() < 0.35

    def in_torch(x, weight, bias, residual, x_bias):
        biased = x + x_bias  # rounded to the dtype, as torch's add of the left-out bias
        dropped = torch.where(keep, biased.to(torch.promote_types(x.dtype, torch.float32)) * scale, 0.0)
        return layer_norm_torch(dropped.to(x.dtype), weight, bias, EPS, residual)

    grads = [_randn(*shape, seed=5), _randn(*shape, seed=6)]
    inputs = (x, residual, weight, bias, x_bias)
    exact = _biased_forward_backward(in_torch, *(t.double() for t in inputs), grads)
    same_dtype = _biased_forward_backward(in_torch, *inputs, grads)
    got = _biased_forward_backward(ours, *inputs, grads)
    names = ["y", "summed", "dx", "dweight", "dbias", "dresidual", "dx_bias"]
    for name, want, theirs, have in zip(names, exact, same_dtype, got):
        torch_error = (theirs.double() - want).abs().max().item()
        bound = 2 * torch_error + 2 * UNIT_ROUNDOFF[dtype] * want.abs().max().item()
        error = (have.double() - want).abs().max().item()
        assert have.dtype == dtype and error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"
    assert torch.equal(got[1], same_dtype[1])  # the residual stream exactly torch's
    # The bias's gradient is x's gradient summed over the rows (in fp32, rounded once to the dtype).
    dx, dx_bias = got[2], got[6]
    rounding = UNIT_ROUNDOFF[dtype] if dtype != torch.float32 else 1e-6
    torch.testing.assert_close(dx_bias.double(), dx.double().sum(dim=(0, 1)), rtol=rounding, atol=1e-5)


def test_dropout_add_adds_the_input_bias_before_the_dropout():
    from kernels import dropout_add

    p, seed, shape, dtype = 0.1, 11, (4, 33, 96), torch.float32
    scale = 1.0 / (1.0 - p)

    def ours(x, residual, x_bias):
        torch.manual_seed(seed)
        return dropout_add(x, residual, p, backend="triton", x_bias=x_bias)

    keep = _kernel_mask(lambda x, r: ours(x, r, torch.zeros(shape[-1], device=DEVICE)), shape, dtype, seed)
    x, residual = _randn(*shape, seed=1).requires_grad_(), _randn(*shape, seed=2).requires_grad_()
    x_bias = _randn(shape[-1], seed=4).requires_grad_()
    out = ours(x, residual, x_bias)
    assert torch.equal(out, residual + torch.where(keep, (x + x_bias) * scale, 0.0))
    grad = _randn(*shape, seed=3)
    out.backward(grad)
    assert torch.equal(x.grad, torch.where(keep, grad * scale, 0.0)) and torch.equal(residual.grad, grad)
    assert torch.equal(x_bias.grad, x.grad.reshape(-1, shape[-1]).sum(0))
    # Without dropout (evaluation) the torch path adds the bias too.
    assert torch.equal(
        dropout_add(x, residual, 0.0, backend="triton", x_bias=x_bias), residual + (x + x_bias)
    )


def test_input_bias_must_fit_x():
    x, residual, weight, bias = _inputs((2, 64), torch.float32, True)
    for backend in ("triton", "torch"):
        with pytest.raises(KernelError, match="needs a residual"):
            layer_norm(x, weight, bias, EPS, backend=backend, x_bias=bias)
    with pytest.raises(KernelError, match="x_bias must be \\[64\\]"):
        layer_norm(x, weight, bias, EPS, residual, backend="triton", x_bias=bias[:32])
    with pytest.raises(KernelError, match="x_bias must be \\[64\\] in x's dtype"):
        layer_norm(x, weight, bias, EPS, residual, backend="triton", x_bias=bias.double())
