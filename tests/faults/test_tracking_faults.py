"""A dead or hung MLflow tracking server (#11): `metadqn promote` and a tracking stage fail in one line within
seconds, before any training; the library's own MLflow calls give up within a bounded budget."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metadqn.tracking.runs import HTTP_DEFAULTS, TrackingUnavailable, check_tracking, configure_tracking
from tests.helpers import BIN, ROOT, free_port

LIMIT_S = 30.0


@pytest.fixture
def hung_uri() -> Iterator[str]:
    """A server that accepts connections (the kernel completes them from the backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


def _run(args: list[str], cwd: Path, uri: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("METADQN_PARAMS", None)
    for key in HTTP_DEFAULTS:  # the defaults under test, not whatever the caller's shell sets
        env.pop(key, None)
    start = time.monotonic()
    proc = subprocess.run([str(BIN / "metadqn"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("server", ["dead", "hung"])
@pytest.mark.parametrize("command", [["promote"], ["promote", "--dry-run"], ["meta-train"], ["collect"]])
def test_cli_fails_in_one_line_within_seconds(server, command, tmp_path, request):
    uri = request.getfixturevalue(f"{server}_uri")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")  # tracking.enabled: true
    proc, elapsed = _run(command, tmp_path, uri)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: MLflow tracking store {uri} is unavailable: ")
    assert ("Connection refused" if server == "dead" else "no answer within") in lines[0]
    assert "MLFLOW_TRACKING_URI" in lines[0]
    if command[0] != "promote":  # a stage can run untracked; promote cannot
        assert "tracking.enabled: false" in lines[0]
    assert elapsed < LIMIT_S, f"{' '.join(command)} took {elapsed:.1f} s against a {server} server"
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()  # nothing trained or written


def test_a_stage_with_tracking_off_does_not_check(tmp_path, dead_uri):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "off.yaml").write_text("tracking: {enabled: false}\n")
    proc, _ = _run(["collect", "--params", "off.yaml"], tmp_path, dead_uri)
    assert "MLflow" not in proc.stderr  # it went on to its own inputs (here: no task pool)
    assert proc.returncode == 2 and "pool" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("uri, fragment", [
    ("bogus://somewhere", "unknown scheme 'bogus'"),
    ("sqlite:////no/such/folder/mlflow.db", "folder /no/such/folder does not exist"),
    ("file:///tmp/mlruns", "MLFLOW_ALLOW_FILE_STORE"),
    ("http://user:secret@127.0.0.1:{port}", "cannot connect"),
    ("postgresql://u:secret@127.0.0.1:{port}/db", "cannot connect to 127.0.0.1"),
])
def test_check_tracking_one_line(uri, fragment, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = uri.format(port=free_port())
    with pytest.raises(TrackingUnavailable) as info:
        check_tracking(uri)
    message = str(info.value)
    assert fragment in message and "\n" not in message and "secret" not in message
    assert isinstance(info.value, ValueError)


def test_check_tracking_accepts_usable_stores(tmp_path):
    assert check_tracking(f"sqlite:///{tmp_path / 'new.db'}")  # MLflow creates it
    (tmp_path / "junk.db").write_text("not a database" * 100)
    with pytest.raises(TrackingUnavailable, match="cannot be read as a database"):
        check_tracking(f"sqlite:///{tmp_path / 'junk.db'}")


def test_http_budget_is_bounded_and_overridable(monkeypatch):
    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # a user's own setting wins
    configure_tracking()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert int(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 10
    assert int(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 3


@pytest.mark.parametrize("server", ["dead", "hung"])
def test_library_promote_raises_within_the_budget(server, tiny_params, monkeypatch, request):
    """Without the CLI's check (e.g. a server that dies mid-pipeline), the registry's own calls give up
    within the bounded budget and raise, instead of retrying for 15 minutes or answering "no challenger"."""
    import mlflow

    from metadqn.tracking.registry import promote

    uri = request.getfixturevalue(f"{server}_uri")
    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    configure_tracking()
    start = time.monotonic()
    with pytest.raises(mlflow.exceptions.MlflowException):
        promote(tiny_params)
    assert time.monotonic() - start < LIMIT_S
