r"""Seesaw: between two validations, one task gets better while another gets worse.

For task t with validation metric M_t (sign s_t = -1 when lower is better, else +1), between
validation v-1 and v:

    delta_t     = M_t(v) - M_t(v-1)                 the raw change, logged as seesaw/<task>/delta
    improve_t   = s_t * delta_t                     > margin_t: improving, < -margin_t: degrading
    event(v)    = any task improving and another degrading
    rate(v)     = events so far / validations with a predecessor so far

``margin_t`` is the configured margin, or with ``margin: auto`` (the default) the task's validation noise: a
score in [0, 1] averaged over n_t examples, at level p = (M_t(v) + M_t(v-1)) / 2, has a variance of at most
p (1 - p) / n_t, so two validations differ by more than

    margin_t    = 1.96 * sqrt(2 p (1 - p) / n_t)

less than 5 % of the time by chance alone, if they were independent draws. The same examples scored twice
differ less than that (their scores correlate), so the bound is conservative: a move it counts is unlikely to be
chance. With a fixed margin, a task on 100 validation examples "moves" by 0.02 when two answers change, and every
validation of a run with many tasks is a seesaw event.

The per-task metric and loss themselves are the module's ``val/<task>/<metric>`` and
``val/<task>/loss``; this callback reads them back rather than logging them twice.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from cgc_lightning.callbacks._log import Stopwatch, log_figure, log_metrics, log_rows
from cgc_lightning.metrics import LOWER_IS_BETTER


@dataclass(frozen=True)
class SeesawStep:
    """What one validation changed, against the one before it."""

    step: int
    delta: dict[str, float]
    """Raw change of each task's signal since the last validation (tasks seen both times only)."""
    improving: tuple[str, ...]
    """Tasks whose sign-corrected change is above the margin."""
    degrading: tuple[str, ...]
    """Tasks whose sign-corrected change is below minus the margin."""
    margins: dict[str, float] = field(default_factory=dict)
    """The margin each task of ``delta`` was held to."""

    @property
    def event(self) -> bool:
        return bool(self.improving) and bool(self.degrading)


Z_95 = 1.959963984540054
"""The two-sided 95 % normal quantile of :func:`noise_margin`."""


def noise_margin(level: float, examples: int) -> float:
    """How far two validations of a mean score in [0, 1] over ``examples`` examples, at ``level``, move apart by
    chance at most 5 % of the time if independent (module docstring): ``1.96 * sqrt(2 p (1 - p) / n)``."""
    p = min(max(level, 0.0), 1.0)
    return Z_95 * math.sqrt(2 * p * (1 - p) / examples)


@dataclass
class SeesawTracker:
    """The bookkeeping, free of Lightning: feed it each validation's per-task values in order.

    Args:
        metric_names: ``{task: name of the value fed}``; a name in ``lower_is_better`` flips the sign.
        margin: a task counts as improving or degrading only when it moves by more than this.
        lower_is_better: metric names where a decrease is an improvement.
        examples: ``{task: validation examples}``: each task's margin is then the larger of ``margin`` and its
            noise margin (:func:`noise_margin`, for values that are mean scores in [0, 1]).
    """

    metric_names: Mapping[str, str]
    margin: float = 0.0
    lower_is_better: Collection[str] = LOWER_IS_BETTER
    examples: Mapping[str, int] | None = None
    steps: list[int] = field(default_factory=list)
    values: list[dict[str, float]] = field(default_factory=list)
    changes: list[SeesawStep] = field(default_factory=list)

    def __post_init__(self):
        if self.margin < 0:
            raise ValueError(f"the seesaw margin must be >= 0, got {self.margin}")
        if self.examples is not None and any(n < 1 for n in self.examples.values()):
            raise ValueError(f"every task needs at least one validation example for its margin, got {self.examples}")

    def sign(self, task: str) -> float:
        return -1.0 if self.metric_names.get(task) in self.lower_is_better else 1.0

    def update(self, step: int, values: Mapping[str, float]) -> SeesawStep | None:
        """Record one validation; return its change against the previous one (``None`` for the first)."""
        values = {t: float(v) for t, v in values.items() if v is not None and not math.isnan(float(v))}
        previous = self.values[-1] if self.values else None
        self.steps.append(step)
        self.values.append(values)
        if previous is None:
            return None
        delta = {t: values[t] - previous[t] for t in values if t in previous}
        margins = {t: self.task_margin(t, previous[t], values[t]) for t in delta}
        improving = tuple(t for t, d in delta.items() if self.sign(t) * d > margins[t])
        degrading = tuple(t for t, d in delta.items() if self.sign(t) * d < -margins[t])
        change = SeesawStep(step, delta, improving, degrading, margins)
        self.changes.append(change)
        return change

    def task_margin(self, task: str, before: float, after: float) -> float:
        """The margin ``task`` is held to between two validations with these values."""
        n = (self.examples or {}).get(task)
        return self.margin if n is None else max(self.margin, noise_margin((before + after) / 2, n))

    @property
    def events(self) -> int:
        return sum(c.event for c in self.changes)

    @property
    def rate(self) -> float:
        """Share of validations (after the first) that were seesaw events; ``nan`` before the second."""
        return self.events / len(self.changes) if self.changes else math.nan

    def series(self, task: str) -> list[float]:
        """The task's value at each validation, ``nan`` where it was missing."""
        return [v.get(task, math.nan) for v in self.values]

    def state_dict(self) -> dict:
        """Plain lists and dicts (checkpoints load with ``weights_only=True``)."""
        changes = [[c.step, c.delta, list(c.improving), list(c.degrading), c.margins] for c in self.changes]
        return {"steps": list(self.steps), "values": [dict(v) for v in self.values], "changes": changes}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.values = list(state["steps"]), [dict(v) for v in state["values"]]
        # checkpoints written before per-task margins have four fields a change
        self.changes = [
            SeesawStep(s, dict(d), tuple(i), tuple(g), dict(m[0]) if m else {}) for s, d, i, g, *m in state["changes"]
        ]


FALLBACK_MARGIN = 0.01
"""``margin: auto`` without validation example counts (loaders given to ``fit`` directly): one example in 100."""


def validation_examples(trainer: Trainer, tasks: tuple[str, ...]) -> dict[str, int] | None:
    """``{task: validation examples}`` from the data module's ``example_counts`` (tasks without any have no
    validation metric to hold to a margin); None, with a warning, where there are no counts to be had."""
    counts = getattr(trainer.datamodule, "example_counts", None)
    if callable(counts):
        found = counts()
        return {t: found[t]["val"] for t in tasks if found.get(t, {}).get("val")}
    rank_zero_warn(
        "seesaw.margin: auto needs each task's validation example count, from a data module's example_counts(); "
        f"fit has none, so the margin is {FALLBACK_MARGIN}. Give --seesaw.margin a number to choose it."
    )
    return None


class SeesawMonitor(Callback):
    """Per-task change at every validation during ``fit``, seesaw events, their rate, and the curves.

    Logs at each validation (step = ``global_step``): ``seesaw/improving`` and ``seesaw/degrading`` (task
    counts), ``seesaw/event`` (0 or 1), ``seesaw/events`` and ``seesaw/rate``; each task's change since the last
    validation (``delta`` of its metric, ``delta_loss``) as rows of the table ``diagnostics/seesaw_deltas.json``
    (or as metrics ``seesaw/<task>/delta`` and ``seesaw/<task>/delta_loss`` with ``per_task_metrics``); and the
    artifact ``diagnostics/task_metrics.png``.

    Args:
        enabled: turn the callback off.
        signal: decide improving/degrading on each task's ``metric`` (its ``val/<task>/<metric>``) or its ``loss``.
        margin: a task counts as improving or degrading only when it moves by more than this (in the signal's
            units: metrics are in [0, 1]); ``auto`` (the default, for ``signal: metric``): by more than its
            validation noise (module docstring), from the data module's validation examples per task.
        plot: log ``diagnostics/task_metrics.png``, refreshed at each validation.
        per_task_metrics: log the per-task changes as metrics too, not only as the table (with many tasks
            they bury the validation and test metrics in the MLflow UI).
    """

    def __init__(
        self,
        enabled: bool = True,
        signal: Literal["metric", "loss"] = "metric",
        margin: float | Literal["auto"] = "auto",
        plot: bool = True,
        per_task_metrics: bool = False,
    ):
        if signal not in ("metric", "loss"):
            raise ValueError(f"seesaw.signal must be 'metric' or 'loss', got {signal!r}")
        if margin == "auto" and signal == "loss":
            raise ValueError(
                "seesaw.margin: auto is the noise of a mean score in [0, 1] (signal: metric); with signal: loss give "
                "the margin in loss units, e.g. --seesaw.margin 0.05"
            )
        if margin != "auto" and not (isinstance(margin, int | float) and margin >= 0):
            raise ValueError(f"seesaw.margin must be 'auto' or a number >= 0, got {margin!r}")
        self.enabled, self.signal, self.margin, self.plot = enabled, signal, margin, plot
        self.per_task_metrics = per_task_metrics
        # both are tracked (each one's deltas are logged, both are plotted); `signal` picks the one that decides
        self.metric_history: SeesawTracker | None = None
        self.loss_history: SeesawTracker | None = None
        self.stopwatch = Stopwatch()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        tasks = tuple(pl_module.layout.tasks)
        metrics = dict(zip(tasks, getattr(pl_module, "task_metrics", ["accuracy"] * len(tasks)), strict=True))
        if self.margin == "auto":
            examples = validation_examples(trainer, tasks)
            self.metric_history = SeesawTracker(metrics, 0.0 if examples else FALLBACK_MARGIN, examples=examples)
            self.loss_history = SeesawTracker(dict.fromkeys(tasks, "loss"), 0.0)  # its deltas are only logged
        else:
            self.metric_history = SeesawTracker(metrics, float(self.margin))
            self.loss_history = SeesawTracker(dict.fromkeys(tasks, "loss"), float(self.margin))

    # the histories travel in checkpoints, so a resumed run's deltas and rate continue where they were
    # (Lightning restores callback states after `setup`)
    def state_dict(self) -> dict:
        if self.metric_history is None:
            return {}
        return {"metric": self.metric_history.state_dict(), "loss": self.loss_history.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict and self.metric_history is not None:
            self.metric_history.load_state_dict(state_dict["metric"])
            self.loss_history.load_state_dict(state_dict["loss"])

    @property
    def tracker(self) -> SeesawTracker | None:
        """The history that decides events (``signal``)."""
        return self.metric_history if self.signal == "metric" else self.loss_history

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        with self.stopwatch():
            self._record(trainer)

    def _record(self, trainer: Trainer) -> None:
        cm = trainer.callback_metrics
        names = self.metric_history.metric_names

        def read(key: str) -> float | None:
            v = cm.get(key)
            return None if v is None else float(v)

        step = trainer.global_step
        m_change = self.metric_history.update(step, {t: read(f"val/{t}/{m}") for t, m in names.items()})
        l_change = self.loss_history.update(step, {t: read(f"val/{t}/loss") for t in names})
        change = m_change if self.signal == "metric" else l_change
        if change is not None:
            out = {}
            if self.per_task_metrics:
                out = {f"seesaw/{t}/delta": d for t, d in m_change.delta.items()}
                out |= {f"seesaw/{t}/delta_loss": d for t, d in l_change.delta.items()}
            rows = [
                {
                    "step": step,
                    "task": t,
                    "delta": m_change.delta.get(t),
                    "delta_loss": l_change.delta.get(t),
                    "margin": change.margins.get(t),
                }
                for t in names
                if t in m_change.delta or t in l_change.delta
            ]
            log_rows(trainer, rows, "diagnostics/seesaw_deltas.json")
            out |= {
                "seesaw/improving": float(len(change.improving)),
                "seesaw/degrading": float(len(change.degrading)),
                "seesaw/event": float(change.event),
                "seesaw/events": float(self.tracker.events),
                "seesaw/rate": self.tracker.rate,
            }
            log_metrics(trainer, out, step)
        if self.plot and trainer.is_global_zero and trainer.loggers:
            self._plot(trainer)

    def _plot(self, trainer: Trainer) -> None:
        from cgc_lightning.callbacks.plots import task_curves

        names = dict(self.metric_history.metric_names)
        steps = list(self.metric_history.steps)
        metrics = {t: self.metric_history.series(t) for t in names}
        losses = {t: self.loss_history.series(t) for t in names}
        events = [c.step for c in self.tracker.changes if c.event]
        log_figure(trainer, lambda: task_curves(steps, metrics, losses, names, events), "diagnostics/task_metrics.png")
