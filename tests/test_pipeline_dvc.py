"""End to end through DVC: the stage command, dvc.lock, and a no-op second `dvc repro`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metadqn.config import load_params
from metadqn.data.io import dvc_md5

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def project_env(project: Path) -> dict[str, str]:
    """The environment of a command run in ``project``: the venv first on PATH, Prefect state and the MLflow
    store inside the project, no params overlay."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("METADQN_PARAMS", None)
    env["PREFECT_HOME"] = str(project / ".prefect")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    return env


def make_project(dest: Path) -> Path:
    """A fresh git checkout of the working tree with tiny params written into params.yaml."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    tiny = load_params(ROOT / "params.yaml", ROOT / "tests" / "params.tiny.yaml")
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny.model_dump(mode="json"), sort_keys=False))
    for stale in ("dvc.lock", "reports"):
        p = dest / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (dest / "data" / "task_pool.csv.dvc").unlink(missing_ok=True)  # the tiny params make their own pool
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([str(BIN / "metadqn"), "init-pool"], cwd=dest, env=project_env(dest), check=True,
                   capture_output=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=dest,
                   check=True)
    return dest


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=project_env(project), capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_dvc_repro_whole_tiny_pipeline_then_noop(tiny_project):
    project = tiny_project
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["collect"]["outs"]}
    assert outs["data/trajectories"] == dvc_md5(project / "data" / "trajectories")
    metrics = json.loads((project / "reports" / "collect" / "metrics.json").read_text())
    assert len(metrics["tasks"]) == 6
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

    start = time.perf_counter()
    second = dvc(project, "repro")
    elapsed = time.perf_counter() - start
    assert second.returncode == 0, second.stderr
    assert "didn't change, skipping" in second.stdout and "Running stage" not in second.stdout
    assert elapsed < 5.0, f"no-op dvc repro took {elapsed:.1f} s"
    status = dvc(project, "status")
    assert "up to date" in status.stdout

    shown = dvc(project, "metrics", "show", "--json")
    assert "fraction_solved" in shown.stdout and "val_zero_shot_normalized" in shown.stdout
    assert "zero_shot_iqm" in shown.stdout
    plots = dvc(project, "plots", "show", "--json")
    assert plots.returncode == 0 and "normalised_return" in plots.stdout
