"""The comparison report of ``compare``: per-task values, relative change, Δm with its interval, negative transfer.

Built from MLflow runs (:func:`report_from_runs`), printed (:func:`format_table`), written (``comparison.csv``,
``comparison.md``, ``delta_m.png``: :func:`write_files`) and logged on the parent run (:func:`log_report`). The
formulas are in :mod:`cgc_lightning.compare`'s docstring.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cgc_lightning.metrics import LOWER_IS_BETTER

#: Tags of a comparison's runs: the parent's id on each child, the method's name, the run's role.
PARENT_TAG, METHOD_TAG, ROLE_TAG = "compare.parent", "compare.method", "compare.role"

# ------------------------------------------------------------------------------------------------ report


@dataclass
class Report:
    """Per-task values of each method, their change against the reference, and the summary."""

    tasks: list[str]
    metric_names: dict[str, str]
    methods: list[str]
    reference: str
    values: dict[str, dict[str, float]]
    """``{method: {task: value}}``."""
    relative: dict[str, dict[str, float]]
    """``{method: {task: rel}}`` as a fraction (sign-corrected: > 0 is better than the reference)."""
    reference_zero: list[str]
    """Tasks where the reference scored 0: their ``rel`` is the (sign-corrected) absolute difference."""
    delta_m: dict[str, float]
    """``{method: Δm}`` as a fraction."""
    negative_transfer: dict[str, int]
    run_ids: dict[str, str] = field(default_factory=dict)
    significance: dict = field(default_factory=dict)
    """``{method: significance.MethodSignificance}``: Δm's interval and each task's verdict, from the runs'
    per-example results (empty without them; ``significance_note`` says why)."""
    significance_note: str | None = None

    @property
    def others(self) -> list[str]:
        return [m for m in self.methods if m != self.reference]


def build_report(
    values: dict[str, dict[str, float]],
    metric_names: dict[str, str],
    reference: str,
    lower_is_better=LOWER_IS_BETTER,
    run_ids: dict[str, str] | None = None,
) -> Report:
    """Relative changes, Δm and negative-transfer counts from ``{method: {task: value}}`` (see the module docstring)."""
    if reference not in values:
        raise ValueError(f"no run of the reference method {reference!r}; methods found: {sorted(values)}")
    tasks = list(metric_names)
    for m, vals in values.items():
        missing = [t for t in tasks if t not in vals or vals[t] is None or math.isnan(vals[t])]
        if missing:
            where = f" (run {run_ids[m]})" if run_ids and m in run_ids else ""
            raise ValueError(f"method {m!r}{where} has no value for task(s) {missing}")
    ref = values[reference]
    zero = [t for t in tasks if ref[t] == 0]
    relative = {}
    for m, vals in values.items():
        relative[m] = {}
        for t in tasks:
            sign = -1.0 if metric_names[t] in lower_is_better else 1.0
            diff = sign * (vals[t] - ref[t])
            relative[m][t] = diff if ref[t] == 0 else diff / abs(ref[t])
    delta_m = {m: sum(r.values()) / len(tasks) for m, r in relative.items()}
    negative = {m: sum(v < 0 for v in r.values()) for m, r in relative.items()}
    return Report(
        tasks=tasks,
        metric_names=dict(metric_names),
        methods=list(values),
        reference=reference,
        values=values,
        relative=relative,
        reference_zero=zero,
        delta_m=delta_m,
        negative_transfer=negative,
        run_ids=dict(run_ids or {}),
    )


def _rel(report: Report, m: str, t: str) -> str:
    v = report.relative[m][t]
    return f"{v:+.4f}†" if t in report.reference_zero else f"{100 * v:+.2f}%"


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the printed and markdown tables."""
    header = ["task", "metric", *report.methods, *[f"Δ {m}" for m in report.others]]
    rows = [
        [
            t,
            report.metric_names[t],
            *[f"{report.values[m][t]:.4f}" for m in report.methods],
            *[_rel(report, m, t) for m in report.others],
        ]
        for t in report.tasks
    ]
    blank = [""] * (1 + len(report.methods))
    rows.append(["Δm (mean Δ)", *blank, *[f"{100 * report.delta_m[m]:+.2f}%" for m in report.others]])
    n = len(report.tasks)
    rows.append(["negative transfer", *blank, *[f"{report.negative_transfer[m]} of {n}" for m in report.others]])
    sig = report.significance
    if sig and all(m in sig for m in report.others):
        ci = lambda d: f"[{d.ci_low:+.2f}, {d.ci_high:+.2f}]%"  # noqa: E731
        rows.append(["Δm 95% CI", *blank, *[ci(sig[m].delta_m) for m in report.others]])
        rows.append(["significant losses", *blank, *[f"{sig[m].significant_losses} of {n}" for m in report.others]])
    return header, rows


def _notes(report: Report, stage: str) -> list[str]:
    notes = [f"{stage} metrics; Δ: change relative to {report.reference} (sign-corrected: + is better)"]
    if report.significance:
        notes.append(
            "CI: paired bootstrap over the test examples (transfer.csv has each task's interval); a significant "
            "loss is a task whose whole interval is below the reference"
        )
    elif report.significance_note:
        notes.append(f"no confidence intervals: {report.significance_note}")
    if report.reference_zero:
        notes.append(
            f"† {report.reference} scored 0 on {', '.join(report.reference_zero)}: Δ there is the absolute "
            "difference, and Δm counts it as that fraction"
        )
    return notes


def format_table(report: Report, stage: str = "test") -> str:
    header, rows = table_rows(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
    )
    summary = len(rows) - len(report.tasks)  # Δm, negative transfer (and the interval rows)
    out = [line(header), "  ".join("-" * w for w in widths), *[line(r) for r in rows[:-summary]]]
    out += ["  ".join("-" * w for w in widths), *[line(r) for r in rows[-summary:]]]
    return "\n".join([*out, *_notes(report, stage)])


def format_markdown(report: Report, stage: str = "test") -> str:
    header, rows = table_rows(report)
    md = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    runs = [f"- {m}: run `{report.run_ids[m]}`" for m in report.methods if m in report.run_ids]
    return "\n".join([*md, "", *_notes(report, stage), "", *runs]) + "\n"


def format_csv(report: Report) -> str:
    """Wide CSV: one row per task (values, and relative changes in percent), then Δm and negative transfer."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "metric", "reference_zero", *report.methods, *[f"rel_pct_{m}" for m in report.others]])
    for t in report.tasks:
        w.writerow(
            [
                t,
                report.metric_names[t],
                int(t in report.reference_zero),
                *[repr(report.values[m][t]) for m in report.methods],
                *[repr(100 * report.relative[m][t]) for m in report.others],
            ]
        )
    blank = [""] * len(report.methods)
    w.writerow(["delta_m", "", "", *blank, *[repr(100 * report.delta_m[m]) for m in report.others]])
    w.writerow(["negative_transfer", "", "", *blank, *[report.negative_transfer[m] for m in report.others]])
    return buf.getvalue()


def delta_m_figure(report: Report):
    from cgc_lightning.callbacks.plots import grouped_bars

    groups = [*report.tasks, "Δm"]
    series = {m: [100 * report.relative[m][t] for t in report.tasks] + [100 * report.delta_m[m]] for m in report.others}
    sig = report.significance
    intervals = {
        m: [None] * len(report.tasks) + [(sig[m].delta_m.ci_low, sig[m].delta_m.ci_high)]
        for m in report.others
        if m in sig
    }
    return grouped_bars(
        groups,
        series,
        f"change against {report.reference} per task, and Δm"
        + (" with its 95% interval" if intervals else "")
        + "\n(hatched: the reference scored 0; absolute x 100)",
        "Δ (%)",
        hatched=report.reference_zero,
        intervals=intervals,
    )


# ---------------------------------------------------------------------------------------------- runs


def read_runs(runs, stage: str = "test", metric: str = "primary") -> tuple[dict, dict, dict]:
    """``values {method: {task: value}}``, ``metric_names {task: name}`` and ``run_ids`` from MLflow runs.

    A run's method is its ``compare.method`` tag, else its ``method`` tag; with several runs of one
    method, the latest is used (``runs`` as MLflow returns them: newest first).
    """
    values, metric_names, run_ids = {}, {}, {}
    for run in runs:
        tags = run.data.tags
        method = tags.get(METHOD_TAG) or tags.get("method") or run.data.params.get("method")
        if method is None or method in values:
            if method in values:
                print(f"compare: ignoring older run {run.info.run_id} of {method} (using {run_ids[method]})")
            continue
        metrics = run.data.metrics
        tasks = [t for t in tags.get("tasks", "").split(",") if t] or sorted(
            {k.split("/")[1] for k in metrics if k.startswith(f"{stage}/") and k.count("/") == 2} - {"avg"}
        )
        vals = {}
        for t in tasks:
            names = [k.split("/")[2] for k in metrics if k.startswith(f"{stage}/{t}/")]
            name = "loss" if metric == "loss" else next((n for n in names if n != "loss"), None)
            if name is None or f"{stage}/{t}/{name}" not in metrics:
                raise ValueError(f"run {run.info.run_id} ({method}) logged no {stage}/{t}/<metric>; did `test` run?")
            if metric_names.setdefault(t, name) != name:
                raise ValueError(f"task {t!r} is scored with {metric_names[t]!r} in one run and {name!r} in another")
            vals[t] = metrics[f"{stage}/{t}/{name}"]
        if set(vals) != set(metric_names) and values:
            raise ValueError(
                f"run {run.info.run_id} ({method}) has tasks {sorted(vals)}, others {sorted(metric_names)}"
            )
        values[method], run_ids[method] = vals, run.info.run_id
    return values, metric_names, run_ids


def write_files(report: Report, stage: str, out_dir: Path) -> Path:
    """``comparison.csv``, ``comparison.md`` and ``delta_m.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.csv").write_text(format_csv(report))
    (out_dir / "comparison.md").write_text(format_markdown(report, stage))
    delta_m_figure(report).savefig(out_dir / "delta_m.png")
    return out_dir


def log_report(client, run_id: str, report: Report, stage: str, out_dir: Path | None = None) -> None:
    """Write the report's files and metrics onto the MLflow run ``run_id`` (and keep the files in ``out_dir``)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(report, stage, out_dir or Path(tmp))
        for name in ("comparison.csv", "comparison.md", "delta_m.png"):
            client.log_artifact(run_id, str(files / name))
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for m in report.methods:
        metrics += [Metric(f"value/{m}/{t}", report.values[m][t], now, 0) for t in report.tasks]
    for m in report.methods:
        metrics.append(Metric(f"avg/{m}", sum(report.values[m].values()) / len(report.tasks), now, 0))
    for m in report.others:
        metrics.append(Metric(f"delta_m/{m}", 100 * report.delta_m[m], now, 0))
        metrics.append(Metric(f"negative_transfer/{m}", float(report.negative_transfer[m]), now, 0))
        metrics += [Metric(f"rel/{m}/{t}", 100 * report.relative[m][t], now, 0) for t in report.tasks]
        if m in report.significance:
            d = report.significance[m].delta_m
            metrics += [
                Metric(f"delta_m_ci_low/{m}", d.ci_low, now, 0),
                Metric(f"delta_m_ci_high/{m}", d.ci_high, now, 0),
            ]
            losses = float(report.significance[m].significant_losses)
            metrics.append(Metric(f"negative_transfer_significant/{m}", losses, now, 0))
    client.log_batch(run_id, metrics=metrics)
    if report.significance:
        from cgc_lightning.significance import transfer_csv

        client.log_text(run_id, transfer_csv(report.significance, report.reference), "transfer.csv")
    for m, child in report.run_ids.items():  # each method's run: its Δm against the reference, beside its scores
        if child != run_id and stage == "test":
            client.log_metric(child, "test/delta_m", 100 * report.delta_m[m], timestamp=now)
    from cgc_lightning.runs_view import update_runs_view

    run = client.get_run(run_id)
    children = [client.get_run(r) for r in report.run_ids.values()]
    shown = {k for c in children for k in c.data.metrics}
    update_runs_view(client, run.info.experiment_id, shown)


def add_significance(client, report: Report, stage: str, metric: str) -> None:
    """Give ``report`` Δm's interval and each task's verdict from its runs' per-example results, or a note why not."""
    from cgc_lightning.significance import method_significance

    if metric == "loss":
        report.significance_note = "the report is on the loss, the per-example results are scores"
        return
    runs = {m: [report.run_ids[m]] for m in report.methods if m in report.run_ids}
    if len(runs) < len(report.methods):
        report.significance_note = "not every method's run is known"
        return
    report.significance, report.significance_note = method_significance(
        client, runs, report.reference, report.metric_names, set(LOWER_IS_BETTER), stage
    )


def report_from_runs(runs, reference: str, stage: str, metric: str, order: list[str] | None = None) -> Report:
    """The report of MLflow ``runs``, methods in ``order`` (default: the reference, then by name)."""
    values, metric_names, run_ids = read_runs(runs, stage, metric)
    order = order or [reference, *sorted(m for m in values if m != reference)]
    values = {m: values[m] for m in [*[m for m in order if m in values], *[m for m in values if m not in order]]}
    return build_report(values, metric_names, reference, LOWER_IS_BETTER, run_ids)
