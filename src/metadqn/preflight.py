"""Cheap input checks before a stage starts, so a user mistake (a missing or foreign file) ends in one
line naming the file and the fix, not in a traceback from deep inside a Prefect flow."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import pyarrow.parquet as pq

from metadqn.data.store import MissingInputError, TaskStore
from metadqn.data.trajectories import SchemaError, schema


def check_store(store: TaskStore, splits: Iterable[str], obs_dim: int, trajectories: bool = True,
                experts: bool = True) -> None:
    """Raises MissingInputError or SchemaError (one-line messages) for the first bad input."""
    if not store.tasks_path.exists():
        raise MissingInputError(f"{store.tasks_path}: not found; run `dvc repro collect` (or `dvc pull`) first")
    try:
        tasks = pd.read_parquet(store.tasks_path)
    except Exception as exc:
        raise SchemaError(f"{store.tasks_path}: not a readable task table ({type(exc).__name__})") from None
    if not {"task_id", "split"} <= set(tasks.columns):
        raise SchemaError(f"{store.tasks_path}: needs columns task_id and split; rerun `dvc repro collect`")
    if not store.collect_metrics.exists():
        raise MissingInputError(f"{store.collect_metrics}: not found; run `dvc repro collect` first")
    expected = schema(obs_dim)
    for tid in tasks.loc[tasks["split"].isin(list(splits)), "task_id"]:
        if trajectories:
            path = store.trajectories / f"{tid}.parquet"
            if not path.exists():
                raise MissingInputError(f"{path}: not found; run `dvc repro collect` (or `dvc pull`) first")
            try:
                got = pq.read_schema(path)
            except Exception as exc:
                raise SchemaError(f"{path}: not a Parquet file ({type(exc).__name__}); rerun `dvc repro collect`") \
                    from None
            missing = [f.name for f in expected if f.name not in got.names]
            if missing:
                raise SchemaError(f"{path}: missing column(s) {', '.join(missing)}; rerun `dvc repro collect`")
        if experts and not (store.experts / f"{tid}.pt").exists():
            raise MissingInputError(f"{store.experts / f'{tid}.pt'}: not found; run `dvc repro collect` first")
