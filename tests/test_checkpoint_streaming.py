"""The tensor-by-tensor torch file writer behind every THUDM-layout file: torch.load reads what it writes
(memory-mapped or not, weights_only), each tensor is produced once and in order, and a failure midway
leaves nothing under the final name."""

import pytest
import torch

from megatron_glm.checkpoint.streaming import TensorPlan
from megatron_glm.checkpoint.thudm import read_module_state, stream_module_file, write_module_file


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "word_embeddings.weight": torch.randn(6, 4, generator=generator).bfloat16(),
        "transformer.layers.0.attention.dense.weight": torch.randn(4, 4, generator=generator),
        "transformer.layers.0.attention.dense.bias": torch.randn(4, generator=generator).half(),
        "counts": torch.arange(5),
        "scale": torch.tensor(2.5),
    }


@pytest.mark.parametrize("mmap", [True, False])
def test_streamed_file_loads_with_torch(tmp_path, mmap):
    tensors = _tensors()
    produced = []

    def produce(name: str) -> torch.Tensor:
        produced.append(name)
        return tensors[name]

    plans = [TensorPlan(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    path = tmp_path / "mp_rank_00_model_states.pt"
    stream_module_file(path, plans, produce, model_parallel_size=3)
    assert produced == list(tensors)
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    assert loaded["mp_world_size"] == 3 and list(loaded["module"]) == list(tensors)
    for name, tensor in tensors.items():
        assert loaded["module"][name].dtype == tensor.dtype and torch.equal(loaded["module"][name], tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_write_module_file_casts_nothing_and_round_trips(tmp_path):
    tensors = _tensors()
    path = tmp_path / "mp_rank_00_model_states.pt"
    write_module_file(path, {k: v.clone() for k, v in tensors.items()}, model_parallel_size=1)
    module = read_module_state(path)
    assert all(torch.equal(module[k], v) and module[k].dtype == v.dtype for k, v in tensors.items())


def test_a_failure_midway_leaves_nothing(tmp_path):
    tensors = _tensors()

    def produce(name: str) -> torch.Tensor:
        if name == "counts":
            raise OSError("source file vanished")
        return tensors[name]

    plans = [TensorPlan(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with pytest.raises(OSError, match="vanished"):
        stream_module_file(tmp_path / "mp_rank_00_model_states.pt", plans, produce, model_parallel_size=1)
    assert list(tmp_path.iterdir()) == []


def test_a_produced_shape_other_than_planned_is_refused(tmp_path):
    plans = [TensorPlan("w", (2, 3), torch.float32)]
    with pytest.raises(ValueError, match=r"produced shape \(3, 2\), planned \(2, 3\)"):
        stream_module_file(tmp_path / "f.pt", plans, lambda name: torch.zeros(3, 2), model_parallel_size=1)
    assert list(tmp_path.iterdir()) == []


def test_merged_tensors_own_their_memory_and_the_sources_stay_intact(tmp_path):
    """ThudmShards.full hands back tensors of their own and lets the kernel reclaim the mapped source pages
    (release_pages): the data read again afterwards is unchanged."""
    from megatron_glm.checkpoint.thudm import ThudmShards

    halves = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    norm = torch.randn(3)
    for rank, half in enumerate(halves):
        module = {"word_embeddings.weight": half, "transformer.final_layernorm.weight": norm}
        write_module_file(tmp_path / f"mp_rank_{rank:02d}_model_states.pt", module, model_parallel_size=2)
    shards = ThudmShards(tmp_path)
    mapped = {s["word_embeddings.weight"].untyped_storage().data_ptr() for s in shards.sources}
    mapped |= {s["transformer.final_layernorm.weight"].untyped_storage().data_ptr() for s in shards.sources}
    for _ in range(2):
        embeddings, layernorm = (
            shards.full("word_embeddings.weight"),
            shards.full("transformer.final_layernorm.weight"),
        )
        assert torch.equal(embeddings, torch.cat(halves)) and torch.equal(layernorm, norm)
        assert {embeddings.untyped_storage().data_ptr(), layernorm.untyped_storage().data_ptr()}.isdisjoint(
            mapped
        )
