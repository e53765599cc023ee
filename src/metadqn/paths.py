"""Default locations of every stage's inputs and outputs (relative to the project root).

Stage commands take these as options, so DVC stage ``cmd`` lines show their paths; the defaults here are
what ``dvc.yaml`` passes.
"""

from __future__ import annotations

from pathlib import Path

TASKS = Path("data/tasks.parquet")
TRAJECTORIES = Path("data/trajectories")
EXPERTS = Path("models/experts")
COLLECT_REPORTS = Path("reports/collect")
COLLECT_METRICS = COLLECT_REPORTS / "metrics.json"
COLLECT_CURVES = COLLECT_REPORTS / "curves.csv"
