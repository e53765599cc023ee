"""Prefect flow for the finetune_search stage: one Prefect task per batched run of candidate configurations
(every candidate that shares its optimisation x meta-learned method x validation task x seed; see
``metadqn.evaluation.search``). ``params.runner`` picks where the groups train."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.runners import task_runner
from metadqn.config import Params
from metadqn.data.store import TaskStore
from metadqn.evaluation.protocol import GroupRun, ProtocolGroup, finetune_group
from metadqn.stages.finetune_search import SearchOutputs, run_finetune_search


@task(name="fine-tune-candidate", cache_policy=NO_CACHE, task_run_name="fine-tune-{group.candidate}")
def finetune_candidate_task(params: Params, group: ProtocolGroup) -> GroupRun:
    return finetune_group(params.family.family(), group)


@flow(name="finetune-search", log_prints=True)
def _search_flow(params: Params, store: TaskStore, models: Path, out: SearchOutputs = SearchOutputs()) -> dict:
    def mapper(_fn, groups: list[ProtocolGroup]) -> list[GroupRun]:
        futures = [finetune_candidate_task.submit(params, g) for g in groups]
        return [f.result() for f in futures]

    tags = {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    return run_finetune_search(params, store, models, out, tags, map_groups=mapper)


def finetune_search_flow(params: Params, store: TaskStore, models: Path, out: SearchOutputs = SearchOutputs()) -> dict:
    """Runs the search flow on the task runner that ``params.runner`` names; returns the selection."""
    return _search_flow.with_options(task_runner=task_runner(params))(params, store, models, out)
