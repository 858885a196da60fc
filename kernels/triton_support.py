"""What the Triton kernels share: interpreter detection, autotune configs and launch helpers.

Imported only when a Triton kernel is about to run, so ``import kernels`` works without triton.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings

import torch
import triton
import triton.language as tl


def switched_on(name: str, default: bool = True) -> bool:
    """A switch from the environment: ``default`` where unset or empty, else off for 0, false, no, off."""
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


# @triton.jit decides at decoration time whether a kernel runs in the interpreter, so read the switch
# once, when the kernel modules are imported.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
# GLM_KERNELS_AUTOTUNE=0 gives every kernel one fixed tile shape on GPUs (the first of its list) instead of
# timing them all on the first call per shape: the kernel tests set it, so that a GPU test run compiles one
# variant per shape (tests/conftest.py). Training and the benchmarks autotune.
AUTOTUNE: bool = switched_on("GLM_KERNELS_AUTOTUNE")


def _environment_number(name: str, default: float, expected: str, *, zero_allowed: bool) -> float:
    """A number from the environment variable ``name`` (``default`` where unset): at least 0 where ``zero_allowed``
    (0 then turns a feature off), else above 0; an error naming the variable and ``expected`` otherwise."""
    value = os.environ.get(name, "").strip() or str(default)
    off = " (0 turns it off)" if zero_allowed else ""
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected {expected}{off}") from None
    if number < 0 or (number == 0 and not zero_allowed):
        raise ValueError(f"{name}={value!r}: expected {expected} {'>= 0' if zero_allowed else '> 0'}{off}")
    return number


# How long the autotuner times each candidate (GLM_KERNELS_AUTOTUNE_REP_MS), after a quarter of that of warm-up.
# Triton's defaults are 100 ms after 25, with the L2 cache flushed before every run: with 30-40 candidates per
# tuning key for the attention's three kernels, ~5 s per key, which a training job pays once per shape but a
# benchmark over lengths, head dims and dropout modes pays dozens of times. 40 ms is still a few hundred runs of
# kernels that take 0.05-0.5 ms, and the autotuner compares their medians.
AUTOTUNE_REP_MS: float = _environment_number(
    "GLM_KERNELS_AUTOTUNE_REP_MS", 40.0, "a time in milliseconds", zero_allowed=False
)


def time_candidate(kernel_call, quantiles):
    """The autotuners' timing of one candidate (their ``do_bench``): the active Triton driver's benchmarker
    (``triton.testing.do_bench`` on GPUs) for ``AUTOTUNE_REP_MS``."""
    from triton.runtime import driver

    bench = driver.active.get_benchmarker()
    return bench(kernel_call, warmup=AUTOTUNE_REP_MS / 4, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def autotune_configs(
    gpu_configs: list[triton.Config], interpreter_config: triton.Config
) -> list[triton.Config]:
    """The configs to autotune over: all on GPUs; the first alone with GLM_KERNELS_AUTOTUNE=0; the interpreter,
    which cannot benchmark, gets exactly one of its own."""
    if INTERPRET:
        return [interpreter_config]
    return gpu_configs if AUTOTUNE else gpu_configs[:1]


# Host-side arithmetic of the launches. triton.cdiv and triton.next_power_of_2 are Triton functions that cost
# a few microseconds per call from Python; a training step makes thousands of these calls, on the host's
# critical path when the step is bound by kernel launches.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def length_bucket(length: int) -> int:
    """Autotune key for a sequence length: the next power of two, so dynamic lengths do not re-tune every step."""
    return next_power_of_2(length)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching, since Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def emulate_bf16(dtype: torch.dtype) -> bool:
    """Whether kernels on ``dtype`` run bf16 by hand: in the interpreter, which cannot compute on bf16 (it sees
    the bit patterns) and truncates fp32 -> bf16 where GPUs round to nearest even."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str | None:
    """``input_precision`` of ``tl.dot``: fp32 operands use TF32 only when torch allows it for its own matmuls;
    16-bit operands go to the tensor cores as they are (None: the default) and accumulate in fp32."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return None


@triton.jit
def _round_fp32_to_bf16_bits(x):
    """fp32 values rounded to the nearest bf16 (ties to even), still held in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Round fp32 ``x`` to ``DTYPE`` to nearest even, as a GPU's conversion does."""
    if EMULATE_BF16:
        x = _round_fp32_to_bf16_bits(x)
    return x.to(DTYPE)


@triton.jit
def opaque_zeros(index):
    """``0.0`` (float32) for each of the non-negative ints ``index``, as a value LLVM cannot prove to be 0.

    ``dot_operand(tl.where(keep, x, 0.0))`` compiles to a select after the rounding to 16 bits: with one arm
    the constant 0, LLVM moves the select past the conversion, and the halves of each packed pair are taken
    apart, selected and put together again (``PRMT``, ``SEL``, ``PRMT``: about 2.5 instructions per element
    where one ``FSEL`` does). With these zeros as the arm (per row or column, hoisted out of a loop) the select
    stays on the fp32 values."""
    return index.to(tl.float32) * 0.0


@triton.jit
def dot_operand(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 ``x`` rounded to the input dtype for ``tl.dot``; when emulating bf16 it stays in fp32 (exactly)."""
    if EMULATE_BF16:
        return _round_fp32_to_bf16_bits(x)
    return x.to(DTYPE)


# In-kernel dropout (the attention's probabilities, the LayerNorm's input, the dropout-add): keep decisions
# drawn from Philox keyed by a seed tensor, p quantized to 1/65536 as in ``kernels.dropout`` on CPUs.
DROPOUT_GROUP = tl.constexpr(8)  # elements per Philox call: four 32-bit outputs, two 16-bit uniforms each
# Philox4x32-7: the fewest rounds Salmon et al. 2011 found to pass BigCrush, as FlashAttention uses.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def philox_uniforms16(seed, c0, c1, c2):
    """Eight 16-bit uniforms (as int32 bit patterns) per counter ``(c0, c1, c2, 0)`` of one Philox call keyed by
    ``seed``: a tensor of the counters' broadcast shape with two more minor dimensions of 2, and one of 2 more,
    which a reshape folds into 8 consecutive elements."""
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, 0, PHILOX_ROUNDS)
    low = 0xFFFF
    pairs01 = tl.join(tl.join(r0 & low, r0 >> 16), tl.join(r1 & low, r1 >> 16))
    pairs23 = tl.join(tl.join(r2 & low, r2 >> 16), tl.join(r3 & low, r3 >> 16))
    return tl.join(pairs01, pairs23).to(tl.int32, bitcast=True)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch memory for a kernel launch (TMA descriptors made on the device), from torch's allocator."""
    device = "cpu" if INTERPRET else "cuda"
    return torch.empty(size, dtype=torch.int8, device=device)


def ensure_scratch_allocator() -> None:
    """Give Triton an allocator for kernels that need scratch memory, unless one is set. Triton keeps it per
    thread (a ContextVar), and autograd runs the backward on threads of its own: call this where the launch
    happens."""
    from triton.runtime import _allocation

    try:
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except AttributeError:  # a Triton that keeps it otherwise: set ours
        unset = True
    if unset:
        triton.set_allocator(_scratch)


def dropout_arguments(dropout_p: float) -> tuple[int, float]:
    """``(threshold, scale)`` of the kernels' dropout: keep where the 16-bit uniform is ``>= round(p * 65536)``;
    scale what is kept by ``1 / (1 - p)``. The threshold is at most 65535 (p below 1 - 2^-17 quantizes as it
    would; above, to 65535/65536): the attention tests a uniform in the high half of a word ``r`` as ``r >=
    threshold << 16``, which must fit 32 bits."""
    return min(round(dropout_p * 65536), 65535), 1.0 / (1.0 - dropout_p)


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed as a device tensor drawn from torch's generator of the device: no host sync, and whatever
    controls that generator (manual_seed, the tensor-parallel RNG tracker, a CUDA graph's registered generator
    state) controls the masks."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def _mebibytes(name: str, default: int) -> int:
    """Bytes from a size in MiB in the environment variable ``name`` (0 turns the feature off)."""
    return int(_environment_number(name, default, "a size in MiB", zero_allowed=True) * 2**20)


# The attention's forward keeps its dropout decisions for the backward (one bit per query-key pair: B * H * Tq *
# Tk / 8 bytes per call, kept until the backward) when they take at most GLM_KERNELS_DROPOUT_MASK_MAX_MIB (64 MiB:
# glm-large's T 512 at micro batch 16 takes 8); beyond, the backward draws them again from Philox as the forward
# drew them. The bits grow with T^2 and a layer's activations with T: at long T without recomputation they would
# outgrow the activations. 0 never stores them. The environment is read at import; each forward reads this value.
DROPOUT_MASK_MAX_BYTES: int = _mebibytes("GLM_KERNELS_DROPOUT_MASK_MAX_MIB", 64)
# Where the forward kept none, the backward's dQ kernel draws the decisions (in its accumulator's layout, as the
# forward does) and stores them for the dK/dV kernel, whose tiles hold the keys on their rows and could draw them
# only with the decisions moved between threads: bits that live for one backward call, up to
# GLM_KERNELS_DROPOUT_BACKWARD_MASK_MAX_MIB (1024 MiB: T 8192 at 16K tokens and 16 heads takes 256). 0 never stores
# them: both backward kernels draw the decisions again.
DROPOUT_BACKWARD_MASK_MAX_BYTES: int = _mebibytes("GLM_KERNELS_DROPOUT_BACKWARD_MASK_MAX_MIB", 1024)

# GLM_KERNELS_DIRECT_LAUNCH=0 sends every launch through Triton's own dispatch (the reference behaviour, kept
# for comparison: benchmarks/bench_launch_overhead.py times both).
DIRECT_LAUNCH: bool = switched_on("GLM_KERNELS_DIRECT_LAUNCH")


_MAX_VARIANTS = 256

# Autotuning candidates that may fail on a GPU or Triton that lacks what they use (Hopper's TMA descriptors:
# ``USE_TMA``; warp specialization: ``WS``): such a candidate that fails to compile or launch while the autotuner times it counts as
# infinitely slow, as Triton counts one that runs out of shared memory, instead of ending the run.
OPTIONAL_FEATURES = ("USE_TMA", "WS")
_optional_failures: set[str] = set()


def tolerate_optional_candidates(tuner) -> bool:
    """Wrap ``tuner``'s (a ``triton.autotune`` object's) timing of one candidate so that a candidate with an
    ``OPTIONAL_FEATURES`` switch on that raises is timed as infinitely slow (one warning per kernel and
    error). Returns whether it was wrapped (not for a Triton without ``_bench``)."""
    if not hasattr(tuner, "_bench"):
        return False
    original = tuner._bench
    name = getattr(getattr(tuner, "base_fn", tuner), "__name__", "a Triton kernel")

    def bench(*args, config, **meta):
        try:
            return original(*args, config=config, **meta)
        except Exception as error:  # noqa: BLE001 - only for the optional candidates, re-raised otherwise
            if not any(config.kwargs.get(feature) for feature in OPTIONAL_FEATURES):
                raise
            message = f"{name}: autotuning candidate {config} failed ({type(error).__name__}: {error})"
            if message not in _optional_failures:
                _optional_failures.add(message)
                warnings.warn(message[:1000] + "; timing it as infinitely slow", RuntimeWarning, stacklevel=2)
            return [float("inf")] * 3

    tuner._bench = bench
    return True


# The autotuned kernels by name (each kernel module adds its own): their tile choices go into checkpoints
# (``kernels.tile_choices``), so that a job resumed on another node, whose Triton cache does not have them, runs
# the tiles the first job ran.
AUTOTUNED: dict = {}


class Launcher:
    """``kernel[grid](*args, **constexprs)`` that skips Triton's dispatch once a call's variant is compiled.

    Every ``kernel[grid](...)`` goes through the autotuner's dispatch and ``JITFunction.run``: binding and
    specializing each of the 20-50 arguments, building the cache key from them, checking the globals. That
    costs tens of microseconds of host time per launch, and a GLM layer makes eight launches per training
    step. Here the first call of each specialization goes through Triton (which compiles, autotunes and
    returns the compiled kernel); the launcher keeps the compiled kernel, the chosen tile and the trailing
    constexpr values, and later calls of the same specialization hand their arguments straight to the
    compiled kernel's launcher, as ``JITFunction.run`` itself does at its end.

    A specialization is what Triton compiles one variant for: the tensor arguments' dtypes and 16-byte
    alignment, the integer arguments' values, the constexprs. The key holds the tensors' device and dtypes,
    every scalar argument's exact value (floats too, which Triton does not specialize on: they are constants
    of a model) and the constexprs, and only calls whose tensors are all 16-byte aligned are cached, so one
    key always means one compiled variant. ``args`` lists the kernel's first ``tensor_args`` parameters (the
    tensors), then its scalar parameters, in signature order; ``constexprs`` the constexpr parameters after
    them and launch options (``num_warps``); the autotuner supplies its tile.

    In the interpreter, with ``GLM_KERNELS_DIRECT_LAUNCH=0``, and for a call with a misaligned tensor, the call
    goes through ``kernel[grid]`` as usual.
    """

    def __init__(self, kernel, tensor_args: int) -> None:
        self.kernel = kernel
        self.tensor_args = tensor_args
        self.arg_names: tuple[str, ...] = tuple(kernel.arg_names)
        self.name: str = getattr(getattr(kernel, "base_fn", kernel), "__name__", "a Triton kernel")
        # Constexpr parameters with a default (``WS: tl.constexpr = False``) that a call and its tile may leave
        # out: the kernel was compiled with the default, and a direct launch passes it.
        self._defaults: dict = _parameter_defaults(kernel)
        # key -> (compiled kernel, trailing constexpr values, grid meta), or None: always through Triton.
        self._variants: dict[tuple, tuple | None] = {}
        self._stream_of = None
        if AUTOTUNE and not INTERPRET:
            from kernels.precompile import install

            tolerate_optional_candidates(kernel)
            install(kernel)  # compile the autotuner's candidates in parallel (kernels/precompile.py)

    def __call__(self, grid, *args, **constexprs) -> dict:
        """Launch; returns the launch's constexprs with the autotuner's tile (what a grid function sees)."""
        tensors = args[: self.tensor_args]
        pointers = [t.data_ptr() for t in tensors]
        if not DIRECT_LAUNCH or INTERPRET or any(pointer & 15 for pointer in pointers):
            self.kernel[grid](*args, **constexprs)
            return self._meta(constexprs)
        device = tensors[0].device.index
        key = (device, *(t.dtype for t in tensors), *args[self.tensor_args :], *constexprs.values())
        try:
            variant = self._variants[key]
        except KeyError:
            if len(self._variants) >= _MAX_VARIANTS:  # float arguments are in the key: keep it bounded
                self._variants.clear()
            self._variants[key] = self._first_launch(grid, args, constexprs)
            return self._meta(constexprs)
        if variant is None:
            self.kernel[grid](*args, **constexprs)
            return self._meta(constexprs)
        compiled, trailing, meta, c_launch = variant
        grid_spec, grid = grid, grid(meta) if callable(grid) else grid
        stream = self._stream_of(device)
        enter_hook, exit_hook = (
            _active_hook(_RUNTIME.launch_enter_hook),
            _active_hook(_RUNTIME.launch_exit_hook),
        )
        metadata = None if enter_hook is None else compiled.launch_metadata(grid, stream, *args, *trailing)
        grid_x, grid_y, grid_z = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
        try:
            if c_launch is not None:
                # The compiled launcher's C entry point, as its Python wrapper calls it (no scratch buffers),
                # with the tensors' addresses: an int skips the launcher's data_ptr() call and its
                # cuPointerGetAttribute check per tensor.
                launch, cooperative, pdl = c_launch
                launch(
                    grid_x, grid_y, grid_z, stream, compiled.function, cooperative, pdl, None, None,
                    compiled.packed_metadata, metadata, enter_hook, exit_hook,
                    *pointers, *args[self.tensor_args :], *trailing,
                )  # fmt: skip
            else:
                compiled.run(
                    grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, metadata,
                    enter_hook, exit_hook, *args, *trailing,
                )  # fmt: skip
        except (TypeError, ValueError, SystemError) as error:
            # The compiled kernel's launcher refused the arguments (a Triton whose launcher takes them
            # differently): launch this variant through Triton from now on, and say so once.
            self._variants[key] = None
            warnings.warn(
                f"{self.name}: direct launch refused ({type(error).__name__}: {error}); launching "
                "through Triton's dispatch instead (GLM_KERNELS_DIRECT_LAUNCH=0 makes that the rule)",
                RuntimeWarning,
                stacklevel=2,
            )
            self.kernel[grid_spec](*args, **constexprs)
            return self._meta(constexprs)
        return meta

    def _meta(self, constexprs: dict) -> dict:
        """``constexprs`` with the tile the autotuner ran last (the one of this call), and the defaults of the
        constexpr parameters that neither names."""
        config = getattr(self.kernel, "best_config", None)
        return {**self._defaults, **constexprs, **(config.kwargs if config is not None else {})}

    def _first_launch(self, grid, args: tuple, constexprs: dict) -> tuple | None:
        """Launch through Triton; return what later direct launches need, or None where they cannot be made."""
        compiled = self.kernel[grid](*args, **constexprs)
        if hasattr(compiled, "result"):  # a Triton that compiles asynchronously may hand back a future
            compiled = compiled.result()
        meta = self._meta(constexprs)
        names = self.arg_names[len(args) :]
        if compiled is None or not hasattr(compiled, "packed_metadata") or any(n not in meta for n in names):
            return None
        if self._stream_of is None:
            from triton.runtime import driver

            self._stream_of = driver.active.get_current_stream
        return compiled, tuple(meta[name] for name in names), meta, _c_launch_of(compiled.run)


def _parameter_defaults(kernel) -> dict:
    """The default values of a ``@triton.jit`` function's parameters (through its autotuner, if any), by name."""
    function = kernel
    while hasattr(function, "fn"):  # autotuner -> JITFunction -> the Python function
        function = function.fn
    if not inspect.isfunction(function):
        return {}
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


# The Triton releases whose CUDA launcher (``CudaLauncher``: a Python wrapper around a C ``launch``) ``_c_launch_of``
# calls the way the wrapper does. Elsewhere launches go through ``compiled.run``; and if the C function ever
# refuses the arguments, the launcher's fallback sends that variant back to Triton's dispatch.
C_LAUNCH_TRITON = ("3.6.",)


def _c_launch_of(run) -> tuple | None:
    """``(launch, cooperative, pdl)`` of a compiled kernel's CUDA launcher that needs no scratch buffers, for a
    Triton in ``C_LAUNCH_TRITON``; None otherwise."""
    if not triton.__version__.startswith(C_LAUNCH_TRITON):
        return None
    launch = getattr(run, "launch", None)
    if (
        launch is None
        or getattr(run, "global_scratch_size", None) != 0
        or getattr(run, "profile_scratch_size", None) != 0
        or not hasattr(run, "launch_cooperative_grid")
        or not hasattr(run, "launch_pdl")
    ):
        return None
    return launch, run.launch_cooperative_grid, run.launch_pdl


_RUNTIME = triton.knobs.runtime


def _active_hook(hook):
    """A launch hook, or None where there is none to call (Triton >= 3.7 keeps an empty chain of hooks)."""
    return None if hook is None or getattr(hook, "calls", True) == [] else hook


def tile_choices(tuners: dict) -> dict[str, list[dict]]:
    """The tile each autotuned kernel in ``tuners`` (name -> ``triton.autotune`` object) chose for each tuning key
    in this process, JSON-ready: ``{name: [{"key": [...], "config": index, "tile": str(config)}]}``."""
    choices = {}
    for name, tuner in tuners.items():
        tiles = [str(config) for config in tuner.configs]
        entries = [
            {"key": list(key), "config": tiles.index(str(config)), "tile": str(config)}
            for key, config in tuner.cache.items()
            if str(config) in tiles and all(isinstance(part, (bool, int, float, str)) for part in key)
        ]
        if entries:
            choices[name] = entries
    return choices


def restore_tile_choices(tuners: dict, choices: dict[str, list[dict]]) -> int:
    """Make each autotuned kernel in ``tuners`` use the tiles of ``choices`` (from ``tile_choices``) for their
    tuning keys instead of timing its configs again; returns how many were restored. A tile is found by what it
    is, wherever it now sits in the kernel's config list; a choice whose kernel or tile is no longer offered is
    left to the autotuner."""
    restored = 0
    for name, entries in choices.items():
        tuner = tuners.get(name)
        if tuner is None:
            continue
        offered = {str(config): config for config in tuner.configs}
        for entry in entries:
            config = offered.get(entry["tile"])
            if config is not None:
                tuner.cache[tuple(entry["key"])] = config
                restored += 1
    return restored
