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


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _preflight(store: TaskStore, splits: tuple[str, ...], cfg: Params) -> None:
    """Checks a stage's inputs before Prefect starts: a missing or foreign file ends in one line."""
    from metadqn.data.store import MissingInputError
    from metadqn.data.trajectories import SchemaError
    from metadqn.preflight import check_store

    try:
        check_store(store, splits, cfg.family.family().obs_dim)
    except (MissingInputError, SchemaError) as exc:
        raise _fail(str(exc)) from None


def _load(base: Path, overlay: Path | None):
    from metadqn.config import ParamsError, load_params

    try:
        return load_params(base, overlay)
    except ParamsError as exc:
        raise _fail(str(exc)) from None


@app.command()
def collect(
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
    tasks: Annotated[Path, typer.Option(help="Output: the task sets.")] = paths.TASKS,
    trajectories: Annotated[Path, typer.Option(help="Output: one Parquet file per task.")] = paths.TRAJECTORIES,
    experts: Annotated[Path, typer.Option(help="Output: one expert state_dict per task.")] = paths.EXPERTS,
    metrics: Annotated[Path, typer.Option(help="Output: metrics JSON.")] = paths.COLLECT_METRICS,
    curves: Annotated[Path, typer.Option(help="Output: expert learning curves (CSV).")] = paths.COLLECT_CURVES,
) -> None:
    """Sample task sets, train one expert per task, write trajectories, experts and metrics."""
    _setup_logging()
    cfg = _load(base_params, params)
    from flows.collect import collect_flow

    from metadqn.stages.collect import CollectOutputs

    out = CollectOutputs(tasks=tasks, trajectories=trajectories, experts=experts, metrics=metrics, curves=curves)
    result = collect_flow(cfg, out)
    typer.echo(f"collect: {100 * result['fraction_solved']:.0f}% of tasks solved; metrics in {metrics}")


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
    _setup_logging()
    cfg = _load(base_params, params)
    from flows.meta_train import meta_train_flow

    from metadqn.data.store import MissingInputError, TaskStore
    from metadqn.stages.meta_train import MetaTrainOutputs

    store = TaskStore(tasks_path=tasks, trajectories=trajectories, experts=experts, collect_metrics=collect_metrics)
    _preflight(store, ("train", "val"), cfg)
    out = MetaTrainOutputs(models=models, metrics=metrics, cross_eval=cross_eval, curves=curves)
    try:
        result = meta_train_flow(cfg, store, out)
    except MissingInputError as exc:
        raise _fail(str(exc)) from None
    summary = ", ".join(f"{k} {v['val_zero_shot_normalized']:.2f}" for k, v in result.items() if isinstance(v, dict))
    typer.echo(f"meta-train: validation zero-shot (normalised): {summary}; metrics in {metrics}")


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
) -> None:
    """Fine-tune every method on every held-out task and seed; write curves, metrics and adapted networks."""
    _setup_logging()
    cfg = _load(base_params, params)
    from flows.meta_test import meta_test_flow

    from metadqn.data.store import MissingInputError, TaskStore
    from metadqn.stages.meta_test import MetaTestOutputs

    store = TaskStore(tasks_path=tasks, collect_metrics=collect_metrics)
    _preflight(store, (), cfg)
    if not (models / "hypernet").exists() and not (models / "siamese").exists():
        typer.echo(f"warning: no meta-models in {models}; only the baselines will be compared", err=True)
    out = MetaTestOutputs(curves_parquet=curves, curves_csv=curves_csv, scores=scores, metrics=metrics,
                          adapted=adapted)
    try:
        meta_test_flow(cfg, store, models, out)
    except MissingInputError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"meta-test: metrics in {metrics}, curves in {curves_csv}")


@app.command()
def report(
    params: ParamsOpt = None,
    base_params: BaseOpt = Path("params.yaml"),
    out_dir: Annotated[Path, typer.Option(help="Output: report.html, report.md, figures/.")] = Path("reports"),
) -> None:
    """Write the evaluation report (reports/report.html, self-contained, and reports/report.md)."""
    _setup_logging()
    cfg = _load(base_params, params)
    from flows.report import report_flow

    for need in (paths.METRICS, paths.META_TEST_CURVES_PARQUET, paths.META_TEST_SCORES):
        if not need.exists():
            raise _fail(f"{need}: not found; run `dvc repro meta_test` first")
    html = report_flow(cfg, out_dir)
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
    from metadqn.tracking.registry import promote as run_promote
    from metadqn.tracking.runs import configure_tracking

    configure_tracking()
    decisions = run_promote(cfg, model, dry_run)
    if not decisions:
        raise _fail("no registered model has a challenger; run `make pipeline` first")
    typer.echo(f"rule: {cfg.registry.metric} IQM of challenger {cfg.registry.rule.replace('_', ' ')} of champion"
               f"{' (dry run)' if dry_run else ''}")
    typer.echo(f"{'model':40} {'chall.':>6} {'champ.':>6} {'chall. IQM':>10} {'champ. IQM':>10} {'bound':>7}  decision")
    for d in decisions:
        verdict = ("would promote" if dry_run else "PROMOTED") if d.promoted else "kept champion"
        typer.echo(f"{d.name:40} {d.challenger or '-':>6} {d.champion or '-':>6} {d.challenger_value:>10.3f} "
                   f"{d.champion_value:>10.3f} {d.champion_bound:>7.3f}  {verdict}: {d.reason}")


@app.command("check-params")
def check_params(params: ParamsOpt = None, base_params: BaseOpt = Path("params.yaml")) -> None:
    """Validate params.yaml (and an overlay) and print its digest."""
    cfg = _load(base_params, params)
    typer.echo(f"params OK (digest {cfg.digest()})")


@app.command()
def pipeline() -> None:
    """Bring the whole DVC pipeline up to date through the Prefect pipeline flow."""
    _setup_logging()
    from flows.pipeline import PipelineBusy, pipeline_flow, pipeline_lock

    try:  # refuse before Prefect starts, with one line; the flow takes the lock itself too
        with pipeline_lock():
            pass
    except PipelineBusy as exc:
        raise _fail(str(exc)) from None
    pipeline_flow()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
