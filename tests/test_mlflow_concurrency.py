"""Many processes, one SQLite MLflow store: no write is lost, and a locked database is waited out, not fatal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from cgc_lightning import tracking

ROOT = Path(__file__).resolve().parents[1]
LOCKED = "(sqlite3.OperationalError) database is locked"

# one training process: its own run, then one logger call per step, as Lightning makes them
WORKER = """
import sys, time
from pathlib import Path
from cgc_lightning.tracking import MLflowLogger

uri, start, rank, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
logger = MLflowLogger(experiment_name="stress", tracking_uri=uri, tags={"rank": str(rank)}, flush_every_s=0)
Path(f"{start}.ready{rank}").touch()
while not start.exists():
    time.sleep(0.01)
logger.log_hyperparams({"rank": rank})
for step in range(steps):
    logger.log_metrics({"train/loss": rank * 10_000 + step}, step=step)
logger.finalize("success")
print(logger.run_id)
"""


def test_retry_when_locked_waits_out_a_locked_store(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def flaky(x, fail=2):
        calls.append(x)
        if len(calls) <= fail:
            raise MlflowException(LOCKED, error_code=TEMPORARILY_UNAVAILABLE)
        return x * 2

    assert tracking.retry_when_locked(flaky, 21) == 42 and calls == [21, 21, 21]
    calls.clear()
    with pytest.raises(MlflowException, match="database is locked"):
        tracking.retry_when_locked(flaky, 1, fail=tracking.LOCKED_RETRIES)
    assert len(calls) == tracking.LOCKED_RETRIES, "gives up after LOCKED_RETRIES tries"

    def broken():
        calls.append(0)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no run 'x'")

    calls.clear()
    with pytest.raises(MlflowException, match="no run"):
        tracking.retry_when_locked(broken)
    assert calls == [0], "other errors are not retried"


def test_logger_writes_survive_a_locked_store(tmp_path, monkeypatch):
    """The project's logger retries a write the store refused for a lock, and the value lands exactly once."""
    from mlflow import MlflowClient

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    logger = tracking.MLflowLogger(experiment_name="locked", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    refusals = [LOCKED, LOCKED]
    real = MlflowClient.log_batch

    def log_batch(self, *args, **kwargs):
        if refusals:
            raise MlflowException(refusals.pop(), error_code=TEMPORARILY_UNAVAILABLE)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    logger.log_metrics({"train/loss": 1.5}, step=3)
    assert not refusals
    history = logger.experiment.get_metric_history(logger.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(3, 1.5)]


@pytest.mark.slow
def test_four_processes_log_500_metrics_each_to_one_sqlite_store(tmp_path):
    from mlflow import MlflowClient

    uri, steps, ranks = f"sqlite:///{tmp_path}/mlflow.db", 500, 4
    MlflowClient(uri).create_experiment("stress")  # the schema exists before anyone races to write (as in a grid)
    start = tmp_path / "start"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, uri, str(start), str(r), str(steps)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(ranks)
    ]
    deadline = time.time() + 300
    while not all(Path(f"{start}.ready{r}").exists() for r in range(ranks)):  # all imported: now write at once
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    start.touch()
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]

    client = MlflowClient(uri)
    runs = {r.data.tags["rank"]: r for r in client.search_runs([client.get_experiment_by_name("stress").experiment_id])}
    assert sorted(runs) == [str(r) for r in range(ranks)]
    for rank, run in runs.items():
        assert run.info.run_id == outs[int(rank)][0].split()[-1]
        assert run.info.status == "FINISHED" and run.data.params["rank"] == rank
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert history == [(s, float(int(rank) * 10_000 + s)) for s in range(steps)], f"rank {rank} lost metrics"
