"""Loss curves as a picture: the train loss and the evaluation loss of each objective from ``metrics.jsonl``.

``glm-pretrain``'s ``MetricsReporter`` writes one JSON object per line: ``{"kind": "train", "step", "loss",
...}`` at every log interval and ``{"kind": "eval", "step", "eval_token", "eval_sentence", ...}`` at every
evaluation. A resumed run appends to the same file; a step logged twice keeps its last value.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from data_tools.errors import DataError

Curve = dict[int, float]


def read_loss_curves(path: str | os.PathLike) -> dict[str, Curve]:
    """``{"train": {step: loss}, "eval token": {...}, "eval all": {...}, ...}`` from a metrics.jsonl."""
    path = Path(path)
    curves: dict[str, Curve] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read the metrics ({exc}); glm-pretrain writes it to logging.log_dir"
        ) from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}:{number}: not a metrics record ({exc})") from exc
        if record.get("kind") == "train":
            values = {"train": record.get("loss")}
        elif record.get("kind") == "eval":
            values = {
                f"eval {k.removeprefix('eval_')}": v for k, v in record.items() if k.startswith("eval_")
            }
        else:
            continue
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                curves.setdefault(name, {})[step] = float(value)
    return curves


def loss_curves_figure(curves: dict[str, Curve], title: str):
    """A matplotlib ``Figure``: the train loss as a line, each evaluation loss as dashed points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)  # the canvas that renders PNGs, without pyplot's global state
    axes = figure.add_subplot()
    for name, curve in sorted(curves.items(), key=lambda item: (item[0] != "train", item[0])):
        steps = sorted(curve)
        style = {"linewidth": 2.0} if name == "train" else {"marker": "o", "linestyle": "--"}
        axes.plot(steps, [curve[s] for s in steps], label=name, **style)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats per target token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def write_loss_curves_png(
    metrics_path: str | os.PathLike, output: str | os.PathLike | None = None, *, title: str | None = None
) -> Path:
    """Plot the curves of ``metrics_path`` into a PNG (default: ``loss-curves.png`` beside it); its path."""
    metrics_path = Path(metrics_path)
    curves = read_loss_curves(metrics_path)
    if "train" not in curves:
        raise DataError(f"{metrics_path}: no train loss recorded yet; nothing to plot")
    figure = loss_curves_figure(curves, title or f"GLM pretraining loss ({metrics_path.parent})")
    output = Path(output) if output is not None else metrics_path.with_name("loss-curves.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}.png")
    try:
        figure.savefig(staging, format="png")
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    return output
