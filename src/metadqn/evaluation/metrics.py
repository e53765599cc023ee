"""Aggregate metrics with honest error bars, following rliable (Agarwal et al. 2021).

* IQM: the interquartile mean over all (task, seed) runs (``scipy.stats.trim_mean`` at 25%).
* 95% CIs: stratified bootstrap: runs are resampled within each task (every task keeps its number of
  runs), percentile intervals, via ``scipy.stats.bootstrap`` with one sample per task.
* Probability of improvement P(X > Y): per task, the Mann-Whitney probability that a run of X beats a run
  of Y (ties count half), averaged over tasks.
* Steps to threshold: the first evaluation at or above the threshold; runs that never reach it are
  censored at the budget, reported as the budget (a lower bound) and counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

Tasks = Sequence[str] | np.ndarray
"""Task ids, one per run: a list, or a column's ``to_numpy()`` (what every caller passes)."""


def iqm(values: np.ndarray, axis: int = -1) -> np.ndarray | float:
    return stats.trim_mean(values, 0.25, axis=axis)


def _by_task(values: np.ndarray, tasks: Tasks) -> list[np.ndarray]:
    tasks = np.asarray(tasks)
    return [np.asarray(values)[tasks == t] for t in dict.fromkeys(tasks)]


def stratified_iqm_ci(values: np.ndarray, tasks: Tasks, confidence: float = 0.95,
                      n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(IQM, CI low, CI high) of ``values`` (one per run), resampling runs within each task."""
    values = np.asarray(values, dtype=np.float64)
    point = float(iqm(values))
    groups = _by_task(values, tasks)
    if len(values) < 2 or all(len(g) < 2 for g in groups) or np.ptp(values) == 0:
        return point, point, point

    def statistic(*samples: np.ndarray, axis: int = -1) -> np.ndarray | float:
        return iqm(np.concatenate(samples, axis=axis), axis=axis)

    usable = [g for g in groups if len(g) >= 2]
    fixed = np.concatenate([g for g in groups if len(g) < 2]) if len(usable) < len(groups) else None

    def with_fixed(*samples: np.ndarray, axis: int = -1) -> np.ndarray | float:
        if fixed is None:
            return statistic(*samples, axis=axis)
        shape = (*samples[0].shape[:-1], len(fixed))
        return statistic(*samples, np.broadcast_to(fixed, shape), axis=axis)

    res = stats.bootstrap(tuple(usable), with_fixed, n_resamples=n_resamples, confidence_level=confidence,
                          method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def task_bootstrap_iqm_ci(values: np.ndarray, tasks: Tasks, confidence: float = 0.95,
                          n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(IQM, CI low, CI high), resampling whole tasks (each with all its runs) with replacement.

    For comparisons across tasks with one or few runs per task (the fine-tuning search), where the
    stratified bootstrap, which keeps the tasks fixed, has nothing to resample.
    """
    values = np.asarray(values, dtype=np.float64)
    point = float(iqm(values))
    groups = _by_task(values, tasks)
    if len(groups) < 2 or np.ptp(values) == 0:
        return point, point, point
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(n_resamples, len(groups)))
    if len({len(g) for g in groups}) == 1:  # equal runs per task (the search): every resample at once
        stats_ = np.asarray(iqm(np.stack(groups)[picks].reshape(n_resamples, -1), axis=-1))
    else:
        stats_ = np.array([iqm(np.concatenate([groups[i] for i in row])) for row in picks])
    alpha = (1.0 - confidence) / 2.0
    return point, float(np.quantile(stats_, alpha)), float(np.quantile(stats_, 1.0 - alpha))


def probability_of_improvement(x: np.ndarray, y: np.ndarray, tasks_x: Tasks, tasks_y: Tasks) -> float:
    """P(a run of X beats a run of Y on the same task), averaged over the tasks both have."""
    gx = dict(zip(dict.fromkeys(tasks_x), _by_task(x, tasks_x), strict=True))
    gy = dict(zip(dict.fromkeys(tasks_y), _by_task(y, tasks_y), strict=True))
    probs = []
    for task in gx.keys() & gy.keys():
        a, b = gx[task][:, None], gy[task][None, :]
        probs.append(float(((a > b) + 0.5 * (a == b)).mean()))
    return float(np.mean(probs)) if probs else float("nan")


def steps_to_threshold(steps: np.ndarray, normalised: np.ndarray, threshold: float, budget: int) -> tuple[int, bool]:
    """(first step whose normalised return >= threshold, censored?) for one learning curve."""
    order = np.argsort(steps)
    steps, normalised = np.asarray(steps)[order], np.asarray(normalised)[order]
    hit = np.flatnonzero(normalised >= threshold)
    if len(hit) == 0:
        return int(budget), True
    return int(steps[hit[0]]), False


def normalised_auc(steps: np.ndarray, normalised: np.ndarray) -> float:
    """Area under the normalised learning curve divided by its step range (a mean normalised return)."""
    order = np.argsort(steps)
    s, v = np.asarray(steps, dtype=np.float64)[order], np.asarray(normalised, dtype=np.float64)[order]
    if len(s) < 2 or s[-1] == s[0]:
        return float(v.mean())
    return float(np.trapezoid(v, s) / (s[-1] - s[0]))
