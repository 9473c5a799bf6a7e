"""The MLflow UI's runs table with the columns that matter: method, seed and every task's score.

MLflow's runs table shows no param or metric column until the user picks them, one by one, out of
hundreds. Its *Share* button stores a view (the picked columns, the sort) as the experiment tag
``mlflow.sharedViewState.<key>`` and opens it at ``#/experiments/<id>/runs?viewStateShareKey=<key>``.
This module writes that tag itself, under the key :data:`VIEW_KEY`, and keeps it up to date as runs log
their scores: the view lists ``method`` and ``seed``, ``test/avg/score`` and Δm, then each task's test
metric, then ``val/avg/score``, with the runs grouped by method (a group's row is the mean over its runs,
e.g. over seeds). :func:`runs_url` is the address to open.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable

VIEW_KEY = "cgc-lightning"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
DEFAULT_UI = "http://127.0.0.1:5000"
#: Metrics shown first, in this order, when a run has them.
LEAD_METRICS = ("test/avg/score", "test/delta_m", "grid/delta_m")
TRAIL_METRICS = ("val/avg/score",)
PARAMS = ("method", "seed")


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"


def score_metrics(names: Iterable[str]) -> list[str]:
    """The metrics of ``names`` the view shows: the lead ones, each task's test score, then the trailing ones."""
    names = set(names)
    task_score = lambda n: n.count("/") == 2 and not n.endswith(("/loss", "/n")) and "/avg/" not in n  # noqa: E731
    tasks = sorted(n for n in names if n.startswith("test/") and task_score(n))
    return [n for n in LEAD_METRICS if n in names] + tasks + [n for n in TRAIL_METRICS if n in names]


def view_state(metrics: Iterable[str]) -> dict:
    """The shared view: ``method``, ``seed`` and ``metrics`` as columns, runs grouped by method (each group's row
    shows the mean over its runs, e.g. over seeds), newest first, the run name wide enough for the seed."""
    columns = [_column("params", p) for p in PARAMS] + [_column("metrics", m) for m in metrics]
    return {
        "selectedColumns": columns,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": "method"}]},
        "columnWidths": {"attributes.`Run Name`": 330},
    }


def update_runs_view(client, experiment_id: str, metrics: Iterable[str]) -> None:
    """Add ``metrics`` to the experiment's shared view, keeping the columns it shows already.

    Several processes of a grid may update it at once; one that loses the race only leaves a column out until
    the next update (the grid and compare parents update it with every child's metrics when they finish).
    Parent runs (grid, compare, stages) hold no ``method`` param: they are listed under "Additional runs".
    """
    try:
        raw = client.get_experiment(experiment_id).tags.get(VIEW_TAG)
        old = json.loads(raw) if raw else {}
        shown = [c[len("metrics.`") : -1] for c in old.get("selectedColumns", []) if c.startswith("metrics.`")]
        state = view_state(score_metrics([*shown, *metrics]))
        if state != old:
            client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(state))
    except Exception as e:  # a read-only store: the runs table only shows fewer columns
        warnings.warn(f"could not update the MLflow runs view of experiment {experiment_id}: {e}", stacklevel=2)


def runs_url(experiment_id: str, ui: str = DEFAULT_UI) -> str:
    """Where ``mlflow ui`` shows the experiment's runs in the shared view."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def ui_command(tracking_uri: str) -> str:
    """The command that serves ``tracking_uri`` in the MLflow UI."""
    return f"mlflow ui --backend-store-uri {tracking_uri}"
