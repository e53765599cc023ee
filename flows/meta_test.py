"""Prefect flow for the meta_test stage: the protocol's fine-tuning fanned out as one Prefect task per
method (a group of every test task x seed, one batched trainer run; see ``metadqn.evaluation.protocol``).

``params.runner`` picks where the groups train (worker processes, the stage process, or a Dask cluster:
see ``flows.runners``). Tasks never cache (``NO_CACHE``): DVC alone decides what is stale.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.runners import prefect_mapper, task_runner
from metadqn.config import Params
from metadqn.data.store import TaskStore
from metadqn.stages.meta_test import MetaTestOutputs, run_meta_test


@flow(name="meta-test", log_prints=True)
def _meta_test_flow(params: Params, store: TaskStore, models: Path,
                    out: MetaTestOutputs = MetaTestOutputs(), selected: Path | None = None) -> dict:
    tags = {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    return run_meta_test(params, store, models, out, tags, map_groups=prefect_mapper, selected=selected)


def meta_test_flow(params: Params, store: TaskStore, models: Path, out: MetaTestOutputs = MetaTestOutputs(),
                   selected: Path | None = None) -> dict:
    """Runs the meta-test flow on the task runner that ``params.runner`` names; returns the metrics."""
    return _meta_test_flow.with_options(task_runner=task_runner(params))(params, store, models, out, selected)
