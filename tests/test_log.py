"""Rank-aware logging: rank 0 prints by default; with all_ranks every rank writes its own file."""

from megatron_glm.log import get_logger, setup_logging


def test_only_rank_zero_prints_by_default(tmp_path, capsys):
    setup_logging(rank=1, log_dir=tmp_path)
    get_logger("training").info("hidden message")
    assert "hidden message" not in capsys.readouterr().err
    assert not (tmp_path / "rank-1.log").exists()
    setup_logging(rank=0, log_dir=tmp_path)
    get_logger("training").info("visible message")
    assert "visible message" in capsys.readouterr().err
    assert "visible message" in (tmp_path / "rank-0.log").read_text()


def test_all_ranks_write_their_own_file_with_a_rank_prefix(tmp_path, capsys):
    setup_logging(rank=3, log_dir=tmp_path, all_ranks=True)
    get_logger("data").warning("from rank three")
    assert "[rank 3] WARNING from rank three" in capsys.readouterr().err
    assert "[rank 3]" in (tmp_path / "rank-3.log").read_text()
    setup_logging(rank=0)
