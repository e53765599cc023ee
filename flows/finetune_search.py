"""Prefect flow for the finetune_search stage: one Prefect task per batched run of candidate configurations
(every candidate that shares its optimisation x meta-learned method x validation task x seed; see
``metadqn.evaluation.search``). ``params.runner`` picks where the groups train."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.runners import prefect_mapper, task_runner
from metadqn.config import Params
from metadqn.data.store import TaskStore
from metadqn.stages.finetune_search import SearchOutputs, run_finetune_search


@flow(name="finetune-search", log_prints=True)
def _search_flow(params: Params, store: TaskStore, models: Path, out: SearchOutputs = SearchOutputs()) -> dict:
    tags = {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    return run_finetune_search(params, store, models, out, tags, map_groups=prefect_mapper)


def finetune_search_flow(params: Params, store: TaskStore, models: Path, out: SearchOutputs = SearchOutputs()) -> dict:
    """Runs the search flow on the task runner that ``params.runner`` names; returns the selection."""
    return _search_flow.with_options(task_runner=task_runner(params))(params, store, models, out)
