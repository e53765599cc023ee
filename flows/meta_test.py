"""Prefect flow for the meta_test stage: the protocol's fine-tuning fanned out as one Prefect task per
method (a group of every test task x seed, one batched trainer run; see ``metadqn.evaluation.protocol``).

``params.runner`` picks where the groups train (the stage process, or one Dask task per group on a Dask
cluster: see ``flows.runners``). Tasks never cache (``NO_CACHE``): DVC alone decides what is stale.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.runners import task_runner
from metadqn.config import Params
from metadqn.data.store import TaskStore
from metadqn.evaluation.protocol import GroupRun, ProtocolGroup, finetune_group
from metadqn.stages.meta_test import MetaTestOutputs, run_meta_test


@task(name="fine-tune-method", cache_policy=NO_CACHE, task_run_name="fine-tune-{group.method}")
def finetune_group_task(params: Params, group: ProtocolGroup) -> GroupRun:
    return finetune_group(params.family.family(), group)


@flow(name="meta-test", log_prints=True)
def _meta_test_flow(params: Params, store: TaskStore, models: Path,
                    out: MetaTestOutputs = MetaTestOutputs(), selected: Path | None = None) -> dict:
    def mapper(_fn, groups: list[ProtocolGroup]) -> list[GroupRun]:
        futures = [finetune_group_task.submit(params, g) for g in groups]
        return [f.result() for f in futures]

    tags = {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    return run_meta_test(params, store, models, out, tags, map_groups=mapper, selected=selected)


def meta_test_flow(params: Params, store: TaskStore, models: Path, out: MetaTestOutputs = MetaTestOutputs(),
                   selected: Path | None = None) -> dict:
    """Runs the meta-test flow on the task runner that ``params.runner`` names; returns the metrics."""
    return _meta_test_flow.with_options(task_runner=task_runner(params))(params, store, models, out, selected)
