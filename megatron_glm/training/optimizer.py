"""AdamW with THUDM/GLM's weight-decay groups and a guard against non-finite updates that does not wait for the
GPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_glm.config import OptimizerConfig
from megatron_glm.model import LayerNorm
from megatron_glm.training.metrics import HostScalars


def _without_dynamo_guard(method):
    """``method`` without the wrapper torch puts on it for ``torch.compile`` (``torch._disable_dynamo``, or the
    graph breaks around ``step``): the wrapper imports TorchDynamo when first called, some 2 s of every rank's
    start on a CPU. The optimizer here never runs inside a compiled region, where alone the wrapper acts.
    ``step`` keeps the wrapper's other effect: it runs without autograd."""
    return getattr(method, "__wrapped__", method)


class SkipDecision:
    """Whether one optimizer step applied its update, decided on the device and read on the host when needed.

    ``skipped`` (and the learning rate the schedule stands at after the step, ``lr``) is known once
    ``GuardedAdamW.resolve`` has read the flag: that waits for the device to have decided, nothing more.
    """

    def __init__(self, optimizer: GuardedAdamW, flag: torch.Tensor | bool) -> None:
        self._optimizer = optimizer
        self._flag = HostScalars([flag])
        self._skipped: bool | None = None
        self._lr: float | None = None

    @property
    def skipped(self) -> bool:
        if self._skipped is None:
            self._optimizer.resolve()
        return bool(self._skipped)

    @property
    def lr(self) -> float | None:
        """Set by the optimizer's ``on_resolved`` hook, if it has one (None otherwise)."""
        if self._skipped is None:
            self._optimizer.resolve()
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = value


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that does not apply an update whose gradients are not finite, and does not wait to decide.

    The training loop sets ``skip_next`` when the ranks agreed that the loss was not finite (a device bool);
    DeepSpeed's BF16 and ZeRO optimizers add their verdict on the gradient norm (``skip_if``: ``fused_bf16``,
    ``fused_zero``); with ``check_gradients`` the step also inspects its own gradients (the pipeline engine
    gives the loop no chance to intervene before the step: a non-finite loss makes every upstream gradient
    non-finite, so each rank reaches the same decision). The parameters, the moments and Adam's step counts are then left exactly as they were, and the
    skip is counted.

    Where the decision is a device tensor (always, once training runs) it is not read before the update: the
    fused AdamW takes it as ``found_inf`` and skips on the device, so the host never waits for the GPU to
    finish the backward and can queue the next step meanwhile. The host learns the outcome later, from a
    pinned copy (``SkipDecision``): at the next update (its learning rate depends on whether this one
    counted), or when the loop reports the step, whichever is first. ``on_resolved`` is called with each
    decision as it is read, in step order (the engine takes the schedule back a step for a skipped one).

    DeepSpeed's ZeRO-1/2 optimizer calls ``step`` once per parameter group, with ``param_groups`` narrowed to
    that group. Between two ``begin_step`` calls (the engine makes one per training step) the calls are one
    update: the first decides, and the others apply its verdict without deciding or reading anything again.
    The hook sees every group meanwhile (a schedule taken back sets the learning rate of all of them).
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
        self.on_resolved: Callable[[SkipDecision], None] | None = None
        self.last_decision: SkipDecision | None = None  # that of the latest step, read or not
        self._unresolved: list[SkipDecision] = []
        self._skipped_steps = 0
        self._in_step = False  # between begin_step and the next: later calls share the first one's verdict
        self._step_flag: torch.Tensor | bool | None = None
        self._all_groups: list[dict] = self.param_groups  # as begin_step found them (not narrowed)

    @property
    def defers_skips(self) -> bool:
        """Whether a device verdict is applied without reading it (the fused AdamW takes it as ``found_inf``)."""
        return all(group["fused"] for group in self.param_groups)

    @property
    def skipped_steps(self) -> int:
        """Updates not applied so far (reads the decisions still on their way)."""
        self.resolve()
        return self._skipped_steps

    def skip_if(self, flag: torch.Tensor) -> None:
        """Skip the next update also where the device bool ``flag`` is true (or-ed with ``skip_next``)."""
        self.skip_next = flag | self.skip_next

    def begin_step(self) -> None:
        """A new training step begins: the ``step`` calls until the next ``begin_step`` make one update."""
        self._in_step = True
        self._step_flag = None
        self._all_groups = self.param_groups
        self.last_decision = None

    def resolve(self) -> None:
        """Read the decisions of the steps taken so far (waits for the device to have made them)."""
        while self._unresolved:
            decision = self._unresolved.pop(0)
            decision._skipped = decision._flag.values()[0] != 0.0
            self._skipped_steps += int(decision._skipped)
            if self.on_resolved is not None:
                self.on_resolved(decision)

    def _non_finite_gradients(self) -> torch.Tensor | None:
        """A device bool: whether some gradient element is not finite (the largest magnitude of each gradient,
        one multi-tensor kernel per dtype on CUDA; NaN and inf propagate through it); None without gradients."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        if not by_dtype:
            return None
        largest = [
            torch.stack(torch._foreach_norm(grads, float("inf"))).max().float() for grads in by_dtype.values()
        ]
        return ~torch.stack(largest).isfinite().all()

    @torch.no_grad()
    def step(self, closure=None):
        if self._in_step and self._step_flag is not None:
            flag = self._step_flag  # a further parameter group of the same update
        else:
            flag = self._decide()
        if not torch.is_tensor(flag):
            result = None if flag else self._adamw_step(self, closure)
        else:
            self.found_inf = flag.float()  # read by torch's fused AdamW (and the step counts taken back)
            try:
                result = self._adamw_step(self, closure)
            finally:
                del self.found_inf
        return result

    def _decide(self) -> torch.Tensor | bool:
        """This update's verdict (a device bool, or a host one), recorded for the host to read later."""
        # This step's learning rate depends on whether the earlier ones counted (the schedule advances only
        # with applied updates). Reading the last step's verdict waits for the GPU to have decided it, not for
        # this step's forward and backward, which stay queued behind it.
        narrowed, self.param_groups = (
            self.param_groups,
            self._all_groups if self._in_step else self.param_groups,
        )
        try:
            self.resolve()
        finally:
            self.param_groups = narrowed
        flag = self.skip_next
        self.skip_next = False
        if self.check_gradients:
            non_finite = self._non_finite_gradients()
            if non_finite is not None:
                flag = non_finite | flag
        if not torch.is_tensor(flag) or not self.defers_skips:
            flag = bool(flag)  # a host value, or an optimizer that cannot skip on the device: read it now
        decision = SkipDecision(self, flag)
        self._unresolved.append(decision)
        self.last_decision = decision
        if self._in_step:
            self._step_flag = flag
        return flag


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
