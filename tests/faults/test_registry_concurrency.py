"""Concurrent promotes on one sqlite store (#11): exactly one process promotes a challenger, the others find it
already champion; none dies with a traceback."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import BIN, ROOT

N_PROCESSES = 5
_AT_ONCE = """
import os, pathlib, sys, time
import mlflow, metadqn.cli, metadqn.tracking.registry  # the seconds of imports before the barrier
mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
mlflow.MlflowClient().search_registered_models(max_results=1)  # and the store's start (MLflow caches it)
barrier, me, n = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(barrier / me).touch()
while len(list(barrier.iterdir())) < n:
    time.sleep(0.005)
sys.argv = ["metadqn", *sys.argv[4:]]
metadqn.cli.main()
"""
"""`metadqn <args>` (the console entry point), started by every process at the same moment: their promotes
overlap instead of being spread over the seconds each process spends importing."""


def _fake_version(client, name: str, tags: dict[str, str]) -> str:
    """A registered version without a logged model (promotion reads aliases and tags only)."""
    import mlflow

    with contextlib.suppress(mlflow.exceptions.MlflowException):  # already registered
        client.create_registered_model(name)
    version = client.create_model_version(name, source=str(Path(tempfile.gettempdir()) / "metadqn-no-model"),
                                          tags=tags)
    client.set_registered_model_alias(name, "challenger", version.version)
    return str(version.version)


def _env(uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("METADQN_PARAMS", None)
    return env


def test_five_concurrent_promotes_promote_once(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = "metadqn-cartpole-mirrored-hypernet"
    tags = {"metric.interp.zero_shot_iqm": "0.9", "metric.interp.zero_shot_ci_high": "0.95",
            "baseline.interp.zero_shot_ci_high": "0.3"}
    _fake_version(client, name, tags)  # v1 becomes champion first, so every process also reads a champion
    client.set_registered_model_alias(name, "champion", "1")
    version = _fake_version(client, name, {**tags, "metric.interp.zero_shot_iqm": "0.99"})
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _AT_ONCE, str(barrier), str(i), str(N_PROCESSES), "promote",
                               "--model", name], cwd=tmp_path, env=_env(uri), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(N_PROCESSES)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and "Traceback" not in err and "error" not in err, out + err[-3000:]
    rows = [line for out, _ in outputs for line in out.splitlines() if line.startswith(name)]
    assert len(rows) == N_PROCESSES
    promoted = [r for r in rows if "PROMOTED" in r]
    assert len(promoted) == 1, "\n".join(rows)
    assert sum("challenger is already champion" in r for r in rows) == N_PROCESSES - 1, "\n".join(rows)
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
    assert client.get_model_version(name, version).tags["promotion.decision"] == "promoted"

    # the dry run shows the champion's figures, not nan
    dry = subprocess.run([str(BIN / "metadqn"), "promote", "--dry-run", "--model", name], cwd=tmp_path,
                         env=_env(uri), capture_output=True, text=True, timeout=120)
    row = next(line for line in dry.stdout.splitlines() if line.startswith(name))
    assert re.search(r"\s0\.990\s+0\.990\s+0\.950\s+0\.300\s", row), row
    assert "nan" not in row
