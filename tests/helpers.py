"""Helpers shared by the end-to-end tests (a fresh git project of this working tree, `dvc` and other commands
run inside it). Test modules import these from here, never from one another."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from metadqn.config import load_params

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


STAGE_PREFECT_API: list[str] = []
"""The URL of this test session's Prefect server (conftest's ``prefect_api``), once it runs."""


def stage_env(project: Path) -> dict[str, str]:
    """:func:`project_env`, plus this session's Prefect server where one runs: a bare ``dvc repro`` runs each
    stage's flow in its own process, and without a server each one starts Prefect's temporary server
    (~5.7 s a flow on this machine). ``metadqn pipeline`` shares one server between its stages itself, and
    the tests of its signal handling and of ``serve`` keep their own environments."""
    env = project_env(project)
    if STAGE_PREFECT_API:
        env["PREFECT_API_URL"] = STAGE_PREFECT_API[0]
    return env


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=stage_env(project), capture_output=True,
                          text=True, timeout=600)


def start_prefect_server(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on loopback (its state under ``home``), once its health check answers."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=home, env={**env, "PREFECT_HOME": str(home / ".prefect")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(1)
    proc.terminate()
    proc.wait(timeout=30)
    raise RuntimeError("prefect server did not start in 90 s")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
