"""Per-example test results as an MLflow table, gates with their own learning rate, and the uniform-gate warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cgc_lightning.callbacks.gates import distance_from_uniform
from cgc_lightning.config import AdapterConfig
from cgc_lightning.hf import ModelSpec
from cgc_lightning.metrics import TaskMetric
from cgc_lightning.module import MultiTaskLoRAModule

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "fixtures" / "tiny-llama")


def module(**kw) -> MultiTaskLoRAModule:
    return MultiTaskLoRAModule(
        ModelSpec(name_or_path=TINY, random_init=True),
        adapter=kw.pop("adapter", AdapterConfig(method="cgc_lora", r=2)),
        task_names=["a", "b"],
        **kw,
    )


def optimizer(m: MultiTaskLoRAModule):
    from types import SimpleNamespace

    m._trainer = SimpleNamespace(estimated_stepping_batches=10)
    return m.configure_optimizers()["optimizer"]


@pytest.mark.parametrize("method", ["cgc_lora", "moelora", "modula_res"])
def test_gates_and_routers_get_their_own_learning_rate_and_decay(method):
    m = module(adapter=AdapterConfig(method=method, r=2), lr=1e-3, weight_decay=0.01, gate_lr=5e-2, gate_weight_decay=0)
    groups = {g["name"]: g for g in optimizer(m).param_groups}
    ids = {id(p): n.rsplit(".", 1)[-1] for n, p in m.model.named_parameters()}
    assert {ids[id(p)].split("_")[0] for p in groups["gates"]["params"]} <= {"gate", "router"}
    assert groups["gates"]["params"] and all(ids[id(p)].startswith("lora_") for p in groups["experts"]["params"])
    assert groups["experts"]["initial_lr"] == 1e-3 and groups["experts"]["weight_decay"] == 0.01
    assert groups["gates"]["initial_lr"] == 5e-2 and groups["gates"]["weight_decay"] == 0
    # unset: gate_lr_ratio (default 10) times the experts' rate, and the experts' decay
    default = {g["name"]: g for g in optimizer(module(adapter=AdapterConfig(method=method, r=2), lr=1e-3)).param_groups}
    assert default["gates"]["initial_lr"] == pytest.approx(1e-2) and default["experts"]["initial_lr"] == 1e-3
    # gate_lr_ratio: 1 is the earlier behaviour, the experts' rate; an explicit gate_lr wins over the ratio
    old = module(adapter=AdapterConfig(method=method, r=2), lr=1e-3, gate_lr_ratio=1)
    assert {g["name"]: g["initial_lr"] for g in optimizer(old).param_groups} == {"experts": 1e-3, "gates": 1e-3}
    both = module(adapter=AdapterConfig(method=method, r=2), lr=1e-3, gate_lr=3e-3, gate_lr_ratio=100)
    assert {g["name"]: g["initial_lr"] for g in optimizer(both).param_groups}["gates"] == 3e-3


def test_methods_without_gates_have_one_group():
    groups = optimizer(module(adapter=AdapterConfig(method="joint_lora", r=2), gate_lr=1.0)).param_groups
    assert [g["name"] for g in groups] == ["experts"]


@pytest.mark.parametrize(
    "kw", [{"gate_lr": 0.0}, {"gate_lr": -1.0}, {"gate_weight_decay": -0.1}, {"gate_lr_ratio": 0.0}]
)
def test_bad_gate_optimizer_values_are_refused_by_name(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        module(**kw)


def test_distance_from_uniform_counts_only_the_experts_a_task_reaches():
    nan = float("nan")
    w = torch.tensor(
        [[[0.5, 0.5, nan], [1 / 3, 1 / 3, 1 / 3]], [[0.45, 0.55, nan], [nan, nan, nan]]]
    )  # (L=2, T=2, E=3)
    assert distance_from_uniform(w) == pytest.approx(0.05)
    assert distance_from_uniform(torch.full((1, 2, 3), 1 / 3)) == pytest.approx(0.0)
    assert distance_from_uniform(torch.tensor([[[0.9, 0.1]]])) == pytest.approx(0.4)


@pytest.mark.parametrize("name", ["accuracy", "exact_match", "f1", "rouge_l"])
def test_per_example_scores_average_to_the_task_metric(name):
    preds = ["the cat sat", "Paris", "two dogs", "", "yes."]
    refs = [["the cat sat down"], ["paris"], ["three dogs", "2 dogs"], ["nothing"], ["Yes"]]
    metric = TaskMetric(name)
    metric.update_texts(preds, refs)
    scores = metric.example_scores(preds, refs)
    assert len(scores) == 5 and all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) / len(scores) == pytest.approx(float(metric.compute()), abs=1e-6)


def fit_and_test(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    common = ["--config", "experiments/tiny.yaml", "--trainer.max_steps=4", "--trainer.val_check_interval=2", *args]
    out = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", "fit", *common], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (best,) = sorted(cwd.glob("outputs/*/*/checkpoints/best.ckpt"), key=lambda p: p.stat().st_mtime)[-1:]
    test = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", "test", *common, f"--ckpt_path={best}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert test.returncode == 0, test.stderr[-3000:]
    return out


@pytest.mark.slow
def test_test_logs_every_example_and_gates_that_do_not_move_are_flagged(tmp_path):
    from mlflow import MlflowClient

    from cgc_lightning.examples import load_examples

    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    still = fit_and_test(
        tmp_path, "--model.lr=1e-6", "--model.warmup_ratio=0", "--trainer.logger.init_args.experiment_name=a"
    )
    moving = fit_and_test(tmp_path, "--model.gate_lr=0.5", "--trainer.logger.init_args.experiment_name=b")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (a,), (b,) = (client.search_runs([client.get_experiment_by_name(n).experiment_id]) for n in ("a", "b"))

    # gates at lr 1e-6 stay uniform: warned once and tagged; at gate_lr 0.5 they move
    assert a.data.tags["gate.uniform"] == "true" and "gates have not learned" in still.stderr
    assert still.stderr.count("gates have not learned") == 1
    assert b.data.tags["gate.uniform"] == "false" and "gates have not learned" not in moving.stderr
    assert b.data.metrics["gate/max_from_uniform"] > 0.02 > a.data.metrics["gate/max_from_uniform"]

    rows_a, rows_b = load_examples(client, a.info.run_id), load_examples(client, b.info.run_id)
    assert rows_a and {(r["task"], r["example_id"]) for r in rows_a} == {(r["task"], r["example_id"]) for r in rows_b}
    for task, metric in (("plausible", "accuracy"), ("qa", "exact_match"), ("count", "f1")):
        scores = [r["score"] for r in rows_a if r["task"] == task]
        assert scores and all(0.0 <= s <= 1.0 for s in scores)
        assert sum(scores) / len(scores) == pytest.approx(a.data.metrics[f"test/{task}/{metric}"], abs=1e-5), task
    plausible = [r for r in rows_a if r["task"] == "plausible"]
    assert all(r["prediction"] and r["references"] for r in plausible), "the picked choice and the answer"
