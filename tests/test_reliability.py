"""Reliability end to end: a NaN loss, Ctrl-C, a tracking server down at start or lost mid-run, bad monitored metric
names and over-short sequences, each through `python -m cgc_lightning fit` on the tiny config."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--seesaw.enabled=false", "--grad_conflict.enabled=false", "--gate_usage.enabled=false"]


def fit(cwd: Path, *extra: str, env: dict | None = None, experiment: str = "tiny") -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    args = [
        *("-m", "cgc_lightning", "fit", "--config", "experiments/tiny.yaml"),
        *("--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1"),
        f"--trainer.logger.init_args.experiment_name={experiment}",
        *QUIET,
        *extra,
    ]
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=base | (env or {}), capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    return tmp_path


def only_run(cwd: Path, experiment: str = "tiny"):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def train_steps(client, run) -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]


@pytest.mark.slow
@pytest.mark.parametrize("adamw", ["auto", "fused"], ids=["checked every step", "deferred"])
def test_nan_loss_stops_the_run_keeps_the_last_good_checkpoint_and_fails_the_mlflow_run(cwd, adamw):
    # on a CPU `auto` is the unfused AdamW, so the guard reads the flag before every step; a fused one skips the
    # poisoned update on the device and the guard reads the flag one step later
    proc = fit(cwd, "--trainer.callbacks+=tests.crash.PoisonAt", "--trainer.callbacks.step=4", f"--model.adamw={adamw}")
    assert proc.returncode != 0
    assert "non-finite training loss (nan) at step 5" in proc.stderr, proc.stderr[-3000:]
    assert "tasks in the batch:" in proc.stderr and "The optimizer did not apply it" in proc.stderr
    client, run = only_run(cwd)
    assert run.info.status == "FAILED" and "non-finite training loss" in run.data.tags["error"]
    if adamw == "auto":
        assert train_steps(client, run) == [0, 1, 2, 3], "steps 1-4 logged, the poisoned step 5 not"
    else:  # step 5 finished (its update skipped) and logged its NaN loss; step 6 stopped before its update
        assert train_steps(client, run) == [0, 1, 2, 3, 4]
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert math.isnan(history[-1].value) and all(math.isfinite(m.value) for m in history[:-1])
    ckpts = {p.name: p for p in cwd.glob(f"outputs/*/{run.info.run_id}/checkpoints/*.ckpt")}
    assert set(ckpts) == {"best.ckpt", "last.ckpt"}
    state = torch.load(ckpts["last.ckpt"], map_location="cpu", weights_only=True)
    assert state["global_step"] == 3, "the last good checkpoint (validation at step 3), not a poisoned one"
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_marks_the_run_killed_and_resumes(cwd):
    proc = fit(cwd, "--trainer.callbacks+=tests.crash.InterruptAt", "--trainer.callbacks.step=4")
    assert proc.returncode == 1, proc.stderr[-3000:]
    client, run = only_run(cwd)
    assert run.info.status == "KILLED"
    (last,) = cwd.glob(f"outputs/*/{run.info.run_id}/checkpoints/last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 5, "the step under way finished"
    assert "Ctrl-C: stopping after this training step" in proc.stderr
    resumed = fit(cwd, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, run = only_run(cwd)
    assert run.info.status == "FINISHED" and train_steps(client, run) == list(range(6))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tracking_server_down_at_start_fails_fast_naming_it(cwd):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    proc = fit(cwd, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode != 0 and time.perf_counter() - start < 60
    assert f"MLflow tracking server {uri} does not answer" in proc.stderr, proc.stderr[-3000:]
    assert not (cwd / "outputs").exists() and not (cwd / "mlruns").exists(), "nothing loaded, nothing written"


@pytest.mark.slow
def test_tracking_server_lost_mid_run_keeps_training_and_the_metrics(cwd):
    from mlflow import MlflowClient

    from cgc_lightning.tracking import replay_unsent

    port, db = free_port(), f"sqlite:///{cwd}/server.db"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db, "--host", "127.0.0.1"]
        + ["--port", str(port), "--default-artifact-root", str(cwd / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers in one process group, killed together
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "the MLflow server did not start"
                time.sleep(0.5)
        proc = fit(
            cwd,
            "--trainer.callbacks+=tests.crash.KillServerAt",
            "--trainer.callbacks.step=2",
            "--trainer.logger.init_args.flush_every_s=0",  # every call its own write: which got through is exact
            env={"MLFLOW_TRACKING_URI": uri, "TRACKING_SERVER_PID": str(server.pid)},
        )
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 9)
        server.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"MLflow tracking store {uri} did not take the metrics" in proc.stderr
    assert "is still unreachable" in proc.stderr
    (unsent,) = cwd.glob("outputs/*/*/unsent_metrics.jsonl")
    assert (unsent.parent / "checkpoints" / "last.ckpt").is_file()
    client = MlflowClient(db)  # the server's own store
    run = client.get_run(unsent.parent.name)
    # the server dies after step 2, before that step's metrics go out: only step 1's (logged at 0) reached it
    assert train_steps(client, run) == [0], "steps logged before the outage are in the store"
    assert replay_unsent(unsent, db) > 0 and not unsent.exists()
    assert train_steps(client, run) == list(range(6)), "nothing lost: the kept metrics fill in the rest"
    assert {"val/avg/score", "val/plausible/accuracy"} <= set(client.get_run(run.info.run_id).data.metrics)


@pytest.mark.slow
def test_monitor_naming_a_task_not_in_the_data(cwd):
    proc = fit(cwd, "--checkpoint.monitor=val/plausibel/accuracy")
    assert proc.returncode != 0
    assert "task 'plausibel' is not in the data; the tasks are ['plausible', 'qa', 'count']" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert "Traceback" not in proc.stderr and proc.returncode == 2, "one error line, before the run starts"
    from mlflow import MlflowClient

    store = cwd / "mlruns" / "mlflow.db"
    runs = (
        MlflowClient(f"sqlite:///{store}").search_runs(
            [e.experiment_id for e in MlflowClient(f"sqlite:///{store}").search_experiments()]
        )
        if store.exists()
        else []
    )
    assert runs == [] and not list(cwd.glob("outputs/*/*/checkpoints/*.ckpt")), "no MLflow run, no checkpoint"
    proc = fit(cwd, "--checkpoint.monitor=val/qa/accuracy")  # qa is scored with exact_match
    assert "task 'qa' is scored with ['val/qa/exact_match', 'val/qa/loss']" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_max_length_that_truncates_every_target(cwd):
    proc = fit(cwd, "--data.max_length=2", "--data.cache_dir=cache")
    assert proc.returncode != 0
    assert "data.max_length=2 truncates every target; raise max_length" in proc.stderr, proc.stderr[-3000:]
    assert not list(cwd.glob("outputs/*/*/checkpoints/*.ckpt"))
