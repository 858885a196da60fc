"""A non-finite loss: the update is never applied; "stop" ends the run naming the last good checkpoint,
"skip" counts skipped steps and keeps the weights unchanged."""

import contextlib
import json
import math
import subprocess

import pytest
import torch

from megatron_glm.checkpoint import find_checkpoint_files, read_module_state, save_thudm_checkpoint
from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel
from megatron_glm.parallel import destroy_parallel, initialize_parallel
from tests.glm_corpora import austen_corpus
from tests.host_reads import host_reads_recorded
from tests.multiproc import run_ranks
from tests.training_runs import pretrain_command, pretrain_env, run_pretrain, tiny_overrides

pytestmark = pytest.mark.slow  # end-to-end runs of real processes; `make test-fast` leaves them out


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A THUDM-layout checkpoint of the tiny model with one NaN weight, and a corpus."""
    root = tmp_path_factory.mktemp("nonfinite")
    initialize_parallel(1, 1)
    try:
        config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
        model = GLMModel(config, 30720, seed=3)
        with torch.no_grad():
            model.transformer.final_layernorm.weight[5] = float("nan")
        save_thudm_checkpoint(model, root / "poisoned")
    finally:
        destroy_parallel()
    return root, austen_corpus(root, 0, 6)


def test_stop_policy_fails_naming_the_last_good_checkpoint(poisoned):
    root, corpus = poisoned
    overrides = tiny_overrides(
        corpus, root / "samples", root / "stop", **{"checkpoint.init_from": str(root / "poisoned")}
    )
    result = subprocess.run(
        pretrain_command(1, overrides), env=pretrain_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "non-finite loss at step 1; the update was not applied" in result.stderr
    assert "Last good checkpoint: none saved yet" in result.stderr
    assert "training.nonfinite_policy=skip" in result.stderr


def test_skip_policy_skips_every_update_and_leaves_the_weights_alone(poisoned):
    root, corpus = poisoned
    run_dir = root / "skip"
    run_pretrain(
        1,
        tiny_overrides(
            corpus,
            root / "samples",
            run_dir,
            **{"checkpoint.init_from": str(root / "poisoned"), "training.nonfinite_policy": "skip"},
        ),
    )
    records = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in train] == [1, 2, 3, 4]
    # The LR schedule advances only with applied updates (as in THUDM/GLM).
    assert len({r["lr"] for r in train}) == 1
    (before_file,) = find_checkpoint_files(root / "poisoned")
    (after_file,) = find_checkpoint_files(run_dir / "checkpoints")
    before, after = read_module_state(before_file), read_module_state(after_file)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key].nan_to_num(7.0), after[key].float().nan_to_num(7.0)), key


def _skip_in_the_middle(rank: int, world_size: int, read_each_step: bool, zero_stage: int) -> dict:
    """Five bf16 steps of ``TrainingEngine`` with a warming-up schedule (a new learning rate each step) and a
    non-finite loss at the third; the step results read after each step, or only at the end."""
    import deepspeed

    from megatron_glm import parallel
    from megatron_glm.config import load_config, padded_vocab_size, parallel_layout
    from megatron_glm.training.engine import TrainingEngine
    from tests.tiny_glm import TINY_SETTINGS, engine_batches

    overrides = [
        *TINY_SETTINGS,
        "training.precision=bf16",
        "training.micro_batch_size=2",
        "training.global_batch_size=2",
        "training.train_steps=10",
        f"parallel.zero_stage={zero_stage}",
        "optimizer.lr=1e-2",
        "lr_schedule.warmup_fraction=1.0",
    ]
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    cfg = load_config(None, overrides)
    layout = parallel_layout(cfg, world_size)
    parallel.initialize_parallel(1, 1)
    parallel.seed_parallel_rng(cfg.training.seed)  # dropout as configured (0.1)
    engine = TrainingEngine(cfg, layout, padded_vocab_size(cfg.model, 1), torch.device("cpu"))
    forward, step = engine._forward, 0

    def poisoned_at_the_third_step(batch):
        # A NaN added as a constant: the loss is not finite, its gradients are. Only the loop's verdict can skip
        # the update (DeepSpeed's own checks of the gradients pass).
        loss = forward(batch)
        return loss + torch.tensor(float("nan")) if step == 2 else loss

    engine._forward = poisoned_at_the_third_step

    optimizer = engine.deepspeed_engine.optimizer
    master = (
        getattr(optimizer, "fp32_groups_flat_partition", None) or optimizer.single_partition_of_fp32_groups
    )
    micro_batches, results, read, host_reads, masters = engine_batches(), [], [], [], []
    for step in range(5):
        with host_reads_recorded(host_reads) if step > 0 else contextlib.nullcontext():
            results.append(engine.train_step(micro_batches))
        if read_each_step:
            read.append((results[-1].skipped, results[-1].lr, results[-1].loss))
            masters.append([p.detach().clone() for p in master])
    if not read_each_step:  # every verdict but the last was read in the next step's update
        read = [(r.skipped, r.lr, r.loss) for r in results]
        masters.append([p.detach().clone() for p in master])
    outcome = {
        "read": read,
        "scheduler_steps": engine.scheduler.num_steps,
        "group_lrs": {group["lr"] for group in engine.optimizer.param_groups},
        "skipped_steps": engine.optimizer.skipped_steps,
        "masters": masters,
        "host_reads": host_reads,
    }
    parallel.destroy_parallel()
    return outcome


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_a_skipped_step_read_late_holds_the_schedule_back_as_one_read_at_once(zero_stage):
    """The optimizer applies a non-finite step's skip on the device and the host learns of it later, at the
    next update at the latest: the schedule, the skip count and the training are those of reading at once.
    Under ZeRO-1 (DeepSpeed's BF16 optimizer) the update is one call of ours; under ZeRO-2 one per parameter
    group, all of which skip."""
    from megatron_glm.config import load_config
    from megatron_glm.training.lr_schedule import lr_at

    (late,) = run_ranks(_skip_in_the_middle, 1, False, zero_stage)
    (at_once,) = run_ranks(_skip_in_the_middle, 1, True, zero_stage)
    schedule = load_config(None, ["lr_schedule.warmup_fraction=1.0"]).lr_schedule
    applied = [1, 2, 2, 3, 4]  # updates applied after each step: the third was skipped
    expected_lrs = [lr_at(n, 1e-2, schedule, 10) for n in applied]
    assert [skipped for skipped, _, _ in late["read"]] == [False, False, True, False, False]
    assert [lr for _, lr, _ in late["read"]] == pytest.approx(expected_lrs, rel=0, abs=0)
    assert late["scheduler_steps"] == 4 and late["group_lrs"] == {expected_lrs[-1]}
    assert late["skipped_steps"] == 1
    assert math.isnan(late["read"][2][2])
    assert late["read"][:2] == at_once["read"][:2] and late["read"][3:] == at_once["read"][3:]
    # Nothing of the skipped update was applied, to any parameter group.
    after_second, after_third = at_once["masters"][1:3]
    assert all(torch.equal(a, b) for a, b in zip(after_second, after_third))
    assert not any(torch.equal(a, b) for a, b in zip(at_once["masters"][0], after_second))
    # Read after each step, the verdicts leave the steps nothing to read on the host: no step waits for the
    # device (read only at the end, each update reads the previous step's verdict, from a copy made long
    # before). Under ZeRO-2 DeepSpeed's own norm tests are replaced (training/fused_zero.py).
    assert at_once["host_reads"] == []
    assert late["host_reads"] and all("training/metrics.py" in read for read in late["host_reads"])
    for a, b in zip(late["masters"][-1], at_once["masters"][-1]):
        assert torch.equal(a, b)
