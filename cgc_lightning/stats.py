r"""Did sharing help or hurt, task by task: paired bootstrap intervals of a method against the reference.

A method and the reference are scored on the same test examples, so the per-example difference
d_i = x_i - y_i carries the comparison and each example's difficulty cancels out of it. With S seeds
(seed s of the method paired with seed s of the reference, e.g. grid points matched on the seed) the
scores are (S, N) and resample b draws

    seeds     j_{b,1..S}  uniformly with replacement from 0..S-1   (one draw, shared by all tasks)
    examples  i_{b,1..N}  uniformly with replacement from 0..N-1   (one draw, shared by all drawn seeds)
    θ*_b      = 1/(S N) Σ_s Σ_k d[j_{b,s}, i_{b,k}]

a two-level bootstrap whose levels are crossed, not nested: every seed scores the same test set, so an
example's difficulty is common to all seeds. Drawing examples afresh within each seed would average that
common part away, and S copies of one run would get an interval √S narrower than the run itself; with
the shared draw they get exactly the one-seed interval. With one seed this is the ordinary paired
bootstrap over examples. The interval is the percentile one, [q_{α/2}, q_{1-α/2}] of θ*, α = 1 - confidence,
and the verdict "better" / "worse" needs all of it on one side of 0.

Δm is compare.py's, on each seed's task means, averaged over seeds like grid's summary (s_t = -1 for a
lower-is-better score, +1 otherwise):

    rel_{t,s} = s_t (M_{m,t,s} - M_{ref,t,s}) / |M_{ref,t,s}|     (M_{ref,t,s} = 0: s_t (M_{m,t,s} - M_{ref,t,s}))
    Δm        = 100 · mean_s mean_t rel_{t,s}                     (percent)

and each resample recomputes it from the resampled means of both methods (the same draw for both; the
seed draw shared by all tasks, since one seed is one run that trains every task; examples drawn per task).
With one seed and per-example scores whose mean is the task's metric, the point estimate is
``100 * compare.build_report(...).delta_m[method]``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

Verdict = Literal["better", "worse", "no significant difference"]

#: Resampled values gathered per chunk (float64): bounds memory to ~32 MB whatever the test set's size.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PairedResult:
    """One task: method minus reference, its bootstrap interval and what it says."""

    method_mean: float
    """The method's score, mean over seeds and examples."""
    reference_mean: float
    """The reference's score, mean over seeds and examples."""
    mean_diff: float
    """``method_mean - reference_mean`` (not sign-corrected: for a lower-is-better score, < 0 is better)."""
    ci_low: float
    """Lower end of the percentile interval of ``mean_diff``."""
    ci_high: float
    """Upper end of the percentile interval of ``mean_diff``."""
    n_examples: int
    n_seeds: int
    confidence: float
    n_resamples: int
    lower_is_better: bool
    verdict: Verdict
    """``"better"`` / ``"worse"`` when the whole interval lies on that side of 0, else no significant difference."""


@dataclass(frozen=True)
class DeltaMResult:
    """Δm of a method against the reference over tasks, in percent, with its bootstrap interval."""

    delta_m: float
    """Δm in percent (``compare.Report.delta_m`` holds the same number as a fraction)."""
    ci_low: float
    ci_high: float
    relative: dict[str, float]
    """``{task: rel}`` in percent, sign-corrected (> 0 is better), mean over seeds."""
    n_seeds: int
    confidence: float
    n_resamples: int
    verdict: Verdict
    reference_zero: list[str] = field(default_factory=list)
    """Tasks where the reference's mean is 0 (in some seed): their rel there is the absolute difference, as in
    compare.py."""
    reference_zero_resamples: int = 0
    """Resamples in which a reference mean that is not 0 became 0 (its rel fell back to the absolute difference);
    more than a few means a task has too few examples for a ratio."""


def _scores(method: ArrayLike, reference: ArrayLike, task: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 (S, N), checked to be the same non-empty finite shape."""
    where = f"task {task!r}: " if task is not None else ""
    x, y = np.asarray(method, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    for name, a in (("method", x), ("reference", y)):
        if a.ndim not in (1, 2):
            raise ValueError(
                f"{where}{name} scores must be (n_examples,) or (n_seeds, n_examples), got shape {a.shape}"
            )
    x, y = np.atleast_2d(x), np.atleast_2d(y)  # (S, N)
    if x.shape != y.shape:
        raise ValueError(
            f"{where}method scores are {x.shape[0]} seed(s) x {x.shape[1]} examples but reference scores "
            f"{y.shape[0]} x {y.shape[1]}; both must score the same test examples in the same order, "
            "with one reference run per method seed"
        )
    if x.size == 0:
        raise ValueError(f"{where}no scores (shape {x.shape}): need at least one seed and one example")
    for name, a in (("method", x), ("reference", y)):
        bad = np.argwhere(~np.isfinite(a))
        if len(bad):
            raise ValueError(f"{where}{name} scores are not finite at (seed, example) {bad[:5].tolist()}")
    return x, y


def _check_options(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _draws(seed: int, n_resamples: int, n_seeds: int, sizes: Sequence[int]) -> Iterator[tuple[np.ndarray, list]]:
    """Chunks of resample indices: ``(seed_idx (c, S), [example_idx (c, N_t) per task])``, c ≤ n_resamples.

    Seeds and examples come from two independent streams, so the example draws do not depend on the number
    of seeds (S identical seeds reproduce the one-seed resamples).
    """
    seed_rng, example_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // (2 * n_seeds * max(sizes))))
    for start in range(0, n_resamples, chunk):
        c = min(chunk, n_resamples - start)
        seed_idx = seed_rng.integers(0, n_seeds, size=(c, n_seeds))  # (c, S)
        yield seed_idx, [example_rng.integers(0, n, size=(c, n)) for n in sizes]  # (c, N_t) each


def _resampled_seed_means(a: np.ndarray, seed_idx: np.ndarray, example_idx: np.ndarray) -> np.ndarray:
    """a: (..., S, N) -> (..., c, S): each resample's example mean of each drawn seed."""
    means = np.take(a, example_idx, axis=-1).mean(axis=-1)  # (..., S, c): every seed on the shared example draw
    means = np.swapaxes(means, -1, -2)  # (..., c, S)
    return np.take_along_axis(means, np.broadcast_to(seed_idx, means.shape), axis=-1)  # (..., c, S): drawn seeds


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _verdict(low: float, high: float, lower_is_better: bool = False) -> Verdict:
    if low > 0:
        return "worse" if lower_is_better else "better"
    if high < 0:
        return "better" if lower_is_better else "worse"
    return "no significant difference"


def paired_bootstrap(
    method_scores: ArrayLike,
    reference_scores: ArrayLike,
    *,
    lower_is_better: bool = False,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    task: str | None = None,
) -> PairedResult:
    """Mean difference method - reference on one task, with its paired (seeds x examples) bootstrap interval.

    Args:
        method_scores: per-example scores, (N,) or (S, N) for S seeds; CPU tensors and lists are fine.
        reference_scores: the reference's scores on the same examples (same order), same shape; row s is the run
            paired with the method's seed s.
        lower_is_better: the score is a loss-like quantity; only flips the verdict (``mean_diff`` stays raw).
        n_resamples: bootstrap resamples.
        confidence: of the percentile interval.
        seed: of the resampling (the same seed gives the same draws for the same shapes).
        task: named in error messages.

    Raises:
        ValueError: the two do not have the same shape, are empty or hold non-finite values.
    """
    _check_options(n_resamples, confidence)
    x, y = _scores(method_scores, reference_scores, task)
    d = x - y  # (S, N)
    n_seeds, n = d.shape
    draws = _draws(seed, n_resamples, n_seeds, [n])
    theta = np.concatenate([_resampled_seed_means(d, s_idx, e_idx).mean(axis=-1) for s_idx, (e_idx,) in draws])  # (B,)
    low, high = _interval(theta, confidence)
    return PairedResult(
        method_mean=float(x.mean()),
        reference_mean=float(y.mean()),
        mean_diff=float(x.mean() - y.mean()),
        ci_low=low,
        ci_high=high,
        n_examples=n,
        n_seeds=n_seeds,
        confidence=confidence,
        n_resamples=n_resamples,
        lower_is_better=lower_is_better,
        verdict=_verdict(low, high, lower_is_better),
    )


def _relative(m: np.ndarray, r: np.ndarray, sign: float) -> np.ndarray:
    """compare.py's rel on arrays of means: the relative change, or the absolute one where the reference is 0."""
    diff = sign * (m - r)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r == 0, diff, diff / np.abs(r))


def delta_m_bootstrap(
    method_scores: Mapping[str, ArrayLike],
    reference_scores: Mapping[str, ArrayLike],
    *,
    lower_is_better: Collection[str] = (),
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> DeltaMResult:
    """Δm (percent) of a method against the reference over tasks, with its bootstrap interval (module docstring).

    Args:
        method_scores: ``{task: per-example scores}``, each (N_t,) or (S, N_t); S must be the same for every task.
        reference_scores: the reference's, with the same tasks and shapes.
        lower_is_better: tasks whose score is lower-is-better (compare.py's s_t = -1), e.g.
            ``{t for t, m in metric_names.items() if m in metrics.LOWER_IS_BETTER}``.
        n_resamples, confidence, seed: as in :func:`paired_bootstrap`.

    Raises:
        ValueError: the tasks differ, a task's arrays misalign, or the seed counts differ between tasks.
    """
    _check_options(n_resamples, confidence)
    if set(method_scores) != set(reference_scores):
        only_m, only_r = (
            sorted(set(method_scores) - set(reference_scores)),
            sorted(set(reference_scores) - set(method_scores)),
        )
        raise ValueError(f"Δm needs the same tasks for both: only the method has {only_m}, only the reference {only_r}")
    tasks = list(method_scores)
    if not tasks:
        raise ValueError("Δm needs at least one task; got no scores")
    pairs = {t: np.stack(_scores(method_scores[t], reference_scores[t], t)) for t in tasks}  # (2, S, N_t)
    seeds = {t: p.shape[1] for t, p in pairs.items()}
    if len(set(seeds.values())) > 1:
        raise ValueError(f"Δm pairs whole runs, so every task needs the same number of seeds; got {seeds}")
    n_seeds = seeds[tasks[0]]
    signs = [-1.0 if t in lower_is_better else 1.0 for t in tasks]

    means = {t: p.mean(axis=-1) for t, p in pairs.items()}  # (2, S): each seed's task mean
    rel = {t: _relative(means[t][0], means[t][1], s) for t, s in zip(tasks, signs, strict=True)}  # (S,)
    zero = [t for t in tasks if (means[t][1] == 0).any()]

    thetas, zero_resamples = [], 0
    for seed_idx, example_idx in _draws(seed, n_resamples, n_seeds, [pairs[t].shape[-1] for t in tasks]):
        per_task, fell_back = [], np.zeros(len(seed_idx), dtype=bool)
        for t, s, e_idx in zip(tasks, signs, example_idx, strict=True):
            m, r = _resampled_seed_means(pairs[t], seed_idx, e_idx)  # (c, S) each
            per_task.append(_relative(m, r, s))
            fell_back |= ((r == 0) & (means[t][1][seed_idx] != 0)).any(axis=-1)
        thetas.append(100 * np.mean(per_task, axis=(0, 2)))  # (c,): mean over tasks and drawn seeds
        zero_resamples += int(fell_back.sum())
    low, high = _interval(np.concatenate(thetas), confidence)
    return DeltaMResult(
        delta_m=float(100 * np.mean([rel[t] for t in tasks])),
        ci_low=low,
        ci_high=high,
        relative={t: float(100 * rel[t].mean()) for t in tasks},
        n_seeds=n_seeds,
        confidence=confidence,
        n_resamples=n_resamples,
        verdict=_verdict(low, high),
        reference_zero=zero,
        reference_zero_resamples=zero_resamples,
    )


def transfer_rows(
    method_scores: Mapping[str, ArrayLike],
    reference_scores: Mapping[str, ArrayLike],
    metric_names: Mapping[str, str],
    *,
    lower_is_better: Collection[str] = (),
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """One row per task of ``metric_names`` (in its order): the paired bootstrap of the method against the reference.

    Each row is ``{task, metric, reference_mean, method_mean, diff, ci_low, ci_high, n_examples, n_seeds,
    verdict}`` (plain values, ready for ``csv.DictWriter``); ``lower_is_better`` as in :func:`delta_m_bootstrap`.
    Every task is resampled with ``seed``, so a row equals :func:`paired_bootstrap` of that task alone.
    """
    missing = [t for t in metric_names if t not in method_scores or t not in reference_scores]
    if missing:
        raise ValueError(
            f"no per-example scores for task(s) {missing}: method has {sorted(method_scores)}, "
            f"reference has {sorted(reference_scores)}"
        )
    rows = []
    for t, metric in metric_names.items():
        r = paired_bootstrap(
            method_scores[t],
            reference_scores[t],
            lower_is_better=t in lower_is_better,
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
            task=t,
        )
        rows.append(
            {
                "task": t,
                "metric": metric,
                "reference_mean": r.reference_mean,
                "method_mean": r.method_mean,
                "diff": r.mean_diff,
                "ci_low": r.ci_low,
                "ci_high": r.ci_high,
                "n_examples": r.n_examples,
                "n_seeds": r.n_seeds,
                "verdict": r.verdict,
            }
        )
    return rows


def method_note(*, n_resamples: int = 10_000, confidence: float = 0.95, n_seeds: int = 1) -> str:
    """The sentence a report prints under its intervals, saying how they were made."""
    over = "test examples" if n_seeds == 1 else f"test examples and seeds ({n_seeds} paired seeds, crossed)"
    return (
        f"paired bootstrap over {over}, {n_resamples:,} resamples, {100 * confidence:g} % percentile interval; "
        "'negative transfer' counts only tasks whose interval lies entirely on the worse side of 0"
    )


def negative_transfer(rows: Sequence[Mapping]) -> list[str]:
    """The tasks of :func:`transfer_rows` whose verdict is "worse": significant losses only."""
    return [row["task"] for row in rows if row["verdict"] == "worse"]
