"""The meta_test stage: the protocol on the held-out tasks, per-run scores, the summary metrics, and the
fine-tuned Q-networks (``models/adapted/<task_id>/<method>-seed<s>.pt``, indexed by ``index.csv``).

The fine-tuning runs as one group per method (see :mod:`metadqn.evaluation.protocol`); ``map_groups``
decides where the groups train (in process, worker processes, Dask) and never changes a result. Every
output file is exactly reproducible: the stage's wall time goes to the log and to MLflow only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from metadqn import paths
from metadqn.config import Params
from metadqn.data.io import atomic_path, require_finite, save_state_dict, write_json
from metadqn.data.store import TaskStore
from metadqn.envs.sampling import SPLITS
from metadqn.evaluation.protocol import run_protocol
from metadqn.evaluation.search import load_selection
from metadqn.evaluation.summary import per_run_scores, summarise
from metadqn.fanout import GroupMapper, run_in_process

log = logging.getLogger("metadqn.meta_test")


@dataclass(frozen=True)
class MetaTestOutputs:
    curves_parquet: Path = paths.META_TEST_CURVES_PARQUET
    curves_csv: Path = paths.META_TEST_CURVES_CSV
    scores: Path = paths.META_TEST_SCORES
    metrics: Path = paths.METRICS
    adapted: Path = paths.ADAPTED


def run_meta_test(params: Params, store: TaskStore, models: Path = paths.META_MODELS,
                  out: MetaTestOutputs = MetaTestOutputs(), tags: dict[str, str] | None = None,
                  map_groups: GroupMapper = run_in_process, selected: Path | None = None) -> dict[str, Any]:
    """The whole stage. ``map_groups`` fine-tunes the protocol's groups (see :mod:`metadqn.fanout`);
    ``selected`` is the finetune_search stage's selection (None: every method fine-tunes with the dqn
    section)."""
    from metadqn.tracking.runs import stage_run

    start = time.perf_counter()
    store = TaskStore(store.tasks_path, store.trajectories, store.experts, store.collect_metrics,
                      allowed=frozenset(SPLITS))
    choices = load_selection(selected) if selected is not None else None
    result = run_protocol(params, store, models, map_groups, choices)
    require_finite(result.curves, out.curves_parquet)
    scores = require_finite(per_run_scores(result.curves, params.meta_test.threshold, result.budget_steps),
                            out.scores)
    metrics: dict[str, Any] = summarise(scores, params.meta_test, result.curves)
    checked = {m for m, (_, ft) in (choices or {}).items() if ft.start_check is not None}
    for (split, method), fell in result.runs.groupby(["split", "method"])["fallback"]:
        if method in checked and method in metrics.get(split, {}):
            # the share of its runs whose start failed the start check (FinetuneConfig.start_check)
            metrics[split][method]["fallback_share"] = round(float(fell.mean()), 6)
    metrics["budget_steps"] = result.budget_steps
    metrics["context_steps"] = result.context_steps

    with atomic_path(out.curves_parquet) as tmp:
        result.curves.to_parquet(tmp, index=False)
    with atomic_path(out.curves_csv) as tmp:
        result.curves.to_csv(tmp, index=False)
    with atomic_path(out.scores) as tmp:
        scores.to_csv(tmp, index=False)
    index = []
    for row, sd in zip(result.runs.itertuples(index=False), result.final_params, strict=True):
        rel = Path(row.task_id) / f"{row.method}-seed{row.seed}.pt"
        save_state_dict(out.adapted / rel, sd)
        index.append({"task_id": row.task_id, "split": row.split, "method": row.method, "seed": row.seed,
                      "path": rel.as_posix()})
    final = scores.set_index(["task_id", "method", "seed"])["final"]
    frame = pd.DataFrame(index)
    frame["final_normalised_return"] = [final[(r.task_id, r.method, r.seed)] for r in frame.itertuples()]
    with atomic_path(out.adapted / "index.csv") as tmp:
        frame.to_csv(tmp, index=False)
    write_json(out.metrics, metrics)
    wall_s = time.perf_counter() - start
    log.info("meta-test: %d runs in %d group(s), %.0f s", len(result.runs), result.groups, wall_s)
    for split in ("interp", "extrap"):
        for method, m in metrics.get(split, {}).items():
            log.info("%s %-16s zero-shot IQM %.3f [%.3f, %.3f]  AUC %.3f  steps-to-threshold %s (ratio %s)",
                     split, method, m["zero_shot_iqm"], m["zero_shot_ci_low"], m["zero_shot_ci_high"], m["auc_iqm"],
                     m["steps_to_threshold_iqm"], m["steps_ratio_vs_scratch"])

    with stage_run("meta_test", params.family.name, params.flat(), params.digest(), params.tracking.enabled,
                   tags) as run:
        if run is not None:
            _track(run, metrics, result.curves, out, wall_s)
    return metrics


def _track(run: Any, metrics: dict[str, Any], curves: pd.DataFrame, out: MetaTestOutputs, wall_s: float) -> None:
    import mlflow

    from metadqn.evaluation.metrics import iqm
    from metadqn.tracking.runs import log_step_metrics

    flat = {f"{split}.{method}.{k}": float(v) for split in ("interp", "extrap") for method, m in
            metrics.get(split, {}).items() for k, v in m.items() if isinstance(v, (int, float)) and v is not None}
    mlflow.log_metrics({**flat, "wall_s": round(wall_s, 2)})
    agg = (curves.groupby(["split", "method", "step"])["normalised_return"].apply(lambda v: float(iqm(v.to_numpy())))
           .reset_index())
    agg["key"] = agg["split"] + "." + agg["method"]
    log_step_metrics(run, agg, "key", "step", "normalised_return", "curve_iqm/")
    mlflow.log_artifact(str(out.metrics))
    mlflow.log_artifact(str(out.scores))
