"""One rule for every command: a user error prints ``prog: error: message`` without a traceback and exits
2 for an invalid config or command line, 1 for a command that ran and failed; a bug keeps its traceback."""

import pytest

from data_tools.errors import DataError
from kernels.errors import KernelError
from megatron_glm.errors import USER_ERRORS, CheckpointError, ConfigError, TrainingError, run_cli


def _raise(exc):
    def body():
        raise exc

    return body


@pytest.mark.parametrize(
    "exc,code",
    [
        (ConfigError("model.hidden_size: 770 is not divisible"), 2),
        (DataError("corpus.jsonl:3: invalid JSON"), 1),
        (CheckpointError("ckpt/mp_rank_00_model_states.pt: truncated"), 1),
        (KernelError("attention: head dimension 256 > 128"), 1),
        (TrainingError("non-finite loss at step 3"), 1),
    ],
)
def test_user_errors_print_one_line_and_exit_by_the_rule(monkeypatch, capsys, exc, code):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_cli("glm-x", _raise(exc)) == code
    assert capsys.readouterr().err == f"glm-x: error: {exc}\n"


def test_inside_a_job_the_message_names_the_rank(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "3")
    assert run_cli("glm-pretrain", _raise(DataError("no corpora"))) == 1
    assert capsys.readouterr().err == "glm-pretrain: error (rank 3 of 8): no corpora\n"


def test_a_bug_is_not_a_user_error():
    assert not isinstance(ValueError(), USER_ERRORS)
    with pytest.raises(ValueError):
        run_cli("glm-x", _raise(ValueError("bug")))


def test_success_exits_0():
    assert run_cli("glm-x", lambda: None) == 0
