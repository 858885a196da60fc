"""The loss-curve PNG: train and per-objective eval losses read from glm-pretrain's metrics.jsonl."""

import json

import pytest

from data_tools.errors import DataError
from megatron_glm.cli.plot_losses import main as plot_losses_main
from megatron_glm.evaluation.loss_curves import loss_curves_figure, read_loss_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, resumed: bool = False) -> None:
    records = [{"kind": "train", "step": s, "loss": 8.0 - s / 10, "lr": 1e-3} for s in (10, 20, 30, 40)]
    records += [
        {"kind": "eval", "step": s, "eval_token": 6.0 - s / 100, "eval_document": 7.0, "eval_all": 6.5}
        for s in (20, 40)
    ]
    if resumed:  # a resumed run appends and logs step 40 again; the last value wins
        records.append({"kind": "train", "step": 40, "loss": 1.5, "lr": 1e-3})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_curves_are_read_per_objective_and_a_repeated_step_keeps_its_last_value(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, resumed=True)
    curves = read_loss_curves(metrics)
    assert set(curves) == {"train", "eval token", "eval document", "eval all"}
    assert curves["train"] == {10: 7.0, 20: 6.0, 30: 5.0, 40: 1.5}
    assert curves["eval token"] == {20: 5.8, 40: 5.6}

    figure = loss_curves_figure(curves, "run")
    lines = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in figure.axes[0].lines
    }
    assert lines["train"] == ([10, 20, 30, 40], [7.0, 6.0, 5.0, 1.5])
    assert lines["eval document"] == ([20, 40], [7.0, 7.0])


def test_png_is_written_beside_the_metrics(tmp_path, capsys):
    metrics = tmp_path / "logs" / "metrics.jsonl"
    metrics.parent.mkdir()
    write_metrics(metrics)
    assert plot_losses_main([str(metrics)]) == 0
    png = tmp_path / "logs" / "loss-curves.png"
    assert f"loss curves: {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (800, 500)
    # Written under a temporary name and renamed: nothing else is left beside the metrics.
    assert sorted(p.name for p in png.parent.iterdir()) == ["loss-curves.png", "metrics.jsonl"]


def test_unusable_metrics_are_reported_with_file_and_line(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a metrics record"):
        read_loss_curves(metrics)
    metrics.write_text('{"kind": "eval", "step": 1, "eval_token": 2.0}\n')
    assert plot_losses_main([str(metrics)]) == 1
    assert "no train loss recorded yet" in capsys.readouterr().err
    assert not (tmp_path / "loss-curves.png").exists()
