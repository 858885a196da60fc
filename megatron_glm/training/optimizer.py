"""AdamW with THUDM/GLM's weight-decay groups and a guard against non-finite updates."""

from __future__ import annotations

import torch

from megatron_glm.config import OptimizerConfig
from megatron_glm.model import LayerNorm


def _without_dynamo_guard(method):
    """``method`` without the wrapper torch puts on it for ``torch.compile`` (``torch._disable_dynamo``, or the
    graph breaks around ``step``): the wrapper imports TorchDynamo when first called, some 2 s of every rank's
    start on a CPU. The optimizer here never runs inside a compiled region, where alone the wrapper acts.
    ``step`` keeps the wrapper's other effect: it runs without autograd."""
    return getattr(method, "__wrapped__", method)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that does not apply an update whose gradients are not finite.

    The training loop sets ``skip_next`` when the ranks agreed that the loss was not finite; with
    ``check_gradients`` the step also inspects its own gradients (the pipeline engine gives the loop no
    chance to intervene before the step: a non-finite loss makes every upstream gradient non-finite, so
    each rank reaches the same decision). The parameters are then left exactly as they were.
    """

    add_param_group = _without_dynamo_guard(torch.optim.Optimizer.add_param_group)
    zero_grad = _without_dynamo_guard(torch.optim.Optimizer.zero_grad)
    state_dict = _without_dynamo_guard(torch.optim.Optimizer.state_dict)
    load_state_dict = _without_dynamo_guard(torch.optim.Optimizer.load_state_dict)
    _adamw_step = staticmethod(_without_dynamo_guard(torch.optim.AdamW.step))

    def __init__(self, params, *, check_gradients: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        self.skip_next: bool | torch.Tensor = False
        self.check_gradients = check_gradients
        self.skipped_steps = 0

    def _gradients_finite(self) -> bool:
        """Whether every gradient element is finite: the largest magnitude of each gradient (one multi-tensor
        kernel per dtype on CUDA; NaN and inf propagate through it), read back once."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        if not by_dtype:
            return True
        largest = [
            torch.stack(torch._foreach_norm(grads, float("inf"))).max().float() for grads in by_dtype.values()
        ]
        return bool(torch.stack(largest).isfinite().all())

    @torch.no_grad()
    def step(self, closure=None):
        # skip_next may be a device bool (the loop does not wait for it): read it here, after the backward.
        skip = bool(self.skip_next) or (self.check_gradients and not self._gradients_finite())
        self.skip_next = False
        if skip:
            self.skipped_steps += 1
            return None
        return self._adamw_step(self, closure)


def build_optimizer(module: torch.nn.Module, cfg: OptimizerConfig, *, check_gradients: bool) -> GuardedAdamW:
    """AdamW over ``module`` with no weight decay on biases and LayerNorm parameters (THUDM/GLM's groups)."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    # ZeRO accepts the optimizers on this list; GuardedAdamW is AdamW (DeepSpeed registers apex's this way).
    if GuardedAdamW not in ZERO_SUPPORTED_OPTIMIZERS:
        ZERO_SUPPORTED_OPTIMIZERS.append(GuardedAdamW)
    return GuardedAdamW(
        weight_decay_param_groups(module, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=True,  # one multi-tensor kernel per step, on CPU and CUDA
        weight_decay=cfg.weight_decay,
        check_gradients=check_gradients,
    )


def weight_decay_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: no weight decay on biases and LayerNorm parameters (as THUDM/GLM), decay elsewhere."""
    no_decay_ids = {id(p) for m in model.modules() if isinstance(m, LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("bias") or id(param) in no_decay_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
