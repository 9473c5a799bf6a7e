"""A MoDULA grid point trains MoDULA's three stages (universal, domain, router) as one point (cgc_lightning.chain)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cgc_lightning.chain import is_chain, stage_steps

ROOT = Path(__file__).resolve().parents[1]


def test_the_step_budget_is_shared_out_over_the_stages():
    assert stage_steps(9, None) == {"universal": 3, "domain": 3, "router": 3}
    assert stage_steps(6, {"universal": 2, "domain": 1, "router": 1}) == {"universal": 3, "domain": 1, "router": 2}
    assert sum(stage_steps(100, {"universal": 0.5, "domain": 0.3, "router": 0.2}).values()) == 100
    with pytest.raises(ValueError, match="positive share to each of"):
        stage_steps(9, {"universal": 1, "domain": 1})
    with pytest.raises(ValueError, match="max_steps >= 3"):
        stage_steps(2, None)


def test_only_modula_left_at_the_joint_default_is_a_chain():
    assert is_chain({"model": {"adapter": {"method": "modula_res"}}})
    assert is_chain({"model": {"adapter": {"method": "modula_flan", "stage": "joint"}}})
    assert not is_chain({"model": {"adapter": {"method": "modula_res", "stage": "router"}}})
    assert not is_chain({"model": {"adapter": {"method": "cgc_lora"}}})


@pytest.mark.slow
def test_a_modula_point_runs_three_stages_and_reports_like_any_other(tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    config = yaml.safe_load((ROOT / "experiments/grids/tiny.yaml").read_text())
    config["overrides"] |= {"trainer.max_steps": 6, "trainer.log_every_n_steps": 1}
    config["axes"] = {"model.adapter.method": ["modula_res", "joint_lora"]}
    config["reference"] = {"model.adapter.method": "joint_lora"}
    config["modula_stages"] = {"universal": 2, "domain": 1, "router": 1}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", "grid", "--config", "grid.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tiny-grid").experiment_id
    points = {
        r.data.tags["grid.model.adapter.method"]: r for r in client.search_runs([exp], "tags.`grid.role` = 'point'")
    }
    assert set(points) == {"modula_res", "joint_lora"} and all(r.info.status == "FINISHED" for r in points.values())
    modula = points["modula_res"]
    stages = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{modula.info.run_id}'")
    assert sorted(r.data.tags["grid.modula_stage"] for r in stages) == ["domain", "universal"]

    def steps(run) -> int:
        return len(client.get_metric_history(run.info.run_id, "train/loss"))

    assert {r.data.tags["grid.modula_stage"]: steps(r) for r in stages} == {"universal": 3, "domain": 1}
    assert steps(modula) == 2, "the router stage trained in the point's own run"
    assert modula.data.params["adapter.stage"] == "router"
    # reported like any other point: test metrics on the point's run, and a Δm against the reference
    assert "test/avg/score" in modula.data.metrics
    assert "modula_res" in proc.stdout and "joint_lora" in proc.stdout


@pytest.mark.slow
def test_a_modula_method_in_compare_runs_three_stages(tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    config = {
        "base": "experiments/tiny.yaml",
        "methods": ["modula_res", "joint_lora"],
        "reference": "joint_lora",
        "experiment_name": "modula-compare",
        "overrides": {
            "trainer": {"max_steps": 6, "val_check_interval": 2, "log_every_n_steps": 1},
            "seesaw": {"enabled": False},
            "grad_conflict": {"enabled": False},
        },
    }
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", "compare", "--config", "compare.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("modula-compare").experiment_id
    methods = {r.data.tags["compare.method"]: r for r in client.search_runs([exp], "tags.`compare.method` != ''")}
    assert set(methods) == {"modula_res", "joint_lora"}, "the stage runs are not methods of the comparison"
    modula = methods["modula_res"]
    stages = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{modula.info.run_id}'")
    assert {
        r.data.tags["grid.modula_stage"]: len(client.get_metric_history(r.info.run_id, "train/loss")) for r in stages
    } == {
        "universal": 2,
        "domain": 2,
    }
    assert len(client.get_metric_history(modula.info.run_id, "train/loss")) == 2
    assert modula.data.params["adapter.stage"] == "router" and "test/avg/score" in modula.data.metrics
    assert "modula_res" in proc.stdout and "negative transfer" in proc.stdout


def test_grid_report_puts_the_summary_on_the_parent_and_delta_m_on_each_point(tmp_path, capsys):
    """The parent run's metrics are each group's mean over seeds (the runs table shows them); each point run has
    its own Δm against the reference of its seed."""
    from cgc_lightning import grid
    from tests.test_grid import _fake_finished_run, _store, points_of

    points, _ = points_of(axes={"model.adapter.method": ["cgc_lora", "independent_lora"], "seed_everything": [1, 2]})
    cfg = grid.GridConfig(base="unused", experiment_name="summary-metrics")
    store = _store(tmp_path, cfg)
    parent = grid.parent_run(store, cfg)
    scores = {
        "cgc_lora": {"plausible": 0.6, "qa": 0.3, "count": 0.2},
        "independent_lora": {"plausible": 0.5, "qa": 0.2, "count": 0.4},
    }
    runs = {p.id: _fake_finished_run(store, parent, p, scores[p.values["model.adapter.method"]]) for p in points}
    grid.report(cfg, points, store, parent)
    metrics = store.client.get_run(parent).data.metrics
    delta = 100 * ((0.6 - 0.5) / 0.5 + (0.3 - 0.2) / 0.2 + (0.2 - 0.4) / 0.4) / 3
    assert metrics["grid/method:cgc_lora/avg"] == pytest.approx((0.6 + 0.3 + 0.2) / 3)
    assert metrics["grid/method:cgc_lora/delta_m"] == pytest.approx(delta)
    assert metrics["grid/method:independent_lora/delta_m"] == 0.0 and metrics["grid/method:cgc_lora/n"] == 2
    for p in points:
        want = delta if p.values["model.adapter.method"] == "cgc_lora" else 0.0
        assert store.client.get_run(runs[p.id]).data.metrics["grid/delta_m"] == pytest.approx(want)


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "studies").glob("*_study.yaml")), ids=lambda p: p.name)
def test_the_shipped_study_expands_to_every_method_and_seed_and_its_points_parse(path):
    from cgc_lightning import grid
    from tests.test_grid import _parse

    cfg, base, base_path = grid.load(path.relative_to(ROOT))
    points, _ = grid.expand(cfg, base)
    methods = {p.config["model"]["adapter"]["method"] for p in points}
    assert methods == {"cgc_lora", "moelora", "joint_lora", "independent_lora", "modula_res", "modula_flan"}
    assert len(points) == 18 and {grid.get_key(p.config, cfg.seed_key) for p in points} == {1, 2, 3}
    tasks = base["data"]["tasks"]
    assert len(tasks) >= 10 and len(base["data"]["clusters"]) >= 3
    assert {t.get("metric", "accuracy") for t in tasks} >= {"accuracy", "exact_match", "f1", "rouge_l", "bleu"}
    assert base["trainer"]["max_steps"] >= 1000 and base["data"]["max_test_examples"] >= 300
    for p in points:
        parsed = _parse(["--config", base_path, *p.args])
        assert parsed.model.adapter.method == p.config["model"]["adapter"]["method"]


def test_the_shipped_gate_rate_grid_sets_the_gates_rate_per_point():
    from cgc_lightning import grid
    from tests.test_grid import _parse

    cfg, base, base_path = grid.load("experiments/studies/gate_lr.yaml")
    points, _ = grid.expand(cfg, base)
    ratios = [_parse(["--config", base_path, *p.args]).model.gate_lr_ratio for p in points]
    assert sorted(ratios) == [1, 10, 100]
