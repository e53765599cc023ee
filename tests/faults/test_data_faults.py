"""Corrupt, truncated and non-finite data, and kill -9 at atomic writes (#11).

Each case either heals (the stage redoes the damaged work and DVC records the same hashes as a clean run)
or ends the stage in one line naming the file; none reaches dvc.lock.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from metadqn.data.io import CorruptDataError, load_state_dict, remove_stale_temps, save_state_dict, write_json
from metadqn.data.trajectories import read_task
from tests.helpers import BIN, dvc, project_env


def _outs(lock: Path, stage: str) -> dict[str, str]:
    data = yaml.safe_load(lock.read_text())["stages"][stage]
    return {o["path"]: o["md5"] for o in data["outs"]}


@pytest.fixture
def project(tiny_project: Path, tmp_path: Path) -> Path:
    """A copy of the reproduced tiny project (the session fixture stays untouched)."""
    dest = tmp_path / "p"
    shutil.copytree(tiny_project, dest, symlinks=True)
    return dest


def _one_line_failure(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _metadqn(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "metadqn"), *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True, timeout=600)


def test_a_truncated_output_is_retrained_never_recorded(project: Path) -> None:
    """#11.1: `truncate -s 100` on an expert and half a trajectory file (of a task in another group), then
    `dvc repro`: collect must not reuse a damaged file; it retrains those tasks' groups and DVC records the
    clean run's hashes again."""
    reference = _outs(project / "dvc.lock", "collect")
    for victim in ("models/experts/train-000.pt", "data/trajectories/extrap-000.parquet"):
        path = project / victim
        with open(path, "r+b") as handle:
            handle.truncate(100 if victim.endswith(".pt") else path.stat().st_size // 2)
    proc = dvc(project, "repro")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _outs(project / "dvc.lock", "collect") == reference
    load_state_dict(project / "models/experts/train-000.pt")  # readable again
    status = dvc(project, "status")
    assert "up to date" in status.stdout, status.stdout


STORE_ARGS = ["--tasks", "data/tasks.parquet", "--trajectories", "data/trajectories", "--experts", "models/experts",
              "--collect-metrics", "reports/collect/metrics.json"]  # relative to the project


@pytest.mark.parametrize("damage", ["nan_obs", "inf_reward"])
def test_non_finite_trajectories_stop_meta_train_in_one_line(project: Path, damage: str, tmp_path: Path) -> None:
    """#11.2: NaN observations or inf rewards used to train meta-models with non-finite weights, exit 0."""
    path = project / "data/trajectories/train-000.parquet"
    frame = pq.read_table(path).to_pandas()
    column = "obs_2" if damage == "nan_obs" else "reward"
    frame.loc[5, column] = np.nan if damage == "nan_obs" else np.inf
    pq.write_table(pa.Table.from_pandas(frame, schema=pq.read_schema(path), preserve_index=False), path)
    out = tmp_path / "meta"
    proc = _metadqn(project, "meta-train", *STORE_ARGS, "--models", str(out / "models"),
                    "--metrics", str(out / "m.json"), "--cross-eval", str(out / "c.csv"),
                    "--curves", str(out / "k.csv"))
    _one_line_failure(proc, "train-000.parquet", column)
    assert not (out / "m.json").exists()


def test_a_degenerate_return_scale_stops_meta_test_in_one_line(project: Path, tmp_path: Path) -> None:
    """#11.2: an expert return of 0 gave inf scores and null IQMs with exit 0; since #14 the scale is
    (R - R_random) / (R_ref - R_random), which a reference equal to the random return makes 0/0."""
    path = project / "reports/collect/metrics.json"
    metrics = json.loads(path.read_text())
    victim = next(t for t, v in metrics["tasks"].items() if v["split"] == "interp")
    metrics["tasks"][victim]["reference_return"] = metrics["tasks"][victim]["random_return"]
    path.write_text(json.dumps(metrics))
    out = tmp_path / "mt"
    proc = _metadqn(project, "meta-test", "--tasks", "data/tasks.parquet", "--collect-metrics", str(path),
                    "--models", "models/meta", "--curves", str(out / "c.parquet"), "--curves-csv", str(out / "c.csv"),
                    "--scores", str(out / "s.csv"), "--metrics", str(out / "m.json"), "--adapted", str(out / "a"))
    _one_line_failure(proc, victim, "cannot be normalised")
    assert not (out / "m.json").exists()


_KILL_HOOK = textwrap.dedent('''
    """Test hook: SIGKILL this process at the Nth rename of a metadqn temp file (between write and rename)."""
    import fcntl, os, signal
    _replace = os.replace
    _counter, _at = os.environ["METADQN_TEST_KILL_COUNTER"], int(os.environ["METADQN_TEST_KILL_AT"])

    def replace(src, dst, *a, **k):
        name = os.path.basename(os.fspath(src))
        if name.startswith(".") and name.endswith(".tmp") and "/.dvc/" not in os.path.abspath(os.fspath(src)):
            with open(_counter, "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                fh.seek(0)
                n = len(fh.read()) + 1
                fh.write("x")
                fh.flush()
            if n == _at:
                os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *a, **k)

    os.replace = replace
''')


@pytest.mark.parametrize(("stage", "at"), [("collect", 9), ("meta_train", 3)])  # a trajectory write; a model write
def test_kill_9_at_an_atomic_write_then_rerun_reproduces_the_reference_hashes(
        project: Path, tmp_path: Path, stage: str, at: int) -> None:
    """#11.4: a kill -9 between a temp write and its rename leaves a `.<name>.tmp`; the rerun must still give
    the reference run's hashes (the temp file is removed, and ignored by DVC meanwhile)."""
    reference = _outs(project / "dvc.lock", stage)
    if stage == "collect":  # from scratch, so that experts and trajectories are written (and killed) too
        for rel in ("data/trajectories", "models/experts"):
            shutil.rmtree(project / rel)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_KILL_HOOK)
    env = project_env(project)
    env.update(PYTHONPATH=str(hook), METADQN_TEST_KILL_COUNTER=str(tmp_path / "count"),
               METADQN_TEST_KILL_AT=str(at))
    killed = subprocess.run([str(BIN / "dvc"), "repro", "-f", "-s", stage], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0, killed.stdout[-2000:]
    temps = [p for p in project.rglob(".*.tmp") if ".dvc" not in p.parts]
    assert temps, "the hook did not interrupt a write"
    proc = dvc(project, "repro", "-s", stage)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _outs(project / "dvc.lock", stage) == reference


def test_a_stale_temp_file_never_changes_an_output_hash(project: Path) -> None:
    stale = project / "data/trajectories/.train-000.parquet.abc123.tmp"
    stale.write_bytes(b"half a file")
    status = dvc(project, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout  # .dvcignore
    assert remove_stale_temps(project / "data/trajectories") == [stale] and not stale.exists()


def test_writers_refuse_non_finite_values_and_readers_refuse_damaged_files(tmp_path: Path) -> None:
    with pytest.raises(CorruptDataError, match="non-finite weights"):
        save_state_dict(tmp_path / "w.pt", {"w": torch.tensor([1.0, math.nan])})
    assert not (tmp_path / "w.pt").exists()
    with pytest.raises(CorruptDataError, match=r"a\.b\.1"):
        write_json(tmp_path / "m.json", {"a": {"b": [1.0, math.inf]}})
    assert not (tmp_path / "m.json").exists()
    save_state_dict(tmp_path / "ok.pt", {"w": torch.ones(3)})
    mode = os.stat(tmp_path / "ok.pt").st_mode & 0o777
    assert mode == 0o666 & ~_umask(), oct(mode)  # outputs are not created 0600 (mkstemp's mode)
    (tmp_path / "ok.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:100])
    with pytest.raises(CorruptDataError, match="not a readable state_dict"):
        load_state_dict(tmp_path / "ok.pt")
    (tmp_path / "t.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CorruptDataError, match="not a readable Parquet"):
        read_task(tmp_path / "t.parquet", 4)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask



def test_a_full_disk_ends_collect_in_one_line_and_keeps_no_half_file(project: Path, tmp_path: Path) -> None:
    """Disk full on a tiny tmpfs (where this machine lets us mount one): one line, exit 2, no temp file left."""
    mount = tmp_path / "tiny-fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount namespace)")
    try:
        over = tmp_path / "over.yaml"
        over.write_text("tracking: {enabled: false}\n")
        proc = _metadqn(project, "collect", "--params", str(over), "--trajectories", str(mount / "traj"),
                        "--experts", str(tmp_path / "experts"), "--tasks", str(tmp_path / "tasks.parquet"),
                        "--metrics", str(tmp_path / "m.json"), "--curves", str(tmp_path / "c.csv"))
        _one_line_failure(proc, "No space left on device", "free disk space")
        assert not list(mount.rglob("*.tmp")), list(mount.rglob("*"))
        assert not (tmp_path / "m.json").exists()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
