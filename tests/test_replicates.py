"""Replicates (metadqn.replicates): seeds, the aggregation, the refusals, and one real replicate of the tiny
pipeline tracked under a parent MLflow run."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from metadqn.replicates import (
    ReplicateError,
    aggregate,
    check_workspace,
    figures,
    markdown,
    replicate_seeds,
    with_seeds,
)
from tests.helpers import BIN, ROOT, dvc, stage_env

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_replicate_r_moves_every_training_seed_by_r_and_keeps_the_tasks():
    seeds = replicate_seeds(PARAMS, 2)
    assert seeds == {"collect.seed": PARAMS["collect"]["seed"] + 2, "meta_train.seed": PARAMS["meta_train"]["seed"] + 2,
                     "meta_test.seed": PARAMS["meta_test"]["seed"] + 2,
                     "meta_test.search.seed": PARAMS["meta_test"]["search"]["seed"] + 2}
    changed = with_seeds(PARAMS, seeds)
    assert changed["meta_test"]["search"]["seed"] == seeds["meta_test.search.seed"]
    assert changed["collect"]["task_seed"] == PARAMS["collect"]["task_seed"]  # same tasks in every replicate
    assert PARAMS["collect"]["seed"] == yaml.safe_load((ROOT / "params.yaml").read_text())["collect"]["seed"]
    assert replicate_seeds(PARAMS, 0) == {k: v - 2 for k, v in seeds.items()}


def test_figures_take_the_headline_keys_of_each_split_and_method_and_skip_non_finite():
    metrics = {"budget_steps": 10, "interp": {"hypernet": {"auc_iqm": 0.9, "zero_shot_iqm": 0.8, "runs": 10,
                                                           "final_iqm": float("nan")}},
               "extrap": {"scratch": {"auc_iqm": 0.3}}}
    assert figures(metrics) == {"interp.hypernet.auc_iqm": 0.9, "interp.hypernet.zero_shot_iqm": 0.8,
                                "extrap.scratch.auc_iqm": 0.3}


def test_aggregate_gives_mean_range_and_a_student_t_interval_across_replicates():
    runs = [{"a": 1.0, "b": 5.0}, {"a": 2.0, "b": 5.0}, {"a": 3.0}]
    table = aggregate(runs, confidence=0.95)
    assert set(table) == {"a"}  # a figure missing from one replicate is not summarised
    row = table["a"]
    assert row["values"] == [1.0, 2.0, 3.0] and row["mean"] == 2.0 and (row["min"], row["max"]) == (1.0, 3.0)
    # sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321
    assert row["ci_low"] == pytest.approx(2.0 - 2.4841, abs=1e-3)
    assert row["ci_high"] == pytest.approx(2.0 + 2.4841, abs=1e-3)
    assert aggregate([{"a": 1.0}, {"a": 1.0}], 0.9)["a"]["ci_low"] == 1.0  # no spread, no width
    page = markdown(table, 3, 0.95, "abc", [{"collect.seed": r} for r in range(3)])
    assert "| a | 1.00 | 2.00 | 3.00 | 2.00 [-0.48, 4.48] | 1.00 | 3.00 |" in page
    assert "rep 2: collect.seed=2" in page


def _git(project, *args):
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True)


def _commit(project):
    _git(project, "add", "-A")
    _git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "run")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a whole tiny replicate, three calls and a move in place: ~6 min alone on 2 cores
def test_replicate_runs_a_clone_with_other_seeds_tracks_it_under_one_parent_and_writes_the_table(
        tiny_project, tmp_path):
    project = tmp_path / "p"
    shutil.copytree(tiny_project, project, symlinks=True)
    (project / "mlflow.db").unlink(missing_ok=True)
    env = stage_env(project)  # the clone's bare `dvc repro` reports to this session's Prefect server

    def replicate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "metadqn"), "replicate", "--workdir", str(tmp_path / "reps"), *args],
                              cwd=project, env=env, capture_output=True, text=True, timeout=600)

    # replicate 0 is the workspace's run at HEAD: uncommitted edits and stale outputs are refused in one line
    readme = project / "README.md"
    readme.write_text(readme.read_text() + "\n")
    refused = replicate("--n", "2")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "commit them first" in refused.stderr
    _git(project, "checkout", "README.md")
    _commit(project)  # whatever the tiny run left uncommitted
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("seeds: 2", "seeds: 3"))
    _commit(project)
    with pytest.raises(ReplicateError, match="not up to date"):
        check_workspace(project)
    _git(project, "reset", "-q", "--hard", "HEAD~1")

    run = replicate("--n", "2")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = json.loads((project / "reports" / "replicates.json").read_text())
    assert out["n"] == 2 and out["seeds"][1]["collect.seed"] == out["seeds"][0]["collect.seed"] + 1
    zero = json.loads((project / "reports" / "metrics.json").read_text())
    one = json.loads((tmp_path / "reps" / "r1" / "reports" / "metrics.json").read_text())
    row = out["figures"]["interp.scratch.auc_iqm"]
    assert row["values"] == [zero["interp"]["scratch"]["auc_iqm"], one["interp"]["scratch"]["auc_iqm"]]
    clone_params = yaml.safe_load((tmp_path / "reps" / "r1" / "params.yaml").read_text())
    assert clone_params["meta_train"]["seed"] == out["seeds"][1]["meta_train.seed"]
    assert "| interp.scratch.auc_iqm |" in (project / "reports" / "replicates.md").read_text()

    # the clone's stage runs are children of one parent run in the workspace's store
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("stage") == "replicates"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["stage"] for r in children} >= {"collect", "meta_train", "meta_test"}
    assert {r.data.tags["replicate"] for r in children} == {"1"}
    assert parent.info.status == "FINISHED"
    assert "interp.scratch.auc_iqm.mean" in parent.data.metrics

    # a second call reuses the finished clone: no stage runs again
    lock = tmp_path / "reps" / "r1" / "dvc.lock"
    before = lock.stat().st_mtime_ns
    again = replicate("--n", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert lock.stat().st_mtime_ns == before
    assert json.loads((project / "reports" / "replicates.json").read_text())["figures"] == out["figures"]

    # a commit that changes the report only: the clone moves to it in place, keeps its own run's outputs
    # (not replicate 0's, which the checkout brings) and reruns the report alone
    clone = tmp_path / "reps" / "r1"
    scores = clone / "reports" / "meta_test" / "scores.csv"
    own_scores = scores.read_bytes()
    assert own_scores != (project / "reports" / "meta_test" / "scores.csv").read_bytes()
    params.write_text(params.read_text().replace("title: metadqn meta-test report", "title: moved report"))
    assert dvc(project, "repro").returncode == 0
    _commit(project)
    moved = replicate("--n", "2")
    assert moved.returncode == 0, moved.stdout[-2000:] + moved.stderr[-2000:]
    assert (clone / "reports" / "report.md").read_text().startswith("# moved report")
    assert scores.read_bytes() == own_scores
    ran = (tmp_path / "reps" / "r1.log").read_text()
    assert "Running stage 'report'" in ran
    assert not any(f"Running stage '{stage}'" in ran for stage in ("collect", "meta_train", "meta_test"))
    head = _git(project, "rev-parse", "HEAD").stdout.strip()
    assert json.loads((clone / ".metadqn-replicate.json").read_text())["commit"] == head
    assert dvc(clone, "status").stdout.strip() == "Data and pipelines are up to date."
    assert json.loads((project / "reports" / "replicates.json").read_text())["figures"] == out["figures"]
