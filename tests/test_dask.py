"""The collect and meta-test fan-out in worker processes and on a real Dask cluster gives exactly the local
run's outputs.

One ``distributed.LocalCluster`` (2 worker processes, 1 thread each) serves both tests, and one temporary
Prefect server (``prefect_test_harness``) serves the flows and the workers: the flow's Prefect settings,
the server's URL included, travel with each task, so no worker starts a server of its own (each would
take 5-20 s).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch

from metadqn.config import FROZEN_SUFFIX
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dask_address():
    from distributed import LocalCluster
    from flows.runners import worker_env
    from prefect.testing.utilities import prefect_test_harness

    # the cluster closes first, then the harness drains the logs and stops the server
    with prefect_test_harness(server_startup_timeout=60), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         env=worker_env()) as cluster:
        yield cluster.scheduler_address


@contextmanager
def _task_stream(address: str | None):
    """Records the tasks the Dask cluster runs meanwhile (nothing for another runner)."""
    if address is None:
        yield []
        return
    from distributed import Client, get_task_stream

    with Client(address, set_as_default=False) as client, get_task_stream(client) as stream:
        yield stream.data


RUNNERS = ("local", "processes", "dask")
"""Every runner kind: one group after another in the test process, a pool of 2 one-thread processes, Dask."""


def _runner(params, kind: str, address: str):
    runner = params.runner.model_copy(update={"kind": kind, "address": address if kind == "dask" else None})
    return params.model_copy(update={"runner": runner})


def _assert_same_tree(a: Path, b: Path) -> None:
    """Same files; equal state dicts, frames, JSON and bytes."""
    from metadqn.data.io import load_state_dict

    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files
    for rel in files:
        fa, fb = a / rel, b / rel
        if rel.suffix == ".pt":
            sa, sb = load_state_dict(fa), load_state_dict(fb)
            assert sa.keys() == sb.keys(), rel
            assert all(torch.equal(sa[k], sb[k]) for k in sa), rel
        elif rel.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(fa), pd.read_parquet(fb), check_exact=True)
        elif rel.suffix == ".json":
            assert json.loads(fa.read_text()) == json.loads(fb.read_text()), rel
        else:
            assert fa.read_bytes() == fb.read_bytes(), rel


def test_collect_on_dask_equals_the_local_run(dask_address, tmp_path):
    from flows.collect import collect_flow

    from metadqn.config import load_params
    from metadqn.data.pool import ensure_pool
    from metadqn.stages.collect import CollectOutputs

    params = load_params(ROOT / "params.yaml", TINY)
    params = params.model_copy(update={
        "tracking": params.tracking.model_copy(update={"enabled": False}),
        "collect": params.collect.model_copy(update={"group_size": 2}),
    })
    results = {}
    for name in RUNNERS:
        root = tmp_path / name
        root.mkdir()
        out = CollectOutputs(pool=root / "pool.csv", tasks=root / "tasks.parquet", trajectories=root / "traj",
                             experts=root / "experts", metrics=root / "collect.json", curves=root / "curves.csv")
        ensure_pool(out.pool, params.family.family(), params.collect.n_train_tasks, params.collect.task_seed)
        with _task_stream(dask_address if name == "dask" else None) as stream:
            results[name] = collect_flow(_runner(params, name, dask_address), out)
    assert len(stream) >= 3  # one Dask task per group of (at most) two of the 6 tiny tasks
    assert len({t["worker"] for t in stream}) == 2  # and both workers took some
    for name in RUNNERS[1:]:
        assert results[name] == results["local"], name
        _assert_same_tree(tmp_path / "local", tmp_path / name)


def test_meta_test_on_dask_equals_the_local_run(dask_address, tiny_run, tmp_path):
    from flows.meta_test import meta_test_flow

    from metadqn.stages.meta_test import MetaTestOutputs

    params, store, meta, _, _ = tiny_run
    metrics = {}
    for name in RUNNERS:
        root = tmp_path / name
        out = MetaTestOutputs(curves_parquet=root / "curves.parquet", curves_csv=root / "curves.csv",
                              scores=root / "scores.csv", metrics=root / "metrics.json", adapted=root / "adapted")
        with _task_stream(dask_address if name == "dask" else None) as stream:
            metrics[name] = meta_test_flow(_runner(params, name, dask_address), store, meta.models, out)
    index = pd.read_csv(tmp_path / "local" / "adapted" / "index.csv")
    methods = index.loc[~index["method"].str.endswith(FROZEN_SUFFIX), "method"].nunique()
    assert len(stream) == methods >= 2  # one Dask task per method (frozen controls cost no training)
    assert "wall_s" not in metrics["local"]
    for name in RUNNERS[1:]:
        assert metrics[name] == metrics["local"], name
        _assert_same_tree(tmp_path / "local", tmp_path / name)
