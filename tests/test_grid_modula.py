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


def test_a_stage_after_one_that_trains_again_starts_over_whatever_it_kept(tmp_path):
    """An earlier stage without a usable checkpoint trains again, so a later stage's "done" or "resume" is stale."""
    import zipfile

    from cgc_lightning.chain import StageRun, run_chain

    def folder(name: str, *ckpts: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        for c in ckpts:
            with zipfile.ZipFile(path / c, "w") as z:
                z.writestr("x", "x")
        return path

    runs = {"universal": StageRun("u", folder("u"), "new"), "domain": StageRun("d", folder("d", "best.ckpt"), "done")}
    point = StageRun("p", folder("p", "last.ckpt"), "resume")
    fits = []

    def fit(args):
        fits.append(args)
        stage = next(a.split("=")[1] for a in args if a.startswith("--model.adapter.stage="))
        with zipfile.ZipFile(({**runs, "router": point})[stage].folder / "best.ckpt", "w") as z:
            z.writestr("x", "x")

    run_chain(fit, [], 9, None, None, runs.__getitem__, point)
    assert [next(a for a in f if a.startswith("--model.adapter.stage=")) for f in fits] == [
        "--model.adapter.stage=universal", "--model.adapter.stage=domain", "--model.adapter.stage=router",
    ]  # fmt: skip
    assert not any("--ckpt_path" in f for f in fits), "nothing resumes from what predates the retrained stage"
    assert f"--model.adapter.init_adapter={tmp_path / 'u' / 'best.ckpt'}" in fits[1]

    fits.clear()  # and with the earlier stages done, the cut-off router stage resumes
    runs = {s: StageRun(s, tmp_path / s[0], "done") for s in ("universal", "domain")}
    run_chain(fit, [], 9, None, None, runs.__getitem__, point)
    assert len(fits) == 1 and "--model.adapter.stage=router" in fits[0] and "--ckpt_path" in fits[0]


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
def test_a_modula_point_killed_in_its_domain_stage_continues_where_it_stopped(tmp_path):
    """Kill a grid while its MoDULA point hangs in the domain stage (after a checkpoint); run it again: the
    universal stage is not trained again, the domain stage resumes in its own run, the router stage follows."""
    import signal
    import time

    from mlflow import MlflowClient

    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    token = tmp_path / "hanging_run"
    config = yaml.safe_load((ROOT / "experiments/grids/tiny.yaml").read_text())
    config["overrides"] |= {
        "trainer.max_steps": 12,
        "trainer.val_check_interval": 2,
        "trainer.log_every_n_steps": 1,
        "trainer.callbacks": [
            {"class_path": "tests.crash.HangAt", "init_args": {"step": 3, "token": str(token), "stage": "domain"}}
        ],
    }
    config["axes"] = {"model.adapter.method": ["modula_res"]}
    config.pop("reference", None)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(config))  # stages of 4 steps each, a checkpoint every 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cgc_lightning", "grid", "--config", "grid.yaml"]
    with open(tmp_path / "first.out", "w") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 600
        while not token.is_file() and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
            time.sleep(0.2)
        assert token.is_file(), (tmp_path / "first.out").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the grid and its point, as a lost machine would
        proc.wait()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tiny-grid").experiment_id

    def stage_runs() -> dict:
        runs = client.search_runs([exp], "tags.`grid.modula_stage` != ''")
        return {r.data.tags["grid.modula_stage"]: r for r in runs}

    before = stage_runs()
    assert before["universal"].info.status == "FINISHED" and before["domain"].info.status == "RUNNING"
    assert token.read_text() == before["domain"].info.run_id
    (cut,) = tmp_path.glob(f"outputs/*/{before['domain'].info.run_id}/checkpoints/last.ckpt")

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    (point,) = client.search_runs([exp], "tags.`grid.role` = 'point'")
    assert point.info.status == "FINISHED" and "test/avg/score" in point.data.metrics
    after = stage_runs()
    assert {s: r.info.run_id for s, r in after.items()} == {s: r.info.run_id for s, r in before.items()}, (
        "each earlier stage kept its own run"
    )
    assert all(r.info.status == "FINISHED" for r in after.values())
    assert all(r.data.tags["mlflow.parentRunId"] == point.info.run_id for r in after.values()), "nested under the point"

    def steps(run_id: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))

    assert steps(after["universal"].info.run_id) == [0, 1, 2, 3], "the finished universal stage was not trained again"
    assert steps(after["domain"].info.run_id) == [0, 1, 2, 3], "the domain stage resumed, no step logged twice"
    assert steps(point.info.run_id) == [0, 1, 2, 3], "the router stage in the point's run"


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
