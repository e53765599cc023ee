"""The ``metadqn`` command line: one command per pipeline stage (what DVC stage commands call).

User mistakes (bad params, missing inputs) end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from metadqn import paths

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


@app.command("check-params")
def check_params(params: ParamsOpt = None, base_params: BaseOpt = Path("params.yaml")) -> None:
    """Validate params.yaml (and an overlay) and print its digest."""
    cfg = _load(base_params, params)
    typer.echo(f"params OK (digest {cfg.digest()})")


@app.command()
def pipeline() -> None:
    """Bring the whole DVC pipeline up to date through the Prefect pipeline flow."""
    _setup_logging()
    from flows.pipeline import pipeline_flow

    pipeline_flow()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
