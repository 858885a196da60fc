"""DeepSpeed's ZeRO-1/2 optimizer with its per-gradient norm as a multi-tensor operation, its clipping decided
on the device, and, under bf16 over ``GuardedAdamW``, a step that reads nothing on the host.

DeepSpeed's ``DeepSpeedZeroOptimizer`` is what glm-pretrain runs under bf16 with ZeRO-2 (``glm-2b.yaml``,
``glm-10b.yaml``) and under fp32 (``glm-demo.yaml``) or fp16 with ZeRO-1 or 2 (bf16 ZeRO-1 is DeepSpeed's BF16
optimizer: ``fused_bf16.py``). At every step it

- tests each gradient of its partition for infinities and NaNs (bf16 and fp16): seven small operations per
  gradient (``amax``, ``amin``, two ``isfinite``, an ``and``, a ``not``, an add), then reads the count on the
  host;
- copies each gradient to fp64 and takes its 2-norm, one tensor at a time;
- reads the norm on the host to decide whether it is finite, then again in each parameter group's clipping.

GLM-Large has 293 parameter tensors: ~2,600 operations per step (9 per gradient), each paying the host's
dispatch (on a GPU a kernel launch), and four reads that make the host wait for the GPU to finish the backward. On one H200 the
ZeRO-2 run of glm-large was 2.3x slower than ZeRO-1 (``docs/benchmarks.md``).

Here:

- the norms are one ``torch._foreach_norm`` (one fused kernel per chunk of tensors on GPUs), taken in
  DeepSpeed's precision (fp64) without its fp64 copy of every gradient (2.7 GB written and read again at
  glm-large), and combined as DeepSpeed combines them (squared, summed, all-reduced over the data- and
  model-parallel groups, to the power 1/2, invalid values masked to -1, the groups' norms combined with an
  invalid one giving inf);
- the clipping multiplies by DeepSpeed's factor computed on the device, without first asking on the host
  whether the norm is valid (where it is not, the update is skipped: below);
- under bf16 over ``GuardedAdamW`` with the fused AdamW, a non-finite norm is the optimizer's device verdict
  (torch's fused AdamW takes it as ``found_inf``: parameters, moments and step counts stay as they were), and
  DeepSpeed's per-gradient test is off (``check_grad_overflow``): a NaN or an infinity in any gradient makes
  the norm, which every rank shares, non-finite, so both skip the same updates. The host learns of a skip
  later (``GuardedAdamW.resolve``), as under ZeRO-1. The reported norm is then inf, as DeepSpeed's.

Under fp32 DeepSpeed still reads the norm once, to skip an invalid one itself. fp16 keeps DeepSpeed's own step:
DeepSpeed runs fp16 on GPUs only, where the tests that compare the two steps bitwise cannot run. The gradients,
norms, skips and weights are those of DeepSpeed's own step: bitwise on CPUs
(``tests/test_training_fused_zero.py``); on GPUs the fused norm kernel may round the per-tensor norms
differently in the last bit.

Only the configurations it covers are changed: bf16 or fp32, no CPU offload, no mixture of experts, no Muon,
no ZenFlow, the gradient norm computed. ``_group_norm`` and ``_unscale_and_clip_grads`` follow
``get_grad_norm_direct`` and ``unscale_and_clip_grads`` of the DeepSpeed versions in ``MIRRORED_DEEPSPEED``
(the one requirements.txt pins); under any other version nothing is replaced.
"""

from __future__ import annotations

import types

import torch

# The DeepSpeed releases whose DeepSpeedZeroOptimizer norm and clipping the functions below reproduce.
MIRRORED_DEEPSPEED = ("0.19.8",)
# The optimizer's methods replaced (as instance attributes: removing them restores DeepSpeed's).
REPLACED_METHODS = ("scaled_global_norm", "unscale_and_clip_grads")


def fuse_zero_optimizer(optimizer) -> bool:
    """Replace ``optimizer``'s per-gradient norm and host-side clipping tests when it is DeepSpeed's ZeRO-1/2
    optimizer in a configuration this covers; returns whether it did."""
    try:
        import deepspeed
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return False
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or deepspeed.__version__ not in MIRRORED_DEEPSPEED:
        return False
    covered = (
        not optimizer.cpu_offload
        and not optimizer.has_moe_layers
        and not optimizer.zenflow
        and optimizer.compute_grad_norm
        and "muon" not in type(optimizer.optimizer).__name__.lower()
        and optimizer.dtype in (torch.bfloat16, torch.float32)
    )
    if not covered:
        return False
    for name, method in zip(REPLACED_METHODS, (_scaled_global_norm, _unscale_and_clip_grads)):
        setattr(optimizer, name, types.MethodType(method, optimizer))
    # Where the inner optimizer skips on the device, the norm's verdict replaces DeepSpeed's per-gradient test
    # (DeepSpeed's step does not test a bf16 norm itself without it, so nothing else reads it).
    optimizer.glm_norm_decides = optimizer.dtype == torch.bfloat16 and getattr(
        optimizer.optimizer, "defers_skips", False
    )
    if optimizer.glm_norm_decides:
        optimizer.check_grad_overflow = False
    return True


def _group_norm(self, gradients: list[torch.Tensor], params: list[torch.nn.Parameter]) -> torch.Tensor:
    """``get_grad_norm_direct`` for the 2-norm: the norm of one parameter group's gradients across the data- and
    model-parallel groups, -1 where it is not finite."""
    from deepspeed import comm as dist
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.runtime.zero.utils import get_norm_dtype

    counted = []
    for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params):
        if hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated:
            continue  # pipeline parallelism may replicate parameters: counted once
        if is_model_parallel_parameter(p) or self.model_parallel_rank == 0:
            counted.append(g.detach())
    if counted:
        # In DeepSpeed's precision (fp64 where the device has it), without its copy of each gradient in it.
        norms = torch._foreach_norm(counted, 2.0, dtype=get_norm_dtype())
        total = torch.stack(norms).pow(2.0).sum().float()
    else:
        # A rank with no gradient of its own to count still joins the all-reduces (DeepSpeed makes this zero
        # on the host and copies it over, a wait for the GPU).
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(1.0 / 2.0)
    # DeepSpeed's mask_nan_or_inf_with_val_inplace, with the -1 as a number: it makes the -1 a tensor on the
    # device, a copy from the host that waits for the GPU to finish everything queued (the whole backward).
    return total.masked_fill_(~torch.isfinite(total), -1.0)


def _scaled_global_norm(self, norm_type: int = 2) -> torch.Tensor:
    """``DeepSpeedZeroOptimizer.scaled_global_norm`` (still multiplied by the loss scale), with each group's
    norm one foreach operation; a non-finite one becomes the inner optimizer's verdict where it decides."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    if norm_type != 2:
        raise ValueError(f"only the 2-norm is supported, not {norm_type}")
    norms = [
        _group_norm(self, self.averaged_gradients[i], self.params_in_partition[i])
        for i in range(len(self.bit16_groups))
    ]
    norm = combine_grad_norm_groups(norms, norm_type=2)  # inf where a group's is invalid
    if self.glm_norm_decides:
        self.optimizer.skip_if(~torch.isfinite(norm))
    return norm


def _unscale_and_clip_grads(self, grad_groups_flat, total_norm) -> None:
    """``DeepSpeedZeroOptimizer.unscale_and_clip_grads`` without asking on the host whether ``total_norm`` is
    valid: where it is not (only reached when the update is skipped on the device) it is inf already, and the
    gradients are multiplied by 0, as DeepSpeed's inf replacement does."""
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        # the norm is in fact norm * scale
        clip = ((total_norm / self.loss_scale) + 1e-6) / self.clip_grad
        clip = torch.clamp(clip, min=1.0)
        combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)
