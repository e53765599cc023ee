"""Where the fan-out of the collect, finetune_search and meta_test stages runs.

A stage hands a picklable ``fn`` and its groups (the contract: :mod:`metadqn.fanout`); :func:`prefect_mapper`
runs ``fn`` on each group as one Prefect task (:func:`run_group`) on the task runner that ``params.runner``
names (:func:`task_runner`). Each group's result is a pure function of the group (its seed derives from the
group's contents), so ``params.runner`` never changes a result (it is left out of ``Params.digest()``).

``runner.kind: processes`` (default) -> Prefect's ``ProcessPoolTaskRunner``: ``runner.workers`` worker
processes of ``runner.threads`` torch threads each (default 2 x 1), started by the stage. Groups train in
parallel, one per process. Why processes of one thread rather than one process of two threads: torch's
OpenMP threads wait on each other at every operation, so when another program takes one of the two cores,
a two-thread process stalls (collect took ~8x its time alone); a one-thread process just shares its core
(figures: ``bench/contention.py`` and the README).

``runner.kind: local`` -> Prefect's ``ThreadPoolTaskRunner(max_workers=1)``: groups train one after another
in the stage process with torch's threads (``dqn.torch_threads``). For debugging (one process to attach to).

``runner.kind: dask`` -> prefect-dask's ``DaskTaskRunner(address=...)`` on an existing Dask cluster
(``runner.address`` or ``$METADQN_DASK_ADDRESS``): one Dask task per group, as many groups at once as the
cluster has worker threads. The runner never creates a cluster (a cluster outlives a stage and is sized
by whoever runs it). What the cluster needs:

- Workers run the same code as the stage process: metadqn of the same commit (``pip install -e .`` or the
  wheel, with torch, gymnasium, prefect and prefect-dask) in the workers' environment. Tasks travel as
  pickled references to ``flows.*`` / ``metadqn.*`` functions, their inputs and results by value, so the
  workers need no shared file system: only the stage process reads inputs and writes outputs.
- One thread per worker process (``dask worker <address> --nthreads 1``, one worker per core or GPU):
  the Dask nanny then sets ``OMP_NUM_THREADS=1`` and each group trains on one core.
- A Prefect server that the workers can reach, named by ``PREFECT_API_URL`` in the stage process (e.g.
  ``prefect server start --host 0.0.0.0`` and ``export PREFECT_API_URL=http://<host>:4200/api``).
  prefect-dask sends the stage's Prefect settings with every task, so workers report their task runs
  to that server. Without it each worker starts its own temporary Prefect server on its first task
  (5-20 s, runs recorded on the worker only): it works, slowly, and ``task_runner`` warns.
- The offline switches and the CPU pin in the workers' environment too (``worker_env()``: DO_NOT_TRACK=true,
  PREFECT_SERVER_ANALYTICS_ENABLED=false, MLFLOW_DISABLE_TELEMETRY=true, DVC_NO_ANALYTICS=1, and
  ``metadqn.determinism.PINNED_ENV``), e.g. ``LocalCluster(env=worker_env())``. A worker that loaded
  torch without the pin fails its first group with one line (its results would differ in the last bits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from metadqn.config import Params
from metadqn.determinism import check_pinned
from metadqn.fanout import group_label, init_worker

log = logging.getLogger("metadqn.runner")

OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow honours only the literal "true"
    "DVC_NO_ANALYTICS": "1",
}


def worker_env() -> dict[str, str]:
    """Environment variables for Dask worker processes: the offline switches and the CPU pin (which must be
    in place before a worker loads torch or numpy; :func:`run_group` refuses a worker without it)."""
    from metadqn.determinism import PINNED_ENV, native

    return {**OFFLINE_ENV, **({} if native() else PINNED_ENV)}


def task_runner(params: Params) -> TaskRunner[Any]:
    """The Prefect task runner that ``params.runner`` names (see the module docstring)."""
    runner = params.runner
    if runner.kind == "dask":
        from prefect.settings import PREFECT_API_URL
        from prefect_dask import DaskTaskRunner

        address = runner.dask_address()
        if not PREFECT_API_URL.value():
            log.warning("runner: dask at %s without PREFECT_API_URL: every worker will start its own temporary "
                        "Prefect server; point PREFECT_API_URL at a server the workers can reach", address)
        return DaskTaskRunner(address=address)
    if runner.kind == "processes":
        return ProcessPoolTaskRunner(max_workers=runner.workers, initializer=init_worker,
                                     initargs=(runner.threads,))
    return ThreadPoolTaskRunner(max_workers=1)


@task(name="run-group", cache_policy=NO_CACHE, task_run_name="{label}")
def run_group(fn: Callable[[Any], Any], group: Any, label: str) -> Any:
    """The one Prefect task of every fan-out: ``fn(group)``, wherever the flow's task runner puts it. A worker
    whose torch or numpy is not on the pinned CPU path (a Dask worker started without ``worker_env()``)
    would give other bytes: it refuses in one line instead."""
    check_pinned()
    return fn(group)


def prefect_mapper(fn: Callable[[Any], Any], groups: Sequence[Any]) -> list[Any]:
    """A :data:`metadqn.fanout.GroupMapper` for use inside a flow: one :func:`run_group` task per group,
    submitted at once to the flow's task runner, longest first (:func:`submission_order`); results in the
    groups' order."""
    futures = {i: run_group.submit(fn, groups[i], group_label(groups[i], i)) for i in submission_order(groups)}
    return [futures[i].result() for i in range(len(groups))]


def submission_order(groups: Sequence[Any]) -> list[int]:
    """Group indices by decreasing ``cost`` (a group's own estimate of its training time; groups without one
    count 0; ties keep their order). Two workers that take the longest group left finish closer together
    than in plan order: meta-test's plain-DQN groups take ~2.3x its anchored ones, and in plan order the
    last of them ran alone at the end."""
    return sorted(range(len(groups)), key=lambda i: -float(getattr(groups[i], "cost", 0.0)))
