"""The CLI end to end: `fit` then `test` on the tiny config, read back from MLflow; every shipped config parses."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cgc_lightning.cli import CGCLightningCLI
from cgc_lightning.module import MultiTaskLoRAModule
from datamodules.multitask import MultiTaskDataModule

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.yaml"))


def workdir(tmp_path: Path) -> Path:
    """A fresh working directory that sees the repo's fixtures and configs under their relative paths."""
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    return tmp_path


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_fit_then_test_logs_everything_to_the_default_store(tmp_path):
    from mlflow import MlflowClient

    cwd = workdir(tmp_path)
    run_cli(cwd, "fit", "--config", "experiments/tiny.yaml")
    assert (cwd / "mlruns" / "mlflow.db").is_file()
    ckpts = sorted(cwd.glob("outputs/*/*/checkpoints/best.ckpt"))
    assert len(ckpts) == 1
    # the best checkpoint and one last.ckpt (two callbacks write it; no stale copy beside a last-v1.ckpt)
    assert sorted(p.name for p in ckpts[0].parent.iterdir()) == ["best.ckpt", "last.ckpt"]
    run_id = ckpts[0].parent.parent.name
    tested = run_cli(cwd, "test", "--config", "experiments/tiny.yaml", "--ckpt_path", str(ckpts[0])).stdout
    # one row per task and metric, not Lightning's every-metric-under-every-dataloader table
    assert "DataLoader 0" not in tested and "test results" in tested
    table = tested.split("test results", 1)[1].splitlines()
    for task, metric in [("plausible", "accuracy"), ("qa", "exact_match"), ("count", "f1")]:
        assert sum(line.split()[:2] == [task, metric] for line in table) == 1, tested[-2000:]

    client = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "test continues the fit run instead of starting another"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((cwd / "mlruns").resolve().as_uri())
    metrics = run.data.metrics
    for stage in ("val", "test"):
        for task, metric in [("plausible", "accuracy"), ("qa", "exact_match"), ("count", "f1")]:
            assert 0.0 <= metrics[f"{stage}/{task}/{metric}"] <= 1.0
            assert metrics[f"{stage}/{task}/loss"] > 0
        assert f"{stage}/avg/score" in metrics
    for task in ("plausible", "qa", "count"):
        assert len(client.get_metric_history(run_id, f"train/{task}/loss")) == 3  # logged every 2 of 6 steps
    assert len(client.get_metric_history(run_id, "val/avg/score")) == 2  # val_check_interval 3 of 6 steps

    params = run.data.params
    assert params["method"] == "cgc_lora" and "adapter.method" not in params, "the method is one param"
    assert (params["adapter.r"], params["adapter.num_shared"], params["adapter.num_specific"]) == ("4", "2", "1")
    assert params["optim.lr"] == "0.005" and params["seed"] == "7" and params["trainer.max_steps"] == "6"
    assert int(params["params.trainable"]) < int(params["params.total"])
    assert not any("/" in k for k in params), "only the stable dotted names, no duplicates from Lightning"
    tags = run.data.tags
    assert tags["method"] == "cgc_lora" and tags["seed"] == "7"
    assert tags["best_adapter.source"] == "best checkpoint"
    assert yaml.safe_load(tags["clusters"]) == {"judge": ["plausible", "qa"], "count": ["count"]}
    assert len(tags["git_commit"].split("-")[0]) == 40 or tags["git_commit"] == "unknown"

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "config_test.yaml", "best_adapter"} <= artifacts
    config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["model"]["adapter"]["r"] == 4 and config["data"]["clusters"] == ["judge", "count"]
    assert {a.path for a in client.list_artifacts(run_id, "best_adapter")} == {
        "best_adapter/adapter_config.json",
        "best_adapter/adapter_model.safetensors",
    }

    # the best adapter reloads onto a fresh base model and reproduces the checkpoint's weights
    import torch

    from cgc_lightning.export import load_adapter
    from cgc_lightning.hf import ModelSpec, load_model

    adapter_dir = client.download_artifacts(run_id, "best_adapter", str(tmp_path))
    model = load_model(ModelSpec(name_or_path=str(ROOT / "tests/fixtures/tiny-llama"), random_init=True))
    load_adapter(model, adapter_dir)
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)["state_dict"]
    ours = dict(model.named_parameters())
    assert state and all(torch.equal(ours[k.removeprefix("model.")], v) for k, v in state.items())


def test_print_config_and_bad_keys(tmp_path):
    cwd = workdir(tmp_path)
    out = run_cli(cwd, "fit", "--config", "experiments/tiny.yaml", "--print_config").stdout
    printed = yaml.safe_load(out)
    assert printed["model"]["adapter"]["method"] == "cgc_lora"
    assert printed["checkpoint"]["monitor"] == "val/avg/score"

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for bad, expected in [
        ("--model.adapter.rank=4", "rank"),
        ("--model.adapter.method=lora2", "lora2"),
        ("--data.sampling=zipf", "zipf"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "cgc_lightning", "fit", "--config", "experiments/tiny.yaml", bad],
            cwd=cwd,
            env=env | {"PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode != 0
        assert expected in proc.stderr, proc.stderr[-2000:]
        assert not (cwd / "outputs").exists(), "nothing ran"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("--model.adapter.r=0", "error: model.adapter: r must be a positive integer, got r=0"),
        ("--model.adapter.num_specific=0 --model.adapter.num_shared=0", "error: model.adapter: cgc_lora needs"),
        ("--model.lr=-0.001", "error: model: lr must be positive, got lr=-0.001"),
        ("--model.warmup_ratio=1", "error: model: warmup_ratio must be in [0, 1)"),
    ],
)
def test_a_bad_value_is_one_line_naming_it_before_anything_is_written(tmp_path, bad, message):
    cwd = workdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", "fit", "--config", "experiments/tiny.yaml", *bad.split()],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
    assert "experiments/tiny.yaml" in errors[0] and "Traceback" not in proc.stderr
    assert not (cwd / "outputs").exists() and not (cwd / "mlruns").exists(), "no checkpoint folder, no MLflow run"


class ParseOnlyCLI(CGCLightningCLI):
    def instantiate_classes(self) -> None:  # parse and validate the config; build nothing
        pass


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_config_parses(path, tmp_path):
    cli = ParseOnlyCLI(MultiTaskLoRAModule, MultiTaskDataModule, run=False, args=["--config", str(path)])
    cfg = cli.config
    assert cfg.model.adapter.method and cfg.data.tasks, path
    if "tests/fixtures" in cfg.model.model.name_or_path:  # small enough to build here
        cwd = Path.cwd()
        os.chdir(ROOT)
        try:
            built = CGCLightningCLI(
                MultiTaskLoRAModule,
                MultiTaskDataModule,
                run=False,
                args=["--config", str(path), f"--data.cache_dir={tmp_path}/cache", "--trainer.logger=false"],
            )
        finally:
            os.chdir(cwd)
        assert built.model.layout.tasks == tuple(built.datamodule.task_names)


@pytest.mark.parametrize("method", ["cgc_lora", "moelora", "joint_lora", "independent_lora", "modula_res"])
def test_run_params_list_only_the_fields_the_method_reads(method):
    from cgc_lightning.config import AdapterConfig
    from cgc_lightning.tracking import run_params

    adapter = dataclasses.asdict(AdapterConfig(method=method))
    params = run_params({"model": {"adapter": adapter}, "seed_everything": 1})
    logged = {k.removeprefix("adapter.") for k in params if k.startswith("adapter.")}
    expected = {
        "cgc_lora": {"num_shared", "num_specific", "gate_input"},
        "moelora": {"num_experts", "split_rank", "gate_dim"},
        "joint_lora": set(),
        "independent_lora": set(),
        "modula_res": {"stage", "num_universal", "load_balance_coef"},
    }[method]
    # the common fields that have a value (None-valued ones are not logged), then the method's own; the method is
    # the one param `method`, not `adapter.method` as well
    assert logged == {"target_modules", "r", "alpha", "dropout", "rslora", "exclude_modules"} | expected
    assert params["method"] == method


def test_a_cli_called_with_its_arguments_does_not_warn_about_the_callers_command_line(monkeypatch, capsys):
    """Grid points, stages and compare's methods call the CLI with their own arguments from a process whose
    command line is theirs (``grid --point ...``): Lightning warned in every such log that both were given."""
    import warnings

    from cgc_lightning import cli

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["cgc_lightning", "grid", "--point", "abc123"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            cli.main(["fit", "--config", "experiments/tiny.yaml", "--print_config"])
    assert "model:" in capsys.readouterr().out
    assert not [w for w in caught if "args parameter" in str(w.message)]
