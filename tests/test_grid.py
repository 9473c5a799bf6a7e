"""Grids: expansion and point identity, scheduling, finished-point detection, Δm summary; a killed grid resumes."""

from __future__ import annotations

import csv
import inspect
import io
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cgc_lightning import grid
from cgc_lightning.grid import GridConfig, expand, load, resolve

ROOT = Path(__file__).resolve().parents[1]
GRIDS = sorted((ROOT / "experiments" / "grids").glob("*.yaml"))
TINY = yaml.safe_load((ROOT / "experiments" / "tiny.yaml").read_text())


def points_of(base: dict = TINY, **spec):
    return expand(GridConfig(base="unused", **spec), base)


# ------------------------------------------------------------------------------------------- expansion


def test_product_in_declared_order_with_overrides_applied():
    points, notes = points_of(
        axes={"model.adapter.method": ["cgc_lora", "moelora"], "model.adapter.r": [2, 4, 8]},
        overrides={"trainer.max_steps": 3},
    )
    assert [(p.values["model.adapter.method"], p.values["model.adapter.r"]) for p in points] == [
        ("cgc_lora", 2), ("cgc_lora", 4), ("cgc_lora", 8), ("moelora", 2), ("moelora", 4), ("moelora", 8),
    ]  # fmt: skip
    assert notes == []
    p = points[4]
    assert p.config["model"]["adapter"] == {**TINY["model"]["adapter"], "method": "moelora", "r": 4}
    assert p.config["trainer"]["max_steps"] == 3 and p.config["data"] == TINY["data"]
    assert p.args == ["--trainer.max_steps=3", "--model.adapter.method=moelora", "--model.adapter.r=4"]
    assert TINY["model"]["adapter"]["r"] == 4, "the base is not modified"


def test_zip_columns_and_rows_move_keys_together():
    points, _ = points_of(
        axes={"seed_everything": [1, 2]},
        zip=[
            {"model.adapter.num_shared": [2, 0], "model.adapter.num_specific": [0, 2]},
            [{"model.adapter.method": "independent_lora"}, {"model.adapter.method": "moelora", "model.adapter.r": 8}],
        ],
    )
    got = [
        (p.values["seed_everything"], p.values["model.adapter.num_shared"], p.values["model.adapter.num_specific"],
         p.values["model.adapter.method"], p.values.get("model.adapter.r"))
        for p in points
    ]  # fmt: skip
    assert got == [
        (s, sh, sp, m, r) for s in (1, 2) for sh, sp in ((2, 0), (0, 2))
        for m, r in (("independent_lora", None), ("moelora", 8))
    ]  # fmt: skip
    assert all(p.config["model"]["adapter"]["r"] == (8 if p.values["model.adapter.method"] == "moelora" else 4)
               for p in points)  # fmt: skip


def test_exclusions_match_every_key_of_an_entry_by_value_or_name():
    points, notes = points_of(
        axes={
            "model.adapter.method": ["cgc_lora", "independent_lora"],
            "model.adapter.num_shared": {"S0": 0, "S2": 2},
            "seed_everything": [1, 2],
        },
        exclude=[
            {"model.adapter.method": "independent_lora", "model.adapter.num_shared": "S0"},
            {"model.adapter.num_shared": 2, "seed_everything": 2},
        ],  # fmt: skip
    )
    kept = {(p.values["model.adapter.method"], p.names["model.adapter.num_shared"], p.values["seed_everything"])
            for p in points}  # fmt: skip
    assert kept == {("cgc_lora", "S0", 1), ("cgc_lora", "S0", 2), ("cgc_lora", "S2", 1), ("independent_lora", "S2", 1)}
    assert notes == ["4 point(s) excluded"]


def test_bad_grids_are_rejected_naming_the_problem():
    with pytest.raises(ValueError, match="zip\\[0\\] needs lists of one length"):
        GridConfig(base="x", zip=[{"model.adapter.r": [1, 2], "model.adapter.alpha": [1.0]}])
    with pytest.raises(ValueError, match="'model.adapter.r' is in both axes and zip\\[0\\]"):
        GridConfig(base="x", axes={"model.adapter.r": [1]}, zip=[{"model.adapter.r": [2]}])
    with pytest.raises(ValueError, match="exclude\\[0\\] may only name axis keys"):
        GridConfig(base="x", axes={"model.adapter.r": [1]}, exclude=[{"model.adapter.alpha": 1}])
    with pytest.raises(ValueError, match="axis 'seed_everything' needs a non-empty list"):
        GridConfig(base="x", axes={"seed_everything": []})
    with pytest.raises(ValueError, match="'model.adapter.r.x': cannot go into 'x' of a int"):
        points_of(axes={"model.adapter.r.x": [1]})
    with pytest.raises(ValueError, match="'data.tasks.7.metric': '7' is not an index of a list of 3"):
        points_of(axes={"data.tasks.7.metric": ["f1"]})


def test_unknown_grid_keys_and_missing_base_are_errors(tmp_path):
    (tmp_path / "g.yaml").write_text("base: nowhere.yaml\naxis: {}\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['axis'\\]"):
        load(tmp_path / "g.yaml")
    (tmp_path / "g.yaml").write_text("base: nowhere.yaml\naxes: {seed_everything: [1]}\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load(tmp_path / "g.yaml")


# -------------------------------------------------------------------------------------------- identity


def test_point_identity_is_the_resolved_config_not_the_position():
    spec = {"axes": {"model.adapter.method": ["cgc_lora", "moelora"], "seed_everything": [1, 2]}}
    ids = {(p.values["model.adapter.method"], p.values["seed_everything"]): p.id for p in points_of(**spec)[0]}
    assert len(set(ids.values())) == 4

    reordered = {"axes": {"seed_everything": [2, 1], "model.adapter.method": ["moelora", "cgc_lora"]}}
    assert {(p.values["model.adapter.method"], p.values["seed_everything"]): p.id
            for p in points_of(**reordered)[0]} == ids  # fmt: skip
    grown = {"axes": {"model.adapter.method": ["cgc_lora", "joint_lora", "moelora"], "seed_everything": [1, 2, 3]}}
    assert set(ids.values()) < {p.id for p in points_of(**grown)[0]}
    as_zip = {"zip": [[{"model.adapter.method": m, "seed_everything": s} for m, s in ids]]}
    assert {p.id for p in points_of(**as_zip)[0]} == set(ids.values())
    # a value the base already has is no change; a base that trains differently is another point
    same = {"axes": {**spec["axes"], "model.adapter.r": [TINY["model"]["adapter"]["r"]]}}
    assert {p.id for p in points_of(**same)[0]} == set(ids.values())
    other_base = {**TINY, "trainer": {**TINY["trainer"], "max_steps": 7}}
    assert not {p.id for p in points_of(other_base, **spec)[0]} & set(ids.values())
    # the same base with other comments and layout is the same content
    text = (ROOT / "experiments" / "tiny.yaml").read_text()
    relaid = yaml.safe_load("# another comment\n" + yaml.safe_dump(yaml.safe_load(text), sort_keys=True))
    assert {p.id for p in points_of(relaid, **spec)[0]} == set(ids.values())


def test_two_axes_values_that_resolve_alike_run_once():
    points, notes = points_of(axes={"model.adapter.r": [4, 8], "model.adapter.alpha": [16.0, 16]})
    assert len(points) == 2 and len(notes) == 2 and "is the same config as" in notes[0]


# ----------------------------------------------------------------------------------- config surgery


def test_clusters_as_a_mapping_move_the_tasks_and_reach_the_cli():
    one = {"all": ["plausible", "qa", "count"]}
    three = {"p": ["plausible"], "q": ["qa"], "c": ["count"]}
    points, _ = points_of(axes={"data.clusters": {"one": one, "three": three}})
    assert [p.names["data.clusters"] for p in points] == ["one", "three"]
    cfg = points[1].config["data"]
    assert cfg["clusters"] == ["p", "q", "c"] and [t["cluster"] for t in cfg["tasks"]] == ["p", "q", "c"]
    assert [a.split("=", 1)[0] for a in points[1].args] == ["--data.clusters", "--data.tasks"]
    with pytest.raises(ValueError, match="missing \\['count'\\]"):
        resolve(TINY, {"data.clusters": {"all": ["plausible", "qa"]}})
    with pytest.raises(ValueError, match="'qa' is in both 'a' and 'b'"):
        resolve(TINY, {"data.clusters": {"a": ["plausible", "qa"], "b": ["qa", "count"]}})


def test_a_list_element_override_passes_the_whole_list():
    (p,), _ = points_of(axes={"data.tasks.2.metric": ["exact_match"]})
    assert [t["metric"] for t in p.config["data"]["tasks"]] == ["accuracy", "exact_match", "exact_match"]
    assert p.args == ["--data.tasks=" + __import__("json").dumps(p.config["data"]["tasks"])]


def test_class_path_sections_are_walked_through_init_args():
    base = {"trainer": {"logger": {"class_path": "cgc_lightning.tracking.MLflowLogger", "init_args": {}}}}
    config = resolve(base, {"trainer.logger.experiment_name": "x", "trainer.logger.init_args.run_name": "y"})
    assert config["trainer"]["logger"]["init_args"] == {"experiment_name": "x", "run_name": "y"}


def _parse(args: list[str], cwd: Path = ROOT):
    """The experiment config the real CLI parser makes of ``args`` (nothing is built)."""
    from cgc_lightning.cli import CGCLightningCLI
    from cgc_lightning.module import MultiTaskLoRAModule
    from datamodules.multitask import MultiTaskDataModule

    class ParseOnly(CGCLightningCLI):
        def instantiate_classes(self) -> None:
            pass

    old = Path.cwd()
    os.chdir(cwd)
    try:
        return ParseOnly(MultiTaskLoRAModule, MultiTaskDataModule, run=False, args=args).config
    finally:
        os.chdir(old)


def test_point_arguments_parse_to_the_resolved_config():
    """The grid's own resolution and the LightningCLI parser agree on what a point trains."""
    points, _ = points_of(
        axes={
            "data.clusters": {
                "two": {"j": ["plausible", "qa"], "c": ["count"]},
                "one": {"a": ["plausible", "qa", "count"]},
            },
            "seed_everything": [3],
        },  # fmt: skip
        zip=[{"model.adapter.method": ["cgc_lora", "moelora"], "model.adapter.r": [2, 8]}],
        overrides={"trainer.max_steps": 2, "data.tasks.1.prompt": "Q: {question}\nA:"},
    )
    for p in points:
        cfg = _parse(["--config", "experiments/tiny.yaml", *p.args])
        want = p.config
        assert cfg.seed_everything == want["seed_everything"] == 3
        assert cfg.trainer.max_steps == 2
        assert cfg.model.adapter.method == want["model"]["adapter"]["method"]
        assert cfg.model.adapter.r == want["model"]["adapter"]["r"]
        assert cfg.data.clusters == want["data"]["clusters"]
        assert [(t.name, t.cluster, t.prompt) for t in cfg.data.tasks] == [
            (t["name"], t["cluster"], t["prompt"]) for t in want["data"]["tasks"]
        ]


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_every_shipped_grid_expands_and_its_points_parse(path):
    cfg, base, base_path = load(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    points, _ = expand(cfg, base)
    assert points and len({p.id for p in points}) == len(points)
    seeds = {grid.get_key(p.config, cfg.seed_key) for p in points}
    refs = [p for p in points if all(grid.get_key(p.config, k) == v for k, v in (cfg.reference or {}).items())]
    assert not cfg.reference or {grid.get_key(p.config, cfg.seed_key) for p in refs} == seeds, "a baseline per seed"
    for p in points:
        cfg_ = _parse(["--config", base_path, *p.args])
        assert cfg_.model.adapter.method == p.config["model"]["adapter"]["method"]


# ------------------------------------------------------------------------------ store, scheduling, summary


def _store(tmp_path, cfg):
    return grid.open_store(cfg, TINY, f"sqlite:///{tmp_path}/mlflow.db")


def _fake_finished_run(store, parent, point, scores: dict[str, float], status="FINISHED"):
    """A child run as a finished point leaves it: tags, and a test metric per task."""
    from mlflow.entities import Metric

    client = store.client
    tags = {grid.PARENT_TAG: parent, grid.POINT_TAG: point.id, "tasks": "plausible,qa,count"}
    run = client.create_run(client.get_experiment_by_name(store.experiment_name).experiment_id, tags=tags)
    names = {"plausible": "accuracy", "qa": "exact_match", "count": "f1"}
    client.log_batch(run.info.run_id, metrics=[Metric(f"test/{t}/{names[t]}", v, 0, 0) for t, v in scores.items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _tiny_grid_store(tmp_path, monkeypatch):
    """The tiny grid's config, points, a store in ``tmp_path`` and the grid's parent run, run from ``tmp_path``."""
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    monkeypatch.chdir(tmp_path)
    cfg, base, base_path = load("experiments/grids/tiny.yaml")
    points, _ = expand(cfg, base)
    store = grid.open_store(cfg, base, f"sqlite:///{tmp_path}/mlflow.db")
    return cfg, base_path, points, store, grid.parent_run(store, cfg)


def test_finished_points_are_skipped_and_the_rest_emitted_for_a_scheduler(tmp_path, monkeypatch):
    cfg, _, points, store, parent = _tiny_grid_store(tmp_path, monkeypatch)
    assert grid.parent_run(store, cfg) == parent, "found again by the grid's name"
    scores = {"plausible": 0.5, "qa": 0.25, "count": 0.1}
    _fake_finished_run(store, parent, points[0], scores)
    _fake_finished_run(store, parent, points[1], {"plausible": 0.5}, status="FINISHED")  # test metrics missing
    _fake_finished_run(store, parent, points[2], scores, status="FAILED")
    runs = grid.child_runs(store, parent)
    assert [grid.finished(runs.get(p.id)) for p in points] == [True, False, False, False]

    shell = grid.emit("shell", "experiments/grids/tiny.yaml", cfg, points, store, parent)
    lines = shell.splitlines()
    assert [line.split("--point ")[1].split()[0] for line in lines] == [p.id for p in points[1:]]
    assert all(f"--parent {parent}" in line and line.startswith(f"cd {tmp_path} && ") for line in lines)
    slurm = grid.emit("slurm", "experiments/grids/tiny.yaml", cfg, points, store, parent)
    assert "#SBATCH --array=0-2" in slurm and f"POINTS=({' '.join(p.id for p in points[1:])})" in slurm
    assert '--point "${POINTS[$SLURM_ARRAY_TASK_ID]}"' in slurm


def test_a_point_between_its_fit_and_its_test_is_busy_while_its_owner_lives(tmp_path, monkeypatch):
    """A second grid on the same store used to test such a point again: ``fit`` ends the run FINISHED, and an owner
    was only believed while the run was RUNNING."""
    cfg, base_path, points, store, parent = _tiny_grid_store(tmp_path, monkeypatch)
    run_id = _fake_finished_run(store, parent, points[0], {"plausible": 0.5})  # fit done, test metrics missing
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.client.set_tag(run_id, grid.OWNER_TAG, f"{socket.gethostname()}:{owner.pid}")
        assert (
            grid.run_point(cfg, points[0], base_path, store, parent) == f"busy (pid {socket.gethostname()}:{owner.pid})"
        )
    finally:
        owner.kill()
        owner.wait()
    assert not grid.schedule._owner_alive(store.client.get_run(run_id)), "a dead owner: the point is interrupted"


def test_summary_delta_m_against_the_baseline_of_the_same_seed(tmp_path):
    points, _ = points_of(axes={"model.adapter.method": ["cgc_lora", "independent_lora"], "seed_everything": [1, 2]})
    cfg = GridConfig(base="unused", experiment_name="summary")
    store = _store(tmp_path, cfg)
    parent = grid.parent_run(store, cfg)
    by = {(p.values["model.adapter.method"], p.values["seed_everything"]): p for p in points}
    scores = {
        ("cgc_lora", 1): {"plausible": 0.6, "qa": 0.3, "count": 0.2},
        ("independent_lora", 1): {"plausible": 0.5, "qa": 0.2, "count": 0.4},
        ("cgc_lora", 2): {"plausible": 0.8, "qa": 0.2, "count": 0.5},
        ("independent_lora", 2): {"plausible": 0.4, "qa": 0.4, "count": 0.5},
    }
    for key, s in scores.items():
        _fake_finished_run(store, parent, by[key], s)
    s = grid.summarise(cfg, points, grid.child_runs(store, parent))
    # Δm by hand: mean over tasks of (M - M_ref) / M_ref, in percent
    d1 = 100 * ((0.6 - 0.5) / 0.5 + (0.3 - 0.2) / 0.2 + (0.2 - 0.4) / 0.4) / 3
    d2 = 100 * ((0.8 - 0.4) / 0.4 + (0.2 - 0.4) / 0.4 + 0) / 3
    rows = {(r["method"], r["seed"]): r for r in s.points}
    assert rows["cgc_lora", 1]["delta_m"] == pytest.approx(d1) and rows["cgc_lora", 2]["delta_m"] == pytest.approx(d2)
    assert (
        rows["independent_lora", 1]["delta_m"] == 0.0
        and rows["cgc_lora", 1]["reference"] == by["independent_lora", 1].id
    )
    assert rows["cgc_lora", 1]["avg"] == pytest.approx((0.6 + 0.3 + 0.2) / 3)

    groups = list(csv.DictReader(io.StringIO(grid.format_csv(s, per_point=False))))
    assert [g["method"] for g in groups] == ["cgc_lora", "independent_lora"] and groups[0]["n"] == "2"
    import statistics

    assert float(groups[0]["delta_m_mean"]) == pytest.approx((d1 + d2) / 2)
    assert float(groups[0]["delta_m_std"]) == pytest.approx(statistics.stdev([d1, d2]))
    assert float(groups[0]["plausible_mean"]) == pytest.approx(0.7)
    md = grid.format_markdown(s, cfg)
    assert f"{(d1 + d2) / 2:+.2f} ± {statistics.stdev([d1, d2]):.2f}" in md and "0.7000 ± 0.1414" in md


def test_summary_without_a_baseline_leaves_delta_m_empty(tmp_path):
    points, _ = points_of(axes={"model.adapter.r": [2, 4]})
    cfg = GridConfig(base="unused", experiment_name="nobase")
    store = _store(tmp_path, cfg)
    parent = grid.parent_run(store, cfg)
    _fake_finished_run(store, parent, points[0], {"plausible": 0.5, "qa": 0.5, "count": 0.5})
    _fake_finished_run(store, parent, points[1], {"plausible": 0.5, "count": 0.5})  # qa's test metric is missing
    s = grid.summarise(cfg, points, grid.child_runs(store, parent))
    assert [r["delta_m"] for r in s.points] == [None, None]
    assert [r["status"] for r in s.points] == ["FINISHED", "FINISHED (incomplete)"]
    assert grid.format_text(s).splitlines()[-1].split()[-1] == "-"


def test_jobs_run_at_once_one_point_per_gpu_until_a_peak_is_known(tmp_path, monkeypatch):
    """``--jobs 2`` keeps two point processes going, each pinned to a GPU of its own (these report no peak memory,
    so no GPU takes a second; packing by memory is tested in test_grid_gpus.py)."""
    from cgc_lightning import gpu_slots

    monkeypatch.chdir(tmp_path)
    points, _ = points_of(axes={"seed_everything": [1, 2, 3, 4, 5]})
    cfg = GridConfig(base="unused", name="sched", experiment_name="sched")
    store = _store(tmp_path, cfg)
    parent = grid.parent_run(store, cfg)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    script = (
        "import os, sys, time; t = time.time(); time.sleep(1.0); open(sys.argv[1], 'w').write("
        "f\"{os.environ.get('CUDA_VISIBLE_DEVICES')} {t} {time.time()} {os.environ['OMP_NUM_THREADS']}\")"
    )
    monkeypatch.setattr(
        grid.schedule,
        "point_command",
        lambda _c, p, _p, _u: [sys.executable, "-c", script, str(tmp_path / f"{p.id}.out")],
    )
    monkeypatch.setattr(gpu_slots, "query_gpus", lambda ids: dict.fromkeys(ids))
    assert not grid.run_grid("g.yaml", cfg, points, store, parent, jobs=2, gpus=["0", "1"])  # no test metrics
    out = [(tmp_path / f"{p.id}.out").read_text().split() for p in points]
    assert [o[0] for o in out[:2]] == ["0", "1"] and {o[0] for o in out} == {"0", "1"}
    assert {o[3] for o in out} == {str(max(1, (os.cpu_count() or 1) // 2))}, "the cores are shared out, not fought over"
    spans = [(float(a), float(b)) for _, a, b, _ in out]
    overlap = lambda t: sum(a <= t < b for a, b in spans)  # noqa: E731
    assert max(overlap(a) for a, _ in spans) == 2, "two at a time, never three"
    for (g, a, b), (h, c, d) in itertools.combinations([(o[0], float(o[1]), float(o[2])) for o in out], 2):
        assert g != h or b <= c or d <= a, "two points at once on one GPU"


def test_visible_gpus(monkeypatch):
    assert grid.visible_gpus("2, 3") == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert grid.visible_gpus(None) == ["4", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert grid.visible_gpus(None) == []


# ----------------------------------------------------------------------------------- end to end


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | {"PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_killed_grid_resumes_to_four_finished_runs(tmp_path):
    """Kill a ``--jobs 2`` grid (and its point processes) once a point finished and another is mid-fit; run it again."""
    from mlflow import MlflowClient

    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    # the shipped tiny grid with longer fits; one point hangs at step 6 (after its last.ckpt of step 4) until the
    # kill, so the kill always lands in the middle of a fit, however fast or busy the machine
    token = tmp_path / "hanging_run"
    config = yaml.safe_load((ROOT / "experiments" / "grids" / "tiny.yaml").read_text())
    config["overrides"] |= {
        "trainer.max_steps": 12,
        "trainer.val_check_interval": 4,
        "trainer.callbacks": [{"class_path": "tests.crash.HangAt", "init_args": {"step": 6, "token": str(token)}}],
    }
    (tmp_path / "slow_tiny.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "cgc_lightning", "grid", "--config", "slow_tiny.yaml", "--jobs", "2"]
    out = tmp_path / "first.out"
    with open(out, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 400
        # one point hangs mid-fit and another has finished: the moment a lost machine would leave behind
        while not (token.is_file() and " finished (" in out.read_text()) and time.time() < deadline:
            assert proc.poll() is None, f"the grid ended before it could be interrupted:\n{out.read_text()[-3000:]}"
            time.sleep(0.2)
        assert token.is_file() and " finished (" in out.read_text(), out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the grid and every point process, as a lost machine would
        proc.wait()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tiny-grid").experiment_id
    before = {r.info.run_id: r for r in client.search_runs([exp], "tags.`grid.role` = 'point'")}
    resumed_run = token.read_text()
    assert before[resumed_run].info.status == "RUNNING" and before[resumed_run].data.tags["grid.stage"] == "fit"
    (interrupted,) = tmp_path.glob(f"outputs/*/{resumed_run}/checkpoints/last.ckpt")
    done_before = {r.data.tags["grid.point_id"] for r in before.values() if grid.finished(r)}
    assert done_before, "at least one point finished before the kill"

    second = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for point in done_before:
        assert f"point {point} " in second.stdout and "skipped (finished" in second.stdout
    assert second.stdout.count(" running") == 4 - len(done_before)

    parent = client.search_runs([exp], "tags.`grid.role` = 'parent'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs), "exactly one run per point"
    assert len({r.data.tags["grid.point_id"] for r in runs}) == 4
    assert resumed_run in {r.info.run_id for r in runs}, "the interrupted point continued in its own run"
    log = (tmp_path / "outputs" / "grids" / "slow_tiny").glob("*.log")
    assert any(f"{resumed_run}/checkpoints/last.ckpt" in f.read_text() and "resumed and finished" in f.read_text()
               for f in log)  # fmt: skip

    from cgc_lightning.tracking import MLflowLogger

    dedup = "resume" in inspect.signature(MLflowLogger).parameters
    steps = None
    for r in runs:
        m = r.data.metrics
        for task, metric in [("plausible", "accuracy"), ("qa", "exact_match"), ("count", "f1")]:
            assert 0.0 <= m[f"test/{task}/{metric}"] <= 1.0 and m[f"test/{task}/loss"] > 0
        assert r.data.params["method"] == r.data.tags["grid.model.adapter.method"]
        assert not [k for k in r.data.params if k.startswith("grid.")], "axis values are tags, params are logged once"
        assert r.data.params["trainer.max_steps"] == "12"
        history = [h.step for h in client.get_metric_history(r.info.run_id, "val/avg/score")]
        steps = steps or sorted(set(history))
        assert len(steps) == 3 and sorted(set(history)) == steps, "validation after steps 4, 8 and 12, in every run"
        if dedup:
            assert len(history) == len(set(history)), f"run {r.info.run_id} logged a step twice: {history}"

    summary = client.download_artifacts(parent[0].info.run_id, "grid_points.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(summary).read_text())))
    assert sorted(r["point_id"] for r in rows) == sorted(r.data.tags["grid.point_id"] for r in runs)
    assert {r["method"]: r["delta_m"] != "" for r in rows} == {"cgc_lora": True, "independent_lora": True}
    assert "Δm %" in second.stdout and "cgc_lora" in second.stdout.split("Δm %")[1]


def test_rank_vs_experts_grid_spends_one_parameter_budget():
    """Every configuration of ``rank_vs_experts.yaml`` trains the same number of LoRA parameters (gates aside)."""
    from cgc_lightning.config import AdapterConfig, TaskLayout
    from cgc_lightning.inject import adapted_layers, inject_adapters
    from tests.conftest import tiny_model

    cfg, base, _ = load(ROOT / "experiments" / "grids" / "rank_vs_experts.yaml")
    points, _ = expand(cfg, base)
    counts = {}
    for p in [p for p in points if p.values["seed_everything"] == 1]:
        data = p.config["data"]
        layout = TaskLayout.from_clusters(
            {c: [t["name"] for t in data["tasks"] if t["cluster"] == c] for c in data["clusters"]},
            [t["name"] for t in data["tasks"]],
        )
        model = tiny_model("llama")
        inject_adapters(model, AdapterConfig(**p.config["model"]["adapter"]), layout)
        lora = sum(t.numel() for n, t in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("lora_"))
        budget = sum(64 * (layer.base_layer.in_features + layer.base_layer.out_features)
                     for _, layer in adapted_layers(model))  # fmt: skip
        counts[p.label()] = (lora, budget)
    assert len(counts) == 8 and all(lora == budget for lora, budget in counts.values()), counts
