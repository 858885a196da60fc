"""DeepSpeed's ZeRO-1/2 optimizer with the gradient norm as one foreach operation and the clipping decided on the
device trains exactly as DeepSpeed's own step; under bf16 over GuardedAdamW the non-finite norm is the
optimizer's device verdict, DeepSpeed's per-gradient test is off, and the step reads nothing on the host.

Two data-parallel ranks (each owns half of the gradients under ZeRO-2, so the norm is all-reduced over them),
gradient accumulation over two micro-batches, a clipping threshold low enough that all steps but one clip, one
step whose gradients are not finite (skipped), and parameters that have gradients in some steps only: the
losses, the gradient norms, the skipped steps and the fp32 master weights after five steps are bitwise those
of DeepSpeed's own step.
"""

from __future__ import annotations

import pytest
import torch

from tests.host_reads import host_reads_recorded
from tests.multiproc import run_ranks
from tests.test_training_fused_bf16 import CLIP, _Model, assert_same_training, inner_optimizer

# Step 3's gradients are not finite on rank 0 only (every rank skips the update); step 4's are small enough
# not to be clipped: (step, micro-batch) -> loss multiplier on rank 0, rank 1.
LOSS_SCALES = {(2, 0): (float("inf"), 1.0), (3, 0): (1e-3, 1e-3), (3, 1): (1e-3, 1e-3)}


def _train(rank: int, world_size: int, precision: str, zero_stage: int, variant: str) -> dict:
    """Five steps under DeepSpeed's own ZeRO step ("deepspeed"), ours ("fused"), or ours over GuardedAdamW,
    which skips on the device ("deferred"); all three over torch's fused AdamW."""
    import deepspeed

    from megatron_glm import parallel
    from megatron_glm.training.fused_zero import REPLACED_METHODS, fuse_zero_optimizer

    parallel.initialize_parallel(1, 1)
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    model = _Model().to(dtype)
    config = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True, "overlap_comm": False},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**62,
    }
    if precision == "bf16":  # as glm-pretrain configures it (engine.deepspeed_config)
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    inner = inner_optimizer(model, variant)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=inner, config=config, mpu=parallel.DeepSpeedMPU()
    )
    # Under a DeepSpeed release whose ZeRO optimizer it does not mirror, nothing is replaced.
    release, deepspeed.__version__ = deepspeed.__version__, "0.0.0"
    replaced = vars(engine.optimizer).keys() & set(REPLACED_METHODS)
    refused_other_release = not fuse_zero_optimizer(engine.optimizer) and not replaced
    deepspeed.__version__ = release
    applied = fuse_zero_optimizer(engine.optimizer) if variant != "deepspeed" else False
    data = torch.Generator().manual_seed(1 + rank)
    losses, norms, skipped, reads = [], [], [], []
    for step in range(5):
        if variant == "deferred":
            inner.begin_step()  # as TrainingEngine.train_step does
        # The branch only in steps 1 and 2: its gradients are None in the other steps.
        model.use_branch = step in (1, 2)
        for micro in range(2):
            x = torch.randn(4, 16, generator=data).to(dtype)
            loss = (engine(x).float() - 1.0).pow(2).mean()
            engine.backward(loss * LOSS_SCALES.get((step, micro), (1.0, 1.0))[rank])
            with host_reads_recorded(reads):
                engine.step()
            losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
        # Read after the step, as the loop does (StepResult): DeepSpeed's own skip, or the device verdict's.
        decision = getattr(inner, "last_decision", None)
        skipped.append(engine.optimizer.overflow or (decision is not None and decision.skipped))
    master = [p.detach().clone() for p in engine.optimizer.single_partition_of_fp32_groups]
    parallel.destroy_parallel()
    return {
        "refused": refused_other_release,
        "applied": applied,
        "checks_each_gradient": engine.optimizer.check_grad_overflow,
        "losses": losses,
        "norms": norms,
        "skipped": skipped,
        "master": master,
        "reads": reads,
    }


@pytest.mark.slow
@pytest.mark.parametrize("precision, zero_stage", [("bf16", 2), ("fp32", 1)])
def test_zero_step_trains_bitwise_like_deepspeeds_own(precision, zero_stage):
    reference = run_ranks(_train, 2, precision, zero_stage, "deepspeed")
    for variant in ("fused", "deferred"):
        results = run_ranks(_train, 2, precision, zero_stage, variant)
        for rank, (ours, theirs) in enumerate(zip(results, reference)):
            where = f"{variant}, rank {rank}"
            assert ours["applied"], f"{where}: the ZeRO optimizer was not fused"
            assert_same_training(ours, theirs, where)
            # The update is decided on the device only under bf16 over GuardedAdamW: there DeepSpeed's
            # per-gradient test is off and nothing is read in the step. Under fp32 DeepSpeed reads the norm
            # once (it skips an invalid one itself), where its own step reads it three times.
            decides = variant == "deferred" and precision == "bf16"
            assert ours["checks_each_gradient"] == (theirs["checks_each_gradient"] and not decides), where
            if decides:
                assert ours["reads"] == [], where
            else:
                assert 0 < len(ours["reads"]) < len(theirs["reads"]), (ours["reads"], theirs["reads"])
    # The run learned: the loss of the last micro-batch is below the first's.
    assert reference[0]["losses"][-1] < reference[0]["losses"][0]


def test_fusing_leaves_other_optimizers_alone():
    from megatron_glm.training.fused_zero import REPLACED_METHODS, fuse_zero_optimizer

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    assert fuse_zero_optimizer(optimizer) is False
    assert not vars(optimizer).keys() & set(REPLACED_METHODS)
