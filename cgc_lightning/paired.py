"""Compare two sets of finished runs example by example, even when they live in different MLflow stores.

    python -m cgc_lightning.paired --method 3f2a...,9c1b... --reference 77d0...,e4a5... \\
        --method-uri sqlite:///after/mlruns/mlflow.db --reference-uri sqlite:///before/mlruns/mlflow.db \\
        --out outputs/paired

Seed i of ``--method`` pairs with seed i of ``--reference`` (e.g. a study run before and after a code change).
Both must have scored the same examples (same tasks, ``data.seed`` and split), read from each run's
``examples/<stage>.json`` (:mod:`cgc_lightning.examples`). Prints a markdown table: per task both means and the
difference with its paired bootstrap interval and verdict (:func:`stats.transfer_rows`), then Δm with its interval
(:func:`stats.delta_m_bootstrap`) and each side's average over tasks of the task's mean per-example score (as
``grid --summary``'s avg, but with BLEU as sentence BLEU). ``--out DIR`` also writes ``paired.csv`` (the columns
of compare's ``transfer.csv``) and ``paired.md``.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cgc_lightning import stats
from cgc_lightning.metrics import LOWER_IS_BETTER
from cgc_lightning.mlflow_env import default_tracking_uri
from cgc_lightning.significance import (
    CONFIDENCE,
    N_RESAMPLES,
    MethodSignificance,
    compare_paired,
    paired_scores,
    run_example_scores,
)
from cgc_lightning.significance import transfer_csv as _transfer_csv

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

Scores = dict[str, dict[str, float]]  # {task: {example id: score}} of one run


def _ids(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def _runs(flag: str, uri: str, run_ids: Sequence[str]) -> tuple[MlflowClient, list[Run]]:
    """The store's client and its runs; ValueError naming the first run id the store does not have."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    db = uri.removeprefix("sqlite:///").split("?")[0]
    if uri.startswith("sqlite:///") and not Path(db).is_file():  # MLflow would create an empty store there
        raise ValueError(f"{flag}: no MLflow store at {uri} ({Path(db).resolve()} does not exist)")
    client, runs = MlflowClient(uri), []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ValueError(f"{flag}: no run {run_id!r} in {uri}") from None
            raise ValueError(f"{flag}: cannot read run {run_id!r} from {uri}: {e.message}") from None
    return client, runs


def _scores(flag: str, uri: str, client: MlflowClient, run_ids: Sequence[str], stage: str) -> list[Scores]:
    out = [run_example_scores(client, run_id, stage) for run_id in run_ids]
    for run_id, scores in zip(run_ids, out, strict=True):
        if not scores:
            raise ValueError(
                f"{flag}: run {run_id!r} in {uri} has no per-example {stage} results "
                + (
                    "(examples/val_step<k>.json: fit with --model.log_val_examples true)"
                    if stage == "val"
                    else f"(examples/{stage}.json)"
                )
            )
    return out


def metric_names(run: Run, tasks: Sequence[str], stage: str) -> dict[str, str]:
    """``{task: metric}`` from the run's ``<stage>/<task>/<metric>`` (or ``test/...``) metrics, not loss; else score."""
    keys = [k.split("/") for k in run.data.metrics if k.count("/") == 2]
    found = {t: sorted({m for s, task, m in keys if s in (stage, "test") and task == t and m != "loss"}) for t in tasks}
    return {t: names[0] if names else "score" for t, names in found.items()}


def load(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """``(method {task: (S, N)}, reference {task: (S, N)}, {task: metric})``; ValueError says what does not pair."""
    method_ids, reference_ids = _ids(args.method), _ids(args.reference)
    if not method_ids or len(method_ids) != len(reference_ids):
        raise ValueError(f"--method has {len(method_ids)} run(s), --reference {len(reference_ids)}: give one per seed")
    m_client, m_runs = _runs("--method", args.method_uri, method_ids)
    r_client, _ = _runs("--reference", args.reference_uri, reference_ids)
    method = _scores("--method", args.method_uri, m_client, method_ids, args.stage)
    reference = _scores("--reference", args.reference_uri, r_client, reference_ids, args.stage)
    tasks = sorted(method[0])
    for run_id, scores in zip([*method_ids, *reference_ids], [*method, *reference], strict=True):
        if sorted(scores) != tasks:
            raise ValueError(f"run {run_id!r} scored tasks {sorted(scores)}, run {method_ids[0]!r} {tasks}")
    ms, rs = paired_scores(method, reference, tasks)  # ValueError naming a task whose examples differ
    return ms, rs, metric_names(m_runs[0], tasks, args.stage)


def task_average(scores: Mapping[str, np.ndarray]) -> float:
    """The average over tasks of each task's mean per-example score (over its examples and seeds)."""
    return float(np.mean([a.mean() for a in scores.values()]))


def markdown(sig: MethodSignificance, means: tuple[float, float], args: argparse.Namespace) -> str:
    """The report: per task, Δm, the task averages (``means``: reference, method), the method note and the runs."""
    rows = [
        f"| {r['task']} | {r['metric']} | {r['reference_mean']:.4f} | {r['method_mean']:.4f} | {r['diff']:+.4f} "
        f"| [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['verdict']} |"
        for r in sig.rows
    ]
    d, (ref, met) = sig.delta_m, means
    note = stats.method_note(n_resamples=args.resamples, confidence=CONFIDENCE, n_seeds=d.n_seeds)
    runs = lambda flag: ", ".join(f"`{r}`" for r in _ids(flag))  # noqa: E731
    return "\n".join(
        [
            "| task | metric | reference | method | diff | 95% CI | verdict |",
            "|---|---|---:|---:|---:|---:|---|",
            *rows,
            f"| Δm | | | | {d.delta_m:+.2f}% | [{d.ci_low:+.2f}, {d.ci_high:+.2f}]% | {d.verdict} |",
            f"| average over tasks | | {ref:.4f} | {met:.4f} | {met - ref:+.4f} | | |",
            "",
            f"{args.stage} examples; {note}",
            "",
            f"- method: runs {runs(args.method)} in {args.method_uri}",
            f"- reference: runs {runs(args.reference)} in {args.reference_uri}",
        ]
    )


def csv_text(sig: MethodSignificance, means: tuple[float, float]) -> str:
    """compare's ``transfer.csv`` columns: one row per task, the Δm row, then the task averages (``mean_score``)."""
    text = _transfer_csv({"method": sig}, "reference")
    buf = io.StringIO()
    w = csv.DictWriter(buf, text.splitlines()[0].split(","), lineterminator="\n")
    ref, met = means
    w.writerow(
        {"method": "method", "reference": "reference", "task": "mean_score", "reference_mean": ref}
        | {"method_mean": met, "diff": met - ref, "n_seeds": sig.delta_m.n_seeds}
    )
    return text + buf.getvalue()


def main(argv: list[str] | None = None) -> MethodSignificance:
    p = argparse.ArgumentParser(prog="python -m cgc_lightning.paired", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, help="the method's run ids, one per seed, comma-separated")
    p.add_argument("--reference", required=True, help="the reference's run ids, seed i pairing with --method's i")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the project store)")
    p.add_argument("--method-uri", help="the method runs' store (default: --tracking-uri)")
    p.add_argument("--reference-uri", help="the reference runs' store (default: --tracking-uri)")
    p.add_argument(
        "--stage",
        default="test",
        help="which per-example results: test (default), val (each run's last validation) or one validation's, e.g. "
        "val_step1000 (examples/<stage>.json)",
    )
    p.add_argument("--resamples", type=int, default=N_RESAMPLES, help=f"bootstrap resamples (default {N_RESAMPLES})")
    p.add_argument("--out", help="also write paired.csv and paired.md here")
    args = p.parse_args(argv)
    if args.resamples < 1:
        p.error(f"--resamples must be at least 1, got {args.resamples}")
    uri = args.tracking_uri or default_tracking_uri()
    args.method_uri, args.reference_uri = args.method_uri or uri, args.reference_uri or uri
    try:
        ms, rs, names = load(args)
    except ValueError as e:
        p.error(str(e))
    sig = compare_paired(ms, rs, names, LOWER_IS_BETTER, args.resamples)
    means = (task_average(rs), task_average(ms))
    text = markdown(sig, means, args)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "paired.md").write_text(text + "\n")
        (out / "paired.csv").write_text(csv_text(sig, means))
    return sig


if __name__ == "__main__":
    main()
