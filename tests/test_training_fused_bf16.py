"""DeepSpeed's BF16 optimizer with foreach gradient loops, and without the gradient all-reduce over a single
data-parallel rank, trains exactly as DeepSpeed's own loops and all-reduce; over GuardedAdamW it also decides
the skip and the clipping on the device, reading nothing on the host, with the same bits.

Two ranks in one tensor-parallel group (so the gradient norm is all-reduced over the model-parallel group),
bf16 weights, ZeRO-1 with fp32 gradient accumulation over two micro-batches, a clipping threshold low
enough that all steps but one clip, one step whose gradients are not finite (skipped), and parameters that have
gradients in some steps only: the losses, the gradient norms, the skipped steps and the fp32 master
weights after five steps are bitwise those of DeepSpeed's per-parameter loops (which zero the fp32
accumulators after each step, where ours overwrite them at the next backward).
"""

from __future__ import annotations

import pytest
import torch

from tests.host_reads import host_reads_recorded
from tests.multiproc import run_ranks

CLIP = 0.05


class _Model(torch.nn.Module):
    """An MLP, and a side branch that only some steps use: its gradients in the other steps are None."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(16, 48), torch.nn.GELU(), torch.nn.Linear(48, 16), torch.nn.LayerNorm(16)
        )
        self.branch = torch.nn.Linear(16, 16)
        self.use_branch = True

    def forward(self, x):
        return self.body(x) + (self.branch(x) if self.use_branch else 0.0)


def inner_optimizer(model: torch.nn.Module, variant: str) -> torch.optim.Optimizer:
    """torch's fused AdamW, or over "deferred" GuardedAdamW (which skips on the device), registered with
    DeepSpeed as build_optimizer registers it."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    from megatron_glm.training.optimizer import GuardedAdamW

    if variant != "deferred":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ZERO_SUPPORTED_OPTIMIZERS.append(GuardedAdamW)
    return GuardedAdamW(model.parameters(), lr=1e-2, fused=True)


def assert_same_training(ours: dict, theirs: dict, where: str) -> None:
    """Five steps trained bitwise alike, the third skipped, the fourth not clipped and the others clipped."""
    assert ours["refused"], f"{where}: fused under a DeepSpeed release it does not mirror"
    assert theirs["skipped"] == [False, False, True, False, False], theirs["skipped"]
    assert ours["skipped"] == theirs["skipped"], where
    # Step 4 was not clipped, every other step was: both paths ran.
    assert theirs["norms"][3] < CLIP < min(theirs["norms"][:2] + theirs["norms"][4:]), theirs["norms"]
    assert ours["losses"] == theirs["losses"], where
    assert ours["norms"] == theirs["norms"], where
    for a, b in zip(ours["master"], theirs["master"]):
        assert torch.equal(a, b), where


def _train(rank: int, world_size: int, variant: str) -> dict:
    """Five steps with DeepSpeed's own loops ("deepspeed"), ours ("fused") or ours over GuardedAdamW, which
    skips on the device ("deferred"); all three over torch's fused AdamW."""
    import deepspeed

    from megatron_glm import parallel
    from megatron_glm.training.fused_bf16 import fuse_bf16_optimizer, skip_single_rank_allreduce

    fused = variant != "deepspeed"
    parallel.initialize_parallel(world_size, 1)
    torch.manual_seed(0)
    model = _Model().to(torch.bfloat16)
    # Counted on every tensor-parallel rank, as a split weight is: the norm's all-reduce adds the ranks'
    # shares (the replicated parameters count on rank 0 only).
    model.body[0].weight.tensor_model_parallel = True
    config = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": True},
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",  # as glm-pretrain configures it (engine.deepspeed_config)
        "steps_per_print": 2**62,
    }
    inner = inner_optimizer(model, variant)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=inner, config=config, mpu=parallel.DeepSpeedMPU()
    )
    # Under a DeepSpeed release whose BF16_Optimizer it does not mirror, nothing is replaced.
    release, deepspeed.__version__ = deepspeed.__version__, "0.0.0"
    refused_other_release = not fuse_bf16_optimizer(engine.optimizer) and "step" not in vars(engine.optimizer)
    deepspeed.__version__ = release
    applied = fuse_bf16_optimizer(engine.optimizer) if fused else False
    # Two tensor-parallel ranks are one data-parallel rank: the gradient all-reduce is an identity (over two
    # data-parallel ranks it stays).
    kept_over_two_ranks = not skip_single_rank_allreduce(engine, 2) and engine.enable_backward_allreduce
    all_reduce_skipped = skip_single_rank_allreduce(engine, 1) if fused else False
    data = torch.Generator().manual_seed(1)
    losses, norms, skipped, reads = [], [], [], []
    for step in range(5):
        # The branch only in steps 1 and 2: from step 3 on its fp32 accumulators must read zero, not what
        # step 2 left in them.
        model.use_branch = step in (1, 2)
        for micro in range(2):
            x = torch.randn(4, 16, generator=data).to(torch.bfloat16)
            loss = (engine(x).float() - 1.0).pow(2).mean()
            # Step 3's gradients are not finite: the update is skipped and the accumulators cleared. Step 4's
            # are small enough not to be clipped.
            engine.backward(loss * {(2, 0): float("inf"), (3, 0): 1e-3, (3, 1): 1e-3}.get((step, micro), 1.0))
            with host_reads_recorded(reads):
                engine.step()
            losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
        if variant == "deferred":
            skipped.append(inner.last_decision.skipped)  # read after the step, as the loop does
        else:
            skipped.append(engine.optimizer.overflow)
    master = [p.detach().clone() for p in engine.optimizer.fp32_groups_flat_partition]
    parallel.destroy_parallel()
    return {
        "refused": refused_other_release,
        "applied": applied,
        "all_reduce_skipped": all_reduce_skipped,
        "kept_over_two_ranks": kept_over_two_ranks,
        "losses": losses,
        "norms": norms,
        "skipped": skipped,
        "master": master,
        "reads": reads,
    }


@pytest.mark.slow
def test_foreach_loops_train_bitwise_like_deepspeeds_own():
    reference = run_ranks(_train, 2, "deepspeed")
    for variant in ("fused", "deferred"):
        for rank, (ours, theirs) in enumerate(zip(run_ranks(_train, 2, variant), reference)):
            where = f"{variant}, rank {rank}"
            assert ours["applied"], f"{where}: the BF16 optimizer was not fused"
            assert ours["all_reduce_skipped"] and ours["kept_over_two_ranks"], where
            assert_same_training(ours, theirs, where)
            # DeepSpeed's step reads the norm on the host (finite? clip?), each read a wait for the GPU; over
            # GuardedAdamW nothing is read in the step.
            assert theirs["reads"] and ours["reads"] if variant == "fused" else not ours["reads"], ours[
                "reads"
            ]
    # The run learned: the loss of the last micro-batch is below the first's.
    assert reference[0]["losses"][-1] < reference[0]["losses"][0]


def test_fusing_leaves_other_optimizers_alone():
    from megatron_glm.training.fused_bf16 import fuse_bf16_optimizer

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    assert fuse_bf16_optimizer(optimizer) is False
    assert "step" not in vars(optimizer)
