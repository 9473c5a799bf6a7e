"""Staged training end to end: MoDULA's three stages chained on the tiny config, then a domain added, read back
from MLflow; every shipped stages config parses."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cgc_lightning.cli import CGCLightningCLI
from cgc_lightning.configs import get_key, set_key
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
    stages(["--config", str(grow), "--init_adapter", adapter_uri])  # the chain in this process, its stages not
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


def test_a_failing_stage_process_ends_the_chain_with_its_log_tail(tmp_path, monkeypatch):
    """The chain's side, each stage's process replaced by a stand-in (a real one loads a model: seconds): the first
    stage hands its result and checkpoint on, the second fails; the error ends with its log, runs are FAILED."""
    from mlflow import MlflowClient

    from cgc_lightning import driver
    from cgc_lightning.stages import StagesConfig, run_stages

    stand_in = """import json, os, sys
from pathlib import Path
config = Path(sys.argv[2])
print(f"stage {config.stem}: process {os.getpid()}", flush=True)
if config.stem == "1_domain":
    print("Traceback: out of memory", flush=True)
    sys.exit(3)
left = {"best": "u/best.ckpt", "last": "u/last.ckpt", "train_steps_s": 1.5, "train_steps_cpu_s": 2.5, "fit_s": 4.0}
config.with_suffix(".json").write_text(json.dumps({**left, "fit_end": __import__("time").time()}))
"""
    monkeypatch.setattr(driver, "child_command", lambda tool, *args: [sys.executable, "-c", stand_in, *args])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = {"class_path": "cgc_lightning.tracking.MLflowLogger", "init_args": {"experiment_name": "fake"}}
    base = {"trainer": {"default_root_dir": str(tmp_path / "outputs"), "logger": logger}}
    set_key(base, "trainer.logger.init_args.tracking_uri", uri)
    cfg = StagesConfig(base=base, stages=[{"stage": "universal"}, {"stage": "domain"}, {"stage": "router"}])
    with pytest.raises(RuntimeError, match=r"stage 'domain' failed \(exit 3\); end of its log (.*)1_domain\.log:\n"):
        run_stages(cfg, base)

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fake").experiment_id
    (parent,) = client.search_runs([exp], "tags.`stages.role` = 'parent'")
    assert parent.info.status == "FAILED"
    pid = parent.info.run_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{pid}'", order_by=["tags.`stage.index` ASC"])
    assert [r.data.tags["stage"] for r in runs] == ["universal", "domain"]  # the router stage never started
    first, failed = runs
    assert failed.info.status == "FAILED"  # its process died without ending its run: the chain ended it
    # the first stage's result reached its run and the parent; its best checkpoint is where the second one started
    times = parent.data.metrics
    assert times["time/universal/train_steps_s"] == 1.5 and times["time/universal/fit_s"] == 4
    assert 0 < first.data.metrics["time/stage_wall_s"] == times["time/universal/wall_s"]
    work = tmp_path / "outputs" / "stages" / pid
    assert get_key(yaml.safe_load((work / "1_domain.yaml").read_text()), "model.adapter.init_adapter") == "u/best.ckpt"
    # each stage's log is an artifact of its run, and holds that process's output alone
    pids = set()
    for i, run in enumerate(runs):
        (log,) = client.list_artifacts(run.info.run_id, "logs")
        text = Path(client.download_artifacts(run.info.run_id, log.path, str(tmp_path / str(i)))).read_text()
        assert text == (work / Path(log.path).name).read_text()
        assert text.startswith(f"stage {i}_{run.data.tags['stage']}: process ")
        pids.add(text.split()[3])
    assert len(pids) == 2 and str(os.getpid()) not in pids
    assert text.endswith("Traceback: out of memory\n")


@pytest.mark.slow
def test_each_stage_runs_in_a_process_of_its_own_and_a_killed_one_fails_the_chain(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from cgc_lightning import driver
    from cgc_lightning.stages import main as stages

    cwd = workdir(tmp_path)
    kill = {"trainer.callbacks": [{"class_path": "tests.crash.SigkillAt", "init_args": {"step": 1}}]}
    chain = [{"stage": "universal"}, {"stage": "domain", "overrides": kill}, {"stage": "router"}]
    path = quick(cwd, "killed.yaml", "modula_tiny.yaml", stages=chain, experiment_name="killed")
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    # not the default, relative URI: MLflow keeps one store per URI in this process, whatever the working directory
    uri = f"sqlite:///{cwd}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the stages' processes import this checkout
    monkeypatch.chdir(cwd)
    with pytest.raises(RuntimeError, match=r"stage 'domain' failed \(exit -9\); end of its log") as failed:
        stages(["--config", str(path)])

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("killed").experiment_id
    (parent,) = client.search_runs([exp], "tags.`stages.role` = 'parent'")
    assert parent.info.status == "FAILED"
    runs = client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", order_by=["tags.`stage.index` ASC"]
    )
    # the killed stage's process could not end its run: the chain marked it FAILED; the router stage never started
    assert [(r.data.tags["stage"], r.info.status) for r in runs] == [("universal", "FINISHED"), ("domain", "FAILED")]
    texts = []
    for i, run in enumerate(runs):
        log = f"logs/{i}_{run.data.tags['stage']}.log"
        texts.append(Path(client.download_artifacts(run.info.run_id, log, str(tmp_path / str(i)))).read_text())
        first = texts[-1].splitlines()[0].split()
        assert first[:3] == ["stage", f"{i}_{run.data.tags['stage']}:", "process"] and first[-1] == run.info.run_id
    pids = {t.split()[3].rstrip(",") for t in texts}
    assert len(pids) == 2 and str(os.getpid()) not in pids, "each stage runs in a process of its own"
    # each log holds its own stage's output: the first fit reached max_steps, the second was killed at step 1
    assert "`max_steps=2` reached" in texts[0] and "reached" not in texts[1]
    log = cwd / "outputs" / "stages" / parent.info.run_id / "1_domain.log"
    assert texts[1] == log.read_text() and driver.log_tail(log, 30) in str(failed.value)
