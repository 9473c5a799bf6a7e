"""Exact resume: a fit killed by SIGKILL mid-epoch and resumed with `--ckpt_path last` equals an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--config",
    "experiments/tiny.yaml",
    "--trainer.max_steps=12",
    "--trainer.val_check_interval=6",
    "--trainer.log_every_n_steps=1",
    "--resume_checkpoint.every_n_train_steps=4",
    "--resume_checkpoint.min_interval_s=0",  # every 4 steps, however fast the steps
    "--model.adapter.dropout=0.1",
]


def subprocess_env() -> dict[str, str]:
    """This environment without MLflow settings, with the repository first on the import path (and what was
    there after it: packages installed with --target, as on the GPU tier's machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def fit(cwd: Path, experiment: str, *extra: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    args = [
        sys.executable,
        "-m",
        "cgc_lightning",
        "fit",
        *COMMON,
        f"--trainer.logger.init_args.experiment_name={experiment}",
        *extra,
    ]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, packing):
    from mlflow import MlflowClient

    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    # packed batches hold as many examples as fit: the checkpoint counts examples, and resuming packs the same rows
    data = ["--data.packing=true", "--data.batch_size=2", "--data.max_length=64"] if packing else []
    whole = fit(tmp_path, "whole", *data)
    assert whole.returncode == 0, whole.stderr[-3000:]
    crash = ["--trainer.callbacks+=tests.crash.SigkillAt", "--trainer.callbacks.step=10"]
    killed = fit(tmp_path, "crash", *data, *crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = fit(tmp_path, "crash", *data, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = {}
    for name in ("whole", "crash"):
        found = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert len(found) == 1, f"{name}: the resumed fit continues its run, it does not start another"
        runs[name] = found[0]
    assert runs["crash"].info.status == "FINISHED"

    def history(run, key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    for key in ("train/loss", "train/plausible/loss", "val/avg/score", "val/plausible/loss"):
        a, b = history(runs["whole"], key), history(runs["crash"], key)
        steps = [s for s, _ in b]
        assert steps == sorted(set(steps)), f"{key}: no repeated steps"
        assert [s for s, _ in a] == steps, f"{key}: no gaps"
        assert torch.allclose(torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]), rtol=1e-5), key
    assert len(history(runs["crash"], "train/loss")) == 12

    def weights(run):
        ckpt = next(tmp_path.glob(f"outputs/*/{run.info.run_id}/checkpoints/last.ckpt"))
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] == 12
        return state["state_dict"]

    a, b = weights(runs["whole"]), weights(runs["crash"])
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


TWO_GPUS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]


@pytest.mark.slow
@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=TWO_GPUS)])
def test_ddp_sigkill_then_resume_matches_an_uninterrupted_ddp_run(tmp_path, accelerator):
    """Two processes (gloo on the CPU, NCCL on 2 GPUs): a resume skips what both ranks consumed, not what one did."""
    from mlflow import MlflowClient

    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", "--grad_conflict.enabled=false"]
    ddp.append(f"--trainer.accelerator={accelerator}")
    # the same batches and RNG states; GPU kernels may sum in another order from one launch to the next
    rtol = 1e-5 if accelerator == "cpu" else 1e-4
    whole = fit(tmp_path, "whole", *ddp)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # at step 10 (after the last.ckpt of step 8) one rank hangs and the other waits for it in the next
    # all-reduce; then both die at once, as on a lost machine
    token = tmp_path / "hanging"
    env = subprocess_env()
    args = [sys.executable, "-m", "cgc_lightning", "fit", *COMMON, "--trainer.logger.init_args.experiment_name=crash"]
    args += [
        *ddp,
        "--trainer.callbacks+=tests.crash.HangAt",
        "--trainer.callbacks.step=10",
        f"--trainer.callbacks.token={token}",
    ]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + 500
        while not token.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert token.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = fit(tmp_path, "crash", *ddp, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = {
        name: client.search_runs([client.get_experiment_by_name(name).experiment_id]) for name in ("whole", "crash")
    }
    assert [len(r) for r in runs.values()] == [1, 1], "the resumed fit continues its run"
    whole_run, crash_run = runs["whole"][0], runs["crash"][0]
    assert crash_run.info.status == "FINISHED"
    for key in ("train/loss", "val/avg/score"):
        a = [(m.step, m.value) for m in client.get_metric_history(whole_run.info.run_id, key)]
        b = [(m.step, m.value) for m in client.get_metric_history(crash_run.info.run_id, key)]
        assert [s for s, _ in a] == [s for s, _ in b], f"{key}: the same steps, none repeated or missing"
        torch.testing.assert_close(torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]), rtol=rtol, atol=0)

    def weights(run):
        ckpt = next(tmp_path.glob(f"outputs/*/{run.info.run_id}/checkpoints/last.ckpt"))
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] == 12 and state["MultiTaskDataModule"]["world_size"] == 2
        return state["state_dict"]

    a, b = weights(whole_run), weights(crash_run)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=1e-7 if accelerator == "cpu" else 1e-6, msg=k)
