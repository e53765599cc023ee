"""Default locations of every stage's inputs and outputs (relative to the project root).

Stage commands take these as options, so DVC stage ``cmd`` lines show their paths; the defaults here are
what ``dvc.yaml`` passes.
"""

from __future__ import annotations

from pathlib import Path

TASK_POOL = Path("data/task_pool.csv")
TASKS = Path("data/tasks.parquet")
TRAJECTORIES = Path("data/trajectories")
EXPERTS = Path("models/experts")
COLLECT_REPORTS = Path("reports/collect")
COLLECT_METRICS = COLLECT_REPORTS / "metrics.json"
COLLECT_CURVES = COLLECT_REPORTS / "curves.csv"
META_MODELS = Path("models/meta")
META_TRAIN_REPORTS = Path("reports/meta_train")
META_TRAIN_METRICS = META_TRAIN_REPORTS / "metrics.json"
META_TRAIN_CROSS_EVAL = META_TRAIN_REPORTS / "cross_eval.csv"
META_TRAIN_CURVES = META_TRAIN_REPORTS / "curves.csv"
META_TEST_REPORTS = Path("reports/meta_test")
META_TEST_CURVES_PARQUET = META_TEST_REPORTS / "curves.parquet"
META_TEST_CURVES_CSV = META_TEST_REPORTS / "curves.csv"
META_TEST_SCORES = META_TEST_REPORTS / "scores.csv"
METRICS = Path("reports/metrics.json")
ADAPTED = Path("models/adapted")
FINETUNE_REPORTS = Path("reports/finetune")
FINETUNE_SEARCH = FINETUNE_REPORTS / "search.csv"
FINETUNE_SEARCH_SCORES = FINETUNE_REPORTS / "scores.csv"
FINETUNE_SELECTED = FINETUNE_REPORTS / "selected.json"
DIAGNOSIS_REPORTS = Path("reports/diagnosis")
DIAGNOSIS_SUMMARY = DIAGNOSIS_REPORTS / "summary.json"
DIAGNOSIS_PER_TASK = DIAGNOSIS_REPORTS / "per_task.csv"
REPORT_SUMMARY = Path("reports/summary.md")
