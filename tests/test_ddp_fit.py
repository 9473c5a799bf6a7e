"""The real `fit` and `validate` under DDP (2 CPU processes, gloo) against one process with the same global batch.

* Training: one process at batch 2B and two at batch B see the same examples in every optimizer step (the
  sampler shards one global order), so the per-task training losses of the first step, which are summed over
  every rank's tokens, are equal; after training the two ranks' adapters are bitwise equal
  (``ddp/adapter_replica_max_diff`` = 0).
* Evaluation: each example is scored on one rank only (no padding by repetition), and the losses and metrics
  are gathered over the ranks, so `validate` of one checkpoint gives the same numbers on 1 and 2 processes,
  also with an odd number of examples per task.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"plausible": "accuracy", "qa": "exact_match", "count": "f1"}
COMMON = [
    "--config",
    "experiments/tiny.yaml",
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=4",
    "--trainer.log_every_n_steps=1",
    "--data.max_eval_examples=5",  # odd: Lightning's DistributedSampler would score one example twice
]
DDP = ["--trainer.devices=2", "--trainer.strategy=ddp"]


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_ddp_fit_and_validate_match_one_process_of_the_same_global_batch(tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    cli(tmp_path, "fit", *COMMON, "--data.batch_size=4", "--trainer.logger.init_args.experiment_name=one")
    cli(tmp_path, "fit", *COMMON, *DDP, "--data.batch_size=2", "--trainer.logger.init_args.experiment_name=two")

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (one,), (two,) = (client.search_runs([client.get_experiment_by_name(n).experiment_id]) for n in ("one", "two"))

    def history(run, key) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)]

    def steps(run, key) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    # every step holds the same examples, so the same tasks; the first step also the same weights, and its
    # per-task losses are summed over both ranks' tokens; later steps differ only in how the gradient
    # weighs the two ranks' token means (one process: one mean over all tokens)
    first = []
    for task in TASKS:
        a, b = steps(one, f"train/{task}/loss"), steps(two, f"train/{task}/loss")
        assert a and sorted(a) == sorted(b), task
        torch.testing.assert_close(list(b.values()), list(a.values()), rtol=2e-3, atol=0, msg=task)
        if 0 in a:
            torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=0, msg=task)
            first.append(task)
    assert first, "some task is in the first batch"
    # later steps differ only in how the two ranks' token means are weighted: close, not equal
    torch.testing.assert_close(history(two, "val/avg/loss")[-1], history(one, "val/avg/loss")[-1], rtol=0.05, atol=0)
    assert history(two, "ddp/adapter_replica_max_diff") == [0.0]
    assert not history(one, "ddp/adapter_replica_max_diff"), "one process: nothing to compare"

    # one checkpoint validated by 1 and by 2 processes: the same numbers (both log into the fit's run)
    (best,) = tmp_path.glob(f"outputs/*/{one.info.run_id}/checkpoints/best.ckpt")
    cli(tmp_path, "validate", *COMMON, "--data.batch_size=4", f"--ckpt_path={best}")
    cli(tmp_path, "validate", *COMMON, *DDP, "--data.batch_size=2", f"--ckpt_path={best}")
    for task, metric in TASKS.items():
        for key in (f"val/{task}/loss", f"val/{task}/{metric}"):
            *_, single, double = history(one, key)
            torch.testing.assert_close(double, single, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cgc_lora", "moelora", "independent_lora", "modula_res"])
def test_ddp_static_trains_every_method_with_equal_replicas(tmp_path, method):
    """``trainer.strategy: ddp_static`` (gradient_as_bucket_view + static_graph, cgc_lightning.strategies): DDP
    accepts every method's graph as static, and the ranks' adapters stay equal."""
    from mlflow import MlflowClient

    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    args = ["--trainer.devices=2", "--trainer.strategy=ddp_static", "--data.batch_size=2"]
    cli(tmp_path, "fit", *COMMON, *args, f"--model.adapter.method={method}")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.metrics["ddp/adapter_replica_max_diff"] == 0.0
    assert len(client.get_metric_history(found.info.run_id, "train/loss")) == 4
