"""Where a grid's runs are: the MLflow store, the grid's parent run and its child runs (one per point), and whether
a point's run is finished. The tags below are the grid's MLflow layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgc_lightning.chain import STAGE_RUN_TAG
from cgc_lightning.driver import MLFLOW_LOGGERS, PARENT_TAG, logger_init  # noqa: F401  (re-exported)
from cgc_lightning.grid.config import GridConfig, resolve

ROLE_TAG, NAME_TAG, POINT_TAG, STAGE_TAG, OWNER_TAG = (
    "grid.role",
    "grid.name",
    "grid.point_id",
    "grid.stage",
    "grid.owner",
)
GPU_TAG = "grid.gpu"


@dataclass
class Store:
    """Where a grid's runs go: the MLflow experiment, and where checkpoints of its runs are written."""

    client: Any
    tracking_uri: str
    experiment_name: str
    checkpoint_dir: str

    @property
    def experiment_id(self) -> str | None:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        return exp.experiment_id if exp is not None else None

    def checkpoints(self, run) -> Path:
        return Path(self.checkpoint_dir) / run.info.experiment_id / run.info.run_id / "checkpoints"


def open_store(cfg: GridConfig, base: dict, tracking_uri: str | None) -> Store:
    from cgc_lightning.tracking import LockRetryingClient, default_tracking_uri

    # the points run `fit --config <base>` with overrides: the base's own logger must know `checkpoint_dir` and `resume`
    init = logger_init(resolve(base, cfg.overrides), "grid", ours_only=True)
    uri = tracking_uri or init.get("tracking_uri") or default_tracking_uri()
    experiment = cfg.experiment_name or init.get("experiment_name") or "cgc-lightning"
    return Store(LockRetryingClient(uri), uri, experiment, init.get("checkpoint_dir") or "outputs")


def new_run(store: Store, run_name: str, tags: dict[str, str]) -> str:
    """A new run (the experiment is created as ``fit`` would, artifacts under ``mlruns/artifacts`` by default)."""
    from cgc_lightning.tracking import MLflowLogger

    logger = MLflowLogger(
        experiment_name=store.experiment_name, run_name=run_name, tracking_uri=store.tracking_uri, tags=tags
    )
    return logger.run_id


def parent_run(store: Store, cfg: GridConfig, parent_id: str | None = None) -> str:
    """The grid's parent run: ``parent_id``, else the newest run tagged with this grid's name, else a new one."""
    if parent_id:
        return store.client.get_run(parent_id).info.run_id
    exp = store.experiment_id
    if exp is not None:
        found = store.client.search_runs(
            [exp],
            f"tags.`{ROLE_TAG}` = 'parent' and tags.`{NAME_TAG}` = '{cfg.name}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            return found[0].info.run_id
    from cgc_lightning.tracking import unique_run_name

    return new_run(store, unique_run_name(f"grid:{cfg.name}"), {ROLE_TAG: "parent", NAME_TAG: cfg.name})


def child_runs(store: Store, parent_id: str, point: str | None = None) -> dict[str, Any]:
    """``{point id: newest active child run}`` of the parent (or of one point)."""
    query = f"tags.`{PARENT_TAG}` = '{parent_id}'" + (f" and tags.`{POINT_TAG}` = '{point}'" if point else "")
    runs = store.client.search_runs(
        [store.experiment_id], query, max_results=50000, order_by=["attributes.start_time DESC"]
    )
    out: dict[str, Any] = {}
    for run in runs:
        out.setdefault(run.data.tags.get(POINT_TAG), run)
    return out


def stage_runs(store: Store, point_run_id: str) -> list[Any]:
    """The runs of a MoDULA point's earlier stages (``grid.modula_stage``), newest first."""
    query = f"tags.`{PARENT_TAG}` = '{point_run_id}' and tags.`{STAGE_RUN_TAG}` != ''"
    return store.client.search_runs([store.experiment_id], query, order_by=["attributes.start_time DESC"])


def task_scores(run) -> tuple[dict[str, float], dict[str, str]] | None:
    """``({task: test metric}, {task: metric name})`` of a run (tasks from its ``tasks`` tag), or None while one is
    missing."""
    values, names = {}, {}
    for task in [t for t in run.data.tags.get("tasks", "").split(",") if t] or [None]:
        found = sorted(k for k in run.data.metrics if k.startswith(f"test/{task}/") and not k.endswith("/loss"))
        if task is None or not found:
            return None
        values[task], names[task] = run.data.metrics[found[0]], found[0].rsplit("/", 1)[1]
    return values, names


def finished(run) -> bool:
    return run is not None and run.info.status == "FINISHED" and task_scores(run) is not None
