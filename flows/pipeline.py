"""The pipeline flow: brings the DVC pipeline up to date, then registers and promotes, then posts the summary.

DVC decides what is stale (``dvc repro <stage>`` is a no-op for an up-to-date stage); Prefect only
sequences and records, and never caches. Stages run one at a time because DVC holds a repository lock.
Registering, promoting and posting the report stay out of the reproducible DAG: they touch the MLflow
registry and Prefect, not files that DVC tracks.

A *scheduled* run (``metadqn serve``'s deployment, or ``metadqn pipeline --scheduled``) first grows the
training task pool by ``schedule.grow_tasks`` tasks seeded by the run's scheduled time (a retried run
does not grow twice), and afterwards records the version it made (``schedule.record``): ``dvc push`` and a
git commit of dvc.lock, the pool's .dvc file and the git-tracked reports on ``schedule.branch``.

Process hygiene (#11, the mechanics in :mod:`metadqn.procs`): each ``dvc repro <stage>`` runs in its own
process group, which is killed when the stage ends, fails or is interrupted; a guard process kills the stage
and the temporary Prefect server if this process is killed outright (SIGKILL), and keeps the pipeline lock
until they are gone. Each stage's stdout and stderr stream to the terminal and into
``.metadqn/logs/<YYYYmmdd-HHMMSS>-<stage>.log`` (local time; git-ignored, never pruned: delete old ones at
will); a failed stage raises :class:`PipelineFailed`, one line with the stage, its exit code, its error line
and that log. Run from ``metadqn pipeline`` (:func:`run_pipeline`), SIGINT, SIGTERM and SIGHUP end the run in
one line with exit code 130, 143 or 129 once the process tree is gone; served (``metadqn serve``) Prefect's
own signal handling stays in charge (its cancellation), and a stage is still killed with its run.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
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
from metadqn.procs import Guard, Interrupts, log_path, run_logged, terminate
from metadqn.versioning import tool

LOCK = Path(".metadqn-pipeline.lock")
LOG_DIR = Path(".metadqn") / "logs"
"""One log file per stage run: ``<YYYYmmdd-HHMMSS>-<stage>.log`` (git-ignored)."""
RECORDED = (Path("dvc.lock"), paths.TASK_POOL.with_name(paths.TASK_POOL.name + ".dvc"), Path("reports"))
"""What a recorded run commits (the outputs themselves go to the DVC remote)."""


class PipelineBusy(RuntimeError):
    """Another pipeline run holds the lock."""


class PipelineFailed(RuntimeError):
    """A stage failed. The message is one line: the stage, its exit code, its last error line, its log."""


@contextlib.contextmanager
def pipeline_lock(path: Path = LOCK) -> Iterator[int]:
    """One pipeline run at a time per project: a second (e.g. an overlapping scheduled run) is refused.

    An OS-level lock (released by the kernel when the last process holding it is gone), so a crashed run never
    blocks the next. Yields the lock's file descriptor: the run's guard inherits it (see
    :func:`_supervised`), so that the lock outlives this process until the stage it started is dead too.
    Never unlocked explicitly: ``LOCK_UN`` would drop the lock for every holder of the descriptor at once.
    """
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineBusy(f"another metadqn pipeline run holds {path}; try again when it has finished") \
                from None
        yield handle.fileno()


@dataclass
class _Run:
    """What an interrupt needs to know about the run in progress."""

    guard: Guard | None = None
    phase: str = "before the first stage"
    log: Path | None = None


_catch_signals = False
"""True while :func:`run_pipeline` (the CLI) runs the flow: signals become one line (see metadqn.procs)."""
_current = _Run()


def _temporary_server_pid() -> int | None:
    """The pid of the temporary Prefect server this process started, if it started one (the guard must kill
    it, after the stages that report to it, if this process dies)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer  # imported already by the client that started it

    server = SubprocessASGIServer()  # the one instance Prefect's client started (a singleton per port)
    return server.server_process.pid if server.server_process is not None else None


def _on_interrupt() -> None:
    if _current.guard is not None:
        _current.guard.kill()
    else:  # before the lock and its guard: only the temporary server may be running
        pid = _temporary_server_pid()
        terminate(pids=[pid] if pid else [])


def _interrupt_message(signal_name: str) -> str:
    log = f" (log: {_current.log})" if _current.log is not None and "stage" in _current.phase else ""
    return (f"pipeline interrupted ({signal_name}) {_current.phase}{log}; outputs of finished stages are kept, "
            f"rerun to continue")


@contextlib.contextmanager
def _supervised(lock_fd: int) -> Iterator[_Run]:
    """The run's guard (holding the lock's descriptor) and, from the CLI, its signal handling."""
    global _current
    guard = Guard(keep_fds=(lock_fd,))
    _current = _Run(guard=guard)
    server = _temporary_server_pid()
    if server is not None:
        guard.watch_pid(server)
    if _catch_signals:
        # Prefect's flow engine put its own SIGTERM handler in at the start of this flow run: ours again
        Interrupts(_on_interrupt, _interrupt_message).arm()
    try:
        yield _current
    finally:
        guard.release()
        _current = _Run(phase="after the last stage")


class _QuietFailure(logging.Filter):
    """Keeps a failed stage's tracebacks (Prefect logs one per task and one per flow run) off the terminal: the
    CLI prints the failure's one line instead; Prefect's API log, where the UI shows them, still gets them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, PipelineFailed) and PipelineFailed.__name__ not in record.getMessage()


def run_pipeline(scheduled: bool = False, grow: int | None = None, record: bool | None = None,
                 at: str | None = None) -> dict:
    """What ``metadqn pipeline`` runs: :func:`pipeline_flow`, with SIGINT, SIGTERM and SIGHUP turned into one
    line and exit code 130, 143 or 129 once the stage and the temporary Prefect server are gone, and a failed
    stage into :class:`PipelineFailed` alone (the caller prints it)."""
    global _catch_signals
    _catch_signals = True
    Interrupts(_on_interrupt, _interrupt_message).arm()
    # the terminal's handlers: Prefect's console handler (on the "prefect" logger, where its flow and task run
    # loggers propagate) or, where it is not set up, the root logger's (the CLI's logging setup)
    handlers = [*logging.getLogger("prefect").handlers, *logging.getLogger().handlers]
    quiet = _QuietFailure()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        return pipeline_flow(scheduled=scheduled, grow=grow, record=record, at=at)
    finally:
        _catch_signals = False
        for handler in handlers:
            handler.removeFilter(quiet)


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
    log = log_path(LOG_DIR, stage)
    _current.phase, _current.log = f"during stage {stage}", log
    done = run_logged([tool("dvc"), "repro", stage], log, env=env, guard=_current.guard)
    if done.returncode != 0:
        raise PipelineFailed(f"stage {stage} failed (exit code {done.returncode}): "
                             f"{done.error_line or 'no error message'}; full output in {log}")
    _current.phase = f"after stage {stage}"


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
    from metadqn.tracking.runs import check_tracking, configure_tracking, git_commit

    params = load_params()
    check_tracking(disable_hint=False)  # a dead or hung server: one line (TrackingUnavailable) in seconds
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
    with pipeline_lock() as lock_fd, _supervised(lock_fd) as run:
        if record:
            from metadqn.versioning import check_branch

            check_branch(params.schedule.branch)
        run.phase = "while preparing the task pool"
        new_tasks = update_pool(params, grow, when)
        for stage in stages or dvc_stages():
            dvc_repro(stage)
        if registry:
            run.phase = "while registering and promoting"
            lines = register_and_promote()
        if record:
            run.phase = "while recording the run"
            commit = record_run(params, when, new_tasks, lines)
    if paths.REPORT_SUMMARY.exists():
        create_markdown_artifact(markdown=paths.REPORT_SUMMARY.read_text(), key="metadqn-pipeline-summary",
                                 description="meta-test summary of the latest pipeline run")
    print("pipeline up to date; report: reports/report.html (metrics: reports/metrics.json)")
    return {"new_tasks": new_tasks, "registry": lines, "commit": commit}


if __name__ == "__main__":
    pipeline_flow()
