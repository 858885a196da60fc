"""DeepSpeed's BF16 optimizer with foreach gradient loops, and without the gradient all-reduce over a single
data-parallel rank, trains exactly as DeepSpeed's own loops and all-reduce.

Two ranks in one tensor-parallel group (so the gradient norm is all-reduced over the model-parallel group),
bf16 weights, ZeRO-1 with fp32 gradient accumulation over two micro-batches, a clipping threshold low
enough that every step clips, one step whose gradients are not finite (skipped), and parameters that have
gradients in some steps only: the losses, the gradient norms, the skipped steps and the fp32 master
weights after five steps are bitwise those of DeepSpeed's per-parameter loops (which zero the fp32
accumulators after each step, where ours overwrite them at the next backward).
"""

from __future__ import annotations

import pytest
import torch

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


def _train(rank: int, world_size: int, fused: bool) -> dict:
    import deepspeed

    from megatron_glm import parallel
    from megatron_glm.training.fused_bf16 import fuse_bf16_optimizer, skip_single_rank_allreduce

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
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config=config,
        mpu=parallel.DeepSpeedMPU(),
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
    losses, norms, skipped = [], [], []
    for step in range(5):
        # The branch only in steps 1 and 2: from step 3 on its fp32 accumulators must read zero, not what
        # step 2 left in them.
        model.use_branch = step in (1, 2)
        for micro in range(2):
            x = torch.randn(4, 16, generator=data).to(torch.bfloat16)
            loss = (engine(x).float() - 1.0).pow(2).mean()
            # Step 3's gradients are not finite: the update is skipped and the accumulators cleared.
            engine.backward(loss * (float("inf") if step == 2 and micro == 0 else 1.0))
            engine.step()
            losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
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
    }


@pytest.mark.slow
def test_foreach_loops_train_bitwise_like_deepspeeds_own():
    fused = run_ranks(_train, 2, True)
    reference = run_ranks(_train, 2, False)
    for rank, (ours, theirs) in enumerate(zip(fused, reference)):
        assert ours["applied"], f"rank {rank}: the BF16 optimizer was not fused"
        assert ours["all_reduce_skipped"] and ours["kept_over_two_ranks"], rank
        assert ours["refused"], f"rank {rank}: fused under a DeepSpeed release it does not mirror"
        assert theirs["skipped"] == [False, False, True, False, False], theirs["skipped"]
        assert ours["skipped"] == theirs["skipped"], rank
        # Every other step clipped, so the clipping path ran.
        finite = [norm for norm, skip in zip(theirs["norms"], theirs["skipped"]) if not skip]
        assert min(finite) > CLIP, theirs["norms"]
        assert ours["losses"] == theirs["losses"], rank
        assert ours["norms"] == theirs["norms"], rank
        for a, b in zip(ours["master"], theirs["master"]):
            assert torch.equal(a, b), rank
    # The run learned: the loss of the last micro-batch is below the first's.
    assert reference[0]["losses"][-1] < reference[0]["losses"][0]


def test_fusing_leaves_other_optimizers_alone():
    from megatron_glm.training.fused_bf16 import fuse_bf16_optimizer

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    assert fuse_bf16_optimizer(optimizer) is False
    assert "step" not in vars(optimizer)
