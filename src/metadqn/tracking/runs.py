"""MLflow runs for the stages: tracking URI, experiments per family, tags, batched step metrics.

Default store: ``sqlite:///mlflow.db`` with artifacts under ``./mlruns`` (MLflow 3 no longer accepts a
bare file store); ``MLFLOW_TRACKING_URI`` overrides it (e.g. an ``mlflow server`` with PostgreSQL).
MLflow is imported lazily: it costs seconds, and stages with tracking off never pay them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACT_ROOT = Path("mlruns")


def git_commit() -> str:
    """HEAD's commit, with ``-dirty`` if tracked files differ from it; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def configure_tracking() -> str:
    """Points MLflow at the tracking URI (default sqlite:///mlflow.db) and returns it."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_name(family: str) -> str:
    return f"metadqn-{family}"


def _ensure_experiment(name: str) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        # keep artifacts inside the project, whatever the working directory of a later reader
        location = (ARTIFACT_ROOT / name).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def stage_run(stage: str, family: str, params: Mapping[str, Any], digest: str, enabled: bool = True,
              tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one stage (``None`` when tracking is off), with flattened params and tags."""
    if not enabled:
        yield None
        return
    import mlflow

    configure_tracking()
    exp_id = _ensure_experiment(experiment_name(family))
    all_tags = {"stage": stage, "git_commit": git_commit(), "params_digest": digest, "family": family,
                **(tags or {})}
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=all_tags) as run:
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        client = mlflow.MlflowClient()
        from mlflow.entities import Param

        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        yield run


def log_step_metrics(run: Any, frame: pd.DataFrame, key_col: str, step_col: str, value_col: str,
                     prefix: str) -> None:
    """Logs one step metric per row (e.g. a learning curve per task), in batches of 1000."""
    if run is None or frame.empty:
        return
    import time

    import mlflow
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}{row[key_col]}", float(row[value_col]), ts, int(row[step_col]))
               for row in frame.to_dict("records")]
    client = mlflow.MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000])


def log_dataset(run: Any, frame: pd.DataFrame, name: str, source: str, digest: str, context: str) -> None:
    """Records ``frame`` as the run's dataset input, with the DVC hash as its digest."""
    if run is None:
        return
    import warnings

    import mlflow

    # the same function as mlflow.data.from_pandas, which mlflow.data sets at import time (invisible to mypy)
    from mlflow.data.pandas_dataset import from_pandas

    with warnings.catch_warnings():
        # MLflow hints about integer columns and ambiguous local sources; neither applies to a DVC path
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(frame, source=source, name=name, digest=digest[:36])
        mlflow.log_input(dataset, context=context)
