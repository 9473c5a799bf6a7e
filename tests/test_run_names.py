"""Run names say what a run trains (method, grid axes, seed) and are unique, without touching the seeded RNGs.

MLflow names an unnamed run from Python's ``random``, which ``seed_everything`` seeds: every run of one seed got the
same name. Our runs are always created with a name whose suffix comes from ``os.urandom``.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cgc_lightning.compare import child_config
from cgc_lightning.grid import RUN_NAME_CHARS, GridConfig, expand, point_run_name
from cgc_lightning.tracking import MLflowLogger, unique_run_name

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "experiments" / "tiny.yaml").read_text())
SUFFIX = re.compile(r" [0-9a-f]{6}$")


# ------------------------------------------------------------------------------------------ fit, through the CLI

#: Two training steps and one short validation: the run and its name, little else.
QUICK = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--data.max_eval_examples=4",
    "--model.max_new_tokens=2",
    "--seesaw.enabled=false",
    "--grad_conflict.enabled=false",
    "--gate_usage.enabled=false",
]


def fit(cwd: Path, *extra: str) -> None:
    """``fit`` of the tiny experiment (seed 7) in a fresh process, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "cgc_lightning", "fit", "--config", "experiments/tiny.yaml", *QUICK, *extra]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_fits_of_one_seed_get_distinct_names_that_say_method_and_seed(tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    fit(tmp_path, "--trainer.logger.init_args.experiment_name=a")  # cgc_lora, seed 7
    fit(tmp_path, "--trainer.logger.init_args.experiment_name=a", "--model.adapter.method=independent_lora")
    fit(tmp_path, "--trainer.logger.init_args.experiment_name=a")  # the same config again
    fit(tmp_path, "--trainer.logger.init_args.experiment_name=b", "--trainer.logger.init_args.run_name=foo")

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("a").experiment_id], order_by=["attributes.start_time"])
    names = [r.info.run_name for r in runs]
    assert len(names) == 3 and len(set(names)) == 3, names
    for run, method in zip(runs, ["cgc_lora", "independent_lora", "cgc_lora"], strict=True):
        name = run.info.run_name
        assert name.startswith(f"{method} seed=7 ") and SUFFIX.search(name), name
        assert run.data.tags["mlflow.runName"] == name and run.data.tags["seed"] == "7"
    (given,) = client.search_runs([client.get_experiment_by_name("b").experiment_id])
    assert given.info.run_name == "foo", "a name the user gives is kept"


# ---------------------------------------------------------------------------------------------------- the logger


def test_logger_names_a_new_run_once_and_never_a_given_or_continued_one(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def logger(**kw) -> MLflowLogger:
        return MLflowLogger(experiment_name="names", tracking_uri=uri, checkpoint_dir=str(tmp_path), **kw)

    early = logger()
    run_id = early.run_id  # created before the config is known, as Lightning's setup does
    placeholder = early.experiment.get_run(run_id).info.run_name
    assert placeholder.startswith("run ") and SUFFIX.search(placeholder)
    early.describe("cgc_lora seed=7")
    renamed = early.experiment.get_run(run_id).info.run_name
    assert renamed.startswith("cgc_lora seed=7 ") and SUFFIX.search(renamed)
    early.describe("moelora seed=1")
    assert early.experiment.get_run(run_id).info.run_name == renamed, "named once"

    late = logger()
    late.describe("joint_lora seed=3")  # before the run exists: created under this name
    assert late.experiment.get_run(late.run_id).info.run_name.startswith("joint_lora seed=3 ")

    given = logger(run_name="foo")
    given.describe("cgc_lora seed=7")
    assert given.experiment.get_run(given.run_id).info.run_name == "foo"
    continued = logger(run_id=run_id)  # test/validate of a trained run, a resumed fit, a grid point
    continued.describe("cgc_lora seed=7 test")
    assert continued.experiment.get_run(run_id).info.run_name == renamed


def _states() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0], "random"
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:], "numpy"
    assert torch.equal(a[2], b[2]), "torch"


def test_naming_runs_leaves_the_seeded_generators_alone(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("rng")
    # the check can see a draw: MLflow's own name for an unnamed run comes from `random` (the bug's cause)
    random.seed(7)
    before = random.getstate()
    client.create_run(exp)
    assert random.getstate() != before

    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    before = _states()
    logger = MLflowLogger(experiment_name="rng", tracking_uri=uri, checkpoint_dir=str(tmp_path))
    logger.describe("cgc_lora seed=7")
    run = logger.experiment.get_run(logger.run_id)
    (point,), _ = expand(GridConfig(base="unused", axes={"model.adapter.r": [8]}), TINY)
    point_run_name(GridConfig(base="unused"), point)
    _assert_same(_states(), before)
    assert run.info.run_name.startswith("cgc_lora seed=7 ")

    # nor does the name follow the seed: the same seed twice gives two names
    random.seed(7)
    first = unique_run_name("cgc_lora", "seed=7")
    random.seed(7)
    assert unique_run_name("cgc_lora", "seed=7") != first


# ------------------------------------------------------------------------------------------- grid, compare, stages


def test_grid_point_names_show_method_every_axis_and_the_seed():
    axes = {
        "model.adapter.method": ["cgc_lora", "independent_lora"],
        "model.adapter.r": [4, 8],
        "seed_everything": [1, 2],
    }
    cfg = GridConfig(base="unused", axes=axes)
    points, _ = expand(cfg, TINY)
    names = [point_run_name(cfg, p) for p in points]
    assert len(set(names)) == len(points) == 8
    for p, name in zip(points, names, strict=True):
        method, r, seed = (p.values[k] for k in axes)
        assert name.startswith(f"{method} r={r} seed={seed} ") and SUFFIX.search(name), name
    assert point_run_name(cfg, points[0]) != names[0], "the same point twice: two names"

    # a long value without a display name: the axes are cut short, the stage and the seed (from the base) are not
    long = {"data.clusters": [{"judge": ["plausible", "qa"], "count": ["count"]}], "model.adapter.num_shared": [2]}
    cfg = GridConfig(base="unused", axes=long)
    (p,), _ = expand(cfg, TINY)
    name = point_run_name(cfg, p, "stage=universal")
    assert len(name) <= RUN_NAME_CHARS and name.startswith("cgc_lora clusters={judge")
    assert "... stage=universal seed=7 " in name and SUFFIX.search(name), name


def test_compare_children_are_named_by_method_and_seed():
    adapter = {**TINY["model"]["adapter"], "method": "cgc_lora", "gate_input": "token"}
    names = [
        child_config(TINY, adapter, name="cgc_token", experiment="e", tracking_uri="u", parent="p")["trainer"][
            "logger"
        ]["init_args"]["run_name"]
        for _ in range(2)
    ]
    assert all(n.startswith("cgc_token seed=7 ") and SUFFIX.search(n) for n in names) and names[0] != names[1]
