# ruff: noqa: I001  (metadqn is imported before pandas on purpose, see below)
from __future__ import annotations

import os
from pathlib import Path

# first, before pandas/numpy/torch load: the package pins their CPU code paths (metadqn.determinism)
import metadqn  # noqa: F401

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "params.tiny.yaml"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two xdist workers on two cores: torch's in-process work on one thread each (two threads per worker
    # would wait on each other); tests that depend on a thread count set it themselves
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The files that hold end-to-end (``slow``) tests run first. ``--dist loadfile`` hands whole files to the
    two workers in collection order, so a long file collected late (test_schedule, test_replicates) ran on
    one worker while the other had nothing left; started first, they overlap with each other and the short
    files fill in around them. The order within a file is kept (the sort is stable)."""
    heavy = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in heavy)


@pytest.fixture
def tiny_params():
    from metadqn.config import load_params

    return load_params(ROOT / "params.yaml", TINY)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """collect + meta_train on the tiny params, in process, tracking off (shared by several test files)."""
    from metadqn.config import load_params
    from metadqn.data.pool import ensure_pool
    from metadqn.data.store import TRAINING_SPLITS, TaskStore
    from metadqn.stages.collect import CollectOutputs, run_collect
    from metadqn.stages.meta_train import MetaTrainOutputs, run_meta_train

    params = load_params(ROOT / "params.yaml", TINY)
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})
    root = tmp_path_factory.mktemp("tiny")
    col = CollectOutputs(pool=root / "pool.csv", tasks=root / "tasks.parquet", trajectories=root / "traj",
                         experts=root / "experts", metrics=root / "collect.json", curves=root / "curves.csv")
    ensure_pool(col.pool, params.family.family(), params.collect.n_train_tasks, params.collect.task_seed)
    run_collect(params, col)
    # meta-training must not need the test tasks at all: delete their data first
    tasks = pd.read_parquet(col.tasks)
    for tid in tasks.loc[~tasks["split"].isin(TRAINING_SPLITS), "task_id"]:
        (col.trajectories / f"{tid}.parquet").unlink()
        (col.experts / f"{tid}.pt").unlink()
    store = TaskStore(col.tasks, col.trajectories, col.experts, col.metrics)
    out = MetaTrainOutputs(models=root / "meta", metrics=root / "meta.json", cross_eval=root / "cross.csv",
                           curves=root / "meta_curves.csv")
    metrics = run_meta_train(params, store, out)
    return params, store, out, metrics, col


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect server per test session (per xdist worker) on loopback, for the stage flows of bare
    ``dvc repro`` runs (:func:`tests.helpers.stage_env`), instead of a temporary server per stage."""
    from tests import helpers

    home = tmp_path_factory.mktemp("prefect-server")
    proc, url = helpers.start_prefect_server(home, dict(os.environ))
    helpers.STAGE_PREFECT_API.append(url)
    try:
        yield url
    finally:
        helpers.STAGE_PREFECT_API.clear()
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, prefect_api):
    """A fresh git project of this working tree with the tiny params, after a whole `dvc repro`."""
    from tests.helpers import dvc, make_project

    project = make_project(tmp_path_factory.mktemp("tiny-project") / "p")
    first = dvc(project, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return project
