"""DeepSpeed's BF16 optimizer with its per-parameter loops done as multi-tensor (foreach) operations.

Under ZeRO-1 with bf16 weights and fp32 gradient accumulation, DeepSpeed wraps the optimizer in its
``BF16_Optimizer``, which after every backward and in every step walks the parameters one by one: a bf16 to
fp32 copy and an add per gradient, a norm per gradient, a clipping multiply per gradient. GLM-Large has 293
parameter tensors, so that is ~1,200 small operations per step, each paying the host's dispatch (and on a GPU
a kernel launch): the step of glm-pretrain is bound by its host on one GPU (``docs/benchmarks.md``). Here the
same arithmetic runs as a few ``torch._foreach_*`` calls (one fused kernel per chunk of tensors on GPUs; on
CPUs the same per-tensor kernels without the Python loop).

DeepSpeed also zeroes all fp32 gradient accumulators twice after every step (in the step and in
``zero_grad``), and the next backward adds into them: here they are only marked stale, and the next backward
writes the widened bf16 gradients into them (zeros where a parameter got none): one write of them per step
instead of two zeroing writes and a read-modify-write (at GLM-Large 1.3 GB instead of 5.2 GB).

The results are those of DeepSpeed's loops: the same additions (fp32 += bf16 promotes exactly as the copy
then add), the same per-tensor 2-norms combined the same way (squared, summed, all-reduced over the
model-parallel group, to the power 1/2, invalid values masked to -1), the same clipping factor. On CPUs
the values are bitwise equal (``tests/test_training_fused_bf16.py``); on GPUs the fused norm kernel may
round the per-tensor norms differently in the last bit.

Over ``GuardedAdamW`` (glm-pretrain's optimizer) the step also reads nothing on the host
(``_step_without_waiting``): DeepSpeed decides on the host whether the norm is finite and whether to clip, and
each of those reads waits for the GPU to finish the backward; here both are decided on the device, with the
same bits. Under any other optimizer the step decides on the host, as DeepSpeed does.

Only the configurations it covers are changed: no mixture of experts, no Muon, gradients not applied
during the backward (``immediate_grad_update``), the 2-norm, no expert-folding correction; anything else
keeps DeepSpeed's own methods. ``_step`` follows ``BF16_Optimizer.step`` of the DeepSpeed versions in
``MIRRORED_DEEPSPEED`` (the one requirements.txt pins); under any other version nothing is replaced.
"""

from __future__ import annotations

import types

import torch

# The DeepSpeed releases whose BF16_Optimizer.step and update_hp_grads the functions below reproduce.
MIRRORED_DEEPSPEED = ("0.19.8",)


def fuse_bf16_optimizer(optimizer) -> bool:
    """Replace ``optimizer``'s per-parameter gradient loops by foreach operations when it is DeepSpeed's
    ``BF16_Optimizer`` in a configuration this covers; returns whether it did."""
    try:
        import deepspeed
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    except ImportError:
        return False
    if not isinstance(optimizer, BF16_Optimizer) or deepspeed.__version__ not in MIRRORED_DEEPSPEED:
        return False
    covered = (
        optimizer.using_real_optimizer
        and not optimizer.has_moe_layers
        and not optimizer._uses_muon
        and not optimizer.immediate_grad_update
        and float(optimizer.norm_type) == 2.0
    )
    if not covered:
        return False
    # The accumulators hold zeros when DeepSpeed creates them; from then on ``_clear_hp_grads`` only marks them.
    optimizer.glm_stale_hp_grads = [False] * len(optimizer.bf16_groups)
    optimizer.update_hp_grads = types.MethodType(_update_hp_grads, optimizer)
    optimizer.clear_hp_grads = types.MethodType(_clear_hp_grads, optimizer)
    optimizer.step = types.MethodType(_step, optimizer)
    return True


def skip_single_rank_allreduce(engine, data_parallel_size: int) -> bool:
    """Turn off the BF16 optimizer's gradient all-reduce of ``engine`` where it is an identity (one data-parallel
    rank); returns whether it did.

    After each backward DeepSpeed all-reduces the BF16 optimizer's fp32 gradients over the data-parallel
    group: it flattens them into a new buffer (a copy of every gradient: 1.3 GB for GLM-Large), reduces the
    buffer, multiplies it by ``1 / ranks`` and copies it back. Over one rank the result is the gradients
    themselves, bit for bit, after three full passes over them in memory and a temporary buffer their size.
    """
    try:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    except ImportError:
        return False
    if data_parallel_size != 1 or not isinstance(engine.optimizer, BF16_Optimizer):
        return False
    if hasattr(engine, "pipeline_enable_backward_allreduce"):  # the pipeline engine reduces in its schedule
        engine.pipeline_enable_backward_allreduce = False
    else:
        engine.enable_backward_allreduce = False
    return True


@torch.no_grad()
def _update_hp_grads(self, clear_lp_grads: bool = False) -> None:
    """Add each bf16 gradient to its fp32 accumulator (``BF16_Optimizer.update_hp_grads``), in one foreach add
    per parameter group; into accumulators cleared since (``_clear_hp_grads``) it copies instead, and zeroes
    those of parameters without a gradient."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if self.autoep_folding_tp_group is not None:
        return BF16_Optimizer.update_hp_grads(self, clear_lp_grads)
    for group_index, group in enumerate(self.bf16_groups):
        stale = self.glm_stale_hp_grads[group_index]
        high, low, absent = [], [], []
        has_gradient = self.fp32_groups_has_gradients[group_index]
        for param_index, lp in enumerate(group):
            hp_grad = self.fp32_groups_gradients[group_index][param_index]
            if lp.grad is None:
                if stale:
                    absent.append(hp_grad)
                continue
            high.append(hp_grad)
            low.append(lp.grad.view(hp_grad.shape))
            lp._hp_grad = hp_grad
            has_gradient[param_index] = True
        if high:
            # Into zeros, the add is the bf16 value widened exactly: the copy writes the same numbers
            # (a -0.0 gradient stays -0.0 where 0 + -0.0 gave +0.0) without reading the accumulators.
            (torch._foreach_copy_ if stale else torch._foreach_add_)(high, low)
            if clear_lp_grads:
                torch._foreach_zero_(low)
        if absent:
            torch._foreach_zero_(absent)
        self.glm_stale_hp_grads[group_index] = False


def _clear_hp_grads(self) -> None:
    """``BF16_Optimizer.clear_hp_grads`` without zeroing the fp32 accumulators (a write of all of them, 1.3 GB at
    GLM-Large, every step): they are marked stale, and the next ``update_hp_grads`` overwrites them. Between
    the two nothing reads them (the all-reduce and the step come after the backward's update)."""
    for index, group in enumerate(self.fp32_groups_gradients):
        self.fp32_groups_has_gradients[index] = [False] * len(group)
        self.glm_stale_hp_grads[index] = True


def _global_norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of ``tensors`` taken together across the model-parallel group, -1 where it is not finite
    (``deepspeed.runtime.utils.get_global_norm_of_tensors`` without experts)."""
    from deepspeed import comm as dist

    if tensors:
        total = torch.stack(torch._foreach_norm(tensors, 2)).pow(2.0).sum()
    else:
        # A rank with no gradient of its own to count (only replicated parameters on a tensor-parallel rank
        # other than 0) still joins the all-reduce.
        total = torch.zeros((), device=self.fp32_groups_flat_partition[0].device)
    if self.mpu is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.mpu.get_model_parallel_group())
    total = total.pow(0.5)
    # DeepSpeed's mask_nan_or_inf_with_val_inplace, with the -1 as a number: it makes the -1 a tensor on the
    # device, a copy from the host that waits for the GPU to finish everything queued (the whole backward).
    return total.masked_fill_(~torch.isfinite(total), -1.0)


@torch.no_grad()
def _step(self, closure=None) -> None:
    """``BF16_Optimizer.step`` with the gradient norm and the clipping as foreach operations."""
    from deepspeed.runtime.utils import is_invalid_grad_norm

    if closure is not None:
        raise TypeError(f"{type(self).__name__}.step takes no closure (DeepSpeed's BF16 optimizer has none)")
    grads, _ = self.get_grads_for_norm()
    self.overflow = False
    norm = _global_norm(self, grads)
    if getattr(self.optimizer, "defers_skips", False):
        return _step_without_waiting(self, norm)
    self._global_grad_norm = norm
    if is_invalid_grad_norm(norm):
        self.overflow = True
        self._global_grad_norm = float("inf")
        self.clear_hp_grads()
        self.clear_lp_grads()
        return None
    if self.clip_grad > 0.0:
        factor = self.clip_grad / (norm + 1e-6)
        if factor < 1:
            torch._foreach_mul_(self.get_grads_for_norm(for_clipping=True), factor)
    _update(self)
    return None


def _step_without_waiting(self, norm: torch.Tensor) -> None:
    """``_step`` with nothing read on the host: the skip and the clipping are decided on the device.

    DeepSpeed reads the norm three times (its -1 copied from the host, is it finite, is the factor below 1),
    each read a wait for the GPU to finish the backward, after which it sits idle until the host has queued
    the update and the next step's first kernels. Here a non-finite norm becomes the inner optimizer's device verdict (``GuardedAdamW``: its
    fused AdamW leaves parameters, moments and step counts as they were), and the gradients are always
    multiplied by the factor capped at 1: times 1.0 every value keeps its bits, so the update is DeepSpeed's
    bit for bit, for one more pass over the fp32 gradients where they are not clipped. The host learns of a
    skipped step later (``GuardedAdamW.resolve``); the reported norm is then inf, as DeepSpeed's.
    """
    invalid = norm < 0  # _global_norm's -1: not finite
    self._global_grad_norm = norm.masked_fill(invalid, float("inf"))
    self.optimizer.skip_if(invalid)
    if self.clip_grad > 0.0:
        factor = (self.clip_grad / (norm + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(self.get_grads_for_norm(for_clipping=True), factor)
    _update(self)
    return None


def _update(self) -> None:
    """The update of ``BF16_Optimizer.step`` once the gradients are clipped."""
    for param_partition, grad_partition in zip(
        self.fp32_groups_flat_partition, self.fp32_groups_gradient_flat_partition
    ):
        param_partition.grad = (
            grad_partition.to(param_partition.dtype)
            if grad_partition.dtype != param_partition.dtype
            else grad_partition
        )
    self.optimizer.step()
    if self.grad_acc_dtype is not torch.float32:
        for param_partition in self.fp32_groups_flat_partition:
            param_partition.grad = None
    self._lazy_init_hp_params_optimizer_state()
    self.update_lp_params()
    self.clear_hp_grads()
