"""One override syntax: dotted keys in compare, stages and grid configs give the configs the nested form of older
configs gave (still read, with a warning); the run driver's logger check and resume plan."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from cgc_lightning import compare, driver, grid, stages
from cgc_lightning.configs import dotted, resolve

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "experiments" / "tiny.yaml").read_text())


def _write(tmp_path: Path, name: str, raw: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_nested_overrides_are_read_as_their_leaves_with_a_warning():
    nested = {"trainer": {"max_steps": 3, "logger": {"init_args": {"tags": {"a": "b"}}}}, "seed_everything": 1}
    with pytest.warns(FutureWarning, match=r"here: nested overrides \(trainer: \{...\}\) are deprecated.*trainer\."):
        flat = dotted(nested, "here")
    assert flat == {"trainer.max_steps": 3, "trainer.logger.init_args.tags.a": "b", "seed_everything": 1}
    # merged key by key, as the nested form was: the base's other trainer settings and logger init args stay
    config = resolve(TINY, flat)
    assert config["trainer"] == {
        **TINY["trainer"],
        "max_steps": 3,
        "logger": {
            "class_path": TINY["trainer"]["logger"]["class_path"],
            "init_args": {"experiment_name": "tiny", "tags": {"a": "b"}},
        },
    }
    # a dotted key's mapping is one value, set whole; dotted keys warn of nothing
    clusters = {"data.clusters": {"judge": ["plausible", "qa"], "count": ["count"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dotted(clusters, "here") == clusters
        assert dotted({"model.adapter.r": 8, "trainer": {}}, "here") == {"model.adapter.r": 8, "trainer": {}}


def test_compare_dotted_and_nested_overrides_give_the_same_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    methods = ["cgc_lora", "independent_lora", {"name": "tok", "method": "cgc_lora", "gate_input": "token"}]
    common = {"base": "experiments/tiny.yaml", "methods": methods, "reference": "independent_lora"}
    new = {**common, "overrides": {"trainer.max_steps": 4, "model.adapter.r": 2, "data.max_eval_examples": 4}}
    old = {
        **common,
        "overrides": {"trainer": {"max_steps": 4}, "model": {"adapter": {"r": 2}}, "data": {"max_eval_examples": 4}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, base = compare.load_config(_write(tmp_path, "new.yaml", new))
    with pytest.warns(FutureWarning, match="compare config, `overrides`: nested overrides"):
        old_cfg, old_base = compare.load_config(_write(tmp_path, "old.yaml", old))
    assert base == old_base and cfg.overrides == old_cfg.overrides
    assert base["trainer"]["max_steps"] == 4 and base["trainer"]["val_check_interval"] == 3  # the rest of trainer kept
    configs = compare.method_configs(cfg, base)
    assert configs == compare.method_configs(old_cfg, old_base)
    assert configs["tok"]["model"]["adapter"] == {**base["model"]["adapter"], "gate_input": "token"}
    assert compare.method_adapters(cfg, base) == {n: c["model"]["adapter"] for n, c in configs.items()}


def test_compare_method_dicts_take_dotted_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    methods = [
        "independent_lora",
        {"name": "short", "method": "cgc_lora", "gate_input": "token"},
        {"name": "long", "model.adapter.method": "cgc_lora", "model.adapter.gate_input": "token"},
        {"name": "slow", "method": "cgc_lora", "model.lr": 1.0e-4, "trainer.max_steps": 2},
    ]
    cfg, base = compare.load_config(_write(tmp_path, "c.yaml", {"base": "experiments/tiny.yaml", "methods": methods}))
    configs = compare.method_configs(cfg, base)
    assert configs["short"] == configs["long"]  # an adapter field is short for model.adapter.<field>
    assert configs["slow"]["model"]["lr"] == 1.0e-4 and configs["slow"]["trainer"]["max_steps"] == 2
    assert (
        configs["independent_lora"]["model"]["lr"] == base["model"]["lr"]
        and configs["short"]["trainer"] == base["trainer"]
    )
    child = compare.method_run_config(configs["slow"], name="slow", experiment="e", tracking_uri="u", parent="p")
    assert (
        child["model"]["lr"] == 1.0e-4 and child["trainer"]["logger"]["init_args"]["tags"]["compare.method"] == "slow"
    )
    bad = {"base": "experiments/tiny.yaml", "methods": ["independent_lora", {"name": "x", "model.adapter.rank": 4}]}
    with pytest.raises(ValueError, match="method 'x'.*rank"):
        compare.method_configs(*compare.load_config(_write(tmp_path, "bad.yaml", bad)))


def test_stages_dotted_and_nested_overrides_give_the_same_stage_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    shipped = yaml.safe_load((ROOT / "experiments/stages/modula_tiny.yaml").read_text())
    assert all("." in k for k in shipped["overrides"]), "the shipped configs are written with dotted keys"
    old = {
        **shipped,
        "overrides": {"model": {"adapter": {"method": "modula_res", "r": 4}}, "trainer": {"max_steps": 2}},
        "stages": [
            {"stage": "universal"},
            {"stage": "domain", "overrides": {"trainer": {"max_steps": 3, "val_check_interval": 3}}},
            {"stage": "router", "overrides": {"model": {"adapter": {"load_balance_coef": 0.01}}}},
        ],
    }
    new = {
        **shipped,
        "overrides": {**shipped["overrides"], "trainer.max_steps": 2},
        "stages": [
            {"stage": "universal"},
            {"stage": "domain", "overrides": {"trainer.max_steps": 3, "trainer.val_check_interval": 3}},
            {"stage": "router", "overrides": {"model.adapter.load_balance_coef": 0.01}},
        ],
    }
    with pytest.warns(FutureWarning, match="nested overrides"):
        old_cfg, old_base = stages.load_config(_write(tmp_path, "old.yaml", old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, base = stages.load_config(_write(tmp_path, "new.yaml", new))
    assert base == old_base and base["trainer"]["max_steps"] == 2 and base["model"]["adapter"]["method"] == "modula_res"
    for spec, old_spec in zip(cfg.stages, old_cfg.stages, strict=True):
        kwargs = dict(init_adapter="a", experiment="e", tracking_uri="u", run_name="r", tags={"stage": spec.stage})
        config = stages.stage_config(base, spec, **kwargs)
        assert config == stages.stage_config(old_base, old_spec, **kwargs)
        assert config["model"]["adapter"]["stage"] == spec.stage and config["model"]["adapter"]["r"] == 4
    domain = stages.stage_config(base, cfg.stages[1], **kwargs)
    assert domain["trainer"]["max_steps"] == 3 and domain["trainer"]["val_check_interval"] == 3
    router = stages.stage_config(base, cfg.stages[2], **kwargs)
    assert router["model"]["adapter"]["load_balance_coef"] == 0.01 and router["trainer"]["max_steps"] == 2


def test_grid_reads_nested_overrides_as_dotted_keys():
    with pytest.warns(FutureWarning, match="grid config, `overrides`"):
        old = grid.GridConfig(base="unused", overrides={"trainer": {"max_steps": 3}}, axes={"seed_everything": [1, 2]})
    new = grid.GridConfig(base="unused", overrides={"trainer.max_steps": 3}, axes={"seed_everything": [1, 2]})
    assert old.overrides == new.overrides
    assert [p.id for p in grid.expand(old, TINY)[0]] == [p.id for p in grid.expand(new, TINY)[0]]


def test_one_list_of_mlflow_loggers():
    lightning = {"trainer": {"logger": {"class_path": driver.MLFLOW_LOGGERS[1], "init_args": {"experiment_name": "x"}}}}
    assert driver.logger_init(lightning, "compare") == {"experiment_name": "x"}
    wired = driver.logged_config(
        lightning, tool="compare", experiment="e", run_name="r", tracking_uri="u", tags={"a": "b"}
    )
    assert wired["trainer"]["logger"] == {
        "class_path": driver.MLFLOW_LOGGERS[0],
        "init_args": {"experiment_name": "e", "run_name": "r", "tracking_uri": "u", "tags": {"a": "b"}},
    }
    assert lightning["trainer"]["logger"]["class_path"] == driver.MLFLOW_LOGGERS[1], "the config is not modified"
    # the grid passes the base config's own logger to fit: it must be ours (checkpoint_dir, resume)
    with pytest.raises(ValueError, match="grid needs the MLflow logger"):
        driver.logger_init(lightning, "grid", ours_only=True)
    with pytest.raises(ValueError, match="grid needs the MLflow logger"):
        driver.logger_init({"trainer": {"logger": False}}, "grid", ours_only=True)
    csv = {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger"}}}
    with pytest.raises(ValueError, match="stages needs the MLflow logger.*CSVLogger"):
        driver.logger_init(csv, "stages")
    assert driver.logger_init({}, "stages") == {}


def test_resume_plan(tmp_path):
    import zipfile

    def ckpt(name):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr("x", "1")

    assert driver.resume_plan("fit", tmp_path) == "restart"
    (tmp_path / "last.ckpt").write_bytes(b"truncated")  # a process killed while writing it
    assert driver.resume_plan("fit", tmp_path) == "restart"
    ckpt("last.ckpt")
    assert driver.resume_plan("fit", tmp_path) == "resume"
    assert driver.resume_plan("fit_done", tmp_path) == "test"
    assert driver.resume_plan("test", tmp_path) == "test"
