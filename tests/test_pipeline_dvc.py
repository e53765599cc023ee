"""End to end through DVC: the stage command, dvc.lock, and a no-op second `dvc repro`."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from metadqn.config import load_params
from metadqn.data.io import dvc_md5
from tests.helpers import dvc


@pytest.mark.slow
def test_dvc_repro_whole_tiny_pipeline_then_noop(tiny_project):
    project = tiny_project
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["collect"]["outs"]}
    assert outs["data/trajectories"] == dvc_md5(project / "data" / "trajectories")
    metrics = json.loads((project / "reports" / "collect" / "metrics.json").read_text())
    counts = load_params(project / "params.yaml").collect.counts()
    assert len(metrics["tasks"]) == sum(counts.values()) == 7  # the tiny overlay: 3 + 1 + 1 + 1 + 1
    meta = json.loads((project / "reports" / "meta_train" / "metrics.json").read_text())
    assert {"hypernet", "siamese", "reptile", "multitask"} <= set(meta)
    assert (project / "models" / "meta" / "hypernet" / "model.pt").exists()
    summary = json.loads((project / "reports" / "metrics.json").read_text())
    assert {"interp", "extrap"} <= set(summary)
    assert {"zero_shot_iqm", "zero_shot_ci_low", "zero_shot_ci_high", "auc_iqm", "steps_to_threshold_iqm",
            "steps_ratio_vs_scratch", "prob_improvement_vs_scratch"} <= set(summary["interp"]["hypernet"])
    report = (project / "reports" / "report.md").read_text()
    from metadqn.evaluation.report import SECTIONS

    for section in SECTIONS:
        assert f"## {section}" in report, section
    html = (project / "reports" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<script" not in html
    assert (project / "models" / "adapted" / "index.csv").exists()
    _check_diagnosis(project, report)

    start = time.perf_counter()
    second = dvc(project, "repro")
    elapsed = time.perf_counter() - start
    assert second.returncode == 0, second.stderr
    assert "didn't change, skipping" in second.stdout and "Running stage" not in second.stdout
    # that nothing reran is checked by the output above; the time is only a loose sanity bound (was 5 s), generous
    # enough for a loaded CI machine
    assert elapsed < 60.0, f"no-op dvc repro took {elapsed:.1f} s"
    status = dvc(project, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr

    shown = dvc(project, "metrics", "show", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "fraction_solved" in shown.stdout and "val_zero_shot_normalized" in shown.stdout
    assert "zero_shot_iqm" in shown.stdout
    plots = dvc(project, "plots", "show", "--json")
    assert plots.returncode == 0 and "normalised_return" in plots.stdout


def _check_diagnosis(project, report: str) -> None:
    """The diagnose stage: a row per hypernetwork and task of every split, neighbours always other training
    tasks, a training task's distance ratio 1 at the median, and the report's table."""
    import pandas as pd

    per_task = pd.read_csv(project / "reports" / "diagnosis" / "per_task.csv")
    tasks = pd.read_parquet(project / "data" / "tasks.parquet")
    split = dict(zip(tasks["task_id"], tasks["split"], strict=True))
    assert set(per_task["model"]) == {"hypernet", "hypernet-oracle"}
    for _, rows in per_task.groupby("model"):
        assert sorted(rows["task_id"]) == sorted(tasks["task_id"])
        assert (rows["nn_task"] != rows["task_id"]).all()
        assert {split[t] for t in rows["nn_task"]} == {"train"}
        assert rows.loc[rows["split"] == "train", "embed_nn_ratio"].median() == pytest.approx(1.0)
    summary = json.loads((project / "reports" / "diagnosis" / "summary.json").read_text())
    assert set(summary["hypernet"]) == {"train", "val", "val_extrap", "interp", "extrap"}
    assert all(-1.5 < m["ret_expert_phys_nn"] < 1.5 for m in summary["hypernet"].values())
    assert "generator at the nearest training embedding" in report
