"""The intervals of compare and grid reports, read from runs' per-example results in a real MLflow store."""

from __future__ import annotations

import numpy as np
import pytest

from cgc_lightning import stats
from cgc_lightning.examples import log_examples
from cgc_lightning.grid import Summary, add_intervals, summary_table
from cgc_lightning.significance import method_significance, paired_scores, transfer_csv

TASKS = {"a": "accuracy", "b": "f1"}
N = 40


class _Logger:
    """What :func:`log_examples` needs of the CLI's MLflow logger."""

    def __init__(self, client, run_id):
        self.experiment, self.run_id = client, run_id


@pytest.fixture
def store(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client, client.create_experiment("sig", artifact_location=(tmp_path / "art").as_uri())


def _run(client, exp, scores: dict[str, np.ndarray], ids=None) -> str:
    run_id = client.create_run(exp).info.run_id
    rows = [
        {"task": t, "example_id": int(i), "prediction": "", "references": ["x"], "score": float(s)}
        for t, values in scores.items()
        for i, s in zip(ids if ids is not None else range(len(values)), values, strict=True)
    ]
    log_examples(_Logger(client, run_id), rows, "examples/test.json")
    return run_id


def test_val_intervals_read_each_runs_last_validation(store):
    """``stage="val"`` pairs the per-example results of each run's last validation (``examples/val_step<k>.json``
    with the largest k, as the run's latest ``val/`` metrics), not a file ``examples/val.json`` no run writes."""
    from cgc_lightning.examples import load_examples

    client, exp = store
    rng = np.random.default_rng(5)
    runs = {}
    for name, shift in (("ref", 0.0), ("m", 0.3)):
        run_id = client.create_run(exp).info.run_id
        early, last = _scores(rng), _scores(rng, shift)
        for step, scores in ((2, early), (10, last)):  # 10 after 2 in number, before it in text
            rows = [
                {"task": t, "example_id": i, "prediction": "", "references": ["x"], "score": float(v)}
                for t, values in scores.items()
                for i, v in enumerate(values)
            ]
            log_examples(_Logger(client, run_id), rows, f"examples/val_step{step}.json")
        runs[name] = ([run_id], last)
    run_id, last = runs["m"][0][0], runs["m"][1]
    assert [r["score"] for r in load_examples(client, run_id, "val") if r["task"] == "a"] == last["a"].tolist()
    assert load_examples(client, run_id, "val_step2") != load_examples(client, run_id, "val")
    assert load_examples(client, run_id, "test") == []
    found, why = method_significance(client, {k: v[0] for k, v in runs.items()}, "ref", TASKS, stage="val")
    assert why is None
    direct = stats.transfer_rows(
        {t: runs["m"][1][t][None] for t in TASKS}, {t: runs["ref"][1][t][None] for t in TASKS}, TASKS, n_resamples=5000
    )
    assert [r["diff"] for r in found["m"].rows] == pytest.approx([r["diff"] for r in direct])


def _scores(rng, shift=0.0) -> dict[str, np.ndarray]:
    return {"a": (rng.random(N) < 0.5 + shift).astype(float), "b": np.clip(rng.random(N) + shift, 0, 1)}


def test_intervals_equal_the_bootstrap_on_the_same_arrays(store):
    client, exp = store
    rng = np.random.default_rng(0)
    ref = [_scores(rng) for _ in range(2)]
    method = [_scores(rng, 0.2) for _ in range(2)]
    runs = {"ref": [_run(client, exp, s) for s in ref], "m": [_run(client, exp, s) for s in method]}
    found, why = method_significance(client, runs, "ref", TASKS, n_resamples=500)
    assert why is None and set(found) == {"m"}
    ms = {t: np.stack([s[t] for s in method]) for t in TASKS}
    rs = {t: np.stack([s[t] for s in ref]) for t in TASKS}
    direct = stats.delta_m_bootstrap(ms, rs, n_resamples=500, confidence=0.95)
    got = found["m"].delta_m
    assert (got.delta_m, got.ci_low, got.ci_high) == pytest.approx((direct.delta_m, direct.ci_low, direct.ci_high))
    assert got.n_seeds == 2 and [r["task"] for r in found["m"].rows] == ["a", "b"]
    assert found["m"].significant_losses == sum(r["verdict"] == "worse" for r in found["m"].rows)
    text = transfer_csv(found, "ref")
    assert text.splitlines()[0].startswith("method,reference,task,metric") and "delta_m_pct" in text

    # the grid's groups: the same pairs give the same interval, and the table grows its columns
    pairs = list(zip(runs["m"], runs["ref"], strict=True))
    s = Summary(TASKS, ["method"], [], [{"method": "m", "n": 2, "values": {}, "pairs": pairs}])
    add_intervals(s, client, n_resamples=500)
    assert s.groups[0]["significance"].delta_m == got
    header, rows = summary_table(s)
    assert header[-2:] == ["Δm 95% CI", "sig. losses"] and rows[0][-2].startswith("[")


def test_runs_that_scored_other_examples_or_none_get_a_reason_not_an_interval(store):
    client, exp = store
    rng = np.random.default_rng(1)
    ref = _run(client, exp, _scores(rng))
    other_ids = _run(client, exp, _scores(rng), ids=range(100, 100 + N))
    found, why = method_significance(client, {"ref": [ref], "m": [other_ids]}, "ref", TASKS, n_resamples=100)
    assert found == {} and "task 'a': the runs scored different test examples" in why
    bare = client.create_run(exp).info.run_id
    found, why = method_significance(client, {"ref": [ref], "m": [bare]}, "ref", TASKS, n_resamples=100)
    assert found == {} and "no per-example test results in the runs of m" in why


def test_paired_scores_pair_seed_by_seed_and_example_by_id():
    method = [{"a": {"2": 1.0, "1": 0.0}}, {"a": {"1": 1.0, "2": 1.0}}]
    reference = [{"a": {"1": 0.5, "2": 0.25}}, {"a": {"2": 0.0, "1": 0.75}}]
    m, r = paired_scores(method, reference, ["a"])
    np.testing.assert_array_equal(m["a"], [[0.0, 1.0], [1.0, 1.0]])  # ids sorted: "1", "2"
    np.testing.assert_array_equal(r["a"], [[0.5, 0.25], [0.75, 0.0]])


def test_delta_m_figure_draws_the_interval_of_each_methods_delta_m(store):
    from matplotlib.container import ErrorbarContainer

    from cgc_lightning.compare import build_report, delta_m_figure

    client, exp = store
    rng = np.random.default_rng(2)
    ref, other = _scores(rng), _scores(rng, 0.3)
    runs = {"ref": [_run(client, exp, ref)], "m": [_run(client, exp, other)]}
    report = build_report(
        {k: {t: float(v[t].mean()) for t in TASKS} for k, v in [("ref", ref), ("m", other)]}, TASKS, "ref"
    )
    report.significance, _ = method_significance(client, runs, "ref", TASKS, n_resamples=200)
    (ax,) = delta_m_figure(report).axes
    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]  # one interval: m's Δm
    d = report.significance["m"].delta_m
    (segment,) = bars.lines[2][0].get_segments()
    assert segment[:, 1].tolist() == pytest.approx([d.ci_low, d.ci_high])
    assert "95% interval" in ax.get_title().replace("\n", " ")  # the title wraps to the figure
