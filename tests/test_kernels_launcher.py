"""Direct launches of compiled Triton kernels (``kernels.triton_support.Launcher``).

The launcher skips Triton's per-call dispatch once a specialization is compiled. Its logic is checked here with a
stand-in kernel on any machine: which calls go through Triton, which go straight to the compiled kernel's
launcher, and with which arguments in which order. The last test runs the real kernels: on a GPU the direct
launches must give the bits Triton's own dispatch gives; in the interpreter every call goes through Triton.
"""

from __future__ import annotations

import pytest
import torch
import triton

import kernels.triton_support as support
from kernels.triton_support import Launcher


class FakeCompiled:
    """A compiled kernel whose launcher records its calls."""

    function = "cu-function"
    packed_metadata = "packed"

    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def run(self, *args) -> None:
        self.launches.append(args)

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream, len(args))


class FakeKernel:
    """An autotuned kernel ``K(X, Y, n, scale, FLAG: constexpr, BLOCK: constexpr)``; the autotuner picks BLOCK."""

    arg_names = ["X", "Y", "n", "scale", "FLAG", "BLOCK"]

    def __init__(self, compiled: FakeCompiled | None = None, block: int | None = 32) -> None:
        self.compiled = FakeCompiled() if compiled is None else compiled
        self.best_config = triton.Config({"BLOCK": block} if block else {})
        self.dispatched: list[tuple] = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.dispatched.append((grid, args, kwargs))
            return self.compiled

        return run


@pytest.fixture
def compiled_mode(monkeypatch):
    """Behave as on a GPU: the interpreter off, direct launches on, a fixed stream."""
    monkeypatch.setattr(support, "INTERPRET", False)
    monkeypatch.setattr(support, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(support._RUNTIME, "launch_enter_hook", None)
    monkeypatch.setattr(support._RUNTIME, "launch_exit_hook", None)


def _launcher(kernel: FakeKernel) -> Launcher:
    launcher = Launcher(kernel, tensor_args=2)
    launcher._stream_of = lambda device: 77  # no CUDA driver here
    return launcher


def _grid(meta):
    return (triton.cdiv(100, meta["BLOCK"]), 3)


def test_first_call_goes_through_triton_then_straight_to_the_compiled_kernel(compiled_mode):
    kernel = FakeKernel()
    launcher = _launcher(kernel)
    x, y = torch.zeros(8), torch.zeros(8)
    launcher(_grid, x, y, 100, 0.5, FLAG=True, num_warps=4)
    assert kernel.dispatched == [(_grid, (x, y, 100, 0.5), {"FLAG": True, "num_warps": 4})]
    assert kernel.compiled.launches == []

    x2, y2 = torch.ones(8), torch.ones(8)  # other tensors, same specialization
    launcher(_grid, x2, y2, 100, 0.5, FLAG=True, num_warps=4)
    assert len(kernel.dispatched) == 1
    # As JITFunction.run launches: grid from the autotuner's tile, stream, handles, no hooks, then every
    # parameter in signature order (constexprs included).
    (launch,) = kernel.compiled.launches
    assert launch[:9] == (4, 3, 1, 77, "cu-function", "packed", None, None, None)
    assert launch[9:11] == (x2, y2) and launch[9] is x2 and launch[10] is y2
    assert launch[11:] == (100, 0.5, True, 32)


def test_another_specialization_is_compiled_through_triton(compiled_mode):
    kernel = FakeKernel()
    launcher = _launcher(kernel)
    x = torch.zeros(8)
    launcher(_grid, x, x, 100, 0.5, FLAG=True)
    launcher(_grid, x, x, 64, 0.5, FLAG=True)  # another integer value
    launcher(_grid, x, x, 100, 0.5, FLAG=False)  # another constexpr
    launcher(_grid, x.double(), x.double(), 100, 0.5, FLAG=True)  # another dtype
    assert len(kernel.dispatched) == 4 and kernel.compiled.launches == []
    launcher(_grid, x, x, 64, 0.5, FLAG=True)
    assert len(kernel.dispatched) == 4 and len(kernel.compiled.launches) == 1


def test_misaligned_tensors_always_go_through_triton(compiled_mode):
    kernel = FakeKernel()
    launcher = _launcher(kernel)
    storage = torch.zeros(64)
    misaligned = storage[
        1:9
    ]  # 4 bytes past a 16-byte boundary: Triton compiles it without the alignment hint
    for _ in range(3):
        launcher(_grid, misaligned, storage[:8], 100, 0.5, FLAG=True)
    assert len(kernel.dispatched) == 3 and kernel.compiled.launches == []


def test_switched_off_or_interpreted_calls_go_through_triton(compiled_mode, monkeypatch):
    kernel = FakeKernel()
    launcher = _launcher(kernel)
    x = torch.zeros(8)
    monkeypatch.setattr(support, "DIRECT_LAUNCH", False)
    for _ in range(2):
        launcher(_grid, x, x, 100, 0.5, FLAG=True)
    monkeypatch.setattr(support, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(support, "INTERPRET", True)
    for _ in range(2):
        launcher(_grid, x, x, 100, 0.5, FLAG=True)
    assert len(kernel.dispatched) == 4 and kernel.compiled.launches == []


def test_a_constexpr_left_at_its_default_is_launched_directly(compiled_mode):
    """A constexpr parameter with a default (``WS: tl.constexpr = False``) that neither the call nor the tile names
    was compiled with its default: later calls launch directly and pass it. (The attention's tiles other than the
    warp-specialized ones name no WS, so that checkpoints' recorded tiles still match: without the default, every
    attention launch went through Triton's dispatch.)"""

    def signature(X, Y, n, scale, FLAG, BLOCK, WS=False):
        """The Python function behind the kernel, as ``kernel.fn.fn`` holds it."""

    kernel = FakeKernel()
    kernel.arg_names = [*FakeKernel.arg_names, "WS"]
    kernel.fn = type("JITFunction", (), {"fn": staticmethod(signature)})()
    launcher = _launcher(kernel)
    x = torch.zeros(8)
    for _ in range(2):
        launcher(_grid, x, x, 100, 0.5, FLAG=True)
    assert len(kernel.dispatched) == 1
    (launch,) = kernel.compiled.launches
    assert launch[11:] == (100, 0.5, True, 32, False)


@pytest.mark.parametrize("compiled,block", [("none", 32), ("fake", None)])
def test_a_call_that_cannot_be_launched_directly_keeps_going_through_triton(compiled_mode, compiled, block):
    # Triton returned no compiled kernel, or a constexpr parameter got no value from the call or the autotuner.
    kernel = FakeKernel(block=block)
    if compiled == "none":
        kernel.compiled = None
    launcher = _launcher(kernel)
    x = torch.zeros(8)
    for _ in range(3):
        launcher(_grid if block else (4,), x, x, 100, 0.5, FLAG=True)
    assert len(kernel.dispatched) == 3


def test_a_launcher_that_refuses_the_arguments_falls_back_to_triton(compiled_mode):
    class Refusing(FakeCompiled):
        def run(self, *args) -> None:
            raise TypeError("function takes exactly 12 arguments")

    kernel = FakeKernel(Refusing())
    launcher = _launcher(kernel)
    x = torch.zeros(8)
    launcher(_grid, x, x, 100, 0.5, FLAG=True)
    with pytest.warns(RuntimeWarning, match="direct launch refused"):
        launcher(_grid, x, x, 100, 0.5, FLAG=True)
    launcher(_grid, x, x, 100, 0.5, FLAG=True)  # no second try, no second warning
    assert len(kernel.dispatched) == 3  # every call launched, through Triton


class FakeCudaLauncher:
    """Triton 3.6's ``CudaLauncher`` as the launcher sees it: a C ``launch`` behind a Python ``__call__``."""

    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, scratch: int = 0) -> None:
        self.global_scratch_size = scratch
        self.profile_scratch_size = 0
        self.c_launches: list[tuple] = []
        self.wrapper_calls: list[tuple] = []

    def launch(self, *args) -> None:
        self.c_launches.append(args)

    def __call__(self, *args) -> None:
        self.wrapper_calls.append(args)


@pytest.mark.parametrize(
    "version,scratch,direct_c", [("3.6.0", 0, True), ("3.6.0", 256, False), ("3.7.1", 0, False)]
)
def test_triton_3_6_launches_go_to_the_c_entry_point_with_addresses(
    compiled_mode, monkeypatch, version, scratch, direct_c
):
    """With Triton 3.6 the launcher calls the compiled launcher's C function itself, as the Python wrapper would,
    with the tensors' addresses as ints (the C function then skips its data_ptr() call and pointer check per
    tensor); a kernel that needs a scratch buffer, or another Triton, goes through the wrapper."""
    monkeypatch.setattr(triton, "__version__", version)
    compiled = FakeCompiled()
    compiled.run = FakeCudaLauncher(scratch)
    kernel = FakeKernel(compiled)
    launcher = _launcher(kernel)
    x, y = torch.zeros(8), torch.zeros(8)
    launcher(_grid, x, y, 100, 0.5, FLAG=True)
    x2, y2 = torch.ones(8), torch.ones(8)
    launcher(_grid, x2, y2, 100, 0.5, FLAG=True)
    if direct_c:
        assert compiled.run.wrapper_calls == []
        (launch,) = compiled.run.c_launches
        # grid, stream, function, cooperative, pdl, no scratch buffers, metadata, no hooks, then the arguments
        assert launch[:13] == (
            4,
            3,
            1,
            77,
            "cu-function",
            False,
            True,
            None,
            None,
            "packed",
            None,
            None,
            None,
        )
        assert launch[13:] == (x2.data_ptr(), y2.data_ptr(), 100, 0.5, True, 32)
    else:
        assert compiled.run.c_launches == []
        (call,) = compiled.run.wrapper_calls
        assert call[9] is x2 and call[10] is y2


def test_launch_hooks_get_their_metadata(compiled_mode, monkeypatch):
    def hook(metadata) -> None:
        pass

    monkeypatch.setattr(support._RUNTIME, "launch_enter_hook", hook)
    kernel = FakeKernel()
    launcher = _launcher(kernel)
    x = torch.zeros(8)
    launcher(_grid, x, x, 100, 0.5, FLAG=True)
    launcher(_grid, x, x, 100, 0.5, FLAG=True)
    (launch,) = kernel.compiled.launches
    assert launch[6] == ("metadata", (4, 3), 77, 6) and launch[7] is hook


def test_an_empty_hook_chain_is_no_hook():
    class Chain:
        calls: list = []

    assert support._active_hook(None) is None
    assert support._active_hook(Chain()) is None
    hook = Chain()
    hook.calls = [print]
    assert support._active_hook(hook) is hook


def test_real_kernels_give_the_same_bits_launched_directly(monkeypatch):
    """Attention with dropout and LayerNorm with the residual, forward and backward, twice: the second call of each
    kernel is a direct launch on a GPU. Its results must equal those of Triton's own dispatch bit for bit."""
    from kernels.triton_attention import _backward_dkdv, _backward_dq, _forward, glm_attention_triton
    from kernels.triton_layer_norm import _backward as ln_backward
    from kernels.triton_layer_norm import layer_norm_triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Kernel variants that the other kernel tests compile too (dtype, head dim, flags): no extra compile time.
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    q, k, v = rand(1, 2, 48, 32), rand(1, 2, 48, 32), rand(1, 2, 48, 32)
    sep = torch.tensor([16], device=device)
    x, residual, weight, bias = rand(7, 1024), rand(7, 1024), rand(1024), rand(1024)

    def results():
        torch.manual_seed(7)
        out = glm_attention_triton(q, k, v, sep, dropout_p=0.1)
        y, summed = layer_norm_triton(x, weight, bias, 1e-5, residual)
        grads = torch.autograd.grad(
            [out, y, summed], [q, k, v, x, weight, bias], [torch.ones_like(out), y.detach(), summed.detach()]
        )
        return [out, y, summed, *grads]

    monkeypatch.setattr(support, "DIRECT_LAUNCH", False)
    reference = results()
    monkeypatch.setattr(support, "DIRECT_LAUNCH", True)
    for _ in range(2):  # the first call of each specialization compiles, the second launches directly
        for ours, expected in zip(results(), reference):
            assert torch.equal(ours, expected)
    launchers = (_forward, _backward_dkdv, _backward_dq, ln_backward)
    direct = [any(variant is not None for variant in launcher._variants.values()) for launcher in launchers]
    # Direct launches need compiled kernels: on a GPU every kernel has one, in the interpreter none.
    assert direct == [device.type == "cuda"] * 4


def _launchers() -> dict[str, Launcher]:
    import kernels.triton_attention as attention
    import kernels.triton_cross_entropy as cross_entropy
    import kernels.triton_layer_norm as layer_norm

    return {
        f"{module.__name__}.{name}": value
        for module in (attention, layer_norm, cross_entropy)
        for name, value in vars(module).items()
        if isinstance(value, Launcher)
    }


def _run_every_kernel(monkeypatch) -> None:
    """Every kernel, forward and backward, in every mode: dropout with the mask stored by the forward or by dQ,
    or drawn again; atomic dQ; padding lengths; the packed projection; the LayerNorm's fused and split backward;
    the dropout-add; the cross entropy."""
    from kernels.triton_attention import glm_attention_qkv_triton, glm_attention_triton
    from kernels.triton_cross_entropy import cross_entropy_triton
    from kernels.triton_layer_norm import FUSED_BACKWARD_MAX_WIDTH, dropout_add_triton, layer_norm_triton

    g = torch.Generator().manual_seed(0)
    # The interpreter runs on CPU tensors; compiled kernels (the GPU check) need the GPU's.
    device = "cpu" if support.INTERPRET or not torch.cuda.is_available() else "cuda"

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    def backward(out):
        out.backward(torch.randn(out.shape, generator=g).to(device))

    q, k, v = rand(1, 2, 24, 16), rand(1, 2, 24, 16), rand(1, 2, 24, 16)
    sep, lengths = torch.tensor([8], device=device), torch.tensor([20], device=device)
    backward(glm_attention_triton(q, k, v, sep, dropout_p=0.1, lengths=lengths))
    backward(glm_attention_triton(q, k, v, sep, dropout_p=0.1, deterministic=False))
    monkeypatch.setattr(support, "DROPOUT_MASK_MAX_BYTES", 0)  # the mask drawn and stored by dQ for dK/dV
    backward(glm_attention_qkv_triton(rand(1, 24, 3, 2, 16), sep, dropout_p=0.1))
    monkeypatch.setattr(support, "DROPOUT_BACKWARD_MASK_MAX_BYTES", 0)  # drawn again by both backward kernels
    backward(glm_attention_qkv_triton(rand(1, 24, 3, 2, 16), sep, dropout_p=0.1))

    x, residual, weight, bias = rand(3, 64), rand(3, 64), rand(64), rand(64)
    y, summed = layer_norm_triton(x, weight, bias, 1e-5, residual, dropout_p=0.1, x_bias=rand(64))
    backward(y + summed)
    width = FUSED_BACKWARD_MAX_WIDTH + 16  # the split backward: dx per row, then dweight and dbias by columns
    backward(layer_norm_triton(rand(2, width), rand(width), rand(width), 1e-5))
    backward(dropout_add_triton(x, residual, 0.1, rand(64)))
    backward(cross_entropy_triton(rand(4, 40), torch.tensor([0, 3, 39, 7], device=device)))


# The interpreter computes both branches of tl.where: the cross entropy's lanes past the vocabulary subtract -inf
# from -inf in the branch it does not take.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_every_launch_passes_its_pointers_then_its_scalars(monkeypatch):
    """A direct launch hands the first ``tensor_args`` arguments to the compiled kernel as addresses and the rest
    as they are, in the kernel's parameter order. A launcher whose count disagrees with its kernel's pointer
    parameters (say, after a new pointer parameter), or a call that passes a tensor among the scalars, would
    launch with the wrong arguments on a GPU, and nothing on a CPU would notice: every kernel's calls are
    checked here, in every mode (dropout with the mask stored by the forward or by dQ, or replayed, atomic dQ,
    padding lengths, the packed projection, the LayerNorm's fused and split backward, the dropout-add, the cross
    entropy)."""
    import inspect

    seen: set[str] = set()
    names = {id(launcher): name for name, launcher in _launchers().items()}
    real_call = Launcher.__call__

    def checked_call(self, grid, *args, **constexprs):
        name = names[id(self)]
        seen.add(name)
        kernel = getattr(self.kernel, "fn", self.kernel)
        parameters = inspect.signature(getattr(kernel, "fn", kernel)).parameters.values()
        runtime = [p.name for p in parameters if "constexpr" not in str(p.annotation)]
        # Pointer parameters are capitalized (Q, Out, KeepBits), scalars not (stride_qb, softmax_scale).
        assert [n[0].isupper() for n in runtime] == [i < self.tensor_args for i in range(len(runtime))], name
        assert len(args) == len(runtime), (name, len(args), runtime)
        assert all(isinstance(a, torch.Tensor) for a in args[: self.tensor_args]), name
        assert not any(isinstance(a, torch.Tensor) for a in args[self.tensor_args :]), name
        # Scalars and constexprs are plain Python values: Triton's autotuner writes its tuning key (some of them)
        # to its on-disk cache as JSON, and a tl.constexpr there (a host-side size computed from one) failed
        # every dropout launch on the H200 (2026-11-28).
        plain = (bool, int, float, str, type(None))
        for key, value in [*enumerate(args[self.tensor_args :]), *constexprs.items()]:
            assert type(value) in plain, (name, key, type(value))
        return real_call(self, grid, *args, **constexprs)

    monkeypatch.setattr(Launcher, "__call__", checked_call)
    _run_every_kernel(monkeypatch)
    assert seen == set(names.values())


class _StubKernel:
    """Stands in for a real kernel behind its launcher: Triton's dispatch "compiles" to a launcher that does
    nothing, and the autotuner's choice is the kernel's first tile, as with GLM_KERNELS_AUTOTUNE=0."""

    def __init__(self, kernel) -> None:
        configs = getattr(kernel, "configs", None)
        self.best_config = configs[0] if configs else None
        self.compiled = FakeCompiled()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.compiled


def test_every_real_kernel_launches_directly_from_its_second_call(compiled_mode, monkeypatch):
    """Each launcher of the attention, the LayerNorm and the cross entropy, called twice with the same
    specialization in every mode, goes through Triton once and then straight to the compiled kernel: no
    parameter is left without a value (the kernels run stubbed: the host's path only)."""
    launchers = _launchers()
    for launcher in launchers.values():
        monkeypatch.setattr(launcher, "kernel", _StubKernel(launcher.kernel))
        monkeypatch.setattr(launcher, "_variants", {})
        monkeypatch.setattr(launcher, "_stream_of", lambda device: 0)
    for _ in range(2):
        _run_every_kernel(monkeypatch)
    for name, launcher in launchers.items():
        assert launcher._variants, f"{name}: never launched with aligned tensors"
        refused = [key for key, variant in launcher._variants.items() if variant is None]
        assert not refused, f"{name}: {len(refused)} specializations always through Triton's dispatch"
        assert launcher.kernel.compiled.launches, f"{name}: no direct launch"
