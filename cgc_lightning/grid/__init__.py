r"""Ablation grids: one config expands to many runs, each an MLflow child run of one parent; resumable, parallel.

    python -m cgc_lightning grid --config experiments/grids/cgc_structure.yaml --dry-run   # list the points
    python -m cgc_lightning grid --config experiments/grids/cgc_structure.yaml --jobs 4    # run what is not done
    python -m cgc_lightning grid --config experiments/grids/cgc_structure.yaml --summary   # the table, no training
    python -m cgc_lightning grid --config experiments/grids/cgc_structure.yaml --emit slurm > grid.sbatch

A grid config (YAML; keys are dotted experiment-config keys, see ``docs/grids.md``)::

    base: experiments/exp.yaml                 # every point starts from this experiment config
    overrides: {trainer.max_steps: 100}        # set for every point
    axes:                                      # the product of these; values as a list, or {display name: value}
      model.adapter.r: [4, 8]
      seed_everything: [1, 2, 3]
    zip:                                       # each entry is one more axis whose keys move together, written as
      - {model.adapter.num_shared: [2, 0], model.adapter.num_specific: [0, 2]}          # equal-length columns
      - [{model.adapter.method: independent_lora}, {model.adapter.method: cgc_lora}]    # or rows
    exclude:                                   # drop the points that match every key of an entry
      - {model.adapter.r: 4, model.adapter.num_shared: 0}
    reference: {model.adapter.method: independent_lora}    # the Δm baseline, matched per seed

A point's identity (tag ``grid.point_id``) is a hash of its resolved config: the base with the point's
overrides applied. Reordering axes, adding values or editing comments keeps it; changing what a point
trains changes it. A point is finished when its child run is FINISHED and has every task's test metric;
re-running a grid skips those, resumes an interrupted point from its ``last.ckpt`` in the same run, and
starts the others afresh. Every point runs as ``grid --point <id>`` in its own process: ``--jobs N`` runs
N of them here (on GPUs, as many per GPU as their measured memory allows: ``gpu_slots``), ``--emit`` writes
them out for a cluster scheduler.

``data.clusters`` may be given as ``{cluster: [task, ...]}``: the point then also moves each task of
``data.tasks`` to its cluster (the cluster-count ablation).

The package: ``config`` (grid configs, their expansion into points), ``store`` (the MLflow runs of a grid),
``schedule`` (running points), ``summary`` (the tables and Δm), ``cli`` (``main``); each name is re-exported here.
"""

from cgc_lightning.grid.cli import main
from cgc_lightning.grid.config import (
    METHOD_KEY,
    RUN_NAME_CHARS,
    GridConfig,
    Point,
    canonical,
    dimensions,
    expand,
    get_key,
    load,
    point_id,
    point_run_name,
    resolve,
    set_key,
    short_names,
)
from cgc_lightning.grid.schedule import emit, point_command, run_grid, run_point, visible_gpus
from cgc_lightning.grid.store import (
    GPU_TAG,
    MLFLOW_LOGGERS,
    NAME_TAG,
    OWNER_TAG,
    PARENT_TAG,
    POINT_TAG,
    ROLE_TAG,
    STAGE_TAG,
    Store,
    child_runs,
    finished,
    new_run,
    open_store,
    parent_run,
    task_scores,
)
from cgc_lightning.grid.summary import (
    Summary,
    add_intervals,
    delta_m_figure,
    format_csv,
    format_markdown,
    format_text,
    log_summary_metrics,
    report,
    summarise,
    summary_table,
)

__all__ = [
    "GPU_TAG",
    "METHOD_KEY",
    "MLFLOW_LOGGERS",
    "NAME_TAG",
    "OWNER_TAG",
    "PARENT_TAG",
    "POINT_TAG",
    "ROLE_TAG",
    "RUN_NAME_CHARS",
    "STAGE_TAG",
    "GridConfig",
    "Point",
    "Store",
    "Summary",
    "add_intervals",
    "canonical",
    "child_runs",
    "delta_m_figure",
    "dimensions",
    "emit",
    "expand",
    "finished",
    "format_csv",
    "format_markdown",
    "format_text",
    "get_key",
    "load",
    "log_summary_metrics",
    "main",
    "new_run",
    "open_store",
    "parent_run",
    "point_command",
    "point_id",
    "point_run_name",
    "report",
    "resolve",
    "run_grid",
    "run_point",
    "set_key",
    "short_names",
    "summarise",
    "summary_table",
    "task_scores",
    "visible_gpus",
]
