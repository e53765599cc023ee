"""`metadqn pipeline` as a process tree (#11): killed outright it leaves no orphan, a signal ends it in one line,
and a failed stage is one line naming its log.

A tiny project whose collect is slowed down (many DQN steps) so that there is a stage to kill. Processes are
told apart by their working directory: everything the pipeline starts runs in the project."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import BIN, make_project, project_env


@pytest.fixture(scope="module")
def slow_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    project = make_project(tmp_path_factory.mktemp("procs") / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dqn"]["total_steps"] = 200_000  # minutes of collect: it is always killed first
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    yield project
    for left in _tree(project):  # a broken build leaves orphans: never let them outlive the tests
        with contextlib.suppress(OSError):
            os.kill(int(left.split()[0]), signal.SIGKILL)


def _tree(project: Path) -> list[str]:
    """The living (not zombie) processes working in ``project``: what the pipeline started, and their leftovers."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            with open(f"/proc/{pid}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmd = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if (cwd == str(project) or cwd.startswith(f"{project}/")) and state not in "ZX":
            found.append(f"{pid} {cmd[:120]}")
    return found


def _start(project: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "metadqn"), "pipeline"], cwd=project, env=env or project_env(project),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_collect(project: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("metadqn collect" in p for p in _tree(project)):
            time.sleep(1.0)  # let it get into its work (Prefect flow run, worker processes)
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"collect never started: {_tree(project)}")


def _gone_within(project: Path, seconds: float, among: set[str] | None = None) -> float:
    """Seconds until no process of ``project`` (of those in ``among``, if given) runs any more."""
    start = time.monotonic()
    while left := [p for p in _tree(project) if among is None or p in among]:
        assert time.monotonic() - start < seconds, f"still running after {seconds} s: {left}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_sigkill_of_the_pipeline_leaves_no_orphan_and_the_next_run_is_not_a_traceback(slow_project):
    project = slow_project
    first = _start(project)
    _wait_for_collect(project, first)
    tree = set(_tree(project))
    assert any("dvc repro collect" in p for p in tree) and any("uvicorn" in p for p in tree), tree
    first.kill()  # SIGKILL to the pipeline's pid alone, as systemd's KillMode=process would
    second = _start(project)  # at once: while the tree dies
    took = _gone_within(project, 20, among=tree - {p for p in tree if p.split()[0] == str(first.pid)})
    print(f"stage, dvc and temporary Prefect server gone {took:.1f} s after the SIGKILL")
    first.communicate()
    # the second run is refused in one line while the tree dies, or it gets through DVC's repository lock to
    # the stage once the tree is dead (then it is stopped)
    deadline = time.monotonic() + 60
    while second.poll() is None and time.monotonic() < deadline:
        if any("metadqn collect" in p for p in _tree(project)):
            second.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    _, err = second.communicate(timeout=60)
    assert "Traceback" not in err and "rwlock" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    if second.returncode == 2:
        assert last.startswith("error: another metadqn pipeline run holds"), err[-3000:]
    else:
        assert second.returncode == 143 and last.startswith("pipeline interrupted (SIGTERM) during stage collect"), \
            err[-3000:]
    print(f"second run: {last}")
    _gone_within(project, 5)


def test_sigterm_ends_the_pipeline_in_one_line_with_its_children(slow_project):
    project = slow_project
    proc = _start(project)
    _wait_for_collect(project, proc)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    print(f"pipeline exited {time.monotonic() - start:.1f} s after SIGTERM")
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("pipeline interrupted (SIGTERM) during stage collect (log: .metadqn/logs/"), err[-3000:]
    assert last.endswith("outputs of finished stages are kept, rerun to continue"), last
    assert not _tree(project), _tree(project)  # gone by the time the pipeline has exited


def test_a_failed_stage_is_one_line_with_its_exit_code_error_and_log(slow_project, tmp_path):
    project = slow_project
    # an overlay is fine for the pipeline itself but refused inside a DVC stage: collect fails with exit code 2
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("meta_test:\n  seeds: 2\n")
    env = project_env(project) | {"METADQN_PARAMS": str(overlay)}
    proc = subprocess.run([str(BIN / "metadqn"), "pipeline"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    failed = [line for line in proc.stderr.splitlines() if line.startswith("error: stage ")]
    assert len(failed) == 1, proc.stderr[-3000:]
    line = failed[0]
    assert line.startswith("error: stage collect failed (exit code 2): error: "), line
    assert "refused inside the DVC stage collect" in line, line
    log = project / line.rsplit("full output in ", 1)[1]
    assert log.parent == project / ".metadqn" / "logs" and log.name.endswith("-collect.log"), log
    text = log.read_text()
    assert "Running stage 'collect'" in text and "refused inside the DVC stage collect" in text, text
    assert text.rstrip().endswith("# exit code 255"), text[-500:]  # dvc's own code; the stage's is in the line
    assert not _tree(project), _tree(project)
