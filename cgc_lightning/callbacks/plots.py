"""The diagnostics' figures: per-task metric curves, gradient-cosine heatmap, gate-use heatmap, Δm bars.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``:
no global backend is switched and no figure is left registered, so this works in a headless
training job and inside a notebook alike. Margins are set by hand (see :func:`_figure`).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float, *, left: float, right: float, bottom: float, top: float) -> Figure:
    """A figure with fixed margins in inches. Matplotlib's automatic layouts (constrained, tight) draw
    the figure once more to measure it, which doubles the cost of a figure that is redrawn at every
    validation of a training run."""
    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    return fig


def _label_inches(labels: Sequence[str], fontsize: float = 8) -> float:
    """Roughly how far the longest of ``labels`` reaches, in inches."""
    return 0.55 * fontsize / 72 * max((len(str(s)) for s in labels), default=0)


def task_curves(
    steps: Sequence[int],
    metrics: dict[str, list[float]],
    losses: dict[str, list[float]],
    metric_names: dict[str, str],
    events: Sequence[int] = (),
) -> Figure:
    """Each task's validation metric (left) and loss (right) against the step; seesaw events shaded.

    Args:
        steps: the step of each validation.
        metrics: ``{task: [value at each validation]}`` (``nan`` where missing).
        losses: the same for the validation loss.
        metric_names: ``{task: metric name}`` for the legend.
        events: steps at which a seesaw event was recorded.
    """
    fig = _figure(11, 4, left=0.6, right=0.2, bottom=0.5, top=0.35)
    ax_m, ax_l = fig.subplots(1, 2, gridspec_kw={"wspace": 0.18})
    for task, values in metrics.items():
        ax_m.plot(steps, values, marker="o", label=f"{task} ({metric_names.get(task, '?')})")
    for task, values in losses.items():
        ax_l.plot(steps, values, marker="o", label=task)
    for ax in (ax_m, ax_l):
        for step in events:
            ax.axvline(step, color="tab:red", alpha=0.25, linewidth=6)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_m.set_title("validation metric per task" + (" (red: seesaw events)" if events else ""))
    ax_l.set_title("validation loss per task")
    ax_m.legend(fontsize=8)
    ax_l.legend(fontsize=8)
    return fig


def heatmap(
    values: Sequence[Sequence[float]],
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    *,
    vmin: float,
    vmax: float,
    cmap: str,
    colorbar: str,
) -> Figure:
    """A labelled heatmap with each cell's value written in it; ``nan`` cells are left blank."""
    left, bottom = 0.3 + _label_inches(rows), 0.3 + 0.71 * _label_inches(cols)  # columns labelled at 45 degrees
    width, height = left + 1.8 + 0.6 * len(cols), bottom + 0.6 + 0.45 * len(rows)
    fig = _figure(max(width, 4.5), height, left=left, right=0.9, bottom=bottom, top=0.6)
    ax = fig.subplots()
    im = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                r, g, b, _ = im.cmap(im.norm(v))
                color = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=colorbar)
    return fig


def grouped_bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    title: str,
    ylabel: str,
    hatched: Sequence[str] = (),
    intervals: dict[str, Sequence[tuple[float, float] | None]] | None = None,
) -> Figure:
    """Bars of each series (a method) side by side for each group (a task); groups in ``hatched`` are hatched;
    ``intervals`` (``{series: [(low, high) or None per group]}``) draws those as error bars."""
    bottom = 0.3 + 0.4 * _label_inches(groups)  # labels at 20 degrees
    width_in = max(5.0, 1.5 + 0.45 * len(groups) * max(len(series), 1))
    title = textwrap.fill(title, width=int((width_in - 1.0) * 12))  # ~12 characters an inch at 10 pt over the axes
    top = 0.35 + 0.18 * (title.count("\n") + 1)
    fig = _figure(width_in, 3.5 + bottom + top - 0.5, left=0.8, right=0.2, bottom=bottom, top=top)
    ax = fig.subplots()
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        for bar, group in zip(bars, groups, strict=True):
            if group in hatched:
                bar.set_hatch("//")
        for x, value, ci in zip(xs, values, (intervals or {}).get(name) or [None] * len(xs), strict=True):
            if ci is not None:
                ax.errorbar(x, value, yerr=[[value - ci[0]], [ci[1] - value]], color="black", capsize=3, linewidth=1)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), labels=groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
