"""Prefect flow for the meta_train stage: one Prefect task per learner.

Learners run one after another: they share torch's global RNG for module initialisation, so running
them concurrently would make results depend on thread timing. Tasks never cache: DVC decides staleness.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from metadqn.config import Params
from metadqn.data.store import TaskStore
from metadqn.stages.meta_train import LearnerResult, MetaTrainOutputs, run_meta_train


@task(name="train-learner", cache_policy=NO_CACHE, task_run_name="train-{name}")
def train_learner_task(fn, name: str) -> LearnerResult:
    return fn(name)


@flow(name="meta-train", log_prints=True)
def meta_train_flow(params: Params, store: TaskStore = TaskStore(), out: MetaTrainOutputs = MetaTrainOutputs()) -> dict:
    def mapper(fn, names: list[str]) -> list[LearnerResult]:
        return [train_learner_task(fn, n) for n in names]

    tags = {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    return run_meta_train(params, store, out, map_learners=mapper, tags=tags)
