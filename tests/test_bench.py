from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_benchmark_script_runs_and_writes_its_table(tmp_path):
    pytest.importorskip("stable_baselines3")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "dqn_throughput.py"), "--quick", "--ks", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert {(r["setting"], r["system"]) for r in results} == {(s, y) for s in ("light", "heavy")
                                                              for y in ("sb3", "metadqn")}
    for r in results:
        assert r["env_steps_per_s"] > 0 and r["ratio_vs_sb3"] > 0
    assert "x SB3 best" in proc.stdout


@pytest.mark.slow
def test_contention_benchmark_script_runs_and_writes_its_table(tmp_path, prefect_api):
    out = tmp_path / "contention.json"
    # the session's Prefect server: each of the script's two collects would otherwise start a temporary one
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "contention.py"), "--quick", "--runners", "processes",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["runner"] == "processes" and row["alone_s"] > 0 and row["busy_s"] > 0
    assert row["slowdown"] > 0 and row["alone_vs_local_alone"] is None  # no local run to compare with
    assert "busy/alone" in proc.stdout


@pytest.mark.slow
def test_determinism_cost_script_runs_both_settings_and_each_takes_its_kernels(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "determinism_cost.py"), "--quick", "--workloads",
                           "acrobot-env", "hypernet", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["workload"] for r in rows] == ["acrobot-env", "hypernet"]
    for r in rows:
        assert r["pinned_capability"] == "AVX2" and r["pinned_s"] > 0 and r["native_s"] > 0 and r["ratio"] > 0
    assert "pinned / native" in proc.stdout
