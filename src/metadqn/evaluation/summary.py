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


def summarise(scores: pd.DataFrame, cfg: MetaTestConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """``{split: {method: {zero_shot_iqm, zero_shot_ci_low, ..., prob_improvement_vs_scratch}}}``.

    The probability of improvement compares normalised AUC (the sample-efficiency score) with scratch's on
    the same tasks; the steps ratio is scratch's steps-to-threshold IQM over the method's (censored runs
    count at the budget, so a ratio against a mostly censored scratch is a lower bound).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split, sg in scores.groupby("split", sort=True):
        out[split] = {}
        scratch = sg[sg["method"] == "scratch"]
        scratch_steps = float(iqm(scratch["steps_to_threshold"].to_numpy(float))) if len(scratch) else float("nan")
        for method, mg in sg.groupby("method", sort=True):
            tasks = mg["task_id"].to_numpy()
            entry: dict[str, Any] = {"runs": len(mg), "tasks": int(mg["task_id"].nunique())}
            for key in ("zero_shot", "auc", "final", "steps_to_threshold"):
                point, lo, hi = stratified_iqm_ci(mg[key].to_numpy(float), tasks, cfg.confidence,
                                                  cfg.bootstrap_resamples, cfg.seed)
                entry.update({f"{key}_iqm": point, f"{key}_ci_low": lo, f"{key}_ci_high": hi})
            entry["censored_fraction"] = float(mg["censored"].mean())
            entry["steps_ratio_vs_scratch"] = scratch_steps / entry["steps_to_threshold_iqm"] \
                if entry["steps_to_threshold_iqm"] > 0 else float("nan")
            entry["prob_improvement_vs_scratch"] = probability_of_improvement(
                mg["auc"].to_numpy(float), scratch["auc"].to_numpy(float), tasks, scratch["task_id"].to_numpy()
            ) if len(scratch) else float("nan")
            out[split][method] = {k: _clean(v) for k, v in entry.items()}
    return out
