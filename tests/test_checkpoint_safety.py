"""Untrusted checkpoint files: only tensors, containers and the allowlisted types are unpickled; a pickle
that would run code is refused (and the code does not run) unless the caller trusts the file."""

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_glm.checkpoint import CheckpointError, load_torch_file, read_module_state
from megatron_glm.cli.convert import main as convert


class RunsCode:
    """Unpickling this calls ``exec``, which creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture()
def malicious(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "release" / "mp_rank_00_model_states.pt"
    path.parent.mkdir()
    torch.save({"module": {"word_embeddings.weight": torch.zeros(2, 2)}, "payload": RunsCode(marker)}, path)
    return path, marker


def test_a_pickle_that_runs_code_is_refused_and_the_code_does_not_run(malicious):
    path, marker = malicious
    with pytest.raises(CheckpointError, match=r"builtins\.exec.*--trust-checkpoint"):
        load_torch_file(path)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: holds types outside"):
        read_module_state(path)
    assert not marker.exists()


def test_the_converter_refuses_it_and_writes_nothing(malicious, tmp_path, capsys):
    path, marker = malicious
    assert (
        convert(["export", "--to", "safetensors", str(path.parent), str(tmp_path / "out.safetensors")]) == 1
    )
    assert "builtins.exec" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_trusting_the_file_unpickles_it(malicious):
    path, marker = malicious
    load_torch_file(path, trust=True)
    assert marker.exists()


def test_deepspeed_and_thudm_metadata_types_are_allowed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    content = {
        "module": {"w": torch.ones(3)},
        "np_rng_state": np.random.RandomState(3).get_state(),
        "random_rng_state": (3, (1, 2, 3), None),
        "optimizer_state_dict": {
            "loss_scaler": LossScaler(1.0),
            "dynamic": DynamicLossScaler(2.0**16, 1000, 1, False, False),
            "zero_stage": ZeroStageEnum.optimizer_states,
        },
    }
    torch.save(content, tmp_path / "f.pt")
    loaded = load_torch_file(tmp_path / "f.pt")
    assert loaded["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.optimizer_states
    assert loaded["optimizer_state_dict"]["dynamic"].cur_scale == 2.0**16
    np.testing.assert_array_equal(loaded["np_rng_state"][1], content["np_rng_state"][1])


def test_truncated_and_foreign_files_are_named(tmp_path):
    torch.save({"module": {"w": torch.ones(1000)}}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot read as a torch checkpoint.*truncated"):
        load_torch_file(tmp_path / "cut.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: expected a state dict of tensors"):
        read_module_state(tmp_path / "list.pt")
