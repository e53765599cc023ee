"""Prefect flow for the diagnose stage (in the stage process: it is a few seconds of forward passes)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from metadqn.config import Params
from metadqn.data.store import TaskStore
from metadqn.stages.diagnose import DiagnoseOutputs, run_diagnose


@flow(name="diagnose", log_prints=True)
def diagnose_flow(params: Params, store: TaskStore, models: Path, out: DiagnoseOutputs = DiagnoseOutputs()) -> dict:
    """Returns the summary (per model and split)."""
    tags = {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    return run_diagnose(params, store, models, out, tags)
