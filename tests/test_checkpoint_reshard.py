"""glm-convert reshard: a TP2 x PP2 ZeRO-1 training checkpoint (optimizer state included) resumed at TP1 x PP1
and at TP4 continues with the losses of the run that went on at the old layout, as do bf16, ZeRO-3 and ZeRO-0
checkpoints (ZeRO-0 also as the target); bad targets and a missing file give one message and write nothing."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_glm.cli.convert import main as convert
from tests.training_runs import ROOT, pretrain_env, step_losses

pytestmark = pytest.mark.slow

# Both layouts compute in fp32; only the order of the sums over tensor-parallel shards differs.
REL_TOL = 1e-5
# bf16: the masters are fp32 and restored exactly, but the forward runs in bf16 (8 mantissa bits), and TP2
# rounds its row-parallel partial sums to bf16 before the all-reduce where TP1 sums inside one matmul. The
# mean loss averages those roundings out (measured: 2e-6 and 6e-6 at steps 3 and 4); one step's update moves
# it by ~1e-2, so 1e-4 still fails on a lost or wrong update (masters, moments, Adam's step or the LR).
BF16_REL_TOL = 1e-4


def _resume(world_size: int, config, log_dir) -> None:
    launcher = [sys.executable]
    if world_size > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(world_size)]
    command = [*launcher, "-m", "megatron_glm.cli.pretrain", "--config", str(config)]
    command += ["--set", f"logging.log_dir={log_dir}"]
    done = subprocess.run(command, env=pretrain_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("tensor_parallel_size, world_size", [(1, 1), (4, 4)])
def test_resharded_checkpoint_resumes_with_the_old_layouts_losses(
    tp2pp2_run, tmp_path, tensor_parallel_size, world_size
):
    _, run = tp2pp2_run
    reference = step_losses(run)
    output = tmp_path / "resharded"
    arguments = ["reshard", "--tensor-parallel-size", str(tensor_parallel_size)]
    assert convert([*arguments, str(run / "checkpoints" / "2"), str(output)]) == 0
    state = json.loads((output / "2" / "universal" / "state.json").read_text())
    assert state["client_state"] == {"step": 2, "consumed_samples": 16, "skipped_steps": 0}
    assert state["adam_step"] == 2 and state["lr_scheduler"]["num_steps"] == 2
    config = output / "2" / "config.yaml"
    assert f"tensor_parallel_size: {tensor_parallel_size}" in config.read_text()
    _resume(world_size, config, tmp_path / "logs")
    resumed = step_losses(tmp_path)
    # Step 3's loss checks the weights; step 4's also the update from the moments, Adam's step and the LR.
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert math.isclose(resumed[step], reference[step], rel_tol=REL_TOL), (step, resumed, reference)
    # The resumed run saved a regular checkpoint at its own layout next to the universal one.
    assert (output / "latest").read_text() == "4" and (output / "4" / "meta.json").is_file()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--tensor-parallel-size", "3"], "4 heads cannot be split over parallel.tensor_parallel_size = 3"),
        (["--tensor-parallel-size", "1", "--pipeline-parallel-size", "3"], "2 layers cannot be split evenly"),
    ],
)
def test_a_target_layout_that_does_not_divide_writes_nothing(
    tp2pp2_run, tmp_path, capsys, arguments, message
):
    _, run = tp2pp2_run
    output = tmp_path / "out"
    assert convert(["reshard", *arguments, str(run / "checkpoints"), str(output)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_optimizer_file_is_named_and_nothing_is_written(tp2pp2_run, tmp_path, capsys):
    _, run = tp2pp2_run
    source = tmp_path / "copy"
    shutil.copytree(run / "checkpoints" / "4", source)
    (source / "zero_pp_rank_0_mp_rank_03_optim_states.pt").unlink()
    output = tmp_path / "out"
    assert convert(["reshard", "--tensor-parallel-size", "1", str(source), str(output)]) == 1
    err = capsys.readouterr().err
    assert "zero_pp_rank_0_mp_rank_03_optim_states.pt: missing" in err and "TP 2 x PP 2 x DP 1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_export_reads_a_resharded_checkpoint(tp2pp2_run, tmp_path):
    from safetensors.torch import load_file

    _, run = tp2pp2_run
    resharded = tmp_path / "resharded"
    assert (
        convert(["reshard", "--tensor-parallel-size", "1", str(run / "checkpoints" / "2"), str(resharded)])
        == 0
    )
    for name, source in (("universal", resharded), ("original", run / "checkpoints" / "2")):
        assert (
            convert(["export", "--to", "safetensors", str(source), str(tmp_path / f"{name}.safetensors")])
            == 0
        )
    universal, original = (load_file(tmp_path / f"{name}.safetensors") for name in ("universal", "original"))
    # fp32 training: the weights glm-pretrain saved are its fp32 master weights, bit for bit.
    assert universal.keys() == original.keys()
    assert all(torch.equal(universal[key], original[key]) for key in original)


def test_a_bf16_checkpoint_reshards_and_resumes(tmp_path):
    """bf16 at ZeRO-1 (DeepSpeed's BF16_Optimizer: bf16_-prefixed optimizer files), TP2 -> TP1."""
    from safetensors.torch import load_file

    from tests.glm_corpora import austen_corpus
    from tests.training_runs import run_pretrain, tiny_overrides

    corpus = austen_corpus(tmp_path, 0, 6)
    run = tmp_path / "run"
    settings = {
        "training.precision": "bf16",
        "checkpoint.interval": 2,
        "parallel.tensor_parallel_size": 2,
        "parallel.zero_stage": 1,
    }
    run_pretrain(2, tiny_overrides(corpus, tmp_path / "samples", run, **settings))
    assert (run / "checkpoints" / "2" / "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt").is_file()
    reference = step_losses(run)
    output = tmp_path / "resharded"
    assert (
        convert(["reshard", "--tensor-parallel-size", "1", str(run / "checkpoints" / "2"), str(output)]) == 0
    )
    # The bf16 weights glm-pretrain saved are its fp32 master weights rounded to bf16: exactly.
    assert convert(["export", "--to", "safetensors", str(output), str(tmp_path / "masters.safetensors")]) == 0
    assert (
        convert(
            [
                "export",
                "--to",
                "safetensors",
                str(run / "checkpoints" / "2"),
                str(tmp_path / "bf16.safetensors"),
            ]
        )
        == 0
    )
    masters, weights = load_file(tmp_path / "masters.safetensors"), load_file(tmp_path / "bf16.safetensors")
    assert all(
        masters[k].dtype == torch.float32 and torch.equal(masters[k].bfloat16(), weights[k]) for k in weights
    )
    _resume(1, output / "2" / "config.yaml", tmp_path / "logs")
    resumed = step_losses(tmp_path)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert math.isclose(resumed[step], reference[step], rel_tol=BF16_REL_TOL), (step, resumed, reference)


def test_a_zero3_checkpoint_reshards_and_resumes_at_zero3(tmp_path):
    """ZeRO-3 at DP3 (each parameter cut in three, padded where 3 does not divide it) -> ZeRO-3 at DP2."""
    from safetensors.torch import load_file

    from tests.glm_corpora import austen_corpus
    from tests.training_runs import run_pretrain, tiny_overrides

    corpus = austen_corpus(tmp_path, 0, 6)
    run = tmp_path / "run"
    # 12 samples a step: 6 micro-batches of 2 at DP3 (2 each) and at DP2 (3 each), the same pairs.
    settings = {"checkpoint.interval": 2, "parallel.zero_stage": 3, "training.global_batch_size": 12}
    run_pretrain(3, tiny_overrides(corpus, tmp_path / "samples", run, **settings))
    assert (run / "checkpoints" / "2" / "zero_pp_rank_2_mp_rank_00_optim_states.pt").is_file()
    reference = step_losses(run)
    output = tmp_path / "resharded"
    assert (
        convert(["reshard", "--tensor-parallel-size", "1", str(run / "checkpoints" / "2"), str(output)]) == 0
    )
    assert "zero_stage: 3" in (output / "2" / "config.yaml").read_text()
    # fp32: the masters gathered from the partitions are the weights glm-pretrain wrote, bit for bit.
    assert convert(["export", "--to", "safetensors", str(output), str(tmp_path / "masters.safetensors")]) == 0
    weights = tmp_path / "weights.safetensors"
    assert convert(["export", "--to", "safetensors", str(run / "checkpoints" / "2"), str(weights)]) == 0
    masters, weights = load_file(tmp_path / "masters.safetensors"), load_file(weights)
    assert masters.keys() == weights.keys() and all(torch.equal(masters[k], weights[k]) for k in weights)
    _resume(2, output / "2" / "config.yaml", tmp_path / "logs")
    resumed = step_losses(tmp_path)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert math.isclose(resumed[step], reference[step], rel_tol=REL_TOL), (step, resumed, reference)


def test_a_zero0_checkpoint_reshards_and_resumes_at_zero0_and_zero1(tmp_path):
    """ZeRO-0 (the torch optimizer's own state_dict, indexed by parameter) at TP2 -> TP1 at ZeRO-0 and ZeRO-1."""
    from tests.glm_corpora import austen_corpus
    from tests.training_runs import run_pretrain, tiny_overrides

    corpus = austen_corpus(tmp_path, 0, 6)
    run = tmp_path / "run"
    settings = {"checkpoint.interval": 2, "parallel.tensor_parallel_size": 2, "parallel.zero_stage": 0}
    run_pretrain(2, tiny_overrides(corpus, tmp_path / "samples", run, **settings))
    assert not list((run / "checkpoints" / "2").glob("*optim_states.pt"))
    reference = step_losses(run)
    for stage in (0, 1):
        output = tmp_path / f"zero{stage}"
        arguments = ["reshard", "--tensor-parallel-size", "1", "--zero-stage", str(stage)]
        assert convert([*arguments, str(run / "checkpoints" / "2"), str(output)]) == 0
        assert f"zero_stage: {stage}" in (output / "2" / "config.yaml").read_text()
        state = json.loads((output / "2" / "universal" / "state.json").read_text())
        assert state["adam_step"] == 2 and state["source_layout"]["zero_stage"] == 0
        _resume(1, output / "2" / "config.yaml", output / "logs")
        resumed = step_losses(output)
        assert sorted(resumed) == [3, 4]
        for step in (3, 4):
            assert math.isclose(resumed[step], reference[step], rel_tol=REL_TOL), (
                stage,
                step,
                resumed,
                reference,
            )


def test_a_zero1_pipeline_checkpoint_resumes_at_zero0(tp2pp2_run, tmp_path):
    _, run = tp2pp2_run
    reference = step_losses(run)
    output = tmp_path / "resharded"
    arguments = ["reshard", "--tensor-parallel-size", "1", "--zero-stage", "0"]
    assert convert([*arguments, str(run / "checkpoints" / "2"), str(output)]) == 0
    _resume(1, output / "2" / "config.yaml", tmp_path / "logs")
    resumed = step_losses(tmp_path)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert math.isclose(resumed[step], reference[step], rel_tol=REL_TOL), (step, resumed, reference)
    # The resumed ZeRO-0 run's own checkpoint reshards again (a ZeRO-0 source), to the same masters' layout.
    again = tmp_path / "again"
    assert convert(["reshard", "--tensor-parallel-size", "2", str(output / "4"), str(again)]) == 0
    assert "zero_stage: 0" in (again / "4" / "config.yaml").read_text()


def test_a_zero0_checkpoint_without_optimizer_state_is_refused(tp2pp2_run, tmp_path, capsys):
    _, run = tp2pp2_run
    source = tmp_path / "copy"
    shutil.copytree(run / "checkpoints" / "2", source)
    config = source / "config.yaml"
    config.write_text(config.read_text().replace("zero_stage: 1", "zero_stage: 0"))
    assert convert(["reshard", "--tensor-parallel-size", "1", str(source), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt: no optimizer state" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
