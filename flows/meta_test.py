"""Prefect flow for the meta_test stage: the protocol runs every (task, method, seed) in one batched task."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from metadqn.config import Params
from metadqn.data.store import TaskStore
from metadqn.stages.meta_test import MetaTestOutputs, run_meta_test


@task(name="meta-test-protocol", cache_policy=NO_CACHE)
def protocol_task(params: Params, store: TaskStore, models: Path, out: MetaTestOutputs, tags: dict) -> dict:
    return run_meta_test(params, store, models, out, tags)


@flow(name="meta-test", log_prints=True)
def meta_test_flow(params: Params, store: TaskStore, models: Path, out: MetaTestOutputs = MetaTestOutputs()) -> dict:
    return protocol_task(params, store, models, out, {"prefect_flow_run_id": str(flow_run.get_id() or "")})
