"""``python -m cgc_lightning.paired``: runs of two real MLflow stores compared example by example."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from cgc_lightning import stats
from cgc_lightning.examples import log_examples
from cgc_lightning.paired import main

N = 60
NAMES = {"a": "accuracy", "b": "f1", "c": "score"}  # c logs no test/c/<metric>: labelled "score"


class _Logger:
    """What :func:`log_examples` needs of the CLI's MLflow logger."""

    def __init__(self, client, run_id):
        self.experiment, self.run_id = client, run_id


def _store(tmp_path, name: str):
    from mlflow import MlflowClient

    (tmp_path / name).mkdir()
    uri = f"sqlite:///{tmp_path}/{name}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("paired", artifact_location=(tmp_path / name / "art").as_uri())


def _run(store, scores: dict[str, np.ndarray], ids=None, reverse: bool = False) -> str:
    _, client, exp = store
    run_id = client.create_run(exp).info.run_id
    rows = [
        {"task": t, "example_id": int(i), "prediction": "", "references": ["x"], "score": float(s)}
        for t, values in scores.items()
        for i, s in zip(ids if ids is not None else range(len(values)), values, strict=True)
    ]
    log_examples(_Logger(client, run_id), rows[::-1] if reverse else rows, "examples/test.json")
    for t, metric in NAMES.items():
        if metric != "score" and t in scores:
            client.log_metric(run_id, f"test/{t}/{metric}", float(scores[t].mean()))
        client.log_metric(run_id, f"test/{t}/loss", 1.0)
    return run_id


def _scores(rng, shift_b: float = 0.0, shift_c: float = 0.0) -> dict[str, np.ndarray]:
    """Scores of 4 decimals, which the MLflow table (JSON of 10 digits) stores exactly."""
    return {
        "a": (rng.random(N) < 0.5).astype(float),
        "b": np.clip(rng.random(N) * 0.5 + 0.25 + shift_b, 0, 1).round(4),
        "c": np.clip(rng.random(N) * 0.5 + 0.25 + shift_c, 0, 1).round(4),
    }


def _cli(*args: str) -> None:
    main([*args, "--resamples", "300"])


def _error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        _cli(*args)
    assert exc.value.code == 2  # parser.error: usage and the message, no traceback
    return capsys.readouterr().err


def test_rows_equal_the_bootstrap_on_the_same_arrays(tmp_path, capsys):
    a, b = _store(tmp_path, "a"), _store(tmp_path, "b")
    rng = np.random.default_rng(0)
    ref = [_scores(rng) for _ in range(2)]
    method = [_scores(rng, shift_b=-0.3, shift_c=0.3) for _ in range(2)]
    ref_ids = [_run(a, s, reverse=True) for s in ref]  # rows in another order: paired by id, not position
    method_ids = [_run(b, s) for s in method]
    out = tmp_path / "out"
    # the method's store through --tracking-uri (the default of --method-uri), the reference's its own
    runs = ["--method", ",".join(method_ids), "--reference", ",".join(ref_ids)]
    _cli(*runs, "--tracking-uri", b[0], "--reference-uri", a[0], "--out", str(out))
    printed = capsys.readouterr().out

    ms = {t: np.stack([s[t] for s in method]) for t in NAMES}  # (S, N)
    rs = {t: np.stack([s[t] for s in ref]) for t in NAMES}
    direct = stats.transfer_rows(ms, rs, NAMES, n_resamples=300, confidence=0.95)
    d = stats.delta_m_bootstrap(ms, rs, n_resamples=300, confidence=0.95)
    rows = {r["task"]: r for r in csv.DictReader((out / "paired.csv").open())}
    assert list(rows) == [*NAMES, "delta_m_pct", "mean_score"]
    for want in direct:
        got = rows[want["task"]]
        assert got["metric"] == want["metric"] and got["verdict"] == want["verdict"]
        assert (int(got["n_examples"]), int(got["n_seeds"])) == (N, 2)
        for key in ("reference_mean", "method_mean", "diff", "ci_low", "ci_high"):
            assert float(got[key]) == pytest.approx(want[key], rel=1e-12), (want["task"], key)
    assert rows["b"]["verdict"] == "worse" and rows["c"]["verdict"] == "better"
    got = rows["delta_m_pct"]
    assert [float(got[k]) for k in ("diff", "ci_low", "ci_high")] == pytest.approx([d.delta_m, d.ci_low, d.ci_high])
    assert got["verdict"] == d.verdict
    averages = [float(np.mean([v.mean() for v in s.values()])) for s in (rs, ms)]
    assert [float(rows["mean_score"][k]) for k in ("reference_mean", "method_mean")] == pytest.approx(averages)

    assert printed.startswith("| task | metric | reference | method | diff | 95% CI | verdict |")
    assert f"| Δm | | | | {d.delta_m:+.2f}% | [{d.ci_low:+.2f}, {d.ci_high:+.2f}]% | {d.verdict} |" in printed
    assert stats.method_note(n_resamples=300, confidence=0.95, n_seeds=2) in printed
    assert (out / "paired.md").read_text() == printed


def test_errors_name_the_run_the_store_or_the_task_before_any_work(tmp_path, capsys):
    a, b = _store(tmp_path, "a"), _store(tmp_path, "b")
    rng = np.random.default_rng(1)
    ref, method = _run(a, _scores(rng)), _run(b, _scores(rng))
    uris = ["--reference-uri", a[0], "--method-uri", b[0]]

    err = _error(capsys, "--method", f"{method},no-such-run", "--reference", f"{ref},{ref}", *uris)
    assert f"--method: no run 'no-such-run' in {b[0]}" in err
    err = _error(capsys, "--method", method, "--reference", "gone", *uris, "--out", str(tmp_path / "o"))
    assert f"--reference: no run 'gone' in {a[0]}" in err and not (tmp_path / "o").exists()
    # counts are checked first: the stores are not even opened
    err = _error(capsys, "--method", f"{method},{method}", "--reference", ref, "--tracking-uri", "sqlite:///nope.db")
    assert "--method has 2 run(s), --reference 1: give one per seed" in err
    err = _error(capsys, "--method", method, "--reference", ref, "--method-uri", f"sqlite:///{tmp_path}/c/mlflow.db")
    assert f"--method: no MLflow store at sqlite:///{tmp_path}/c/mlflow.db" in err
    assert not (tmp_path / "c").exists()  # MLflow would have made an empty store there

    bare = b[1].create_run(b[2]).info.run_id
    err = _error(capsys, "--method", bare, "--reference", ref, *uris)
    assert f"--method: run {bare!r} in {b[0]} has no per-example test results" in err
    other_ids = _run(b, _scores(rng), ids=range(100, 100 + N))
    err = _error(capsys, "--method", other_ids, "--reference", ref, *uris)
    assert "task 'a': the runs scored different test examples" in err
    two_tasks = _run(b, {t: v for t, v in _scores(rng).items() if t != "c"})
    err = _error(capsys, "--method", two_tasks, "--reference", ref, *uris)
    assert f"run {ref!r} scored tasks ['a', 'b', 'c'], run {two_tasks!r} ['a', 'b']" in err


def test_runs_as_a_module_and_exits_with_the_message_alone(tmp_path):
    a = _store(tmp_path, "a")
    run = _run(a, _scores(np.random.default_rng(2)))
    cmd = [sys.executable, "-m", "cgc_lightning.paired", "--method", "missing", "--reference", run]
    done = subprocess.run([*cmd, "--tracking-uri", a[0]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"--method: no run 'missing' in {a[0]}" in done.stderr
    assert "Traceback" not in done.stderr
