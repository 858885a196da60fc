"""GuardedAdamW: an update whose gradients are not all finite is not applied, and is counted; the others are
torch's AdamW steps."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_glm.training.optimizer import GuardedAdamW
from tests.host_reads import host_reads_recorded

ROOT = Path(__file__).resolve().parents[1]


def _params():
    generator = torch.Generator().manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(4, 8, generator=generator))
    half = torch.nn.Parameter(torch.randn(16, generator=generator).to(torch.bfloat16))
    return [weights, half]


def _step_with(poison):
    params = _params()
    before = [p.detach().clone() for p in params]
    optimizer = GuardedAdamW(params, lr=0.1, check_gradients=True)
    for p in params:
        p.grad = torch.ones_like(p)
    poison(params)
    optimizer.step()
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, params)]
    return optimizer.skipped_steps, changed


@pytest.mark.parametrize(
    "poison",
    [
        lambda ps: ps[0].grad.view(-1).__setitem__(5, float("nan")),
        lambda ps: ps[1].grad.__setitem__(3, float("inf")),  # in the bf16 gradient
        lambda ps: ps[0].grad.view(-1).__setitem__(0, float("-inf")),
    ],
    ids=["nan_fp32", "inf_bf16", "minus_inf_fp32"],
)
def test_a_non_finite_gradient_anywhere_skips_the_whole_update(poison):
    skipped, changed = _step_with(poison)
    assert skipped == 1
    assert changed == [False, False]


def test_large_finite_gradients_are_applied():
    # 3e38 is finite in fp32 although its square (what a 2-norm would sum) is not.
    skipped, changed = _step_with(lambda ps: ps[0].grad.view(-1).__setitem__(2, 3e38))
    assert skipped == 0
    assert changed == [True, True]


def test_without_the_check_only_the_loop_flag_skips():
    params = _params()
    optimizer = GuardedAdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    optimizer.skip_next = torch.tensor(True)
    optimizer.step()
    assert optimizer.skipped_steps == 1 and optimizer.skip_next is False
    for p in params:
        p.grad = torch.ones_like(p)
    before = params[0].detach().clone()
    optimizer.step()
    assert optimizer.skipped_steps == 1
    assert not torch.equal(before, params[0].detach())


def test_a_device_verdict_skips_without_being_read_and_is_counted_when_read():
    params = _params()
    optimizer = GuardedAdamW(params, lr=0.1, fused=True)
    before = [p.detach().clone() for p in params]
    reads = []
    for verdict in (True, False):
        for p in params:
            p.grad = torch.full_like(p, float("nan") if verdict else 1.0)
        optimizer.skip_next = torch.tensor(verdict)
        optimizer.resolve()  # the last step's verdict: read before the step, as the loop reads it
        with host_reads_recorded(reads):
            optimizer.step()
        if verdict:
            # Skipped on the device: the weights, the moments and Adam's step counts as they were.
            assert [torch.equal(b, p.detach()) for b, p in zip(before, params)] == [True, True]
            assert all(
                state["step"] == 0 and not state["exp_avg"].any() for state in optimizer.state.values()
            )
            assert optimizer.last_decision.skipped and optimizer.skipped_steps == 1
    assert reads == []
    assert optimizer.skipped_steps == 1 and not optimizer.last_decision.skipped
    assert all(state["step"] == 1 for state in optimizer.state.values())
    assert not any(torch.equal(b, p.detach()) for b, p in zip(before, params))


def test_the_parameter_groups_of_one_update_share_its_verdict():
    # DeepSpeed's ZeRO-1/2 steps the optimizer one parameter group at a time, narrowing param_groups to it.
    params = _params()
    optimizer = GuardedAdamW([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1, fused=True)
    groups = optimizer.param_groups
    reads = []
    for verdict in (True, False):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.begin_step()
        optimizer.skip_next = torch.tensor(verdict)
        with host_reads_recorded(reads):
            for group in groups:
                optimizer.param_groups = [group]
                optimizer.step()
        optimizer.param_groups = groups
        unchanged = [torch.equal(b, p.detach()) for b, p in zip(before, params)]
        assert unchanged == [verdict, verdict]
        assert optimizer.skipped_steps == 1  # one update, skipped once, then one applied
    assert reads == []


def _train_three_steps(optimizer_class, **kwargs) -> list[torch.Tensor]:
    params = _params()
    optimizer = optimizer_class(params, lr=0.1, weight_decay=0.01, fused=True, **kwargs)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, 0.5 + step - i)
        if isinstance(optimizer, GuardedAdamW):
            optimizer.skip_next = torch.tensor(False)  # the loop's device verdict: applied as found_inf = 0
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:  # what a resume does
            optimizer.load_state_dict(optimizer.state_dict())
    return [p.detach() for p in params]


def test_the_steps_are_torchs_adamw_bitwise():
    ours, torchs = _train_three_steps(GuardedAdamW), _train_three_steps(torch.optim.AdamW)
    for mine, theirs in zip(ours, torchs):
        assert torch.equal(mine, theirs)


def test_building_stepping_and_saving_does_not_import_torchdynamo():
    # torch wraps the optimizer's methods for torch.compile; the wrappers import TorchDynamo on first use,
    # some 2 s of every rank's start on a CPU, for an optimizer that never runs compiled.
    program = (
        "import sys, torch\n"
        "from megatron_glm.training.optimizer import GuardedAdamW\n"
        "params = [torch.nn.Parameter(torch.ones(4))]\n"
        "optimizer = GuardedAdamW(params, lr=0.1, fused=True, check_gradients=True)\n"
        "params[0].grad = torch.ones(4)\n"
        "optimizer.step(); optimizer.zero_grad(); optimizer.load_state_dict(optimizer.state_dict())\n"
        "assert params[0].grad is None and not torch.equal(params[0].detach(), torch.ones(4))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False", result.stdout + result.stderr
