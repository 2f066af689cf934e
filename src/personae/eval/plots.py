"""Figures for the HTML report, drawn with matplotlib's Agg backend and returned as base64 PNG data URIs."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_POINTS = 2000  # a curve is thinned to this many points: the report stays small for long runs


@dataclass
class Curve:
    """One line of an adaptation (or any) plot: a label, the metric it measures, and its points."""

    label: str
    metric: str
    steps: list[float]
    values: list[float | None]


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported late so `import personae` stays light."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_to_data_uri(figure: Any) -> str:
    """Render a matplotlib figure to a `data:image/png;base64,...` URI and close it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thin(xs: Sequence[float], ys: Sequence[float | None]) -> tuple[list[float], list[float]]:
    stride = max(1, math.ceil(len(xs) / MAX_POINTS))
    pairs = [(x, y) for x, y in zip(xs[::stride], ys[::stride]) if is_number(y)]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]  # type: ignore[arg-type]


def is_number(value: Any) -> bool:
    """True for a finite int or float (not a bool, not None, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    steps = [float(row.get("step", i)) for i, row in enumerate(rows)]
    out = {}
    for key in keys:
        xs, ys = _thin(steps, [row.get(key) for row in rows])
        if xs:
            out[key] = (xs, ys)
    return out


def metric_keys(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """The numeric keys of a metrics log split into losses and accuracies, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if is_number(value):
                seen.setdefault(key, None)
    losses = [k for k in seen if "loss" in k]
    accuracies = [k for k in seen if k.endswith(("_acc", "accuracy"))]
    return losses, accuracies


def training_curves(stage: str, rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Losses (left) and accuracies (right) against step for one stage's metrics.jsonl; None if empty."""
    losses, accuracies = metric_keys(rows)
    panels = [(title, _series(rows, keys)) for title, keys in (("loss", losses), ("accuracy", accuracies))]
    panels = [(title, series) for title, series in panels if series]
    if not panels:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    for axis, (title, series) in zip(axes[0], panels):
        for key, (xs, ys) in series.items():
            axis.plot(xs, ys, label=key, linewidth=1.4, marker="." if len(xs) < 30 else None)
        axis.set_title(f"{stage}: {title}")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure_to_data_uri(figure)


def retrieval_bars(result: Mapping[str, Any]) -> str | None:
    """Recall@K image->text and text->image next to chance, as grouped bars; None without R@K keys."""
    ks = [k for k in (1, 5, 10) if is_number(result.get(f"i2t_r@{k}"))]
    if not ks:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.2, 3.2))
    width = 0.27
    for offset, (prefix, label) in enumerate((("i2t", "image -> text"), ("t2i", "text -> image"),
                                              ("chance", "chance"))):
        values = [float(result.get(f"{prefix}_r@{k}") or 0.0) for k in ks]
        axis.bar([i + (offset - 1) * width for i in range(len(ks))], values, width, label=label,
                 color=("#3b7dd8", "#e08a2c", "#9a9a9a")[offset])
    axis.set_xticks(range(len(ks)), [f"R@{k}" for k in ks])
    return _finish_bars(figure, axis, "retrieval on the test split")


def _finish_bars(figure: Any, axis: Any, title: str) -> str:
    """Scores in [0, 1]: fixed y range, title, horizontal grid, legend; the figure as a data URI."""
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure_to_data_uri(figure)


def split_bars(metrics: Sequence[str], splits: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One bar per metric and character split (seen vs held-out); None when nothing is scored."""
    names = [m for m in metrics if any(is_number(block.get(m)) for block in splits.values())]
    if not names:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5.2, 1.1 * len(names)), 3.4))
    width = 0.8 / max(1, len(splits))
    for offset, (label, block) in enumerate(splits.items()):
        values = [float(block[m]) if is_number(block.get(m)) else 0.0 for m in names]
        axis.bar([i + (offset - (len(splits) - 1) / 2) * width for i in range(len(names))], values, width,
                 label=label)
    axis.set_xticks(range(len(names)), [m.replace("_", "\n") for m in names], fontsize=8)
    return _finish_bars(figure, axis, "role-play metrics, overall")


def curve_panels(curves: Sequence[Curve]) -> str | None:
    """One panel per metric, one line per curve label, values against adaptation steps."""
    metrics = list(dict.fromkeys(c.metric for c in curves))
    if not metrics:
        return None
    plt = _pyplot()
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 3.4 * rows), squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        for curve in (c for c in curves if c.metric == metric):
            xs, ys = _thin(curve.steps, curve.values)
            axis.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, label=curve.label or metric)
        axis.set_title(metric.replace("_", " "))
        axis.set_xlabel("adaptation steps")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    figure.tight_layout()
    return figure_to_data_uri(figure)


__all__ = ["Curve", "curve_panels", "figure_to_data_uri", "is_number", "metric_keys", "retrieval_bars",
           "split_bars", "training_curves"]
