"""A grid's summary: each point's test metrics and Δm against the reference point of its seed, aggregated over
seeds (:func:`summarise`), Δm's intervals (:func:`add_intervals`), the tables (text, Markdown, CSV), the Δm figure,
and :func:`report`, which logs them all on the parent run."""

from __future__ import annotations

import csv
import io
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgc_lightning.grid.config import GridConfig, Point, canonical, get_key, short_names
from cgc_lightning.grid.store import Store, child_runs, task_scores


@dataclass
class Summary:
    """Per-point results and their aggregates over seeds."""

    tasks: dict[str, str]
    """``{task: metric name}``."""
    axes: list[str]
    """Axis keys shown as columns (the seed axis is averaged over, not shown)."""
    points: list[dict]
    """One row per point: ``axis values, seed, run_id, status, <task>, avg, delta_m, reference``."""
    groups: list[dict]
    """One row per combination of non-seed axes: ``axis values, n, <task>/avg/delta_m: [values over seeds]``,
    ``pairs`` (the (point run, reference run) of each seed) and, once :func:`add_intervals` ran, ``significance``."""
    interval_note: str | None = None
    """Why the groups have no Δm interval, when they have none."""


def summarise(cfg: GridConfig, points: list[Point], runs: dict[str, Any]) -> Summary:
    """Test metrics of each point, Δm against the baseline point of the same seed, and mean/spread over seeds."""
    from cgc_lightning.compare_report import build_report

    short = short_names(points)
    results, tasks = {}, {}
    for p in points:
        run = runs.get(p.id)
        found = task_scores(run) if run is not None and run.info.status == "FINISHED" else None
        if found:
            results[p.id] = found[0]
            tasks.update(found[1])

    def seed(p: Point) -> Any:
        return get_key(p.config, cfg.seed_key)

    ref_points = [
        p
        for p in points
        if cfg.reference and all(canonical(get_key(p.config, k)) == canonical(v) for k, v in cfg.reference.items())
    ]

    def reference_of(p: Point) -> Point | None:
        same_seed = [r for r in ref_points if canonical(seed(r)) == canonical(seed(p))]
        varying = {k for r in same_seed for k in r.values if len({canonical(x.values.get(k)) for x in same_seed}) > 1}
        match = [r for r in same_seed if all(canonical(r.values.get(k)) == canonical(p.values.get(k)) for k in varying)]
        return match[0] if len(match) == 1 else None

    axes = [k for k in short if k != cfg.seed_key]
    rows, groups = [], {}
    for p in points:
        run, vals = runs.get(p.id), results.get(p.id)
        ref = reference_of(p)
        delta = None
        if vals is not None and ref is not None and ref.id in results:
            report = build_report({"ref": results[ref.id], "point": vals}, tasks, "ref")
            delta = 100 * report.delta_m["point"]
        status = "missing" if run is None else run.info.status + ("" if vals is not None else " (incomplete)")
        row = {short[k]: p.names[k] for k in short if k in p.names}
        row |= {"seed": seed(p), "point_id": p.id, "run_id": run.info.run_id if run else "", "status": status}
        row |= {t: (vals or {}).get(t) for t in tasks}
        row |= {"avg": statistics.fmean(vals.values()) if vals else None, "delta_m": delta}
        row["reference"] = ref.id if ref is not None else ""
        rows.append(row)
        key = canonical([p.names.get(k) for k in axes])
        group = groups.setdefault(key, {**{short[k]: p.names.get(k, "") for k in axes}, "n": 0, "values": {}})
        if vals is not None:
            group["n"] += 1
            for col in [*tasks, "avg", "delta_m"]:
                if row[col] is not None:
                    group["values"].setdefault(col, []).append(row[col])
            if delta is not None and ref is not p:  # the paired runs behind Δm's interval, seed by seed
                group.setdefault("pairs", []).append((row["run_id"], runs[ref.id].info.run_id))
    return Summary(tasks, [short[k] for k in axes], rows, list(groups.values()))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(values: list[float], pct: bool = False) -> str:
    mean, std = _mean_std(values)
    if mean is None:
        return "-"
    text = f"{mean:+.2f}" if pct else f"{mean:.4f}"
    if std is None:
        return text
    return text + (f" ± {std:.2f}" if pct else f" ± {std:.4f}")


def summary_table(s: Summary) -> tuple[list[str], list[list[str]]]:
    header = [*s.axes, "n", *[f"{t} ({m})" for t, m in s.tasks.items()], "avg", "Δm %"]
    with_ci = any("significance" in g for g in s.groups)
    if with_ci:
        header += ["Δm 95% CI", "sig. losses"]
    rows = []
    for g in s.groups:
        row = [
            *[str(g[a]) for a in s.axes],
            str(g["n"]),
            *[_cell(g["values"].get(t, [])) for t in s.tasks],
            _cell(g["values"].get("avg", [])),
            _cell(g["values"].get("delta_m", []), pct=True),
        ]
        if with_ci:
            sig = g.get("significance")
            d = sig.delta_m if sig else None
            row += [f"[{d.ci_low:+.2f}, {d.ci_high:+.2f}]" if d else "-", str(sig.significant_losses) if sig else "-"]
        rows.append(row)
    return header, rows


def delta_m_figure(s: Summary, cfg: GridConfig):
    """Each group's mean Δm over its seeds, with the 95% interval where there is one; None without any Δm."""
    from cgc_lightning.callbacks.plots import grouped_bars

    groups = [g for g in s.groups if g["values"].get("delta_m")]
    if not groups:
        return None
    labels = [" ".join(str(g[a]) for a in s.axes) or "all" for g in groups]
    means = [statistics.fmean(g["values"]["delta_m"]) for g in groups]
    cis = [
        (g["significance"].delta_m.ci_low, g["significance"].delta_m.ci_high) if "significance" in g else None
        for g in groups
    ]
    ref = ", ".join(f"{k}={v}" for k, v in (cfg.reference or {}).items())
    title = f"grid {cfg.name}: Δm against {ref}, mean over seeds" + (" with 95% intervals" if any(cis) else "")
    return grouped_bars(labels, {"Δm": means}, title, "Δm (%)", intervals={"Δm": cis})


def add_intervals(s: Summary, client, n_resamples: int | None = None) -> None:
    """Δm's bootstrap interval for each group with a reference, over its seeds and the test examples (paired with
    the reference point of each seed), from the runs' per-example results; ``s.interval_note`` says why not."""
    from cgc_lightning.metrics import LOWER_IS_BETTER
    from cgc_lightning.significance import N_RESAMPLES, method_significance

    for g in s.groups:
        pairs = g.get("pairs") or []
        if not pairs or len(pairs) != g["n"]:  # a seed without its reference: the interval would mix seeds
            continue
        runs = {"point": [p for p, _ in pairs], "reference": [r for _, r in pairs]}
        found, why = method_significance(
            client, runs, "reference", s.tasks, set(LOWER_IS_BETTER), n_resamples=n_resamples or N_RESAMPLES
        )
        if why:
            s.interval_note = why
            continue
        g["significance"] = found["point"]


def format_text(s: Summary) -> str:
    header, rows = summary_table(s)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _notes(s: Summary, cfg: GridConfig) -> str:
    ref = ", ".join(f"{k}={v}" for k, v in (cfg.reference or {}).items()) or "none"
    text = (
        f"test metrics, mean ± sample std over {cfg.seed_key}; Δm: mean relative change per task against the "
        f"point with {ref} and the same seed, in percent (+ is better)"
    )
    if any("significance" in g for g in s.groups):
        text += (
            "; CI: paired bootstrap over seeds and test examples; sig. losses: tasks whose whole interval is below "
            "the reference"
        )
    elif s.interval_note:
        text += f"; no Δm intervals: {s.interval_note}"
    return text


def format_markdown(s: Summary, cfg: GridConfig) -> str:
    header, rows = summary_table(s)
    md = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * len(s.axes) + ["---:"] * (len(header) - len(s.axes))) + "|",
    ]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([f"# grid {cfg.name}", "", *md, "", _notes(s, cfg), ""])


def format_csv(s: Summary, per_point: bool) -> str:
    buf = io.StringIO()
    cols = [*s.tasks, "avg", "delta_m"]
    if per_point:
        w = csv.DictWriter(
            buf, [*s.axes, "seed", "point_id", "run_id", "status", *cols, "reference"], extrasaction="ignore"
        )
        w.writeheader()
        w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in s.points])
    else:
        w = csv.writer(buf, lineterminator="\n")
        ci = ["delta_m_ci_low", "delta_m_ci_high", "significant_losses"]
        w.writerow([*s.axes, "n", *[f"{c}_{stat}" for c in cols for stat in ("mean", "std")], *ci])
        for g in s.groups:
            stats = [_mean_std(g["values"].get(c, [])) for c in cols]
            sig = g.get("significance")
            extra = [sig.delta_m.ci_low, sig.delta_m.ci_high, sig.significant_losses] if sig else ["", "", ""]
            w.writerow([*[g[a] for a in s.axes], g["n"], *["" if x is None else x for st in stats for x in st], *extra])
    return buf.getvalue()


def report(cfg: GridConfig, points: list[Point], store: Store, parent_id: str, out: Path | None = None) -> Summary:
    """Summarise the grid from MLflow, log the tables on the parent run (and into ``out``), print the table."""
    s = summarise(cfg, points, child_runs(store, parent_id))
    add_intervals(s, store.client)
    files = {
        "grid_summary.md": format_markdown(s, cfg),
        "grid_summary.csv": format_csv(s, per_point=False),
        "grid_points.csv": format_csv(s, per_point=True),
    }
    significance = {" ".join(f"{a}={g[a]}" for a in s.axes): g["significance"] for g in s.groups if "significance" in g}
    if significance:
        from cgc_lightning.significance import transfer_csv

        ref = " ".join(f"{k}={v}" for k, v in (cfg.reference or {}).items())
        files["grid_transfer.csv"] = transfer_csv(significance, ref)
    for name, text in files.items():
        store.client.log_text(parent_id, text, name)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
    figure = delta_m_figure(s, cfg)
    if figure is not None:
        store.client.log_figure(parent_id, figure, "grid_delta_m.png")
        if out is not None:
            figure.savefig(out / "grid_delta_m.png")
    log_summary_metrics(store.client, parent_id, s)
    from cgc_lightning.runs_view import runs_url, ui_command, update_runs_view

    children = child_runs(store, parent_id).values()
    metrics = {k for run in children for k in run.data.metrics} | {"grid/delta_m"}
    update_runs_view(store.client, store.experiment_id, metrics)
    done = sum(r["status"] == "FINISHED" for r in s.points)
    print(
        f"\ngrid {cfg.name}: {done} of {len(points)} point(s) finished; parent run {parent_id} "
        f"(experiment {store.experiment_name!r}, {store.tracking_uri})\n"
        f"runs: `{ui_command(store.tracking_uri)}`, then {runs_url(store.experiment_id)}"
    )
    print(format_text(s))
    print(_notes(s, cfg))
    return s


def _metric_name(*parts: str) -> str:
    """An MLflow metric name (alphanumerics, ``_ - . / :`` and spaces) from free text."""
    return "/".join(re.sub(r"[^0-9A-Za-z_\-. :]", "_", str(p).replace("=", ":")) for p in parts if str(p))


def log_summary_metrics(client, parent_id: str, s: Summary) -> None:
    """The summary as metrics, so the MLflow runs table shows it: on the parent, each group's mean over seeds
    (``grid/<axis:value ...>/avg``, ``.../delta_m``, ``.../n``); on each point's run, its ``grid/delta_m``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for group in s.groups:
        label = " ".join(f"{k}:{group[k]}" for k in s.axes) or "all"
        for col in ("avg", "delta_m"):
            values = group["values"].get(col)
            if values:
                metrics.append(Metric(_metric_name("grid", label, col), statistics.fmean(values), now, 0))
        metrics.append(Metric(_metric_name("grid", label, "n"), float(group["n"]), now, 0))
        if "significance" in group:
            d = group["significance"].delta_m
            metrics.append(Metric(_metric_name("grid", label, "delta_m_ci_low"), d.ci_low, now, 0))
            metrics.append(Metric(_metric_name("grid", label, "delta_m_ci_high"), d.ci_high, now, 0))
    try:
        for i in range(0, len(metrics), 500):
            client.log_batch(parent_id, metrics=metrics[i : i + 500])
        for row in s.points:
            if row["run_id"] and row["delta_m"] is not None:
                client.log_metric(row["run_id"], "grid/delta_m", row["delta_m"], timestamp=now)
    except Exception as e:  # the tables are logged already; a store that refuses metrics costs only the columns
        print(f"grid: could not log the summary metrics ({e})", file=sys.stderr)
