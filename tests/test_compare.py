"""The comparison: Δm and negative transfer on hand-made numbers, config checks, and `compare` end to end on the
tiny config, its table checked against the child runs read back from MLflow."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cgc_lightning import compare
from cgc_lightning.compare import CompareConfig, build_report, child_config, format_csv, load_config

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------- arithmetic


def test_delta_m_and_negative_transfer_on_hand_made_metrics():
    # b is a loss (lower is better); the reference scored 0 on c
    metric_names = {"a": "accuracy", "b": "loss", "c": "f1"}
    values = {
        "ref": {"a": 0.5, "b": 2.0, "c": 0.0},
        "better": {"a": 0.6, "b": 1.5, "c": 0.1},
        "worse": {"a": 0.4, "b": 2.5, "c": 0.0},
    }
    r = build_report(values, metric_names, "ref")
    assert r.others == ["better", "worse"] and r.reference_zero == ["c"]
    # (0.6 - 0.5) / 0.5; loss down 2.0 -> 1.5 is +25%; c: the absolute difference, flagged
    assert r.relative["better"] == pytest.approx({"a": 0.2, "b": 0.25, "c": 0.1})
    assert r.relative["worse"] == pytest.approx({"a": -0.2, "b": -0.25, "c": 0.0})
    assert r.relative["ref"] == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert r.delta_m["better"] == pytest.approx((0.2 + 0.25 + 0.1) / 3)
    assert r.delta_m["worse"] == pytest.approx(-0.45 / 3)
    assert r.negative_transfer == {"ref": 0, "better": 0, "worse": 2}

    table = compare.format_table(r)
    assert "+20.00%" in table and "-25.00%" in table and "+0.1000†" in table and "2 of 3" in table
    rows = list(csv.reader(io.StringIO(format_csv(r))))
    assert rows[0] == ["task", "metric", "reference_zero", "ref", "better", "worse", "rel_pct_better", "rel_pct_worse"]
    assert rows[2][:6] == ["b", "loss", "0", "2.0", "1.5", "2.5"] and float(rows[2][6]) == pytest.approx(25.0)
    assert rows[3][2] == "1"  # c is flagged
    assert rows[-2][0] == "delta_m" and float(rows[-2][-1]) == pytest.approx(-15.0)
    assert rows[-1] == ["negative_transfer", "", "", "", "", "", "0", "2"]

    # a metric is lower-is-better only when named so
    flipped = build_report(values, metric_names, "ref", lower_is_better={"accuracy"})
    assert flipped.relative["better"]["a"] == pytest.approx(-0.2) and flipped.relative["better"]["b"] == -0.25


def test_report_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="reference method 'ref'"):
        build_report({"m": {"a": 1.0}}, {"a": "accuracy"}, "ref")
    with pytest.raises(ValueError, match=r"'m' \(run r1\) has no value for task\(s\) \['b'\]"):
        build_report({"ref": {"a": 1.0, "b": 1.0}, "m": {"a": 1.0}}, {"a": "f1", "b": "f1"}, "ref", run_ids={"m": "r1"})


# ------------------------------------------------------------------------------------------------ config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_compare_config_is_checked_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg, base = load_config(ROOT / "experiments/compare/tiny.yaml")
    assert cfg.reference == "independent_lora" and base["model"]["adapter"]["r"] == 4
    for text, message in [
        ("base: experiments/tiny.yaml\nmethods: [cgc_lora]\nrefrence: cgc_lora\n", "unknown key.*refrence"),
        ("base: experiments/tiny.yaml\nmethods: [cgc_lora, joint_lora]\n", "reference 'independent_lora' is not"),
        ("base: experiments/nope.yaml\nmethods: [cgc_lora]\nreference: cgc_lora\n", "nope.yaml"),
        ("base: experiments/tiny.yaml\nmethods: [cgc_lora, cgc_lora]\nreference: cgc_lora\n", "repeated"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_config(_write(tmp_path, text))
    bad = CompareConfig(base={}, methods=["joint_lora", {"name": "x", "method": "cgc_lora", "rank": 4}], reference="x")
    with pytest.raises(ValueError, match="method 'x'.*rank"):
        compare.method_adapters(bad, base)
    bad = CompareConfig(base={}, methods=["joint_lora", {"name": "x", "method": "lora2"}], reference="x")
    with pytest.raises(ValueError, match="method 'x'.*lora2"):
        compare.method_adapters(bad, base)


def test_child_config_is_the_base_with_the_method_and_a_nested_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg, base = load_config(ROOT / "experiments/compare/tiny.yaml")
    cfg.methods.append({"name": "cgc_token", "method": "cgc_lora", "gate_input": "token"})
    adapters = compare.method_adapters(cfg, base)
    child = child_config(base, adapters["cgc_token"], name="cgc_token", experiment="e", tracking_uri="u", parent="p")
    assert child["model"]["adapter"] == {**base["model"]["adapter"], "method": "cgc_lora", "gate_input": "token"}
    assert child["data"] == base["data"] and child["seed_everything"] == base["seed_everything"]
    init = child["trainer"]["logger"]["init_args"]
    assert init["tags"] == {"mlflow.parentRunId": "p", "compare.parent": "p", "compare.method": "cgc_token"}
    assert (init["experiment_name"], init["tracking_uri"]) == ("e", "u")
    assert re.fullmatch(r"cgc_token seed=7 [0-9a-f]{6}", init["run_name"]), init["run_name"]
    assert base["trainer"]["logger"]["init_args"] == {"experiment_name": "tiny"}, "the base is not modified"


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_compare_end_to_end_on_the_tiny_config(tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # a tiny model gains nothing from threads, and on a shared machine they cost several times over
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cgc_lightning", "compare", "--config", "experiments/compare/tiny.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[1/3] cgc_lora ..." in out and "[3/3] joint_lora ..." in out and "negative transfer" in out

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny-compare")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("compare.role") == "parent"]
    children = {r.data.tags["compare.method"]: r for r in runs if r is not parent}
    assert set(children) == {"cgc_lora", "independent_lora", "joint_lora"}
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED"
    for name, child in children.items():
        assert child.data.tags["mlflow.parentRunId"] == pid and child.info.run_name.startswith(f"{name} seed=7 ")
        assert child.data.params["method"] == name and child.info.status == "FINISHED"
    # the same metric names in every child, so MLflow's run comparison overlays the methods' per-task curves
    names = [
        {k for k in c.data.metrics if k.startswith(("val/", "train/", "test/", "seesaw/"))} for c in children.values()
    ]
    assert names[0] == names[1] == names[2] and "val/plausible/accuracy" in names[0] and "seesaw/rate" in names[0]
    artifacts = {a.path for a in client.list_artifacts(children["cgc_lora"].info.run_id, "diagnostics")}
    assert {"diagnostics/task_metrics.png", "diagnostics/grad_cosine.png", "diagnostics/gate_usage.png"} <= artifacts
    # per-task diagnostics are tables, not metrics: the run's metrics are the scores and a few summaries
    tables = {"seesaw_deltas", "grad_cosines", "grad_norms", "gate_weights"}
    assert {f"diagnostics/{t}.json" for t in tables} <= artifacts
    cgc = children["cgc_lora"]
    diagnostic = {k for k in cgc.data.metrics if k.startswith(("seesaw/", "gate/", "grad_conflict/"))}
    assert diagnostic <= {
        "seesaw/improving", "seesaw/degrading", "seesaw/event", "seesaw/events", "seesaw/rate",
        "gate/entropy", "gate/max_from_uniform", "grad_conflict/min_cos", "grad_conflict/neg_frac",
    }, diagnostic  # fmt: skip

    def load(name):  # what mlflow.load_table reads: {"columns": [...], "data": [[...], ...]}
        table = json.loads(Path(client.download_artifacts(cgc.info.run_id, f"diagnostics/{name}.json")).read_text())
        return {c: [row[i] for row in table["data"]] for i, c in enumerate(table["columns"])}

    assert "diagnostics/gate_weights.json" in cgc.data.tags["mlflow.loggedArtifacts"]  # found by mlflow.load_table
    weights = load("gate_weights")
    assert set(weights) >= {"step", "task", "expert", "weight", "task_entropy"}
    assert set(weights["task"]) == {"plausible", "qa", "count"}
    cosines = load("grad_cosines")
    assert set(zip(cosines["task_a"], cosines["task_b"], strict=True)) == {("plausible", "qa")}  # one shared pair

    assert {"comparison.csv", "comparison.md", "delta_m.png", "compare_config.yaml", "logs"} <= {
        a.path for a in client.list_artifacts(pid)
    }
    for m, child in children.items():  # each method's log on its own run too, as a grid point's is
        assert [a.path for a in client.list_artifacts(child.info.run_id, "logs")] == [f"logs/{m}.log"]
    text = Path(client.download_artifacts(pid, "comparison.csv", str(tmp_path))).read_text()
    rows = {r["task"]: r for r in csv.DictReader(io.StringIO(text))}
    metric = {"plausible": "accuracy", "qa": "exact_match", "count": "f1"}
    others = ("cgc_lora", "joint_lora")
    rel_sum = dict.fromkeys(others, 0.0)
    for task, name in metric.items():
        ref = children["independent_lora"].data.metrics[f"test/{task}/{name}"]
        assert rows[task]["metric"] == name and rows[task]["reference_zero"] == str(int(ref == 0))
        for m, child in children.items():
            value = child.data.metrics[f"test/{task}/{name}"]
            assert float(rows[task][m]) == value
            if m in others:
                rel = (value - ref) / abs(ref) if ref else value - ref
                assert float(rows[task][f"rel_pct_{m}"]) == pytest.approx(100 * rel)
                rel_sum[m] += rel
    logged = parent.data.metrics
    for m in others:
        assert float(rows["delta_m"][f"rel_pct_{m}"]) == pytest.approx(100 * rel_sum[m] / 3)
        assert logged[f"delta_m/{m}"] == pytest.approx(100 * rel_sum[m] / 3)
        assert logged[f"negative_transfer/{m}"] == float(rows["negative_transfer"][f"rel_pct_{m}"])
        # Δm's interval from the per-example results: it holds the point estimate; the child carries its Δm
        assert logged[f"delta_m_ci_low/{m}"] <= logged[f"delta_m/{m}"] <= logged[f"delta_m_ci_high/{m}"]
        assert children[m].data.metrics["test/delta_m"] == pytest.approx(logged[f"delta_m/{m}"])
        assert 0 <= logged[f"negative_transfer_significant/{m}"] <= logged[f"negative_transfer/{m}"]
    for m, child in children.items():
        assert logged[f"avg/{m}"] == pytest.approx(child.data.metrics["test/avg/score"])
    transfer = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(pid, "transfer.csv")).read_text())))
    assert {(r["method"], r["task"]) for r in transfer} == {(m, t) for m in others for t in [*metric, "delta_m_pct"]}
    for r in transfer:
        assert r["reference"] == "independent_lora" and float(r["ci_low"]) <= float(r["diff"]) <= float(r["ci_high"])
    assert "Δm 95% CI" in out and "significant losses" in out

    # the same report from the runs, without training (the config's latest comparison)
    config = str(ROOT / "experiments/compare/tiny.yaml")
    again = compare.main(["--from-runs", "--config", config, "--tracking-uri", uri, "--no-log"])
    assert format_csv(again) == text
    # and on the test loss (lower is better), from the parent's children
    loss = compare.main(
        ["--from-runs", "--experiment", "tiny-compare", "--parent", pid, "--tracking-uri", uri]
        + ["--metric", "loss", "--no-log", "--out", str(tmp_path / "loss")]
    )
    assert loss.methods[0] == "independent_lora" and loss.metric_names == dict.fromkeys(metric, "loss")
    assert (tmp_path / "loss" / "delta_m.png").is_file()
    for m in others:
        expected = [
            -(children[m].data.metrics[f"test/{t}/loss"] - children["independent_lora"].data.metrics[f"test/{t}/loss"])
            / children["independent_lora"].data.metrics[f"test/{t}/loss"]
            for t in metric
        ]
        assert [loss.relative[m][t] for t in metric] == pytest.approx(expected)
        assert loss.negative_transfer[m] == sum(v < 0 for v in expected)
    saved = yaml.safe_load(Path(client.download_artifacts(pid, "compare_config.yaml", str(tmp_path))).read_text())
    assert (
        saved["methods"] == ["cgc_lora", "independent_lora", "joint_lora"] and saved["reference"] == "independent_lora"
    )


def test_a_long_bar_chart_title_wraps_inside_the_figure():
    from cgc_lightning.callbacks.plots import grouped_bars

    title = "grid transfer_study: Δm against model.adapter.method=independent_lora, mean over seeds with 95% intervals"
    fig = grouped_bars(["cgc_lora", "moelora", "joint_lora"], {"Δm": [-7.0, -11.3, -4.2]}, title, "Δm (%)")
    fig.canvas.draw()
    text = fig.axes[0].title
    box = text.get_window_extent(renderer=fig.canvas.get_renderer())
    width, height = fig.canvas.get_width_height()
    assert "\n" in text.get_text() and text.get_text().replace("\n", " ") == title
    assert box.x0 >= 0 and box.x1 <= width and box.y1 <= height  # nothing cut off at either side or the top
