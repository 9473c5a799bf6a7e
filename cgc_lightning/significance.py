"""Confidence intervals for ``compare`` and ``grid``: the runs' per-example test results through :mod:`stats`.

Every ``test`` logs each example's score (``examples/test.json``, :mod:`cgc_lightning.examples`). Two runs on
the same data score the same examples under the same ids, so a method and the reference pair example by
example (and seed by seed, for a grid's seeds). :func:`method_significance` returns, per method, Δm with its
bootstrap interval and one row per task (difference, interval, verdict); :func:`transfer_csv` writes the rows.

A task scored by BLEU is resampled on sentence BLEU (the per-example score), while its reported metric is the
corpus BLEU: its interval is about the sentence-level mean. Runs without per-example results (written before
they were recorded) get no interval; the reason is returned instead.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cgc_lightning import stats
from cgc_lightning.examples import load_examples
from cgc_lightning.mlflow_env import quiet_downloads

#: Bootstrap resamples for the reports (the intervals move by well under 0.1 point between draws at this count).
N_RESAMPLES = 5000
CONFIDENCE = 0.95


@dataclass
class MethodSignificance:
    """A method against the reference: Δm with its interval, and one :func:`stats.transfer_rows` row per task."""

    delta_m: stats.DeltaMResult
    rows: list[dict]

    @property
    def significant_losses(self) -> int:
        """Tasks where the method is worse than the reference with the whole interval below 0."""
        return sum(r["verdict"] == "worse" for r in self.rows)


def run_example_scores(client, run_id: str, stage: str = "test") -> dict[str, dict[str, float]]:
    """``{task: {example id: score}}`` of a run's per-example results; {} when it logged none."""
    out: dict[str, dict[str, float]] = {}
    with quiet_downloads():
        rows = load_examples(client, run_id, stage)
    for row in rows:
        out.setdefault(row["task"], {})[str(row["example_id"])] = float(row["score"])
    return out


def _id_order(example_id: str) -> tuple:
    """Example ids in file order: numerically where they are numbers (``"2"`` before ``"10"``)."""
    return (0, int(example_id), "") if example_id.isdigit() else (1, 0, example_id)


def _stack(per_seed: Sequence[Mapping[str, float]], ids: list[str]) -> np.ndarray:
    return np.array([[scores[i] for i in ids] for scores in per_seed], dtype=np.float64)


def paired_scores(
    method: Sequence[Mapping[str, Mapping[str, float]]],
    reference: Sequence[Mapping[str, Mapping[str, float]]],
    tasks: Sequence[str],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``({task: (S, N) scores}, {task: (S, N)})`` with seed s of the method paired with seed s of the reference.

    Raises ValueError naming the task when the runs scored different examples (another split or data seed)."""
    m_out, r_out = {}, {}
    for task in tasks:
        runs = [*method, *reference]
        missing = [i for i, r in enumerate(runs) if task not in r]
        if missing:
            raise ValueError(f"task {task!r}: {len(missing)} of the runs logged no per-example results for it")
        ids = sorted(runs[0][task], key=_id_order)
        if any(sorted(r[task], key=_id_order) != ids for r in runs[1:]):
            raise ValueError(
                f"task {task!r}: the runs scored different test examples (another data.seed or split?); "
                "paired intervals need the same examples"
            )
        m_out[task] = _stack([r[task] for r in method], ids)
        r_out[task] = _stack([r[task] for r in reference], ids)
    return m_out, r_out


def compare_paired(
    ms: Mapping[str, np.ndarray],
    rs: Mapping[str, np.ndarray],
    metric_names: Mapping[str, str],
    lower_is_better: set[str] | frozenset[str] = frozenset(),
    n_resamples: int = N_RESAMPLES,
) -> MethodSignificance:
    """A method's paired scores ``ms`` against the reference's ``rs`` (:func:`paired_scores`): its Δm and each
    task's difference, with intervals. ``lower_is_better``: the metric names where lower is better."""
    lower = {t for t, m in metric_names.items() if m in lower_is_better}
    kw = {"lower_is_better": lower, "n_resamples": n_resamples, "confidence": CONFIDENCE}
    return MethodSignificance(
        stats.delta_m_bootstrap(ms, rs, **kw), stats.transfer_rows(ms, rs, dict(metric_names), **kw)
    )


def method_significance(
    client,
    method_runs: Mapping[str, Sequence[str]],
    reference: str,
    metric_names: Mapping[str, str],
    lower_is_better: set[str] | frozenset[str] = frozenset(),
    stage: str = "test",
    n_resamples: int = N_RESAMPLES,
) -> tuple[dict[str, MethodSignificance], str | None]:
    """Each method of ``method_runs`` (``{method: [run id per seed]}``, the reference's seeds in the same order)
    against ``reference``: ``({method: MethodSignificance}, None)``, or ``({}, why not)``."""
    scores = {m: [run_example_scores(client, r, stage) for r in runs] for m, runs in method_runs.items()}
    lacking = sorted({m for m, per_seed in scores.items() if not all(per_seed)})
    if lacking:
        return {}, f"no per-example {stage} results in the runs of {', '.join(lacking)} (logged since examples/)"
    tasks = list(metric_names)
    out = {}
    try:
        for m in method_runs:
            if m == reference:
                continue
            if len(scores[m]) != len(scores[reference]):
                raise ValueError(f"{m} has {len(scores[m])} seed(s), {reference} {len(scores[reference])}")
            ms, rs = paired_scores(scores[m], scores[reference], tasks)
            out[m] = compare_paired(ms, rs, metric_names, lower_is_better, n_resamples)
    except ValueError as e:
        return {}, str(e)
    return out, None


def transfer_csv(results: Mapping[str, MethodSignificance], reference: str) -> str:
    """One row per method and task (difference against ``reference``, interval, verdict), then each Δm."""
    buf = io.StringIO()
    cols = ["method", "reference", "task", "metric", "reference_mean", "method_mean", "diff", "ci_low", "ci_high"]
    w = csv.DictWriter(buf, [*cols, "verdict", "n_examples", "n_seeds"], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for m, res in results.items():
        for row in res.rows:
            w.writerow({"method": m, "reference": reference, **row})
        d = res.delta_m
        w.writerow(
            {"method": m, "reference": reference, "task": "delta_m_pct", "diff": d.delta_m, "ci_low": d.ci_low}
            | {"ci_high": d.ci_high, "verdict": d.verdict, "n_seeds": d.n_seeds}
        )
    return buf.getvalue()
