"""A non-finite loss: the update is never applied; "stop" ends the run naming the last good checkpoint,
"skip" counts skipped steps and keeps the weights unchanged."""

import json
import subprocess

import pytest
import torch

from megatron_glm.checkpoint import find_checkpoint_files, read_module_state, save_thudm_checkpoint
from megatron_glm.config import ModelConfig
from megatron_glm.model import GLMModel
from megatron_glm.parallel import destroy_parallel, initialize_parallel
from tests.glm_corpora import austen_corpus
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
