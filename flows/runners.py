"""Where the fan-out of the collect and meta_test stages runs: ``task_runner(params)``.

A stage's flow submits one Prefect task per group (collect: a group of tasks' experts; meta_test: one
method's fine-tuning runs), each a batched trainer run whose result is a pure function of the group
(its seed derives from the group's contents). The runner only decides where the groups train, so
``params.runner`` never changes a result (it is left out of ``Params.digest()``).

``runner.kind: local`` -> Prefect's ``ThreadPoolTaskRunner(max_workers=1)``: groups train one after
another in the stage process. The batched trainer already keeps every core busy through torch's
intra-op threads; groups trained concurrently in threads would each bring their own OpenMP team and
oversubscribe the cores, which stalls OpenMP (on a 2-core machine with one other busy process, one K=480
training run took 71 s on one torch thread and 460 s on two). Parallelism across groups is Dask's job.

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
- The offline switches in the workers' environment too (``worker_env()``: DO_NOT_TRACK=true,
  PREFECT_SERVER_ANALYTICS_ENABLED=false, MLFLOW_DISABLE_TELEMETRY=true, DVC_NO_ANALYTICS=1), e.g.
  ``env DO_NOT_TRACK=true ... dask worker ...`` or ``LocalCluster(env=worker_env())``.
"""

from __future__ import annotations

import logging

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from metadqn.config import Params

log = logging.getLogger("metadqn.runner")

OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow honours only the literal "true"
    "DVC_NO_ANALYTICS": "1",
}


def worker_env() -> dict[str, str]:
    """Environment variables for Dask worker processes: the offline switches."""
    return dict(OFFLINE_ENV)


def task_runner(params: Params) -> TaskRunner:
    """The Prefect task runner that ``params.runner`` names (see the module docstring)."""
    if params.runner.kind == "dask":
        from prefect.settings import PREFECT_API_URL
        from prefect_dask import DaskTaskRunner

        address = params.runner.dask_address()
        if not PREFECT_API_URL.value():
            log.warning("runner: dask at %s without PREFECT_API_URL: every worker will start its own temporary "
                        "Prefect server; point PREFECT_API_URL at a server the workers can reach", address)
        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=1)
