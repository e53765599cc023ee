"""Prefect flow for the collect stage: expert training fanned out as one Prefect task per task group.

Each group is one batched trainer run; ``params.runner`` picks where the groups train (the stage process,
or one Dask task per group on a Dask cluster: see ``flows.runners``). Tasks never cache (``NO_CACHE``):
DVC alone decides what is stale.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.runners import task_runner
from metadqn.config import Params
from metadqn.stages.collect import CollectOutputs, GroupResult, run_collect, train_group


@task(name="train-expert-group", cache_policy=NO_CACHE)
def train_group_task(params: Params, group: pd.DataFrame) -> GroupResult:
    return train_group(params.family.family(), group, params.dqn, params.collect)


@flow(name="collect", log_prints=True)
def _collect_flow(params: Params, out: CollectOutputs = CollectOutputs()) -> dict:
    def mapper(_fn, groups: list[pd.DataFrame]) -> list[GroupResult]:
        futures = [train_group_task.submit(params, g) for g in groups]
        return [f.result() for f in futures]

    tags = {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    return run_collect(params, out, map_groups=mapper, tags=tags)


def collect_flow(params: Params, out: CollectOutputs = CollectOutputs()) -> dict:
    """Runs the collect flow on the task runner that ``params.runner`` names; returns the stage's metrics."""
    return _collect_flow.with_options(task_runner=task_runner(params))(params, out)


if __name__ == "__main__":
    from metadqn.config import load_params

    collect_flow(load_params(Path("params.yaml")))
