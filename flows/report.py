"""Prefect flow for the report stage; the summary table also goes to Prefect as a markdown artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from metadqn.config import Params
from metadqn.evaluation.report import build_report


@flow(name="report", log_prints=True)
def report_flow(params: Params, out_dir: Path = Path("reports"), inputs: dict[str, Path] | None = None) -> Path:
    """``inputs``: ``build_report``'s input paths by keyword (``metrics_path``, ...; defaults for the rest)."""
    result = build_report(params, out_dir, **(inputs or {}))
    create_markdown_artifact(markdown=result.summary_markdown, key="metadqn-meta-test-summary",
                             description=f"metadqn meta-test summary (IQM with {params.meta_test.confidence:.0%} CIs)")
    print(f"report written: {result.html}")
    return result.html
