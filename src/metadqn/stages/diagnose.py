"""The diagnose stage: where each generated start falls relative to the training tasks, and which link of
the hypernetwork (encoder or generator) leaves the training region (:mod:`metadqn.evaluation.diagnosis`).

Outputs: ``reports/diagnosis/per_task.csv`` (one row per model and task) and
``reports/diagnosis/summary.json`` (per model and split; a DVC metrics file the report reads). Only the
report reads them: no training, checkpoint or configuration choice depends on them (``tests/test_dag.py``).
Every file is exactly reproducible.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metadqn import paths
from metadqn.config import Params
from metadqn.data.io import atomic_path, require_finite, write_json
from metadqn.data.store import TaskStore
from metadqn.envs.sampling import SPLITS
from metadqn.evaluation.diagnosis import diagnose, summarise_diagnosis

log = logging.getLogger("metadqn.diagnose")


@dataclass(frozen=True)
class DiagnoseOutputs:
    summary: Path = paths.DIAGNOSIS_SUMMARY
    per_task: Path = paths.DIAGNOSIS_PER_TASK


def run_diagnose(params: Params, store: TaskStore, models: Path = paths.META_MODELS,
                 out: DiagnoseOutputs = DiagnoseOutputs(), tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The whole stage; returns the summary."""
    from metadqn.tracking.runs import stage_run

    start = time.perf_counter()
    store = TaskStore(store.tasks_path, store.trajectories, store.experts, store.collect_metrics,
                      allowed=frozenset(SPLITS))
    per_task = diagnose(params, store, models)
    summary = summarise_diagnosis(per_task)
    if per_task.empty:
        log.warning("diagnose: no hypernetwork in %s; the diagnosis is empty", models)
    with atomic_path(out.per_task) as tmp:
        require_finite(per_task, out.per_task).round(6).to_csv(tmp, index=False)
    write_json(out.summary, summary)
    wall_s = time.perf_counter() - start
    for model, splits in summary.items():
        for split, m in splits.items():
            log.info("%-16s %-6s embedding nn ratio %.2f, outside box %.2f; return: generated %.2f, generated at the "
                     "nearest training embedding %.2f, physics-nearest expert %.2f", model, split, m["embed_nn_ratio"],
                     m["embed_outside_box"], m["ret_gen"], m["ret_gen_nn"], m["ret_expert_phys_nn"])
    with stage_run("diagnose", params.family.name, params.flat(), params.digest(), params.tracking.enabled,
                   tags) as run:
        if run is not None:
            import mlflow

            mlflow.log_metrics({f"{model}.{split}.{k}": v for model, splits in summary.items()
                                for split, m in splits.items() for k, v in m.items()} | {"wall_s": round(wall_s, 2)})
            mlflow.log_artifact(str(out.summary))
    return summary
