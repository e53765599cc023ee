"""The pipeline flow: brings the DVC pipeline up to date, then registers and promotes, then posts the summary.

DVC decides what is stale (``dvc repro <stage>`` is a no-op for an up-to-date stage); Prefect only
sequences and records, and never caches. Stages run one at a time because DVC holds a repository lock.
Registering, promoting and posting the report stay out of the reproducible DAG: they touch the MLflow
registry and Prefect, not files that DVC tracks.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from metadqn import paths
from metadqn.config import load_params

STAGES = ("collect", "meta_train", "meta_test", "report")
LOCK = Path(".metadqn-pipeline.lock")


class PipelineBusy(RuntimeError):
    """Another pipeline run holds the lock."""


@contextlib.contextmanager
def pipeline_lock(path: Path = LOCK) -> Iterator[None]:
    """One pipeline run at a time per project: a second (e.g. an overlapping scheduled run) is refused.

    An OS-level lock (released by the kernel if the holder dies), so a crashed run never blocks the next.
    """
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineBusy(f"another metadqn pipeline run holds {path}; try again when it has finished") \
                from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@task(name="dvc-repro", cache_policy=NO_CACHE, task_run_name="dvc-repro-{stage}")
def dvc_repro(stage: str) -> None:
    dvc = Path(sys.executable).with_name("dvc")
    subprocess.run([str(dvc) if dvc.exists() else "dvc", "repro", stage], check=True)


def _data_hash() -> str:
    lock = yaml.safe_load(Path("dvc.lock").read_text()) if Path("dvc.lock").exists() else {}
    for out in lock.get("stages", {}).get("collect", {}).get("outs", []):
        if out["path"] == str(paths.TRAJECTORIES):
            return out["md5"]
    return "unknown"


@task(name="register-and-promote", cache_policy=NO_CACHE)
def register_and_promote() -> list[str]:
    from metadqn.tracking.registry import promote, register_meta_models
    from metadqn.tracking.runs import configure_tracking, git_commit

    params = load_params()
    configure_tracking()
    provenance = {"git_commit": git_commit(), "dvc_data_hash": _data_hash(),
                  "prefect_flow_run_id": str(flow_run.get_id() or "")}
    registered = register_meta_models(params, provenance)
    lines = [f"{r.name}: {'version ' + r.version + ' (challenger)' if r.version else 'unchanged'}" for r in registered]
    for d in promote(params):
        lines.append(f"{d.name}: {'promoted v' + str(d.challenger) if d.promoted else 'champion kept'} ({d.reason})")
    for line in lines:
        print(line)
    return lines


@flow(name="pipeline", log_prints=True)
def pipeline_flow(stages: tuple[str, ...] = STAGES, register: bool = True) -> None:
    with pipeline_lock():
        for stage in stages:
            dvc_repro(stage)
        if register:
            register_and_promote()
    if Path("reports/report.md").exists():
        text = Path("reports/report.md").read_text()
        start = text.find("## Headline results")
        end = text.find("## Learning curves")
        create_markdown_artifact(markdown=text[start:end] if start >= 0 else text, key="metadqn-pipeline-summary",
                                 description="meta-test summary of the latest pipeline run")
    print("pipeline up to date; report: reports/report.html (metrics: reports/metrics.json)")


if __name__ == "__main__":
    pipeline_flow()
