"""Autotuned Triton tiles travel with checkpoints: a job resumed on another node (whose Triton cache lacks them)
runs the tiles the first job ran instead of timing them again and perhaps choosing others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import triton

import kernels
import kernels.triton_attention_backward_kernels
import kernels.triton_attention_kernels
import kernels.triton_layer_norm  # noqa: F401 - the three register their autotuned kernels
from kernels.triton_support import AUTOTUNED, restore_tile_choices, tile_choices
from megatron_glm.checkpoint import tile_file_name
from megatron_glm.training.checkpoint import CheckpointManager


class Tuner:
    """What the functions read of a ``triton.autotune`` object: its config list and its key -> config cache."""

    def __init__(self, configs):
        self.configs = configs
        self.cache = {}


def _configs():
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=w, num_stages=3)
        for m, w in ((128, 4), (64, 8))
    ]


def test_choices_round_trip_through_json():
    tuner = Tuner(_configs())
    key = (512, 512, 64, True, False, "torch.bfloat16", "torch.int32")
    # As the disk cache hands it back: an equal Config, not the list's own object.
    tuner.cache[key] = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    saved = json.loads(json.dumps(tile_choices({"forward": tuner})))
    assert saved == {"forward": [{"key": list(key), "config": 1, "tile": str(tuner.configs[1])}]}

    resumed = Tuner(_configs())
    assert restore_tile_choices({"forward": resumed}, saved) == 1
    assert resumed.cache == {key: resumed.configs[1]}


def test_choices_of_withdrawn_tiles_are_left_to_the_autotuner():
    tuner = Tuner(_configs())
    tuner.cache[(1024,)] = tuner.configs[0]
    tuner.cache[(2048, object())] = tuner.configs[0]  # a key JSON cannot hold is left out, not an error
    saved = tile_choices({"forward": tuner, "untuned": Tuner(_configs())})
    assert list(saved) == ["forward"]  # nothing tuned, nothing saved
    assert [entry["key"] for entry in json.loads(json.dumps(saved))["forward"]] == [[1024]]
    withdrawn = Tuner(_configs()[1:])  # the chosen tile is no longer offered
    gone = {}  # the kernel no longer exists
    assert restore_tile_choices({"forward": withdrawn, **gone}, saved) == 0
    assert withdrawn.cache == {}


def test_a_tile_is_restored_wherever_it_now_sits_in_the_list():
    tuner = Tuner(_configs())
    tuner.cache[(1024,)] = tuner.configs[0]
    saved = tile_choices({"forward": tuner})
    reordered = Tuner(list(reversed(_configs())) + [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})])
    assert restore_tile_choices({"forward": reordered}, saved) == 1
    assert str(reordered.cache[(1024,)]) == str(tuner.configs[0])


# The real autotuners with one tuned key each, as a training job leaves them.
TUNED_KEYS = {
    "attention_forward": (512, 512, 64, True, False, "torch.bfloat16"),
    "layer_norm_backward": (1024, True, "torch.bfloat16", "torch.bfloat16", "torch.float32"),
}


@pytest.fixture(params=sorted(TUNED_KEYS))
def tuned_kernel(request):
    name, key = request.param, TUNED_KEYS[request.param]
    tuner = AUTOTUNED[name]
    tuner.cache[key] = tuner.configs[-1]
    yield name, tuner, key
    tuner.cache.pop(key, None)


class Engine:
    """Stands in for DeepSpeed's engine: its checkpoint is the staging folder."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        (Path(save_dir) / tag).mkdir(parents=True)


def test_checkpoints_carry_the_tiles_and_resume_puts_them_back(tmp_path, tuned_kernel):
    name, tuner, key = tuned_kernel
    manager = CheckpointManager(tmp_path)
    final = manager.save(Engine(), 4, {"step": 4}, "model: {}\n")
    saved = json.loads((final / tile_file_name(0)).read_text())
    assert saved[name] == [
        {"key": list(key), "config": len(tuner.configs) - 1, "tile": str(tuner.configs[-1])}
    ]

    tuner.cache.clear()  # a new process on another node: nothing tuned, nothing cached
    CheckpointManager(tmp_path).restore_kernel_tiles("4")
    assert tuner.cache == {key: tuner.configs[-1]}
    assert kernels.tile_choices()[name] == saved[name]
