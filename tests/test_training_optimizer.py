"""GuardedAdamW: an update whose gradients are not all finite is not applied, and is counted."""

import pytest
import torch

from megatron_glm.training.optimizer import GuardedAdamW


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
