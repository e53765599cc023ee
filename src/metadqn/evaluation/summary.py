"""From learning curves to per-run scores and the per-split, per-method summary (``reports/metrics.json``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from metadqn.config import MetaTestConfig
from metadqn.evaluation.metrics import (
    iqm,
    normalised_auc,
    probability_of_improvement,
    steps_to_threshold,
    stratified_iqm_ci,
)


def per_run_scores(curves: pd.DataFrame, threshold: float, budget: int) -> pd.DataFrame:
    """One row per (task, method, seed): zero_shot (first point), auc, steps_to_threshold, censored."""
    rows = []
    for (task, split, method, seed), g in curves.groupby(["task_id", "split", "method", "seed"], sort=True):
        g = g.sort_values("step")
        steps, norm = g["step"].to_numpy(), g["normalised_return"].to_numpy()
        hit, censored = steps_to_threshold(steps, norm, threshold, budget)
        rows.append({"task_id": task, "split": split, "method": method, "seed": seed,
                     "zero_shot": float(norm[0]), "auc": normalised_auc(steps, norm), "final": float(norm[-1]),
                     "steps_to_threshold": hit, "censored": censored})
    return pd.DataFrame(rows)


def _clean(v: Any) -> Any:
    """Rounded floats; NaN and infinities become null (strict JSON readers refuse NaN)."""
    if isinstance(v, float):
        return round(v, 6) if np.isfinite(v) else None
    return v


def paired_differences(scores: pd.DataFrame, method: str, baseline: str, key: str = "auc") -> pd.DataFrame:
    """Per (task, seed): ``key`` of ``method`` minus that of ``baseline`` (the protocol pairs them by common
    random numbers: same context, resets, exploration draws and evaluation start states)."""
    a = scores[scores["method"] == method].set_index(["task_id", "seed"])[key]
    b = scores[scores["method"] == baseline].set_index(["task_id", "seed"])[key]
    both = a.index.intersection(b.index)
    if len(both) != len(a):
        raise ValueError(f"{method} and {baseline} do not have the same (task, seed) runs; cannot pair them")
    return (a[both] - b[both]).rename("diff").reset_index()


def min_curve_iqm(curves: pd.DataFrame) -> float:
    """The lowest point of the IQM learning curve (every point is at or after the context, the first one is
    the zero-shot return): how far a start dips while it adapts."""
    return float(curves.groupby("step")["normalised_return"].apply(lambda v: iqm(v.to_numpy(float))).min())


PAIRED_KEYS = ("auc", "final")
"""The scores compared with scratch run by run (``<key>_diff_vs_scratch``): the AUC, the product's claim, and
the final return, whose unpaired IQMs differ by less than their run-to-run noise where a start only speeds up
the beginning (README, "Replicates")."""


def summarise(scores: pd.DataFrame, cfg: MetaTestConfig,
              curves: pd.DataFrame | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{split: {method: {zero_shot_iqm, zero_shot_ci_low, ..., auc_diff_vs_scratch, ...}}}``.

    Regret is 1 - AUC. ``auc_diff_vs_scratch`` is the IQM of the paired per-(task, seed) AUC differences
    with scratch, with a stratified-bootstrap CI (a paired test: the CI excluding 0 is the significance
    claim); ``final_diff_vs_scratch`` the same for the final return. The probability of improvement
    compares AUC with scratch's on the same tasks; the steps ratio
    is scratch's steps-to-threshold IQM over the method's (censored runs count at the budget, so a ratio
    against a mostly censored scratch is a lower bound). ``min_curve_iqm`` (with ``curves``) is the lowest
    IQM curve point.
    """
    scores = scores.assign(regret=1.0 - scores["auc"])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split, sg in scores.groupby("split", sort=True):
        out[split] = {}
        scratch = sg[sg["method"] == "scratch"]
        scratch_steps = float(iqm(scratch["steps_to_threshold"].to_numpy(float))) if len(scratch) else float("nan")
        for method, mg in sg.groupby("method", sort=True):
            tasks = mg["task_id"].to_numpy()
            entry: dict[str, Any] = {"runs": len(mg), "tasks": int(mg["task_id"].nunique())}
            for key in ("zero_shot", "auc", "final", "regret", "steps_to_threshold"):
                point, lo, hi = stratified_iqm_ci(mg[key].to_numpy(float), tasks, cfg.confidence,
                                                  cfg.bootstrap_resamples, cfg.seed)
                entry.update({f"{key}_iqm": point, f"{key}_ci_low": lo, f"{key}_ci_high": hi})
            entry["censored_fraction"] = float(mg["censored"].mean())
            entry["steps_ratio_vs_scratch"] = scratch_steps / entry["steps_to_threshold_iqm"] \
                if entry["steps_to_threshold_iqm"] > 0 else float("nan")
            entry["prob_improvement_vs_scratch"] = probability_of_improvement(
                mg["auc"].to_numpy(float), scratch["auc"].to_numpy(float), tasks, scratch["task_id"].to_numpy()
            ) if len(scratch) else float("nan")
            if len(scratch) and method != "scratch":
                for key in PAIRED_KEYS:
                    diff = paired_differences(sg, method, "scratch", key)
                    point, lo, hi = stratified_iqm_ci(diff["diff"].to_numpy(float), diff["task_id"].to_numpy(),
                                                      cfg.confidence, cfg.bootstrap_resamples, cfg.seed)
                    entry.update({f"{key}_diff_vs_scratch": point, f"{key}_diff_vs_scratch_ci_low": lo,
                                  f"{key}_diff_vs_scratch_ci_high": hi})
            if curves is not None:
                mc = curves[(curves["split"] == split) & (curves["method"] == method)]
                entry["min_curve_iqm"] = min_curve_iqm(mc)
            out[split][method] = {k: _clean(v) for k, v in entry.items()}
    return out
