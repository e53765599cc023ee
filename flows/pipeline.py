"""The pipeline flow: brings the DVC pipeline up to date, then registers and promotes, then posts the summary.

DVC decides what is stale (``dvc repro <stage>`` is a no-op for an up-to-date stage); Prefect only
sequences and records, and never caches. Stages run one at a time because DVC holds a repository lock.
Registering, promoting and posting the report stay out of the reproducible DAG: they touch the MLflow
registry and Prefect, not files that DVC tracks.

A *scheduled* run (``metadqn serve``'s deployment, or ``metadqn pipeline --scheduled``) first grows the
training task pool by ``schedule.grow_tasks`` tasks seeded by the run's scheduled time (a retried run
does not grow twice), and afterwards records the version it made (``schedule.record``): ``dvc push`` and a
git commit of dvc.lock, the pool's .dvc file and the git-tracked reports on ``schedule.branch``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from metadqn import paths
from metadqn.config import Params, load_params
from metadqn.dag import recorded_md5
from metadqn.dag import stages as dvc_stages
from metadqn.versioning import tool

LOCK = Path(".metadqn-pipeline.lock")
RECORDED = (Path("dvc.lock"), paths.TASK_POOL.with_name(paths.TASK_POOL.name + ".dvc"), Path("reports"))
"""What a recorded run commits (the outputs themselves go to the DVC remote)."""


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


def _api_url() -> str | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/") or None


@task(name="dvc-repro", cache_policy=NO_CACHE, task_run_name="dvc-repro-{stage}")
def dvc_repro(stage: str) -> None:
    # the stage's own flow reports to this run's Prefect API (a server, or this process's temporary one)
    # instead of starting another temporary server per stage
    env = dict(os.environ)
    url = _api_url()
    if url:
        env["PREFECT_API_URL"] = url
    subprocess.run([tool("dvc"), "repro", stage], check=True, env=env)


def _data_hash() -> str:
    return recorded_md5(paths.TRAJECTORIES) or "unknown"


@task(name="prepare-task-pool", cache_policy=NO_CACHE)
def update_pool(params: Params, grow: int, when: datetime) -> list[str]:
    """Makes sure the pool exists (recreating it from params in a fresh clone), then grows it."""
    from metadqn.stages.collect import grow_pool, prepare_pool

    done = prepare_pool(params)
    added = grow_pool(params, grow, when) if grow > 0 else None
    new = [] if added is None else list(added["task_id"])
    print(f"task pool: {done}; {'added ' + ', '.join(new) if new else 'nothing added'}")
    return new


@task(name="record-run", cache_policy=NO_CACHE)
def record_run(params: Params, when: datetime, new_tasks: list[str], lines: list[str]) -> str | None:
    from metadqn.data.pool import batch_name
    from metadqn.versioning import record

    summary = "; ".join(line for line in lines if "PROMOTED" in line or "promoted" in line) or "no promotion"
    message = (f"metadqn scheduled run {batch_name(when)}: +{len(new_tasks)} training task(s)"
               f"{' (' + ', '.join(new_tasks) + ')' if new_tasks else ''}\n\n{summary}\n")
    commit = record(RECORDED, message, params.schedule.push)
    print(f"recorded: {'commit ' + commit if commit else 'nothing changed, no commit'}")
    return commit


@task(name="register-and-promote", cache_policy=NO_CACHE)
def register_and_promote() -> list[str]:
    from metadqn.tracking.registry import promote, register_meta_models, register_qnets
    from metadqn.tracking.runs import configure_tracking, git_commit

    params = load_params()
    configure_tracking()
    provenance = {"git_commit": git_commit(), "dvc_data_hash": _data_hash(),
                  "prefect_flow_run_id": str(flow_run.get_id() or "")}
    registered = register_meta_models(params, provenance)
    lines = [f"{r.name}: {'version ' + r.version + ' (challenger)' if r.version else 'unchanged'}" for r in registered]
    qnets = register_qnets(params, provenance)
    if qnets:
        fresh = [r.version for r in qnets if r.version]
        lines.append(f"{qnets[0].name}: {len(fresh)} new version(s) of {len(qnets)} test task(s)"
                     f"{' (v' + fresh[0] + '..v' + fresh[-1] + ')' if fresh else ''}")
    for d in promote(params):
        lines.append(f"{d.name}: {'promoted v' + str(d.challenger) if d.promoted else 'champion kept'} ({d.reason})")
    for line in lines:
        print(line)
    return lines


def run_time(at: str | None = None) -> datetime:
    """The run's time: ``at`` if given, else the flow run's scheduled start, else now (UTC)."""
    from metadqn.data.pool import parse_time

    if at is None:
        scheduled = flow_run.get_scheduled_start_time()
        at = scheduled.isoformat() if scheduled is not None else None
    return parse_time(at).replace(microsecond=0)


@flow(name="pipeline", log_prints=True)
def pipeline_flow(scheduled: bool = False, grow: int | None = None, record: bool | None = None,
                  at: str | None = None, stages: tuple[str, ...] | None = None, registry: bool = True) -> dict:
    """One pipeline run. ``scheduled`` turns on the schedule's growth and recording (``grow`` and ``record``
    override them); ``at`` is the run's time (default: the scheduled start); ``registry`` False skips
    registering and promoting."""
    params = load_params()
    grow = (params.schedule.grow_tasks if scheduled else 0) if grow is None else grow
    record = (params.schedule.record if scheduled else False) if record is None else record
    when = run_time(at)
    commit, lines = None, []
    with pipeline_lock():
        if record:
            from metadqn.versioning import check_branch

            check_branch(params.schedule.branch)
        new_tasks = update_pool(params, grow, when)
        for stage in stages or dvc_stages():
            dvc_repro(stage)
        if registry:
            lines = register_and_promote()
        if record:
            commit = record_run(params, when, new_tasks, lines)
    if paths.REPORT_SUMMARY.exists():
        create_markdown_artifact(markdown=paths.REPORT_SUMMARY.read_text(), key="metadqn-pipeline-summary",
                                 description="meta-test summary of the latest pipeline run")
    print("pipeline up to date; report: reports/report.html (metrics: reports/metrics.json)")
    return {"new_tasks": new_tasks, "registry": lines, "commit": commit}


if __name__ == "__main__":
    pipeline_flow()
