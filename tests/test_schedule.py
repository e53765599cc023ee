"""Scheduled runs end to end on the tiny params: the pool grows, collect trains only the new tasks, a new
challenger is registered, the run is recorded (dvc push + git commit) and a fresh clone reproduces it;
then `metadqn serve` serves the same pipeline as a Prefect deployment with a cron schedule."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import BIN, dvc, make_project, project_env, start_prefect_server

BRANCH = "metadqn-scheduled"
FIRST, SECOND = "2026-11-27T03:00:00Z", "2026-11-28T03:00:00Z"


def metadqn(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "metadqn"), *args], cwd=project, env=project_env(project), capture_output=True,
                          text=True, timeout=timeout)


def _git(project: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True).stdout


def _ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    # (two whole tiny pipelines, in the setup of the first test that asks: that test's timeout covers them,
    # hence the marks below; ~4.5 min alone on 2 cores, over 10 min on a machine with other work on both)
    """A tiny project on the scheduled branch with a local DVC remote, after two scheduled runs."""
    root = tmp_path_factory.mktemp("sched")
    project = make_project(root / "p")
    remote = root / "remote"
    _git(project, "switch", "-q", "-c", BRANCH)
    assert dvc(project, "remote", "modify", "--local", "local", "url", str(remote)).returncode == 0
    runs = [_ok(metadqn(project, "pipeline", "--scheduled", "--at", at)) for at in (FIRST, SECOND)]
    return project, remote, runs


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_second_scheduled_run_trains_only_the_new_tasks_and_registers_a_challenger(scheduled):
    project, _, (first, second) = scheduled
    pool = pd.read_csv(project / "data" / "task_pool.csv")
    assert len(pool) == 3 + 2 + 2 and list(pool["batch"].unique()) == ["initial", FIRST, SECOND]
    held_out = pd.read_parquet(project / "data" / "tasks.parquet").query("split != 'train'")
    assert not set(held_out["task_id"]) & set(pool["task_id"])
    assert "collect: trained 9 task(s)" in first  # 3 + 2 training, 4 held-out (val, val_extrap, interp, extrap)
    assert "collect: trained 2 task(s)" in second
    assert "metadqn-cartpole-mirrored-hypernet: version 1 (challenger)" in first
    assert "metadqn-cartpole-mirrored-hypernet: version 2 (challenger)" in second
    assert "metadqn-cartpole-mirrored-qnet:" in second

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    challenger = client.get_model_version_by_alias("metadqn-cartpole-mirrored-hypernet", "challenger")
    assert str(challenger.version) == "2"
    for key in ("git_commit", "dvc_data_hash", "params_digest", "prefect_flow_run_id", "mlflow_run_id"):
        assert challenger.tags[key], key
    qnet = client.get_model_version_by_alias("metadqn-cartpole-mirrored-qnet", "interp-000")
    assert {"task_id", "split", "method", "normalised_return", "physics.length"} <= set(qnet.tags)
    assert qnet.tags["split"] == "interp" and qnet.tags["method"] == "hypernet"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_each_scheduled_run_is_a_commit_a_fresh_clone_reproduces(scheduled, tmp_path):
    project, remote, _ = scheduled
    log = _git(project, "log", "--format=%s", BRANCH).splitlines()
    assert log[:2] == [f"metadqn scheduled run {SECOND}: +2 training task(s) (train-005, train-006)",
                       f"metadqn scheduled run {FIRST}: +2 training task(s) (train-003, train-004)"]
    changed = _git(project, "show", "--name-only", "--format=", "HEAD").split()
    assert {"dvc.lock", "data/task_pool.csv.dvc", "reports/metrics.json"} <= set(changed)
    assert dvc(project, "status").stdout.strip().endswith("Data and pipelines are up to date.")

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--branch", BRANCH, str(project), str(clone)], check=True)
    assert dvc(clone, "remote", "modify", "--local", "local", "url", str(remote)).returncode == 0
    pull = dvc(clone, "pull")
    assert pull.returncode == 0, pull.stderr[-2000:]
    assert "Data and pipelines are up to date" in dvc(clone, "status").stdout
    again = dvc(clone, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout[-2000:]
    assert (clone / "reports" / "metrics.json").read_bytes() == (project / "reports" / "metrics.json").read_bytes()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_an_unchanged_pipeline_run_is_fast_and_registers_nothing(scheduled):
    project, _, _ = scheduled
    start = time.perf_counter()
    out = _ok(metadqn(project, "pipeline"))
    elapsed = time.perf_counter() - start
    # that nothing reran is checked below; the time is only a loose sanity bound (was 30 s), generous enough for
    # a loaded CI machine
    assert elapsed < 120, f"unchanged pipeline run took {elapsed:.1f} s"
    assert "Running stage" not in out and "(challenger)" not in out and "new version" not in out.replace(
        "0 new version", "")
    assert "unchanged" in out


@pytest.fixture
def prefect_server(scheduled):
    """`prefect server start` on loopback, as the README runs it (the scheduler lives in the server)."""
    project = scheduled[0]
    proc, url = start_prefect_server(project, project_env(project))
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_serve_makes_a_cron_deployment_that_runs_and_stops_on_sigterm(scheduled, prefect_server):
    project, _, _ = scheduled
    env = {**project_env(project), "PREFECT_API_URL": prefect_server}
    server = subprocess.Popen([str(BIN / "metadqn"), "serve", "--cron", "0 3 * * *"], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        listed = ""
        while time.time() < deadline:
            listed = subprocess.run([str(BIN / "prefect"), "deployment", "ls"], cwd=project, env=env,
                                    capture_output=True, text=True).stdout
            if "metadqn-scheduled" in listed:
                break
            time.sleep(2)
        assert "pipeline/metadqn-scheduled" in listed, listed
        shown = subprocess.run([str(BIN / "prefect"), "deployment", "inspect", "pipeline/metadqn-scheduled"],
                               cwd=project, env=env, capture_output=True, text=True).stdout
        assert "0 3 * * *" in shown
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "pipeline/metadqn-scheduled",
                              "--param", "grow=0", "--watch", "--watch-timeout", "300"],
                             cwd=project, env=env, capture_output=True, text=True, timeout=360)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            output, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
    assert server.returncode == 0, output[-3000:]
    assert json.loads((project / "reports" / "metrics.json").read_text())
