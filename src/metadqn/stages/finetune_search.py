"""The finetune_search stage: each meta-learned method's fine-tuning configuration, chosen on validation
tasks (see :mod:`metadqn.evaluation.search`).

Outputs: ``reports/finetune/selected.json`` (what meta_test reads: method -> candidate and its levers),
``reports/finetune/search.csv`` (per method and candidate: IQMs with CIs; the report shows it) and
``reports/finetune/scores.csv`` (per-run scores). Every file is exactly reproducible.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metadqn import paths
from metadqn.config import Params
from metadqn.data.io import atomic_path, require_finite, write_text
from metadqn.data.store import TaskStore
from metadqn.evaluation.search import run_search, selection_to_json
from metadqn.fanout import GroupMapper, run_in_process

log = logging.getLogger("metadqn.finetune_search")


@dataclass(frozen=True)
class SearchOutputs:
    selected: Path = paths.FINETUNE_SELECTED
    summary: Path = paths.FINETUNE_SEARCH
    scores: Path = paths.FINETUNE_SEARCH_SCORES


def run_finetune_search(params: Params, store: TaskStore, models: Path = paths.META_MODELS,
                        out: SearchOutputs = SearchOutputs(), tags: dict[str, str] | None = None,
                        map_groups: GroupMapper = run_in_process) -> dict[str, dict[str, Any]]:
    """The whole stage; returns the selection."""
    from metadqn.tracking.runs import stage_run

    start = time.perf_counter()
    result = run_search(params, store, models, map_groups)
    with atomic_path(out.summary) as tmp:
        require_finite(result.summary, out.summary).to_csv(tmp, index=False)
    with atomic_path(out.scores) as tmp:
        require_finite(result.scores, out.scores).to_csv(tmp, index=False)
    write_text(out.selected, selection_to_json(result.selected))
    wall_s = time.perf_counter() - start
    for row in result.summary.itertuples():
        log.info("search %-16s %-10s AUC %.3f [%.3f, %.3f]  final %.3f  min curve %.3f%s", row.method, row.candidate,
                 row.auc_iqm, row.auc_ci_low, row.auc_ci_high, row.final_iqm, row.min_curve_iqm,
                 "  <- selected" if row.selected else "")
    log.info("finetune search: %.0f s", wall_s)
    with stage_run("finetune_search", params.family.name, params.flat(), params.digest(), params.tracking.enabled,
                   tags) as run:
        if run is not None:
            import mlflow

            mlflow.log_metrics({f"{r.method}.{r.candidate}.auc_iqm": float(r.auc_iqm)
                                for r in result.summary.itertuples()} | {"wall_s": round(wall_s, 2)})
            mlflow.set_tags({f"selected.{m}": v["candidate"] for m, v in result.selected.items()})
            mlflow.log_artifact(str(out.selected))
            mlflow.log_artifact(str(out.summary))
    return result.selected
