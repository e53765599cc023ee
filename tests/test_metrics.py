from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metadqn.config import MetaTestConfig
from metadqn.evaluation.metrics import (
    iqm,
    normalised_auc,
    probability_of_improvement,
    steps_to_threshold,
    stratified_iqm_ci,
)
from metadqn.evaluation.protocol import check_equal_budgets
from metadqn.evaluation.summary import per_run_scores, summarise


def test_iqm_by_hand():
    assert iqm(np.arange(1, 9, dtype=float)) == pytest.approx(4.5)  # mean of 3, 4, 5, 6


def test_bootstrap_ci_hand_checked_single_task():
    # one task, runs {0, 1}: resamples are {0,0}, {0,1}, {1,1} with probability 1/4, 1/2, 1/4, so the IQM
    # (here the mean of two) is 0, 0.5 or 1 and the 95% percentile interval is [0, 1]
    point, lo, hi = stratified_iqm_ci(np.array([0.0, 1.0]), ["a", "a"], n_resamples=4000, seed=1)
    assert (point, lo, hi) == (0.5, 0.0, 1.0)


def test_bootstrap_is_stratified_by_task():
    # every stratified resample keeps 4 runs of each task, so the IQM is always 0.5: a zero-width CI.
    # A plain bootstrap over all 8 runs would mix the tasks and give a wide interval.
    values = np.array([0.2] * 4 + [0.8] * 4)
    tasks = ["a"] * 4 + ["b"] * 4
    assert stratified_iqm_ci(values, tasks, n_resamples=500) == (0.5, 0.5, 0.5)
    point, lo, hi = stratified_iqm_ci(np.r_[values, 0.5], [*tasks, "c"], n_resamples=500)
    assert lo <= point <= hi


def test_probability_of_improvement_by_hand():
    x, y = np.array([1.0, 3.0, 0.0, 0.0]), np.array([2.0, 2.0, 0.0, 1.0])
    tasks = ["a", "a", "b", "b"]
    # task a: 1>2 no, 1>2 no, 3>2 yes, 3>2 yes -> 0.5; task b: 0 vs 0 tie (0.5), 0 vs 1 no, x2 -> 0.25
    assert probability_of_improvement(x, y, tasks, tasks) == pytest.approx((0.5 + 0.25) / 2)


def test_steps_to_threshold_handles_censoring():
    steps = np.array([64, 1064, 2064])
    assert steps_to_threshold(steps, np.array([0.1, 0.95, 0.2]), 0.9, 2064) == (1064, False)
    assert steps_to_threshold(steps, np.array([0.1, 0.5, 0.8]), 0.9, 2064) == (2064, True)
    assert steps_to_threshold(steps[::-1], np.array([0.1, 0.5, 0.95]), 0.9, 2064) == (64, False)
    assert normalised_auc(np.array([0, 10]), np.array([0.0, 1.0])) == pytest.approx(0.5)


def _curves(budget: int = 300) -> pd.DataFrame:
    rows = []
    for task in ("t0", "t1"):
        for method, level in (("scratch", 0.2), ("hypernet", 1.0)):
            for seed in range(3):
                for i, step in enumerate((100, 200, budget)):
                    norm = level if method == "hypernet" else level * (i + 1)
                    rows.append({"task_id": task, "split": "interp", "method": method, "seed": seed, "step": step,
                                 "return": 500 * norm, "normalised_return": norm})
    return pd.DataFrame(rows)


def test_summary_censoring_ratio_and_equal_budgets():
    curves = _curves()
    check_equal_budgets(curves, 300)
    scores = per_run_scores(curves, 0.9, 300)
    assert scores.loc[scores.method == "scratch", "censored"].all()
    assert (scores.loc[scores.method == "scratch", "steps_to_threshold"] == 300).all()
    summary = summarise(scores, MetaTestConfig(bootstrap_resamples=200))["interp"]
    assert summary["hypernet"]["steps_to_threshold_iqm"] == 100
    assert summary["hypernet"]["steps_ratio_vs_scratch"] == pytest.approx(3.0)
    assert summary["scratch"]["censored_fraction"] == 1.0
    assert summary["hypernet"]["prob_improvement_vs_scratch"] == 1.0
    uneven = curves[~((curves.method == "scratch") & (curves.step == 300))]
    with pytest.raises(AssertionError, match="unequal budgets"):
        check_equal_budgets(uneven, 300)


def test_paired_difference_uses_the_pairing():
    """Tasks differ a lot in level, but the method beats scratch by 0.1 on every (task, seed): the paired CI
    excludes 0 although the two methods' own CIs overlap."""
    rows = []
    for t, level in enumerate((0.1, 0.4, 0.7, 0.9)):
        for seed in range(4):
            noise = 0.15 * seed
            for method, bonus in (("scratch", 0.0), ("hypernet", 0.1)):
                for step in (100, 300):
                    v = level + noise + bonus
                    rows.append({"task_id": f"t{t}", "split": "interp", "method": method, "seed": seed,
                                 "step": step, "return": 500 * v, "normalised_return": v})
    curves = pd.DataFrame(rows)
    scores = per_run_scores(curves, 0.9, 300)
    summary = summarise(scores, MetaTestConfig(bootstrap_resamples=500), curves)["interp"]
    h, s = summary["hypernet"], summary["scratch"]
    assert h["auc_diff_vs_scratch"] == pytest.approx(0.1)
    assert 0 < h["auc_diff_vs_scratch_ci_low"] <= 0.1 <= h["auc_diff_vs_scratch_ci_high"]
    assert h["auc_ci_low"] < s["auc_ci_high"]  # unpaired CIs overlap
    assert "auc_diff_vs_scratch" not in s
    assert h["regret_iqm"] == pytest.approx(1 - h["auc_iqm"])
    assert h["min_curve_iqm"] == pytest.approx(h["auc_iqm"])  # flat curves
    shuffled = scores[~((scores.method == "scratch") & (scores.seed == 0))]
    with pytest.raises(ValueError, match="cannot pair"):
        summarise(shuffled, MetaTestConfig(bootstrap_resamples=500))


def test_task_bootstrap_resamples_tasks():
    from metadqn.evaluation.metrics import task_bootstrap_iqm_ci

    # one run per task: the stratified bootstrap has nothing to resample, the task bootstrap does
    values, tasks = np.array([0.1, 0.4, 0.7, 0.9]), ["a", "b", "c", "d"]
    assert stratified_iqm_ci(values, tasks, n_resamples=500) == (iqm(values),) * 3
    point, lo, hi = task_bootstrap_iqm_ci(values, tasks, n_resamples=500)
    assert lo < point < hi and lo >= 0.1 and hi <= 0.9
    # tasks that agree give a zero-width interval whatever their runs' spread
    assert task_bootstrap_iqm_ci(np.array([0.2, 0.8, 0.2, 0.8]), ["a", "a", "b", "b"], n_resamples=200)[1:] == \
        pytest.approx((0.5, 0.5))


def test_task_bootstrap_gives_the_same_interval_with_equal_and_unequal_runs_per_task():
    """The equal-runs path resamples every task set at once; it must give what one IQM per resample gives."""
    from metadqn.evaluation.metrics import iqm, task_bootstrap_iqm_ci

    rng = np.random.default_rng(4)
    values, tasks = rng.random(24), np.repeat(np.arange(8), 3)
    groups = [values[tasks == t] for t in range(8)]
    picks = np.random.default_rng(7).integers(0, 8, size=(300, 8))
    ref = np.array([iqm(np.concatenate([groups[i] for i in row])) for row in picks])
    want = (float(iqm(values)), float(np.quantile(ref, 0.05)), float(np.quantile(ref, 0.95)))
    assert task_bootstrap_iqm_ci(values, tasks, 0.9, 300, 7) == want
    # one task with a run fewer takes the per-resample path; the intervals stay close
    lo, hi = task_bootstrap_iqm_ci(values[1:], tasks[1:], 0.9, 300, 7)[1:]
    assert abs(lo - want[1]) < 0.1 and abs(hi - want[2]) < 0.1


def test_final_return_is_paired_apart_from_the_auc():
    """A start that leads early but ends below scratch on every (task, seed): the paired AUC difference is
    positive and the paired final difference negative, each from its own score."""
    rows = []
    for t, level in enumerate((0.2, 0.5, 0.8)):
        for seed in range(3):
            for step in (100, 200, 300):
                for method, v in (("scratch", level), ("reptile", level + (0.3 if step < 300 else -0.1))):
                    rows.append({"task_id": f"t{t}", "split": "extrap", "method": method, "seed": seed,
                                 "step": step, "return": 500 * v, "normalised_return": v})
    scores = per_run_scores(pd.DataFrame(rows), 0.9, 300)
    r = summarise(scores, MetaTestConfig(bootstrap_resamples=200))["extrap"]["reptile"]
    assert r["auc_diff_vs_scratch"] > 0.1
    assert r["final_diff_vs_scratch"] == pytest.approx(-0.1)
    assert r["final_diff_vs_scratch_ci_high"] < 0
