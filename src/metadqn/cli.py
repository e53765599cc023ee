"""The ``metadqn`` command line: one command per pipeline stage (what DVC stage commands call).

User mistakes (bad params, missing inputs) end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from metadqn import paths
from metadqn.errors import UserError

if TYPE_CHECKING:
    from metadqn.config import Params
    from metadqn.data.store import TaskStore

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="metadqn: meta-reinforcement-learning with deep Q-learning, as a reproducible pipeline.")

ParamsOpt = Annotated[Path | None, typer.Option(
    "--params", help="A YAML file overlaid on params.yaml (default: $METADQN_PARAMS, if set).")]
BaseOpt = Annotated[Path, typer.Option("--base-params", help="The main params file.")]


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from metadqn.errors import quiet_user_errors

    quiet_user_errors()


def _start_stage(base_params: Path, params: Path | None) -> Params:
    """A stage command's start: logging; a guard that kills what the stage starts (worker processes,
    temporary Prefect servers) if the stage itself is killed, so a kill -9 leaves no orphans; the params;
    the CPU pin checked and torch's threads set from params (same bytes on any machine)."""
    _setup_logging()
    from metadqn.procs import guard_descendants

    guard_descendants()
    cfg = _load(base_params, params)
    import torch

    from metadqn.determinism import NotPinned, check_pinned

    try:
        check_pinned()
    except NotPinned as exc:
        raise _fail(str(exc)) from None
    torch.set_num_threads(cfg.dqn.torch_threads)
    return cfg


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _check_tracking(cfg: Params) -> None:
    """A stage that tracks checks the MLflow store first: a dead or hung server ends it in one line before
    any training, not in minutes of retries and a traceback after it."""
    if not cfg.tracking.enabled:
        return
    from metadqn.tracking.runs import TrackingUnavailable, check_tracking

    try:
        check_tracking()
    except TrackingUnavailable as exc:
        raise _fail(str(exc)) from None


def _preflight(store: TaskStore, splits: tuple[str, ...], cfg: Params) -> None:
    """Checks a stage's inputs before Prefect starts: a missing or foreign file ends in one line."""
    from metadqn.preflight import check_store

    try:
        check_store(store, splits, cfg.family.family().obs_dim)
    except UserError as exc:  # MissingInputError, SchemaError
        raise _fail(str(exc)) from None


def _load(base: Path, overlay: Path | None):
    from metadqn.config import ParamsError, load_params

    try:
        cfg = load_params(base, overlay)
    except ParamsError as exc:
        raise _fail(str(exc)) from None
    for line in cfg.warnings():
        typer.echo(f"warning: {line}", err=True)
    return cfg


@app.command()
def collect(
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
    pool: Annotated[Path, typer.Option(help="Input: the training task pool.")] = paths.TASK_POOL,
    tasks: Annotated[Path, typer.Option(help="Output: the task sets.")] = paths.TASKS,
    trajectories: Annotated[Path, typer.Option(help="Output: one Parquet file per task.")] = paths.TRAJECTORIES,
    experts: Annotated[Path, typer.Option(help="Output: one expert state_dict per task.")] = paths.EXPERTS,
    metrics: Annotated[Path, typer.Option(help="Output: metrics JSON.")] = paths.COLLECT_METRICS,
    curves: Annotated[Path, typer.Option(help="Output: expert learning curves (CSV).")] = paths.COLLECT_CURVES,
) -> None:
    """Train an expert for every pool and held-out task that lacks one; write trajectories, experts, metrics."""
    cfg = _start_stage(base_params, params)
    _check_tracking(cfg)
    from flows.collect import collect_flow

    from metadqn.data.pool import PoolError
    from metadqn.stages.collect import CollectOutputs, load_pool

    try:  # before Prefect starts: a missing or inconsistent pool is one line
        load_pool(cfg, pool)
    except PoolError as exc:
        raise _fail(str(exc)) from None
    out = CollectOutputs(pool=pool, tasks=tasks, trajectories=trajectories, experts=experts, metrics=metrics,
                         curves=curves)
    try:
        result = collect_flow(cfg, out)
    except UserError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"collect: trained {result['trained_tasks']} task(s); {100 * result['fraction_solved']:.0f}% of "
               f"tasks solved; metrics in {metrics}")


@app.command("init-pool")
def init_pool(
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
    pool: Annotated[Path, typer.Option(help="The training task pool.")] = paths.TASK_POOL,
    force: Annotated[bool, typer.Option("--force", help="Rebuild it from params, dropping grown tasks.")] = False,
) -> None:
    """Create the training task pool from params (collect.n_train_tasks, task_seed) if it is missing."""
    cfg = _load(base_params, params)
    from metadqn.data.pool import PoolError
    from metadqn.stages.collect import prepare_pool
    from metadqn.versioning import VersioningError

    try:
        done = prepare_pool(cfg, pool, force)
    except (PoolError, VersioningError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"task pool {pool}: {done}")


@app.command("grow-tasks")
def grow_tasks(
    n: Annotated[int, typer.Option("--n", min=1, help="How many training tasks to add.")],
    at: Annotated[str | None, typer.Option(
        "--at", help="The run's (scheduled) time, ISO 8601; it names the batch and seeds the draw (default: now).",
    )] = None,
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
    pool: Annotated[Path, typer.Option(help="The training task pool.")] = paths.TASK_POOL,
) -> None:
    """Append N training tasks to the pool (drawn from the training ranges; held-out tasks never change)."""
    cfg = _load(base_params, params)
    from metadqn.data.pool import PoolError
    from metadqn.stages.collect import grow_pool
    from metadqn.versioning import VersioningError

    try:
        when = _parse_time(at)
        added = grow_pool(cfg, n, when, pool)
    except (PoolError, VersioningError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if added.empty:
        typer.echo(f"task pool {pool}: already holds the batch of {when.isoformat()}; unchanged")
    else:
        typer.echo(f"task pool {pool}: added {', '.join(added['task_id'])} (batch {added['batch'].iloc[0]}, "
                   f"seed {added['seed'].iloc[0]})")


def _parse_time(text: str | None):
    from metadqn.data.pool import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise ValueError(f"--at {exc}") from None


@app.command("meta-train")
def meta_train(
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
    tasks: Annotated[Path, typer.Option(help="Input: the task sets.")] = paths.TASKS,
    trajectories: Annotated[Path, typer.Option(help="Input: trajectories.")] = paths.TRAJECTORIES,
    experts: Annotated[Path, typer.Option(help="Input: experts.")] = paths.EXPERTS,
    collect_metrics: Annotated[Path, typer.Option(help="Input: collect metrics.")] = paths.COLLECT_METRICS,
    models: Annotated[Path, typer.Option(help="Output: one folder per learner.")] = paths.META_MODELS,
    metrics: Annotated[Path, typer.Option(help="Output: metrics JSON.")] = paths.META_TRAIN_METRICS,
    cross_eval: Annotated[Path, typer.Option(help="Output: cross-evaluation matrix.")] = paths.META_TRAIN_CROSS_EVAL,
    curves: Annotated[Path, typer.Option(help="Output: training curves.")] = paths.META_TRAIN_CURVES,
) -> None:
    """Train every meta-learner in params (hypernet, siamese, reptile, multitask) on the training tasks."""
    cfg = _start_stage(base_params, params)
    _check_tracking(cfg)
    from flows.meta_train import meta_train_flow

    from metadqn.data.store import TaskStore
    from metadqn.stages.meta_train import MetaTrainOutputs

    store = TaskStore(tasks_path=tasks, trajectories=trajectories, experts=experts, collect_metrics=collect_metrics)
    _preflight(store, ("train", "val", "val_extrap"), cfg)
    out = MetaTrainOutputs(models=models, metrics=metrics, cross_eval=cross_eval, curves=curves)
    try:
        result = meta_train_flow(cfg, store, out)
    except UserError as exc:
        raise _fail(str(exc)) from None
    summary = ", ".join(f"{k} {v['val_zero_shot_normalized']:.2f}" for k, v in result.items() if isinstance(v, dict))
    typer.echo(f"meta-train: validation zero-shot (normalised): {summary}; metrics in {metrics}")


@app.command("finetune-search")
def finetune_search(
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
    tasks: Annotated[Path, typer.Option(help="Input: the task sets.")] = paths.TASKS,
    collect_metrics: Annotated[Path, typer.Option(help="Input: expert returns.")] = paths.COLLECT_METRICS,
    models: Annotated[Path, typer.Option(help="Input: meta-models.")] = paths.META_MODELS,
    selected: Annotated[Path, typer.Option(help="Output: the selection meta-test reads.")] = paths.FINETUNE_SELECTED,
    summary: Annotated[Path, typer.Option(help="Output: per method and candidate.")] = paths.FINETUNE_SEARCH,
    scores: Annotated[Path, typer.Option(help="Output: per-run scores.")] = paths.FINETUNE_SEARCH_SCORES,
) -> None:
    """Choose each meta-learned method's fine-tuning configuration on the validation tasks (never test tasks)."""
    cfg = _start_stage(base_params, params)
    _check_tracking(cfg)
    from flows.finetune_search import finetune_search_flow

    from metadqn.data.store import TaskStore
    from metadqn.stages.finetune_search import SearchOutputs

    store = TaskStore(tasks_path=tasks, collect_metrics=collect_metrics)
    _preflight(store, (), cfg)
    try:
        chosen = finetune_search_flow(cfg, store, models, SearchOutputs(selected, summary, scores))
    except UserError as exc:
        raise _fail(str(exc)) from None
    picks = ", ".join(f"{m}={v['candidate']}" for m, v in chosen.items()) or "nothing to search"
    typer.echo(f"finetune search: {picks}; selection in {selected}")


@app.command("meta-test")
def meta_test(
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
    tasks: Annotated[Path, typer.Option(help="Input: the task sets.")] = paths.TASKS,
    collect_metrics: Annotated[Path, typer.Option(help="Input: expert returns.")] = paths.COLLECT_METRICS,
    models: Annotated[Path, typer.Option(help="Input: meta-models.")] = paths.META_MODELS,
    curves: Annotated[Path, typer.Option(help="Output: learning curves (Parquet).")] = paths.META_TEST_CURVES_PARQUET,
    curves_csv: Annotated[Path, typer.Option(help="Output: learning curves (CSV).")] = paths.META_TEST_CURVES_CSV,
    scores: Annotated[Path, typer.Option(help="Output: per-run scores.")] = paths.META_TEST_SCORES,
    metrics: Annotated[Path, typer.Option(help="Output: metrics JSON.")] = paths.METRICS,
    adapted: Annotated[Path, typer.Option(help="Output: fine-tuned Q-networks.")] = paths.ADAPTED,
    selected: Annotated[Path | None, typer.Option(
        help="Input: the finetune_search selection (omitted: every method fine-tunes with the dqn section).",
    )] = None,
) -> None:
    """Fine-tune every method on every held-out task and seed; write curves, metrics and adapted networks."""
    cfg = _start_stage(base_params, params)
    _check_tracking(cfg)
    from flows.meta_test import meta_test_flow

    from metadqn.data.store import TaskStore
    from metadqn.stages.meta_test import MetaTestOutputs

    store = TaskStore(tasks_path=tasks, collect_metrics=collect_metrics)
    _preflight(store, (), cfg)
    if not (models / "hypernet").exists() and not (models / "siamese").exists():
        typer.echo(f"warning: no meta-models in {models}; only the baselines will be compared", err=True)
    out = MetaTestOutputs(curves_parquet=curves, curves_csv=curves_csv, scores=scores, metrics=metrics,
                          adapted=adapted)
    try:
        meta_test_flow(cfg, store, models, out, selected)
    except UserError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"meta-test: metrics in {metrics}, curves in {curves_csv}")


@app.command()
def diagnose(
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
    tasks: Annotated[Path, typer.Option(help="Input: the task sets.")] = paths.TASKS,
    trajectories: Annotated[Path, typer.Option(help="Input: the trajectory dataset.")] = paths.TRAJECTORIES,
    experts: Annotated[Path, typer.Option(help="Input: the per-task experts.")] = paths.EXPERTS,
    collect_metrics: Annotated[Path, typer.Option(help="Input: expert returns.")] = paths.COLLECT_METRICS,
    models: Annotated[Path, typer.Option(help="Input: meta-models.")] = paths.META_MODELS,
    summary: Annotated[Path, typer.Option(help="Output: per model and split (metrics JSON).")] = (
        paths.DIAGNOSIS_SUMMARY),
    per_task: Annotated[Path, typer.Option(help="Output: per model and task.")] = paths.DIAGNOSIS_PER_TASK,
) -> None:
    """Where each hypernetwork's start leaves the training region: encoder or generator (analysis only)."""
    cfg = _start_stage(base_params, params)
    _check_tracking(cfg)
    from flows.diagnose import diagnose_flow

    from metadqn.data.store import TaskStore
    from metadqn.envs.sampling import SPLITS
    from metadqn.stages.diagnose import DiagnoseOutputs

    store = TaskStore(tasks_path=tasks, trajectories=trajectories, experts=experts, collect_metrics=collect_metrics)
    _preflight(store, SPLITS, cfg)
    try:
        diagnose_flow(cfg, store, models, DiagnoseOutputs(summary, per_task))
    except UserError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"diagnose: summary in {summary}, per task in {per_task}")


@app.command()
def report(
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
    out_dir: Annotated[Path, typer.Option(help="Output: report.md, report.html, summary.md, figures/.")] = Path(
        "reports"),
    metrics: Annotated[Path, typer.Option(help="Input: meta-test metrics.")] = paths.METRICS,
    curves: Annotated[Path, typer.Option(help="Input: meta-test curves (parquet).")] = paths.META_TEST_CURVES_PARQUET,
    scores: Annotated[Path, typer.Option(help="Input: meta-test per-run scores.")] = paths.META_TEST_SCORES,
    meta_train_metrics: Annotated[Path, typer.Option(help="Input (optional): meta-train metrics.")] = (
        paths.META_TRAIN_METRICS),
    collect_metrics: Annotated[Path, typer.Option(help="Input: collect metrics.")] = paths.COLLECT_METRICS,
    tasks: Annotated[Path, typer.Option(help="Input: the task table.")] = paths.TASKS,
    search: Annotated[Path, typer.Option(help="Input (optional): the fine-tuning search summary.")] = (
        paths.FINETUNE_SEARCH),
    selected: Annotated[Path, typer.Option(help="Input (optional): the fine-tuning selection.")] = (
        paths.FINETUNE_SELECTED),
    diagnosis: Annotated[Path, typer.Option(help="Input (optional): the out-of-range diagnosis summary.")] = (
        paths.DIAGNOSIS_SUMMARY),
) -> None:
    """Write the evaluation report (report.md, report.html rendered from it, summary.md, figures/)."""
    cfg = _start_stage(base_params, params)
    _check_tracking(cfg)
    from flows.report import report_flow

    for need, stage in ((metrics, "meta_test"), (curves, "meta_test"), (scores, "meta_test"),
                        (collect_metrics, "collect"), (tasks, "collect")):
        if not need.exists():
            raise _fail(f"{need}: not found; run `dvc repro {stage}` first")
    inputs = {"metrics_path": metrics, "curves_path": curves, "scores_path": scores,
              "meta_train_path": meta_train_metrics, "collect_path": collect_metrics, "tasks_path": tasks,
              "search_path": search, "selected_path": selected, "diagnosis_path": diagnosis}
    html = report_flow(cfg, out_dir, inputs)
    typer.echo(f"report: {html}")


@app.command()
def promote(
    model: Annotated[str | None, typer.Option("--model", help="One registered model name (default: all).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the decisions without moving aliases.")] = False,
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
) -> None:
    """Move `champion` to each meta-model's `challenger` where the registry rule in params holds."""
    cfg = _load(base_params, params)
    from metadqn.tracking.runs import TrackingUnavailable, check_tracking, configure_tracking, redact_uri, tracking_uri

    try:  # a dead or hung server: one line in seconds, not "no challenger" after minutes of retries
        check_tracking(disable_hint=False)
    except TrackingUnavailable as exc:
        raise _fail(str(exc)) from None
    from mlflow.exceptions import MlflowException

    from metadqn.tracking.registry import PromotionBusy
    from metadqn.tracking.registry import promote as run_promote

    try:
        configure_tracking()
        decisions = run_promote(cfg, model, dry_run)
    except PromotionBusy as exc:
        raise _fail(str(exc)) from None
    except MlflowException as exc:
        first = (exc.message.strip().splitlines() or [""])[0]
        raise _fail(f"MLflow tracking store {redact_uri(tracking_uri())}: {first}") from None
    if not decisions:
        raise _fail("no registered model has a challenger; run `make pipeline` first")
    bar = (f"the floor {cfg.registry.floor:g}" if cfg.registry.floor is not None
           else "scratch's upper CI bound (same run)")
    typer.echo(f"rule: {cfg.registry.metric} IQM of challenger above {bar}, and "
               f"{cfg.registry.rule.replace('_', ' ')} of champion{' (dry run)' if dry_run else ''}")
    typer.echo(f"{'model':40} {'chall.':>6} {'champ.':>6} {'chall. IQM':>10} {'champ. IQM':>10} {'bound':>7} "
               f"{'bar':>7}  decision")
    for d in decisions:
        verdict = ("would promote" if dry_run else "PROMOTED") if d.promoted else "kept champion"
        typer.echo(f"{d.name:40} {d.challenger or '-':>6} {d.champion or '-':>6} {d.challenger_value:>10.3f} "
                   f"{d.champion_value:>10.3f} {d.champion_bound:>7.3f} {d.bar:>7.3f}  {verdict}: {d.reason}")


@app.command("check-params")
def check_params(params: ParamsOpt = None, base_params: BaseOpt = Path("params.yaml")) -> None:
    """Validate params.yaml (and an overlay) and print its digest."""
    cfg = _load(base_params, params)
    typer.echo(f"params OK (digest {cfg.digest()})")


@app.command()
def replicate(
    n: Annotated[int, typer.Option("--n", min=2, help="Replicates in all, the workspace's own run included.")] = 3,
    workdir: Annotated[Path, typer.Option(
        "--workdir", help="Where replicates 1..n-1 run, one clone each (reused if finished).")] = Path(
        "/tmp/metadqn-replicates"),
    out: Annotated[Path, typer.Option("--out", help="The replicate table, a DVC metrics file.")] = Path(
        "reports/replicates.json"),
    page: Annotated[Path, typer.Option("--page", help="The replicate table as Markdown.")] = Path(
        "reports/replicates.md"),
) -> None:
    """Independent replicates of the whole pipeline (other training seeds, same tasks) and their table.

    Replicate 0 is this workspace's run (commit it and bring it up to date first); replicate r runs in a
    clone of HEAD with every seed + r. See metadqn.replicates."""
    _setup_logging()
    cfg = _load(Path("params.yaml"), None)
    _check_tracking(cfg)
    from metadqn.replicates import run_replicates

    try:
        table = run_replicates(Path.cwd(), n, workdir.resolve(), out, page, cfg.meta_test.confidence,
                               cfg.family.name, cfg.tracking.enabled, progress=typer.echo)
    except UserError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{len(table)} figures across {n} replicates: {out}, {page}")


def _pipeline_checks(cfg: Params, record: bool, at: str | None) -> None:
    """Everything a pipeline run could trip over through a user's doing, checked before Prefect starts."""
    from flows.pipeline import PipelineBusy, pipeline_lock

    from metadqn.data.pool import PoolError
    from metadqn.stages.collect import load_pool, prepare_pool
    from metadqn.versioning import VersioningError, check_branch

    try:
        with pipeline_lock():
            pass
        if at is not None:
            _parse_time(at)
        if record:
            check_branch(cfg.schedule.branch)
        # a fresh clone recreates the pool from params where it can (else: `dvc pull` it)
        prepare_pool(cfg)
        load_pool(cfg, paths.TASK_POOL)
    except (PipelineBusy, PoolError, VersioningError, ValueError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def pipeline(
    scheduled: Annotated[bool, typer.Option(
        "--scheduled", help="Run as a scheduled run: grow the pool by schedule.grow_tasks and record the run.",
    )] = False,
    grow: Annotated[int | None, typer.Option("--grow", min=0, help="Tasks to add to the pool first.")] = None,
    record: Annotated[bool | None, typer.Option(
        "--record/--no-record", help="dvc push + git commit of the run (default: schedule.record if scheduled).",
    )] = None,
    at: Annotated[str | None, typer.Option("--at", help="The run's time, ISO 8601 (seeds the pool's growth).")] = None,
) -> None:
    """Bring the whole DVC pipeline up to date through the Prefect pipeline flow, register and promote."""
    _setup_logging()
    cfg = _load(Path("params.yaml"), None)
    n_grow = (cfg.schedule.grow_tasks if scheduled else 0) if grow is None else grow
    do_record = (cfg.schedule.record if scheduled else False) if record is None else record
    _pipeline_checks(cfg, do_record, at)
    from flows.pipeline import PipelineFailed, run_pipeline

    # SIGINT, SIGTERM, SIGHUP: one line and exit 130, 143, 129 once the stage is gone (flows/pipeline.py)
    try:
        run_pipeline(scheduled=scheduled, grow=n_grow, record=do_record, at=at)
    except PipelineFailed as exc:  # one line: the stage, its exit code, its error line, its log file
        raise _fail(str(exc)) from None


@app.command()
def serve(
    cron: Annotated[str | None, typer.Option("--cron", help="Cron schedule (default: schedule.cron).")] = None,
    timezone: Annotated[str | None, typer.Option(
        help="Time zone of the schedule (default: schedule.timezone).")] = None,
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
) -> None:
    """Serve the pipeline as a Prefect deployment that runs on a cron schedule (Ctrl-C or SIGTERM stops it).

    Each scheduled run grows the task pool, brings the pipeline up to date, registers and promotes, and
    records the run (see the schedule section of params.yaml). Runs never overlap: this process runs one at
    a time, and the pipeline lock refuses a run while another process's holds it. Prefect's scheduler lives
    in its server: point PREFECT_API_URL at a `prefect server start` for the cron schedule to fire (with a
    temporary server, only runs triggered by hand are picked up).
    """
    _setup_logging()
    cfg = _load(base_params, params)
    from prefect.schedules import Cron

    cron = cron or cfg.schedule.cron
    try:
        schedule = Cron(cron, timezone=timezone or cfg.schedule.timezone)
    except ValueError as exc:
        raise _fail(f"--cron {cron!r}: {str(exc).splitlines()[-1]}") from None
    if cfg.schedule.record:
        from metadqn.versioning import VersioningError, check_branch

        try:
            check_branch(cfg.schedule.branch)
        except VersioningError as exc:
            raise _fail(str(exc)) from None
    from flows.pipeline import pipeline_flow
    from prefect.deployments.runner import EntrypointType

    pipeline_flow.serve(
        name=cfg.schedule.deployment, schedule=schedule, parameters={"scheduled": True}, limit=1,
        description="metadqn scheduled run: grow the task pool, dvc repro, register, promote, record",
        tags=["metadqn", cfg.family.name], entrypoint_type=EntrypointType.MODULE_PATH,
    )


def _internal_error(exc: BaseException) -> None:
    first = (str(exc).strip().splitlines() or [""])[0]
    typer.echo(f"internal error: {type(exc).__name__}: {first} (METADQN_DEBUG=1 shows the traceback)", err=True)
    sys.exit(1)


def main() -> None:
    """The console entry point. A failure that no command turned into its one-line message is still one line
    (exit 1, "internal error"); ``METADQN_DEBUG=1`` shows the traceback for a bug report."""
    import os

    if os.environ.get("METADQN_DEBUG"):
        app()
        return
    try:
        code = app(standalone_mode=False)  # click returns an Exit's code instead of exiting
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(exc.exit_code if isinstance(exc, typer.Exit) else exc.code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except OSError as exc:
        from metadqn.errors import is_disk_full

        if not is_disk_full(exc):
            _internal_error(exc)
        # a full disk mid-write: atomic writes left no half file behind, so freeing space and rerunning is enough
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc} while writing; free disk space (or raise the quota) "
                   "and rerun: no half-written output was kept", err=True)
        sys.exit(2)
    except Exception as exc:  # the last line of defence against a traceback
        show = getattr(exc, "show", None)  # a usage error (typer's vendored click): its own short message
        if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
            show()
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        _internal_error(exc)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
