"""THUDM-layout checkpoints: save/load round trips at TP = 1 and TP = 2 (2 gloo ranks), re-sharding, errors."""

import dataclasses
import logging

import pytest
import torch

from megatron_glm import parallel
from megatron_glm.checkpoint import CheckpointError, load_thudm_checkpoint, save_thudm_checkpoint
from megatron_glm.model import GLMModel
from tests.multiproc import run_ranks
from tests.tiny_glm import TINY, VOCAB, make_batch

SEED, OTHER_SEED = 7, 99


def change_mp_split(full: dict, new_mp: int) -> list[dict]:
    """THUDM's change_mp.py split rules from MP = 1, written out independently of our sharding code."""
    shards = [{} for _ in range(new_mp)]
    for key, value in full.items():
        for shift in range(new_mp):
            if value.dim() == 2 and "position" in key:
                part = value
            elif "query_key_value" in key:
                size = value.shape[0] // new_mp // 3
                blocks = [
                    value[(shift + i * new_mp) * size : (shift + i * new_mp + 1) * size] for i in range(3)
                ]
                part = torch.cat(blocks)
            elif (value.dim() == 2 and ("word" in key or "h_to_4h" in key)) or key.endswith(
                "dense_h_to_4h.bias"
            ):
                size = value.shape[0] // new_mp
                part = value[shift * size : (shift + 1) * size]
            elif value.dim() == 2:
                size = value.shape[1] // new_mp
                part = value[:, shift * size : (shift + 1) * size]
            else:
                part = value
            shards[shift][key] = part.clone()
    return shards


def _hidden(model):
    batch = make_batch()
    with torch.no_grad():
        return model.eval()(batch["tokens"], batch["position_ids"], batch["sep"])


def _checkpoints_at_tp2(rank, world_size, root):
    parallel.initialize_parallel(2, 1)
    model = GLMModel(TINY, VOCAB, seed=SEED)
    save_thudm_checkpoint(model, root / "tp2-split", merge=False)
    save_thudm_checkpoint(model, root / "tp2-merged", tag="100", merge=True)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = {}
    for source in ("tp1", "tp2-split", "change-mp-2/release"):
        fresh = GLMModel(TINY, VOCAB, seed=OTHER_SEED)
        load_thudm_checkpoint(fresh, root / source)
        loaded[source] = {
            "state_equal": all(torch.equal(v, own[k]) for k, v in fresh.state_dict().items()),
            "hidden": _hidden(fresh),
        }
    parallel.destroy_parallel()
    return loaded


@pytest.fixture(scope="module")
def single_model():
    parallel.initialize_parallel(1, 1)
    yield GLMModel(TINY, VOCAB, seed=SEED)
    parallel.destroy_parallel()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, single_model):
    root = tmp_path_factory.mktemp("checkpoints")
    save_thudm_checkpoint(single_model, root / "tp1")
    for rank, shard in enumerate(change_mp_split(single_model.state_dict(), 2)):
        (root / "change-mp-2" / "release").mkdir(parents=True, exist_ok=True)
        torch.save(
            {"module": shard, "mp_world_size": 2},
            root / "change-mp-2" / "release" / f"mp_rank_{rank:02d}_model_states.pt",
        )
    results = run_ranks(_checkpoints_at_tp2, 2, root)
    return root, results


def _module(path):
    return torch.load(path, weights_only=True)["module"]


def test_tp1_layout_and_round_trip(saved, single_model):
    root, _ = saved
    assert (root / "tp1" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (root / "tp1" / "latest").read_text() == "release"
    module = _module(root / "tp1" / "release" / "mp_rank_00_model_states.pt")
    assert list(module) == list(single_model.state_dict())
    fresh = GLMModel(TINY, VOCAB, seed=OTHER_SEED)
    load_thudm_checkpoint(fresh, root / "tp1")
    for key, value in single_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_tp2_files_follow_change_mp_and_merge_to_the_tp1_dict(saved, single_model):
    root, _ = saved
    for rank in range(2):
        ours = _module(root / "tp2-split" / "release" / f"mp_rank_{rank:02d}_model_states.pt")
        reference = _module(root / "change-mp-2" / "release" / f"mp_rank_{rank:02d}_model_states.pt")
        assert list(ours) == list(reference)
        for key in ours:
            assert torch.equal(ours[key], reference[key]), (rank, key)
    assert (root / "tp2-merged" / "latest").read_text() == "100"
    merged = _module(root / "tp2-merged" / "100" / "mp_rank_00_model_states.pt")
    for key, value in single_model.state_dict().items():
        assert torch.equal(merged[key], value), key


@pytest.mark.parametrize("source", ["tp1", "tp2-split", "change-mp-2/release"])
def test_any_source_loads_into_tp2(saved, single_model, source):
    _, results = saved
    expected = _hidden(single_model)
    for rank in range(2):
        assert results[rank][source]["state_equal"]
        torch.testing.assert_close(results[rank][source]["hidden"], expected, rtol=1e-5, atol=2e-6)


def test_tp2_files_load_into_tp1(saved, single_model):
    root, _ = saved
    fresh = GLMModel(TINY, VOCAB, seed=OTHER_SEED)
    load_thudm_checkpoint(fresh, root / "tp2-split" / "release")
    for key, value in single_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_bare_state_dict_file_loads(saved, single_model, tmp_path):
    torch.save(single_model.state_dict(), tmp_path / "pytorch_model.bin")
    fresh = GLMModel(TINY, VOCAB, seed=OTHER_SEED)
    load_thudm_checkpoint(fresh, tmp_path / "pytorch_model.bin")
    assert torch.equal(fresh.word_embeddings.weight, single_model.word_embeddings.weight)


def test_vocab_padding_differences_are_filled_with_zeros(saved, single_model, caplog):
    root, _ = saved
    # A model padded to a larger multiple (as a larger TP size would) loads the 256-row table.
    wider = dataclasses.replace(TINY, vocab_size=512, make_vocab_size_divisible_by=512)
    model = GLMModel(wider, 512, seed=OTHER_SEED)
    with caplog.at_level(logging.INFO, logger="megatron_glm"):
        load_thudm_checkpoint(model, root / "tp1")
    table = model.word_embeddings.weight
    assert torch.equal(table[:VOCAB], single_model.word_embeddings.weight)
    assert torch.equal(table[VOCAB:], torch.zeros(512 - VOCAB, TINY.hidden_size))
    assert "padding rows 256..511 with zeros" in caplog.text


def test_a_different_vocabulary_is_refused(saved):
    root, _ = saved
    model = GLMModel(dataclasses.replace(TINY, vocab_size=1024), 1024)
    with pytest.raises(CheckpointError, match="word_embeddings.weight has 256 rows, the model 1024"):
        load_thudm_checkpoint(model, root / "tp1")


def test_key_and_shape_errors_name_the_key_and_file(saved, single_model, tmp_path):
    state = dict(single_model.state_dict())
    del state["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    state["pool_layer.weight"] = torch.zeros(2)
    torch.save({"module": state}, tmp_path / "broken.pt")
    with pytest.raises(
        CheckpointError,
        match=r"broken\.pt: missing keys \['transformer\.layers\.1\.mlp\.dense_4h_to_h"
        r"\.bias'\] and unexpected keys \['pool_layer\.weight'\]",
    ):
        load_thudm_checkpoint(GLMModel(TINY, VOCAB), tmp_path / "broken.pt")
    wider = GLMModel(dataclasses.replace(TINY, max_position_embeddings=32), VOCAB)
    with pytest.raises(
        CheckpointError,
        match=r"transformer\.position_embeddings\.weight: shape \(65, 64\) in .*"
        r"mp_rank_00_model_states\.pt, the model expects \(33, 64\)",
    ):
        load_thudm_checkpoint(wider, saved[0] / "tp1")
    with pytest.raises(CheckpointError, match="no mp_rank_XX_model_states.pt files"):
        load_thudm_checkpoint(GLMModel(TINY, VOCAB), tmp_path)
