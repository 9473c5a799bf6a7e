"""Paired bootstrap and Δm intervals: against scipy's bootstrap, against plain loops on the same draws, and
against compare.py's Δm; verdicts, seeds, and errors on misaligned scores."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from cgc_lightning import stats
from cgc_lightning.compare import build_report
from cgc_lightning.stats import delta_m_bootstrap, method_note, negative_transfer, paired_bootstrap, transfer_rows


def scores(n: int, shift: float = 0.0, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(method, reference): reference ~0.5 ± 0.2 per example, method = reference + shift + noise, in [0, 1]."""
    rng = np.random.default_rng(seed)
    ref = np.clip(rng.normal(0.5, 0.2, n), 0, 1)
    return np.clip(ref + shift + rng.normal(0, noise, n), 0, 1), ref


# ------------------------------------------------------------------------------------------- one seed


@pytest.mark.parametrize("kind", ["continuous", "accuracy"])
def test_one_seed_interval_matches_scipy_bootstrap(kind):
    if kind == "continuous":
        x, y = scores(300, shift=0.02, noise=0.3)
    else:  # 0/1 correctness, as accuracy's per-example scores
        rng = np.random.default_rng(3)
        x, y = (rng.random(300) < 0.6).astype(float), (rng.random(300) < 0.55).astype(float)
    r = paired_bootstrap(x, y, n_resamples=20_000, seed=1)
    ref = scipy_stats.bootstrap(
        (x, y),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        paired=True,
        vectorized=True,
        method="percentile",
        n_resamples=20_000,
        confidence_level=0.95,
        rng=np.random.default_rng(2),
    )
    # independent Monte-Carlo draws: each end's sd is ~0.03 of the statistic's sd (~0.03 here), so 0.004 is > 4 sd
    assert r.ci_low == pytest.approx(ref.confidence_interval.low, abs=0.004)
    assert r.ci_high == pytest.approx(ref.confidence_interval.high, abs=0.004)
    assert r.mean_diff == x.mean() - y.mean()
    assert (r.method_mean, r.reference_mean) == (x.mean(), y.mean())
    assert (r.n_examples, r.n_seeds, r.n_resamples, r.confidence) == (300, 1, 20_000, 0.95)


def test_tensors_and_lists_give_the_same_result_as_arrays():
    x, y = scores(50, shift=0.1)
    a = paired_bootstrap(x, y, n_resamples=500)
    assert paired_bootstrap(torch.from_numpy(x), torch.from_numpy(y), n_resamples=500) == a
    assert paired_bootstrap(x.tolist(), y.tolist(), n_resamples=500) == a


def test_verdicts():
    x, y = scores(200, shift=0.3)
    assert paired_bootstrap(x, y).verdict == "better"
    assert paired_bootstrap(y, x).verdict == "worse"
    # a loss: the method's lower values are the better ones
    assert paired_bootstrap(y, x, lower_is_better=True).verdict == "better"
    assert paired_bootstrap(x, y, lower_is_better=True).verdict == "worse"
    same = paired_bootstrap(y, y)
    assert (same.ci_low, same.ci_high, same.verdict) == (0.0, 0.0, "no significant difference")
    x, y = scores(200, shift=0.0, noise=0.01, seed=5)
    tiny = paired_bootstrap(x, y)
    assert tiny.ci_low < 0 < tiny.ci_high and tiny.verdict == "no significant difference"


def test_negative_transfer_counts_only_significant_losses():
    method, reference = {}, {}
    method["lost"], reference["lost"] = scores(200, shift=-0.3, seed=1)
    method["won"], reference["won"] = scores(200, shift=0.3, seed=2)
    # a little worse on average, but the interval spans 0
    rng = np.random.default_rng(3)
    reference["noisy"], noise = rng.random(100), rng.normal(0, 0.3, 100)
    method["noisy"] = reference["noisy"] + noise - noise.mean() - 0.01
    metric_names = {"lost": "accuracy", "won": "f1", "noisy": "rouge_l"}
    rows = transfer_rows(method, reference, metric_names)
    by_task = {row["task"]: row for row in rows}
    noisy = by_task["noisy"]
    assert noisy["diff"] < 0 and noisy["ci_low"] < 0 < noisy["ci_high"]
    assert [row["verdict"] for row in rows] == ["worse", "better", "no significant difference"]
    assert negative_transfer(rows) == ["lost"]
    # a row is the task's paired bootstrap alone, under the same seed
    alone = paired_bootstrap(method["noisy"], reference["noisy"])
    assert (noisy["ci_low"], noisy["ci_high"], noisy["diff"]) == (alone.ci_low, alone.ci_high, alone.mean_diff)
    assert [row["metric"] for row in rows] == ["accuracy", "f1", "rouge_l"]
    assert set(rows[0]) == {
        *("task", "metric", "reference_mean", "method_mean", "diff", "ci_low", "ci_high"),
        *("n_examples", "n_seeds", "verdict"),
    }


def test_method_note():
    assert method_note() == (
        "paired bootstrap over test examples, 10,000 resamples, 95 % percentile interval; "
        "'negative transfer' counts only tasks whose interval lies entirely on the worse side of 0"
    )
    assert "test examples and seeds (3 paired seeds, crossed), 2,000 resamples, 90 %" in method_note(
        n_resamples=2000, confidence=0.9, n_seeds=3
    )


def test_ten_thousand_resamples_of_a_thousand_examples_are_fast():
    x, y = scores(1000, shift=0.01)
    paired_bootstrap(x, y, n_resamples=100)  # warm up
    start = time.perf_counter()
    paired_bootstrap(x, y)
    # ~0.1 s alone; the bound is loose for a shared CI machine, and catches a per-resample Python loop
    assert time.perf_counter() - start < 3.0


# ------------------------------------------------------------------------------------------- seeds


def test_identical_seeds_give_the_one_seed_interval():
    x, y = scores(150, shift=0.05, noise=0.2)
    one = paired_bootstrap(x, y, n_resamples=3000)
    three = paired_bootstrap(np.stack([x] * 3), np.stack([y] * 3), n_resamples=3000)
    assert three.n_seeds == 3
    torch.testing.assert_close(
        torch.tensor([three.mean_diff, three.ci_low, three.ci_high], dtype=torch.float64),
        torch.tensor([one.mean_diff, one.ci_low, one.ci_high], dtype=torch.float64),
        rtol=1e-12,
        atol=1e-12,
    )


def test_disagreeing_seeds_widen_the_interval():
    x, y = scores(400, shift=0.05, noise=0.1)
    # the same test examples; the method's runs land 0.06 apart from seed to seed
    xs, ys = np.stack([x - 0.06, x, x + 0.06]), np.stack([y] * 3)
    multi = paired_bootstrap(xs, ys)
    widths = [(r.ci_high - r.ci_low) for r in (paired_bootstrap(xs[s], ys[s]) for s in range(3))]
    assert multi.ci_high - multi.ci_low > 1.5 * max(widths)
    assert multi.mean_diff == pytest.approx(x.mean() - y.mean())


def loop_paired(xs: np.ndarray, ys: np.ndarray, n_resamples: int, confidence: float, seed: int):
    """The seeds x examples bootstrap with plain loops, on the module's draws."""
    n_seeds, n = xs.shape
    theta = []
    for seed_idx, (example_idx,) in stats._draws(seed, n_resamples, n_seeds, [n]):
        for b in range(len(seed_idx)):
            total = 0.0
            for s in seed_idx[b]:
                for i in example_idx[b]:
                    total += xs[s, i] - ys[s, i]
            theta.append(total / (n_seeds * n))
    alpha = 1 - confidence
    return np.quantile(theta, [alpha / 2, 1 - alpha / 2])


@pytest.mark.parametrize("n_seeds", [1, 3])
def test_paired_bootstrap_against_loops_on_the_same_draws(monkeypatch, n_seeds):
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 2000)  # several chunks of resamples
    rng = np.random.default_rng(7)
    xs, ys = rng.random((n_seeds, 40)), rng.random((n_seeds, 40))
    r = paired_bootstrap(xs, ys, n_resamples=150, confidence=0.9, seed=4)
    low, high = loop_paired(xs, ys, 150, 0.9, 4)
    assert r.ci_low == pytest.approx(low, rel=1e-12) and r.ci_high == pytest.approx(high, rel=1e-12)


def test_multi_seed_interval_against_a_statistical_reference():
    """The crossed two-level bootstrap written out independently: its interval matches within Monte-Carlo error."""
    rng = np.random.default_rng(11)
    example = rng.normal(0, 0.3, 120)  # shared difficulty of each example's difference
    xs = 0.03 + np.array([[-0.04], [0.0], [0.05]]) + example + rng.normal(0, 0.1, (3, 120))
    ys = np.zeros_like(xs)
    r = paired_bootstrap(xs, ys, n_resamples=20_000, seed=3)
    draw = np.random.default_rng(99)
    seeds = draw.integers(0, 3, (20_000, 3))
    examples = draw.integers(0, 120, (20_000, 120))
    theta = np.array([xs[s][:, e].mean() for s, e in zip(seeds, examples, strict=True)])
    low, high = np.quantile(theta, [0.025, 0.975])
    # Monte-Carlo sd of each end's difference ~0.0015; examples drawn per seed (nested) move each end ~0.017 inwards
    assert r.ci_low == pytest.approx(low, abs=0.006) and r.ci_high == pytest.approx(high, abs=0.006)


# ------------------------------------------------------------------------------------------- Δm


def means(d: dict[str, np.ndarray]) -> dict[str, float]:
    return {t: float(np.mean(v)) for t, v in d.items()}


def test_delta_m_point_matches_compare():
    rng = np.random.default_rng(0)
    method, reference = {}, {}
    method["a"], reference["a"] = scores(200, shift=0.05, seed=1)
    method["b"], reference["b"] = rng.normal(1.5, 0.3, 80), rng.normal(2.0, 0.3, 80)  # a per-example loss
    method["c"], reference["c"] = (rng.random(60) < 0.1).astype(float), np.zeros(60)  # the reference scored 0
    metric_names = {"a": "accuracy", "b": "loss", "c": "f1"}
    r = delta_m_bootstrap(method, reference, lower_is_better={"b"}, n_resamples=2000)
    report = build_report({"m": means(method), "ref": means(reference)}, metric_names, "ref")
    assert r.delta_m == pytest.approx(100 * report.delta_m["m"], rel=1e-12)
    assert r.relative == pytest.approx({t: 100 * v for t, v in report.relative["m"].items()}, rel=1e-12)
    assert r.reference_zero == report.reference_zero == ["c"]
    assert r.ci_low < r.delta_m < r.ci_high
    assert r.reference_zero_resamples == 0  # all-zero reference scores stay 0 in every resample


def test_delta_m_over_seeds_is_the_mean_of_each_seeds_delta_m():
    """grid.py's summary: Δm against the reference run of the same seed, then the mean over seeds."""
    rng = np.random.default_rng(1)
    method = {"a": rng.random((3, 50)) + 0.1, "b": rng.random((3, 30))}
    reference = {"a": rng.random((3, 50)), "b": rng.random((3, 30))}
    names = {"a": "accuracy", "b": "f1"}
    per_seed = [
        build_report(
            {"m": {t: v[s].mean() for t, v in method.items()}, "ref": {t: v[s].mean() for t, v in reference.items()}},
            names,
            "ref",
        ).delta_m["m"]
        for s in range(3)
    ]
    r = delta_m_bootstrap(method, reference, n_resamples=500)
    assert r.n_seeds == 3 and r.delta_m == pytest.approx(100 * np.mean(per_seed), rel=1e-12)


def test_delta_m_interval_excludes_zero_for_a_clear_gain():
    method, reference = {}, {}
    for i, t in enumerate(["a", "b", "c"]):
        method[t], reference[t] = scores(300, shift=0.05, noise=0.05, seed=i)
    r = delta_m_bootstrap(method, reference)
    assert 0 < r.ci_low < r.delta_m < r.ci_high and r.verdict == "better"
    worse = delta_m_bootstrap(reference, method)
    assert worse.ci_high < 0 and worse.verdict == "worse"


def loop_delta_m(method, reference, lower_is_better, n_resamples, confidence, seed):
    """Δm's bootstrap with plain loops on the module's draws: compare.py's formula on each resample's means."""
    tasks = list(method)
    n_seeds = np.atleast_2d(method[tasks[0]]).shape[0]
    sizes = [np.atleast_2d(method[t]).shape[1] for t in tasks]
    theta = []
    for seed_idx, example_idx in stats._draws(seed, n_resamples, n_seeds, sizes):
        for b in range(len(seed_idx)):
            rels = []
            for t, e_idx in zip(tasks, example_idx, strict=True):
                x, y = np.atleast_2d(method[t]), np.atleast_2d(reference[t])
                for s in seed_idx[b]:
                    m = sum(x[s, i] for i in e_idx[b]) / len(e_idx[b])
                    r = sum(y[s, i] for i in e_idx[b]) / len(e_idx[b])
                    diff = (-1 if t in lower_is_better else 1) * (m - r)
                    rels.append(diff if r == 0 else diff / abs(r))
            theta.append(100 * sum(rels) / len(rels))
    alpha = 1 - confidence
    return np.quantile(theta, [alpha / 2, 1 - alpha / 2])


@pytest.mark.parametrize("n_seeds", [1, 2])
def test_delta_m_against_loops_on_the_same_draws(monkeypatch, n_seeds):
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1000)
    rng = np.random.default_rng(5)
    method = {"a": rng.random((n_seeds, 25)), "b": rng.random((n_seeds, 40)) + 1}
    reference = {"a": rng.random((n_seeds, 25)), "b": rng.random((n_seeds, 40)) + 1}
    # a sparse reference: some resamples draw only its zeros, and fall back to the absolute difference
    method["c"] = (rng.random((n_seeds, 12)) < 0.5).astype(float)
    reference["c"] = np.zeros((n_seeds, 12))
    reference["c"][:, 0] = 1.0
    r = delta_m_bootstrap(method, reference, lower_is_better={"b"}, n_resamples=120, confidence=0.8, seed=2)
    low, high = loop_delta_m(method, reference, {"b"}, 120, 0.8, 2)
    assert r.ci_low == pytest.approx(low, rel=1e-12) and r.ci_high == pytest.approx(high, rel=1e-12)
    assert r.reference_zero == [] and r.reference_zero_resamples > 0


# ------------------------------------------------------------------------------------------- bad input


def test_misaligned_or_empty_scores_are_errors_that_name_the_task():
    x, y = scores(100)
    with pytest.raises(ValueError, match=r"task 'qa'.*1 seed\(s\) x 100 examples.*1 x 99"):
        paired_bootstrap(x, y[:99], task="qa")
    with pytest.raises(ValueError, match=r"3 seed\(s\) x 100 examples.*2 x 100"):
        paired_bootstrap(np.stack([x] * 3), np.stack([y] * 2))
    with pytest.raises(ValueError, match="no scores"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match=r"task 'qa'.*reference scores are not finite at .* \[\[0, 3\]\]"):
        paired_bootstrap(x, np.where(np.arange(100) == 3, np.nan, y), task="qa")
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(x, y, confidence=95)


def test_delta_m_and_rows_errors_name_the_tasks():
    x, y = scores(50)
    with pytest.raises(ValueError, match=r"task 'b'.*1 seed\(s\) x 50 examples.*1 x 49"):
        delta_m_bootstrap({"a": x, "b": x}, {"a": y, "b": y[:49]})
    with pytest.raises(ValueError, match=r"only the method has \['b'\], only the reference \[\]"):
        delta_m_bootstrap({"a": x, "b": x}, {"a": y})
    with pytest.raises(ValueError, match=r"same number of seeds; got \{'a': 1, 'b': 2\}"):
        delta_m_bootstrap({"a": x, "b": np.stack([x, x])}, {"a": y, "b": np.stack([y, y])})
    with pytest.raises(ValueError, match="at least one task"):
        delta_m_bootstrap({}, {})
    with pytest.raises(ValueError, match=r"task\(s\) \['b'\]"):
        transfer_rows({"a": x}, {"a": y}, {"a": "accuracy", "b": "f1"})
