"""Exact reproduction across clones and CPU settings, and sharing data through a DVC remote."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.helpers import BIN, dvc, make_project, stage_env

# wall-clock times live in MLflow only, so every metrics file must match byte for byte; the report names
# the git commit and the run's time, so it may differ
NOT_COMPARED = {"reports/report.html", "reports/report.md"}
METRICS = ("reports/collect/metrics.json", "reports/meta_train/metrics.json", "reports/metrics.json")

# a second machine, as far as the libraries can tell: every CPU-dependent code path told to take another
# kernel than this machine's (pre-AVX2 torch and oneDNN, MKL's AVX-512 path, numpy without AVX2 or AVX-512,
# OpenBLAS's oldest kernels). The package's pin (metadqn.determinism) must override all of it; with the pin
# off, the tiny pipeline's outputs differ from the first clone's (checked when this test was written).
OTHER_MACHINE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AVX512", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR", "OPENBLAS_CORETYPE": "Prescott"}


def _outs(project) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


@pytest.mark.slow
def test_two_clones_under_two_cpu_settings_reproduce_the_same_outputs_and_a_third_pulls_them(tiny_project,
                                                                                              tmp_path):
    a, b = tiny_project, make_project(tmp_path / "b")
    run = subprocess.run([str(BIN / "dvc"), "repro"], cwd=b, env={**stage_env(b), **OTHER_MACHINE},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    outs_a, outs_b = _outs(a), _outs(b)
    assert outs_a.keys() == outs_b.keys()
    differ = {k for k in outs_a if outs_a[k] != outs_b[k]} - NOT_COMPARED
    assert not differ, f"outputs differ between clones: {sorted(differ)}"
    for rel in METRICS:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel

    # share a's data through a local DVC remote; a fresh clone of a's commit pulls it and has nothing to rerun
    remote = tmp_path / "remote"
    assert dvc(a, "remote", "modify", "--local", "local", "url", str(remote)).returncode == 0
    push = dvc(a, "push")
    assert push.returncode == 0, push.stderr[-2000:]
    subprocess.run(["git", "add", "-A"], cwd=a, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], cwd=a, check=True)
    c = tmp_path / "c"
    subprocess.run(["git", "clone", "-q", str(a), str(c)], check=True)
    assert dvc(c, "remote", "modify", "--local", "local", "url", str(remote)).returncode == 0
    pull = dvc(c, "pull")
    assert pull.returncode == 0, pull.stderr[-2000:]
    status = dvc(c, "status")
    assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    again = dvc(c, "repro")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "Running stage" not in again.stdout, again.stdout[-2000:]
