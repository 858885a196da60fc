"""Fused kernels for GLM: attention with the prefix (``sep``) mask, LayerNorm (optionally fused with the residual
add and the dropout before it), the dropout-add, and the cross entropy over a whole vocabulary.

``glm_attention(_qkv)``, ``layer_norm``, ``dropout_add`` and ``cross_entropy`` are the interface the model calls.
Each runs either a torch implementation (``kernels.reference``, ``kernels.dropout``, ``F.cross_entropy``) or the
Triton kernels (``kernels.triton_attention``, ``kernels.triton_layer_norm``, ``kernels.triton_cross_entropy``),
chosen by ``resolve_backend``. The Triton modules are imported on first use, so ``import kernels`` needs neither a
GPU nor triton.
"""

from __future__ import annotations

import functools
import importlib.util
import sys

import torch

from kernels.dropout import Dropout, dropout, keep_mask
from kernels.errors import KernelError
from kernels.reference import glm_attention_mask, glm_attention_torch, layer_norm_torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """Whether the triton package is installed."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """The implementation a call on tensors of ``device`` runs: ``"triton"`` or ``"torch"``.

    ``"auto"`` picks Triton for CUDA tensors when triton is installed, torch otherwise. ``"triton"`` insists: it
    needs triton and either CUDA tensors or the Triton interpreter (``TRITON_INTERPRET=1`` set before the first
    Triton call), which runs the kernels on CPU tensors. ``"torch"`` always runs torch.
    """
    if requested not in BACKENDS:
        raise KernelError(f"kernel backend {requested!r} is not one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise KernelError(
            "kernel backend 'triton' needs the triton package: pip install triton, or use 'auto'/'torch'"
        )
    if device.type != "cuda":
        from kernels.triton_support import INTERPRET

        if not INTERPRET:
            raise KernelError(
                f"kernel backend 'triton' got {device.type} tensors: Triton runs CUDA tensors, or CPU tensors in its "
                "interpreter when TRITON_INTERPRET=1 is set before the first Triton call; or use 'auto'/'torch'"
            )
    return "triton"


def glm_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    lengths: torch.Tensor | None = None,
    backend: str = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """Attention over ``[B, H, T, D]`` where key j is visible to query i iff ``j < sep[b]`` or ``j <= i``.

    ``softmax_scale`` defaults to ``1/sqrt(D)``. ``dropout_p`` drops attention probabilities (torch's RNG on the
    torch path; a seed drawn from torch's generator of the device on the Triton path). ``lengths`` ([B] ints)
    marks query rows at or past ``lengths[b]`` as padding (output 0, no gradient) and hides keys past it.
    ``deterministic=False`` lets the Triton backward add dQ with atomics, as FlashAttention-2 does: less work,
    but dQ then differs in its last bits from run to run (``torch.use_deterministic_algorithms(True)`` overrides
    it; the torch path ignores it).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise KernelError(f"glm_attention: dropout_p={dropout_p} must be in [0, 1)")
    if resolve_backend(backend, q.device) == "triton":
        from kernels.triton_attention import glm_attention_triton

        return glm_attention_triton(
            q,
            k,
            v,
            sep,
            softmax_scale=softmax_scale,
            dropout_p=dropout_p,
            lengths=lengths,
            deterministic=deterministic,
        )
    return glm_attention_torch(
        q, k, v, sep, softmax_scale=softmax_scale, dropout_p=dropout_p, lengths=lengths
    )


def glm_attention_qkv(
    qkv: torch.Tensor,
    sep: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    lengths: torch.Tensor | None = None,
    backend: str = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """``glm_attention`` on the packed output of a fused query-key-value projection, ``qkv`` [B, T, 3, H, D]:
    returns [B, H, T, D] as ``glm_attention`` does, and ``qkv``'s gradient comes back as one tensor (the Triton
    kernels write dq, dk and dv into it; on the torch path autograd stacks them), not as three zero-padded
    parts that autograd adds."""
    if not 0.0 <= dropout_p < 1.0:
        raise KernelError(f"glm_attention_qkv: dropout_p={dropout_p} must be in [0, 1)")
    if resolve_backend(backend, qkv.device) == "triton":
        from kernels.triton_attention import glm_attention_qkv_triton

        return glm_attention_qkv_triton(
            qkv,
            sep,
            softmax_scale=softmax_scale,
            dropout_p=dropout_p,
            lengths=lengths,
            deterministic=deterministic,
        )
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise KernelError(f"glm_attention_qkv: qkv must be [B, T, 3, H, D]; got {tuple(qkv.shape)}")
    q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))
    return glm_attention_torch(
        q, k, v, sep, softmax_scale=softmax_scale, dropout_p=dropout_p, lengths=lengths
    )


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim; with ``residual`` returns ``(LN(x + residual), x + residual)``.

    ``dropout_p`` and ``x_bias`` (with a residual) bias and drop x first: ``s = residual + dropout(x + x_bias)``,
    returns ``(LN(s), s)``; ``x_bias`` is the bias a linear layer left out (``RowParallelLinear``'s
    ``skip_bias_add``), so that the bias add, the dropout, the residual add and the LayerNorm are one kernel each
    way. The torch path draws the mask with ``kernels.dropout``; the Triton kernels draw it in the kernel from a
    seed of torch's generator of the device, and again in the backward (no mask is stored)."""
    if not 0.0 <= dropout_p < 1.0:
        raise KernelError(f"layer_norm: dropout_p={dropout_p} must be in [0, 1)")
    if (dropout_p > 0.0 or x_bias is not None) and residual is None:
        raise KernelError(
            "layer_norm: dropout_p (as x_bias) needs a residual: it computes LN(residual + dropout(x + x_bias))"
        )
    if resolve_backend(backend, x.device) == "triton":
        from kernels.triton_layer_norm import layer_norm_triton

        return layer_norm_triton(x, weight, bias, eps, residual, dropout_p, x_bias)
    if x_bias is not None:
        x = x + x_bias
    return layer_norm_torch(dropout(x, dropout_p), weight, bias, eps, residual)


def dropout_add(
    x: torch.Tensor,
    residual: torch.Tensor,
    dropout_p: float,
    backend: str = "auto",
    x_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + dropout(x + x_bias, dropout_p)`` (``x_bias`` optional: the bias a linear layer left out): on
    the Triton path one kernel each way, the mask drawn in the kernel (and again in the backward) from a seed of
    torch's generator of the device; on the torch path ``kernels.dropout`` and the adds. ``dropout_p = 0`` is
    the plain sum."""
    if not 0.0 <= dropout_p < 1.0:
        raise KernelError(f"dropout_add: dropout_p={dropout_p} must be in [0, 1)")
    if dropout_p > 0.0 and resolve_backend(backend, x.device) == "triton":
        from kernels.triton_layer_norm import dropout_add_triton

        return dropout_add_triton(x, residual, dropout_p, x_bias)
    if x_bias is not None:
        x = x + x_bias
    return residual + dropout(x, dropout_p)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, backend: str = "auto"
) -> torch.Tensor:
    """Per-row cross entropy (fp32) of ``logits [N, V]`` against ``targets [N]``, label smoothing as
    ``F.cross_entropy``'s; the gradient comes back in the logits' dtype. The Triton kernels read the logits once
    forward and once back (no fp32 copy, no stored softmax); the torch path is ``F.cross_entropy`` on fp32."""
    if resolve_backend(backend, logits.device) == "triton":
        from kernels.triton_cross_entropy import cross_entropy_triton

        return cross_entropy_triton(logits, targets, label_smoothing)
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, reduction="none", label_smoothing=label_smoothing
    )


def tile_choices() -> dict[str, list[dict]]:
    """The tiles the autotuned Triton kernels chose in this process, per tuning key (JSON-ready); empty where no
    Triton kernel has run. Saved with each checkpoint and put back on resume (``restore_tile_choices``): the
    autotuner's on-disk cache is node-local, and on another node it would time the tiles again and could pick
    others, whose rounding differs, so the resumed run would not continue bit for bit."""
    if "kernels.triton_support" not in sys.modules:
        return {}
    from kernels.triton_support import AUTOTUNED
    from kernels.triton_support import tile_choices as choices_of

    return choices_of(AUTOTUNED)


def restore_tile_choices(choices: dict[str, list[dict]]) -> int:
    """Make the autotuned Triton kernels use ``choices`` (from ``tile_choices``); returns how many were put back."""
    if not choices or not triton_available():
        return 0
    import kernels.triton_attention_backward_kernels
    import kernels.triton_attention_kernels
    import kernels.triton_layer_norm  # noqa: F401 - the three register their autotuned kernels
    from kernels.triton_support import AUTOTUNED
    from kernels.triton_support import restore_tile_choices as restore

    return restore(AUTOTUNED, choices)


__all__ = [
    "BACKENDS",
    "Dropout",
    "KernelError",
    "cross_entropy",
    "dropout",
    "dropout_add",
    "glm_attention",
    "glm_attention_qkv",
    "glm_attention_mask",
    "glm_attention_torch",
    "keep_mask",
    "layer_norm",
    "layer_norm_torch",
    "resolve_backend",
    "restore_tile_choices",
    "tile_choices",
    "triton_available",
]
