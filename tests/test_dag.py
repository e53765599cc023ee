"""dvc.yaml is the one DAG: stage order, a stage's code and the recorded hashes are all read from it."""

from __future__ import annotations

import yaml

from metadqn import dag
from tests.conftest import ROOT


def test_every_dependency_dvc_yaml_names_exists():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = [(name, d) for name, st in spec.items() for d in st.get("deps", [])
               if not (ROOT / d).exists() and not d.startswith(("data/", "models/", "reports/"))]
    assert not missing


def test_collect_code_is_its_dvc_yaml_code_deps():
    files = {f.relative_to(ROOT).as_posix() for f in dag.code_files("collect", ROOT / "dvc.yaml")}
    assert {"flows/collect.py", "src/metadqn/stages/collect.py", "src/metadqn/dqn/trainer.py"} <= files
    assert not any(f.startswith("src/metadqn/meta/") for f in files)  # collect does not run the meta-learners
    assert dag.stages(ROOT / "dvc.yaml")[0] == "collect"


def test_only_the_report_reads_the_diagnosis():
    """The diagnose stage reads the test splits; a stage that chose anything from its output would leak
    them into selection."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    readers = {name for name, st in spec.items() for d in st.get("deps", []) if d.startswith("reports/diagnosis")}
    assert readers == {"report"}
    assert list(spec).index("diagnose") < list(spec).index("report")


def test_code_digest_follows_the_files_dvc_yaml_lists(tmp_path):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "flows").mkdir()
    (tmp_path / "src" / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "flows" / "f.py").write_text("F = 1\n")
    (tmp_path / "src" / "other.py").write_text("O = 1\n")
    spec = tmp_path / "dvc.yaml"
    spec.write_text(yaml.safe_dump({"stages": {"s": {"cmd": "x", "deps": ["data/in.csv", "src/pkg", "flows/f.py"]}}}))
    before = dag.code_digest("s", spec)
    (tmp_path / "src" / "other.py").write_text("O = 2\n")  # not a dependency: same digest
    assert dag.code_digest("s", spec) == before
    (tmp_path / "flows" / "f.py").write_text("F = 2\n")
    assert dag.code_digest("s", spec) != before


def test_recorded_md5_reads_the_lock(tmp_path):
    lock = tmp_path / "dvc.lock"
    assert dag.recorded_md5(ROOT / "x", lock) is None  # no lock yet
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "collect": {"cmd": "c", "outs": [{"path": "data/trajectories", "md5": "abc.dir"}]},
        "report": {"cmd": "r", "outs": [{"path": "reports/report.md", "md5": "def"}]}}}))
    from pathlib import Path

    assert dag.recorded_md5(Path("data/trajectories"), lock) == "abc.dir"
    assert dag.lock_outs(lock)["report"] == {"reports/report.md": "def"}
