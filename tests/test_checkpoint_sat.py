"""glm-convert export --to sat: SwissArmyTransformer's GLMModel layout (model_config.json, latest,
release/mp_rank_XX_model_states.pt with SAT's keys, THUDM's model-parallel split), and back with
import --from sat, equal to the source."""

import json

import pytest
import torch

from megatron_glm.checkpoint import ThudmShards, expected_keys
from megatron_glm.cli.convert import main as convert

pytestmark = pytest.mark.slow

# SAT's BaseModel: the transformer under "transformer.", GLM's block positions in a mixin.
SAT_RENAMED = {
    "word_embeddings.weight": "transformer.word_embeddings.weight",
    "transformer.block_position_embeddings.weight": "mixins.block_position_embedding.block_position_embeddings.weight",
}


def test_sat_export_layout_keys_shapes_and_round_trip(tp2pp2_run, tmp_path):
    _, run = tp2pp2_run
    checkpoints = run / "checkpoints"
    sat = tmp_path / "sat"
    assert convert(["export", "--to", "sat", "--model-parallel-size", "2", str(checkpoints), str(sat)]) == 0
    assert (sat / "latest").read_text() == "release"
    config = json.loads((sat / "model_config.json").read_text())
    assert config == {
        "model_class": "GLMModel",
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "vocab_size": 30720,
        "layernorm_order": "pre",
        "model_parallel_size": 2,
        "max_sequence_length": 65,  # position-table rows: THUDM's maximum 64 + 1, as SAT's 513 for 512
        "block_lm": True,
    }
    files = sorted(p.name for p in (sat / "release").iterdir())
    assert files == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    shards = [
        torch.load(sat / "release" / name, map_location="cpu", weights_only=True)["module"] for name in files
    ]
    expected = [SAT_RENAMED.get(k, k) for k in expected_keys(2)]
    assert list(shards[0]) == expected and list(shards[1]) == expected
    shapes = {k: tuple(v.shape) for k, v in shards[1].items()}
    assert shapes["transformer.word_embeddings.weight"] == (15360, 64)
    assert shapes["transformer.position_embeddings.weight"] == (65, 64)
    assert shapes["mixins.block_position_embedding.block_position_embeddings.weight"] == (65, 64)
    assert shapes["transformer.layers.1.attention.query_key_value.weight"] == (96, 64)
    assert shapes["transformer.layers.1.attention.dense.weight"] == (64, 32)
    assert shapes["transformer.layers.1.mlp.dense_4h_to_h.weight"] == (64, 128)
    assert shapes["transformer.final_layernorm.weight"] == (64,)

    back = tmp_path / "back"
    assert convert(["import", "--from", "sat", str(sat), str(back)]) == 0
    original, imported = ThudmShards(checkpoints), ThudmShards(back)
    keys = original.keys()
    assert imported.model_parallel_size == 1 and imported.keys() == keys
    for key in keys:
        assert torch.equal(imported.full(key), original.full(key)), key
