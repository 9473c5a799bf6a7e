"""Where diagnostics go: numbers to every logger of the trainer, figures and tables to the MLflow run.

Everything here is a no-op off rank 0 and when the trainer has no logger (``logger: false``), so the
callbacks that use it still compute their diagnostics and keep them on themselves. Figures are
drawn on the training thread, at validation: matplotlib holds the GIL while it draws, so a
background thread would take the time from the training loop all the same, only less visibly.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager

from lightning.pytorch import Trainer

from cgc_lightning.mlflow_env import quiet_downloads
from cgc_lightning.tracking import mlflow_logger


def log_metrics(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    """Log plain floats under ``step`` to every logger (MLflow, CSV, ...), on rank 0 only."""
    if not metrics or not trainer.is_global_zero:
        return
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=step)


def log_figure(trainer: Trainer, build: Callable[[], object], path: str) -> None:
    """Log the matplotlib figure ``build()`` returns as the PNG artifact ``path`` of the MLflow run (a later
    call replaces it); ``build`` is not called without an MLflow logger or off rank 0."""
    logger = mlflow_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return
    try:
        logger.experiment.log_figure(logger.run_id, build(), path)
    except Exception as e:  # a tracking outage must not end the training; the next validation draws it again
        warnings.warn(f"could not log {path} to MLflow: {e}", stacklevel=2)


def log_json(trainer: Trainer, data: dict, path: str) -> None:
    """Log ``data`` as the JSON artifact ``path`` of the MLflow run."""
    logger = mlflow_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return
    try:
        logger.experiment.log_text(logger.run_id, json.dumps(data, indent=1), path)
    except Exception as e:
        warnings.warn(f"could not log {path} to MLflow: {e}", stacklevel=2)


def log_rows(trainer: Trainer, rows: list[dict], path: str) -> None:
    """Append ``rows`` (dicts with the same keys) to the MLflow table artifact ``path`` (``log_table`` appends).

    Per-task diagnostics go here rather than into metrics: a run's metric list stays short enough that its
    validation and test metrics are easy to find in the MLflow UI, and the series is still one table to read
    (``mlflow.load_table``) or to open in the run's artifact view.
    """
    logger = mlflow_logger(trainer)
    if logger is None or not trainer.is_global_zero or not rows:
        return
    try:
        with quiet_downloads():  # log_table downloads the table to append to it
            logger.experiment.log_table(
                logger.run_id, data={k: [r[k] for r in rows] for k in rows[0]}, artifact_file=path
            )
    except Exception as e:
        warnings.warn(f"could not log {path} to MLflow: {e}", stacklevel=2)


class Stopwatch:
    """Seconds a callback has spent on its diagnostics, so their overhead can be measured and reported."""

    def __init__(self):
        self.seconds = 0.0

    @contextmanager
    def __call__(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
