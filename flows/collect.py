"""Prefect flow for the collect stage: expert training fanned out as one Prefect task per task group.

Each group is one batched trainer run; ``params.runner`` picks where the groups train (worker processes,
the stage process, or a Dask cluster: see ``flows.runners``). Tasks never cache: DVC alone decides
what is stale.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.runners import prefect_mapper, task_runner
from metadqn.config import Params
from metadqn.stages.collect import CollectOutputs, run_collect


@flow(name="collect", log_prints=True)
def _collect_flow(params: Params, out: CollectOutputs = CollectOutputs()) -> dict:
    tags = {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    return run_collect(params, out, map_groups=prefect_mapper, tags=tags)


def collect_flow(params: Params, out: CollectOutputs = CollectOutputs()) -> dict:
    """Runs the collect flow on the task runner that ``params.runner`` names; returns the stage's metrics."""
    return _collect_flow.with_options(task_runner=task_runner(params))(params, out)


if __name__ == "__main__":
    from metadqn.config import load_params

    collect_flow(load_params(Path("params.yaml")))
