"""Staged training end to end: MoDULA's three stages chained on the tiny config, then a domain added, read back
from MLflow; every shipped stages config parses."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cgc_lightning.cli import CGCLightningCLI
from cgc_lightning.module import MultiTaskLoRAModule
from cgc_lightning.stages import StageSpec, load_config, stage_config
from datamodules.multitask import MultiTaskDataModule
from tests.test_cli import run_cli, workdir

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = sorted((ROOT / "experiments" / "stages").glob("*.yaml"))


class ParseOnlyCLI(CGCLightningCLI):
    def instantiate_classes(self) -> None:  # parse and validate the config; build nothing
        pass


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=[p.name for p in STAGE_CONFIGS])
def test_every_stages_config_parses(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg, base = load_config(path, init_adapter="runs:/0123/best_adapter" if "add_domain" in path.name else None)
    assert cfg.stages
    for spec in cfg.stages:
        config = stage_config(
            base,
            spec,
            init_adapter="some/adapter",
            experiment="x",
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
            run_name="x",
            tags={},
        )
        file = tmp_path / f"{spec.name}.yaml"
        file.write_text(yaml.safe_dump(config))
        parsed = ParseOnlyCLI(MultiTaskLoRAModule, MultiTaskDataModule, run=False, args=["--config", str(file)]).config
        assert parsed.model.adapter.stage == spec.stage
        assert parsed.model.adapter.method.startswith("modula_")
        assert parsed.model.adapter.init_adapter == "some/adapter"
        assert any(c.class_path.endswith("stages.StageTimer") for c in parsed.trainer.callbacks)


def test_stages_config_errors(tmp_path):
    def write(**raw):
        file = tmp_path / "s.yaml"
        file.write_text(yaml.safe_dump({"base": "experiments/tiny.yaml", **raw}))
        return file

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stage'\]; a stages config has"):
        load_config(write(stage="universal", stages=[{"stage": "universal"}]))
    with pytest.raises(ValueError, match=r"stage 0: unknown key\(s\) \['steps'\]"):
        load_config(write(stages=[{"stage": "universal", "steps": 3}]))
    with pytest.raises(ValueError, match="unknown stage 'final'"):
        load_config(write(stages=[{"stage": "final"}]))
    with pytest.raises(ValueError, match="the first stage is 'domain'.*set init_adapter"):
        load_config(write(stages=[{"stage": "domain"}, {"stage": "router"}]))
    with pytest.raises(ValueError, match=r"stage names must be unique; repeated: \['router'\]"):
        load_config(write(stages=[{"stage": "universal"}, {"stage": "router"}, {"stage": "router"}]))
    with pytest.raises(FileNotFoundError, match="base config 'nope.yaml' not found"):
        load_config(write(base="nope.yaml", stages=[{"stage": "universal"}]))
    with pytest.raises(ValueError, match="stages needs the MLflow logger"):
        base = {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger"}}}
        stage_config(
            base,
            StageSpec("universal"),
            init_adapter=None,
            experiment="x",
            tracking_uri="sqlite:///x.db",
            run_name="x",
            tags={},
        )


#: The tiny experiment, shortened: each stage is two training steps and one validation, diagnostics without figures.
QUICK = {
    "trainer": {"max_steps": 2, "val_check_interval": 2, "num_sanity_val_steps": 0},
    "model": {"max_new_tokens": 2},
    "data": {"max_eval_examples": 4},
    "seesaw": {"plot": False},
    "grad_conflict": {"plot": False},
    "gate_usage": {"plot": False},
}


def quick(cwd: Path, name: str, shipped: str, **extra) -> Path:
    """A copy of a shipped stages config with the quick settings merged into its overrides."""
    raw = yaml.safe_load((ROOT / "experiments" / "stages" / shipped).read_text())
    overrides = raw.setdefault("overrides", {})
    for key, value in QUICK.items():
        overrides[key] = {**overrides.get(key, {}), **value}
    raw.update(extra)
    path = cwd / name
    path.write_text(yaml.safe_dump(raw))
    return path


def experts(client, run_id: str, dst: Path) -> dict[str, torch.Tensor]:
    """The run's best adapter tensors, ``{name: tensor}``."""
    folder = client.download_artifacts(run_id, "best_adapter", str(dst))
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


@pytest.mark.slow
def test_three_stages_then_a_new_domain_read_back_from_mlflow(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from cgc_lightning.stages import main as stages

    cwd = workdir(tmp_path)
    run_cli(cwd, "stages", "--config", str(quick(cwd, "chain.yaml", "modula_tiny.yaml")))

    client = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("tiny-modula").experiment_id
    (parent,) = client.search_runs([exp], "tags.`stages.role` = 'parent'")
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["method"] == "modula_res" and parent.data.tags["stages"] == "universal,domain,router"
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{pid}'", order_by=["tags.`stage.index` ASC"])
    assert [c.data.tags["stage"] for c in children] == ["universal", "domain", "router"]
    for i, child in enumerate(children):
        assert child.info.status == "FINISHED"
        params, metrics = child.data.params, child.data.metrics
        assert params["method"] == "modula_res" and params["adapter.stage"] == child.data.tags["stage"]
        assert params["trainer.max_steps"] == "2"
        # each stage records its training time; the steps are part of the fit, the fit part of the stage
        assert 0 < metrics["time/train_steps_s"] <= metrics["time/fit_s"] <= metrics["time/stage_wall_s"]
        assert metrics["time/train_steps_cpu_s"] > 0
        stage = child.data.tags["stage"]
        assert parent.data.metrics[f"time/{stage}/train_steps_s"] == metrics["time/train_steps_s"]
        if i:  # each stage starts from the previous stage's best checkpoint
            prev = children[i - 1].info.run_id
            assert params["adapter.init_adapter"].endswith(f"{prev}/checkpoints/best.ckpt")
        else:
            assert "adapter.init_adapter" not in params
    # stage 1 trains U, stage 2 the two domain experts (each U's size), stage 3 the router (smaller still)
    trainable = [int(c.data.params["params.trainable"]) for c in children]
    assert trainable[1] == 2 * trainable[0] and trainable[2] < trainable[0]
    last = children[-1]
    assert {"test/plausible/accuracy", "test/qa/exact_match", "test/count/f1"} <= set(last.data.metrics)
    assert parent.data.metrics["test/avg/score"] == last.data.metrics["test/avg/score"]
    assert 0 < last.data.metrics["train/aux_loss"] < 1  # 0.01 x about 1 in each of the 14 adapted layers
    assert "train/aux_loss" not in children[0].data.metrics and "train/aux_loss" not in children[1].data.metrics
    if importlib.util.find_spec("cgc_lightning.callbacks") is not None:  # the seesaw diagnostics log router use
        table = json.loads(
            Path(client.download_artifacts(last.info.run_id, "diagnostics/gate_weights.json")).read_text()
        )
        rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
        assert [r for r in rows if (r["task"], r["expert"]) == ("plausible", "domain.judge") and 0 <= r["weight"] <= 1]
    adapter_uri = parent.data.tags["stages.adapter"]
    assert adapter_uri == f"runs:/{last.info.run_id}/best_adapter"

    # the universal expert is bit-identical through stages 2 and 3, the domain experts through stage 3
    s1, s2, s3 = (experts(client, c.info.run_id, tmp_path / f"s{i}") for i, c in enumerate(children))
    names = sorted(k for k in s1 if k.endswith(("lora_A", "lora_B")))
    assert names and sorted(s1) == sorted(s3)
    for k in names:
        assert torch.equal(s2[k][:1], s1[k][:1]) and torch.equal(s3[k][:1], s1[k][:1]), k
        assert torch.equal(s3[k], s2[k]), k
    assert any(not torch.equal(s2[k][1:], s1[k][1:]) for k in names), "stage 2 trains the domain experts"
    routers = [k for k in s1 if k.endswith("router_W")]
    assert any(not torch.equal(s3[k], s2[k]) for k in routers), "stage 3 trains the router"

    # add a domain (`echo`) to the trained adapter: its expert, then the router; nothing else moves
    grow = quick(cwd, "grow.yaml", "modula_add_domain_tiny.yaml", test=False)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(cwd)
    stages(["--config", str(grow), "--init_adapter", adapter_uri])  # in this process: no second start-up
    (grown,) = client.search_runs([exp], f"tags.`stages.role` = 'parent' and attributes.run_id != '{pid}'")
    assert grown.data.params["init_adapter"] == adapter_uri
    g_children = client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{grown.info.run_id}'", order_by=["tags.`stage.index` ASC"]
    )
    assert [c.data.tags["stage"] for c in g_children] == ["domain", "router"]
    g2, g3 = (experts(client, c.info.run_id, tmp_path / f"g{i}") for i, c in enumerate(g_children))
    # clusters judge, count (rows 1, 2 as before) and the new echo (row 3), after the universal row 0
    for k in names:
        assert g2[k].shape[0] == s3[k].shape[0] + 1
        assert torch.equal(g2[k][:3], s3[k]) and torch.equal(g3[k][:3], s3[k]), k
        assert torch.equal(g3[k], g2[k]), k
    assert any(not torch.equal(g2[k][3], torch.zeros_like(g2[k][3])) for k in names if k.endswith("lora_B"))
    for k in routers:
        assert torch.equal(g2[k][:2], s3[k]) and torch.equal(g2[k][2], torch.zeros_like(g2[k][2])), k
    assert any(not torch.equal(g3[k], g2[k]) for k in routers)
