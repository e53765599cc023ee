"""Prefect flow for the meta_train stage: one Prefect task per job (a learner, or one hypernet seed).

Jobs run where ``params.runner`` says (worker processes by default, see ``flows.runners``); each seeds torch
itself, so where they run never changes a result. Tasks never cache: DVC decides staleness.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.runners import prefect_mapper, task_runner
from metadqn.config import Params
from metadqn.data.store import TaskStore
from metadqn.stages.meta_train import MetaTrainOutputs, run_meta_train


@flow(name="meta-train", log_prints=True)
def _meta_train_flow(params: Params, store: TaskStore = TaskStore(),
                     out: MetaTrainOutputs = MetaTrainOutputs()) -> dict:
    tags = {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    return run_meta_train(params, store, out, map_groups=prefect_mapper, tags=tags)


def meta_train_flow(params: Params, store: TaskStore = TaskStore(), out: MetaTrainOutputs = MetaTrainOutputs()) -> dict:
    """Runs the meta_train flow on the task runner that ``params.runner`` names; returns the stage's metrics."""
    return _meta_train_flow.with_options(task_runner=task_runner(params))(params, store, out)
