"""GLM attention on Triton: the autograd function that launches the kernels of ``triton_attention_kernels``
(forward) and ``triton_attention_backward_kernels``.

Backward, in three launches: ``delta = rowsum(dO * O)`` once per query row; dK and dV per key block, looping over
the query blocks that can see it; dQ per query block, looping over the key blocks it sees. Splitting dQ from
dK/dV recomputes the scores once more than an atomic-add dQ would, but writes every gradient exactly once, so
gradients are deterministic (bit-identical reruns) and no fp32 dQ buffer is needed. With ``deterministic=False``
the dK/dV kernel adds dQ into an fp32 buffer with atomics instead (zeroed by the first launch, converted by the
last), as FlashAttention-2 does: less work, not bitwise reproducible. With dropout the forward stores its keep
decisions as bits and both backward kernels read them (up to ``triton_support.DROPOUT_MASK_MAX_BYTES``); past
that, dQ runs first, draws them and stores them for dK/dV, for that backward only (up to
``triton_support.DROPOUT_BACKWARD_MASK_MAX_BYTES``).
"""

from __future__ import annotations

import functools
import math

import torch

from kernels import triton_support
from kernels.errors import KernelError
from kernels.triton_attention_backward_kernels import (
    attention_backward_dkdv_kernel,
    attention_backward_dq_convert_kernel,
    attention_backward_dq_kernel,
    attention_backward_preprocess_kernel,
)
from kernels.triton_attention_dropout import KEEP_BITS_ROW_KEYS
from kernels.triton_attention_kernels import attention_forward_kernel
from kernels.triton_support import (
    DROPOUT_GROUP,
    INTERPRET,
    Launcher,
    cdiv,
    device_guard,
    dot_precision,
    dropout_arguments,
    dropout_seed,
    emulate_bf16,
    ensure_scratch_allocator,
    length_bucket,
    next_power_of_2,
)

MAX_HEAD_DIM = 128
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PREPROCESS_BLOCK_M = 64

# The kernels' tensor parameters come first: Q, K, V, Out, Lse, Sep, Lengths, Seed, KeepBits in the forward.
_forward = Launcher(attention_forward_kernel, tensor_args=9)
_backward_preprocess = Launcher(attention_backward_preprocess_kernel, tensor_args=4)
_backward_dkdv = Launcher(attention_backward_dkdv_kernel, tensor_args=13)
_backward_dq = Launcher(attention_backward_dq_kernel, tensor_args=11)
_backward_dq_convert = Launcher(attention_backward_dq_convert_kernel, tensor_args=2)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return t.stride()[:3]


def _empty_in_layout_of(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like ``t`` whose dimensions lie in memory in ``t``'s order (outermost first).

    For q viewed as [B, H, T, D] out of a [B, T, ..., H, D] projection, the output is then [B, T, H, D] in
    memory, so merging the heads afterwards (``out.transpose(1, 2).reshape(B, T, H * D)``) needs no copy.
    """
    batch, heads, length, head_dim = t.shape
    b, h, s, _ = t.stride()
    # The model's two layouts directly (this runs four times per layer and step): [B, T, H, D] and [B, H, T, D].
    if b >= s >= h:
        return torch.empty((batch, length, heads, head_dim), device=t.device, dtype=t.dtype).transpose(1, 2)
    if b >= h >= s:
        return torch.empty((batch, heads, length, head_dim), device=t.device, dtype=t.dtype)
    # The head dim stays innermost: the kernels store rows of D contiguous values.
    order = sorted(range(t.dim() - 1), key=lambda dim: (-t.stride(dim), dim)) + [t.dim() - 1]
    storage = torch.empty([t.shape[dim] for dim in order], device=t.device, dtype=t.dtype)
    return storage.permute([order.index(dim) for dim in range(t.dim())])


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_flags(q: torch.Tensor, lengths: torch.Tensor | None, dropout_p: float) -> dict:
    head_dim = q.shape[-1]
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, next_power_of_2(head_dim)),
        "HAS_LENGTHS": lengths is not None,
        "HAS_DROPOUT": dropout_p > 0.0,
        "EMULATE_BF16": emulate_bf16(q.dtype),
        "DOT_PRECISION": dot_precision(q.dtype),
    }


@functools.cache
def _tma_capable(device_index: int) -> bool:
    """Whether CUDA device ``device_index`` has the tensor memory accelerator (compute capability 9+)."""
    return device_index >= 0 and torch.cuda.get_device_capability(device_index)[0] >= 9


def _tma_possible(*tiled: torch.Tensor) -> bool:
    """Whether the tensors a kernel loads by tiles (``[B, H, T, D]``, unit last stride) can be read through TMA
    descriptors: a GPU of compute capability 9+ (or the interpreter), 16-bit values, every [T, D] matrix 16-byte
    aligned and its rows 16-byte multiples apart. Otherwise the TMA autotuning candidates are pruned."""
    first = tiled[0]
    if first.element_size() != 2:
        return False
    if not INTERPRET and not _tma_capable(first.get_device()):
        return False
    for t in tiled:
        size = t.element_size()
        b, h, s, _ = t.stride()
        if t.data_ptr() % 16 or (b * size) % 16 or (h * size) % 16 or (s * size) % 16:
            return False
    return True


def _keep_bits_shape(batch: int, heads: int, query_length: int, key_length: int) -> tuple[int, int, int]:
    """The stored dropout decisions' shape: a byte per query and 8 keys, each query's row padded to whole 128-key
    tiles (KEEP_BITS_ROW_KEYS), which the kernels then load and store as words."""
    row_keys = int(KEEP_BITS_ROW_KEYS)
    return batch * heads, query_length, cdiv(key_length, row_keys) * (row_keys // int(DROPOUT_GROUP))


def _attention_forward(q, k, v, sep, lengths, softmax_scale: float, dropout_p: float, for_backward: bool):
    """Launch the forward; returns ``(out, lse, seed, keep_bits, lengths_arg)``, what the backward needs besides
    q, k, v. ``keep_bits`` holds the dropout's keep decisions where the forward stored them (with dropout, for a
    backward, up to ``triton_support.DROPOUT_MASK_MAX_BYTES``), else it is ``sep``."""
    batch, heads, query_length, _ = q.shape
    key_length = k.shape[2]
    out = _empty_in_layout_of(q)
    lse = torch.empty((batch, heads, query_length), device=q.device, dtype=torch.float32)
    # (Without dropout the kernels never read the seed or the keep bits; sep stands in for the pointers.)
    seed = dropout_seed(q.device) if dropout_p > 0.0 else sep
    bits_shape = _keep_bits_shape(batch, heads, query_length, key_length)
    store_mask = (
        dropout_p > 0.0 and for_backward and math.prod(bits_shape) <= triton_support.DROPOUT_MASK_MAX_BYTES
    )
    keep_bits = torch.empty(bits_shape, device=q.device, dtype=torch.uint8) if store_mask else sep
    lengths_arg = sep if lengths is None else lengths
    flags = _kernel_flags(q, lengths, dropout_p)
    flags["KEEP_BITS"] = store_mask
    flags["TMA_POSSIBLE"] = tma = _tma_possible(q, k, v)  # K and V by tiles; q too when warp-specialized
    if tma:
        ensure_scratch_allocator()  # the descriptors are made on the device, in scratch memory

    # Query blocks vary fastest, so the programs running together share one head's K and V in L2. Heads
    # and samples take the other two grid axes (each allows 65535).
    def grid(meta):
        return (cdiv(query_length, meta["BLOCK_M"]), heads, batch)

    with device_guard(q.device):
        _forward(
            grid, q, k, v, out, lse, sep, lengths_arg, seed, keep_bits,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            heads, query_length, key_length, softmax_scale, *dropout_arguments(dropout_p),
            length_bucket(query_length), length_bucket(key_length),
            **flags,
        )  # fmt: skip
    return out, lse, seed, keep_bits, lengths_arg


def _attention_backward(
    q, k, v, out, lse, sep, lengths_arg, seed, keep_bits, has_lengths: bool, softmax_scale: float,
    dropout_p: float, atomic: bool, grad_out, dq, dk, dv,
) -> None:  # fmt: skip
    """Launch the backward, writing the gradients into ``dq``, ``dk``, ``dv`` (any strides, unit last stride);
    with ``atomic`` dQ by atomic adds from the dK/dV kernel."""
    grad_out = _unit_last_stride(grad_out)
    batch, heads, query_length, head_dim = q.shape
    key_length = k.shape[2]
    flags = _kernel_flags(q, lengths_arg if has_lengths else None, dropout_p)
    flags["KEEP_BITS"] = keep_bits.dtype == torch.uint8
    # Where the forward kept no decisions, the dQ kernel draws them in the layout its accumulator holds them (as
    # the forward does) and stores them for dK/dV, which cannot draw them without moving them between threads.
    bits_shape = _keep_bits_shape(batch, heads, query_length, key_length)
    dq_stores_bits = (
        dropout_p > 0.0
        and not flags["KEEP_BITS"]
        and not atomic
        and math.prod(bits_shape) <= triton_support.DROPOUT_BACKWARD_MASK_MAX_BYTES
    )
    delta = torch.empty_like(lse)
    # fp32 dQ accumulator of the atomic backward, zeroed by the preprocess kernel (else delta stands in).
    dq_accum = (
        torch.empty((batch * heads, query_length, head_dim), device=q.device, dtype=torch.float32)
        if atomic
        else delta
    )
    buckets = (length_bucket(query_length), length_bucket(key_length))
    scalars = (heads, query_length, key_length, softmax_scale, *dropout_arguments(dropout_p))

    def query_grid(meta):
        return (cdiv(query_length, meta["BLOCK_M"]), heads, batch)

    def key_grid(meta):
        return (cdiv(key_length, meta["BLOCK_N"]), heads, batch)

    # dK/dV loads q and dO by tiles; k and v too when warp-specialized
    key_flags = {**flags, "TMA_POSSIBLE": _tma_possible(q, k, v, grad_out)}
    flags["TMA_POSSIBLE"] = _tma_possible(q, k, v, grad_out)  # dQ k and v by tiles; q and dO when specialized
    if key_flags["TMA_POSSIBLE"] or flags["TMA_POSSIBLE"]:
        ensure_scratch_allocator()

    def launch_dq(keep_bits: torch.Tensor, store_bits: bool) -> None:
        _backward_dq(
            query_grid, q, k, v, grad_out, dq, lse, delta, sep, lengths_arg, seed, keep_bits,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
            *scalars, *buckets, **flags, STORE_BITS=store_bits,
        )  # fmt: skip

    with device_guard(q.device):
        _backward_preprocess(
            (cdiv(query_length, _PREPROCESS_BLOCK_M), heads, batch),
            out, grad_out, delta, dq_accum, *_strides(out), *_strides(grad_out), heads, query_length,
            HEAD_DIM=head_dim, BLOCK_D=flags["BLOCK_D"], BLOCK_M=_PREPROCESS_BLOCK_M, ATOMIC_DQ=atomic,
        )  # fmt: skip
        if dq_stores_bits:
            keep_bits = torch.empty(bits_shape, device=q.device, dtype=torch.uint8)
            launch_dq(keep_bits, store_bits=True)
            key_flags["KEEP_BITS"] = True
        _backward_dkdv(
            key_grid, q, k, v, grad_out, dk, dv, lse, delta, sep, lengths_arg, seed, keep_bits, dq_accum,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
            *scalars, *buckets, **key_flags, ATOMIC_DQ=atomic,
        )  # fmt: skip
        if atomic:
            _backward_dq_convert(
                (cdiv(query_length, _PREPROCESS_BLOCK_M), heads, batch),
                dq_accum, dq, *_strides(dq), heads, query_length, softmax_scale,
                HEAD_DIM=head_dim, BLOCK_D=flags["BLOCK_D"], BLOCK_M=_PREPROCESS_BLOCK_M,
                EMULATE_BF16=flags["EMULATE_BF16"],
            )  # fmt: skip
            return
        if not dq_stores_bits:
            launch_dq(keep_bits, store_bits=False)


def _atomic_dq(deterministic: bool) -> bool:
    """Whether the backward adds dQ with atomics: when the caller allows it and torch is not told to be
    deterministic (``torch.use_deterministic_algorithms``)."""
    return not deterministic and not torch.are_deterministic_algorithms_enabled()


class GLMAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sep, lengths, softmax_scale, dropout_p, deterministic):
        # Nothing to keep the dropout mask for where no input needs a gradient (e.g. evaluation: under no_grad
        # q, k and v need none). A recomputation's first pass does store it; its checkpoint drops it at once.
        out, lse, seed, keep_bits, lengths_arg = _attention_forward(
            q, k, v, sep, lengths, softmax_scale, dropout_p, any(ctx.needs_input_grad[:3])
        )
        ctx.save_for_backward(q, k, v, out, lse, sep, lengths_arg, seed, keep_bits)
        ctx.softmax_scale, ctx.dropout_p, ctx.has_lengths = softmax_scale, dropout_p, lengths is not None
        ctx.atomic = _atomic_dq(deterministic)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, sep, lengths_arg, seed, keep_bits = ctx.saved_tensors
        dq, dk, dv = _empty_in_layout_of(q), _empty_in_layout_of(k), _empty_in_layout_of(v)
        _attention_backward(
            q, k, v, out, lse, sep, lengths_arg, seed, keep_bits, ctx.has_lengths, ctx.softmax_scale,
            ctx.dropout_p, ctx.atomic, grad_out, dq, dk, dv,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


def _heads_of(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v as [B, H, T, D] views of a packed [B, T, 3, H, D] tensor (two view calls: this runs four times
    per layer and step)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


class GLMPackedAttentionFunction(torch.autograd.Function):
    """Attention on the packed output of the fused query-key-value projection, [B, T, 3, H, D].

    The backward writes dq, dk and dv into their places of one [B, T, 3, H, D] gradient, which is the
    projection's output gradient as it is: split into q, k and v by autograd instead, each part's backward
    would zero a tensor of the packed size and copy its part in, and autograd would add the three (about
    10 memory passes over the packed tensor per layer and step, and 8 more launches).
    """

    @staticmethod
    def forward(ctx, qkv, sep, lengths, softmax_scale, dropout_p, deterministic):
        q, k, v = _heads_of(qkv)
        out, lse, seed, keep_bits, lengths_arg = _attention_forward(
            q, k, v, sep, lengths, softmax_scale, dropout_p, ctx.needs_input_grad[0]
        )
        ctx.save_for_backward(qkv, out, lse, sep, lengths_arg, seed, keep_bits)
        ctx.softmax_scale, ctx.dropout_p, ctx.has_lengths = softmax_scale, dropout_p, lengths is not None
        ctx.atomic = _atomic_dq(deterministic)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qkv, out, lse, sep, lengths_arg, seed, keep_bits = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
        _attention_backward(
            *_heads_of(qkv), out, lse, sep, lengths_arg, seed, keep_bits, ctx.has_lengths, ctx.softmax_scale,
            ctx.dropout_p, ctx.atomic, grad_out, *_heads_of(dqkv),
        )  # fmt: skip
        return dqkv, None, None, None, None, None


def _check_common(
    where: str, dtype: torch.dtype, batch: int, head_dim: int, sep: torch.Tensor, lengths
) -> None:
    """The checks both entry points share: dtype, head dim, sep and lengths."""
    if dtype not in _SUPPORTED_DTYPES:
        raise KernelError(f"{where}: inputs must be fp16, bf16 or fp32; got {dtype}")
    if head_dim > MAX_HEAD_DIM:
        raise KernelError(
            f"{where}: head dim {head_dim} > {MAX_HEAD_DIM}; use backend='torch' for wider heads"
        )
    for name, ints in (("sep", sep), ("lengths", lengths)):
        if ints is not None and (ints.dim() != 1 or ints.shape[0] != batch or ints.is_floating_point()):
            raise KernelError(
                f"{where}: {name} must be an integer tensor [B={batch}]; got {ints.dtype} {tuple(ints.shape)}"
            )


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sep: torch.Tensor, lengths) -> None:
    where = "kernels.glm_attention(backend='triton')"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise KernelError(
            f"{where}: q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise KernelError(
            f"{where}: k and v must be [B, H, Tk, D] with q's B, H and D; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[2] > k.shape[2]:
        raise KernelError(f"{where}: more queries ({q.shape[2]}) than keys ({k.shape[2]}); pass Tq <= Tk")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise KernelError(f"{where}: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_common(where, q.dtype, q.shape[0], q.shape[3], sep, lengths)


def _prepared(head_dim: int, device: torch.device, softmax_scale, sep: torch.Tensor, lengths):
    """``(softmax_scale, sep, lengths)`` as the autograd functions take them: the default scale, int32 on the
    inputs' device."""
    softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    sep = sep.to(device=device, dtype=torch.int32)
    if lengths is not None:
        lengths = lengths.to(device=device, dtype=torch.int32)
    return softmax_scale, sep, lengths


def glm_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    lengths: torch.Tensor | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """The Triton counterpart of ``kernels.reference.glm_attention_torch`` (same arguments, same result);
    ``deterministic=False`` adds dQ with atomics in the backward."""
    _check_inputs(q, k, v, sep, lengths)
    softmax_scale, sep, lengths = _prepared(q.shape[-1], q.device, softmax_scale, sep, lengths)
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    return GLMAttentionFunction.apply(q, k, v, sep, lengths, softmax_scale, float(dropout_p), deterministic)


def glm_attention_qkv_triton(
    qkv: torch.Tensor,
    sep: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    lengths: torch.Tensor | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """``glm_attention_triton`` on a packed [B, T, 3, H, D] ``qkv``; the result is [B, H, T, D] (in memory
    [B, T, H, D]), its gradient one [B, T, 3, H, D] tensor."""
    where = "kernels.glm_attention_qkv(backend='triton')"
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise KernelError(f"{where}: qkv must be [B, T, 3, H, D]; got {tuple(qkv.shape)}")
    _check_common(where, qkv.dtype, qkv.shape[0], qkv.shape[4], sep, lengths)
    softmax_scale, sep, lengths = _prepared(qkv.shape[-1], qkv.device, softmax_scale, sep, lengths)
    return GLMPackedAttentionFunction.apply(
        _unit_last_stride(qkv), sep, lengths, softmax_scale, float(dropout_p), deterministic
    )
