"""The collect and meta-test fan-out on a real Dask cluster gives exactly the local run's outputs.

One ``distributed.LocalCluster`` (2 worker processes, 1 thread each) serves both tests. Its workers
report task runs to this test process's temporary Prefect server (the one Prefect starts for the local
flows anyway): the flow's Prefect settings travel with each task, so no worker starts a server of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dask_address():
    from distributed import LocalCluster
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runners import worker_env

    server = SubprocessASGIServer()  # the temporary server of Prefect's ephemeral mode in this process
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         env=worker_env()) as cluster:
        yield cluster.scheduler_address


def _runner(params, address: str | None):
    runner = params.runner.model_copy(update={"kind": "dask", "address": address} if address else {"kind": "local"})
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
    for name, address in (("local", None), ("dask", dask_address)):
        root = tmp_path / name
        root.mkdir()
        out = CollectOutputs(pool=root / "pool.csv", tasks=root / "tasks.parquet", trajectories=root / "traj",
                             experts=root / "experts", metrics=root / "collect.json", curves=root / "curves.csv")
        ensure_pool(out.pool, params.family.family(), params.collect.n_train_tasks, params.collect.task_seed)
        results[name] = collect_flow(_runner(params, address), out)
    assert results["dask"] == results["local"]
    assert len(list((tmp_path / "local" / "experts").glob("*.pt"))) >= 2 * 2  # at least two groups of two
    _assert_same_tree(tmp_path / "local", tmp_path / "dask")


def test_meta_test_on_dask_equals_the_local_run(dask_address, tiny_run, tmp_path):
    from flows.meta_test import meta_test_flow
    from metadqn.stages.meta_test import MetaTestOutputs

    params, store, meta, _, _ = tiny_run
    metrics = {}
    for name, address in (("local", None), ("dask", dask_address)):
        root = tmp_path / name
        out = MetaTestOutputs(curves_parquet=root / "curves.parquet", curves_csv=root / "curves.csv",
                              scores=root / "scores.csv", metrics=root / "metrics.json", adapted=root / "adapted")
        metrics[name] = meta_test_flow(_runner(params, address), store, meta.models, out)
    assert metrics["dask"] == metrics["local"]
    assert "wall_s" not in metrics["local"]
    index = pd.read_csv(tmp_path / "local" / "adapted" / "index.csv")
    assert index["method"].nunique() >= 2  # at least two groups (one per method)
    _assert_same_tree(tmp_path / "local", tmp_path / "dask")
