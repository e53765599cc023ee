"""Params fuzz (#11): hundreds of malformed params files, each must end in one line (exit 2) naming the file
and the key, never a traceback and never an accepted value that would fail or misbehave in a stage.

The files are generated from the shipped params.yaml: every leaf gets values of its own kind that no stage
can use (negative counts, NaN and inf, wrong types, unknown choices), plus structural damage (duplicate
sections, unknown keys, binary and UTF-16 files, a directory, deep nesting, broken YAML) and the cross-section
mistakes reported in #11 (nothing trains, a replay larger than the machine, a bad Dask address...).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from metadqn.cli import app
from metadqn.config import Params, load_params

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "params.yaml"


def _leaves(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "candidates":
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _bad_values(path: tuple[str, ...], value: Any) -> list[Any]:
    """Values of the leaf's own kind that must be refused."""
    if isinstance(value, bool):
        return ["maybe", 2]
    if isinstance(value, int):
        huge = 2**64 if path[-1].endswith("seed") else 10**12
        return [-1, 1.5, "many", huge]
    if isinstance(value, float):
        return [float("nan"), float("inf"), "fast"]
    if isinstance(value, str):
        return [[1, 2], {"a": 1}]
    if isinstance(value, list):
        return [{"not": "a list"}, [None]]
    if isinstance(value, dict):  # family.ranges, meta_test.search.candidates
        return [["a", "list"], {"no_such_key": {"train": [[1.0, 2.0]]}}]
    if value is None:  # optional fields: learning_rate_end, early_stop_return, runner.address
        return [[1.0], "not a number" if path[-1] != "address" else "not an address"]
    raise AssertionError(f"no bad values for {path}={value!r}")


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def _leaf_cases() -> list[tuple[str, str, str]]:
    """(case id, overlay text, the key the error must name)."""
    defaults = Params().model_dump(mode="json")
    cases = []
    for path, value in _leaves(defaults):
        for i, bad in enumerate(_bad_values(path, value)):
            text = yaml.safe_dump(_nest(path, bad), allow_unicode=True)
            cases.append((f"{'.'.join(path)}#{i}", text, path[-1]))
    return cases


CROSS = [  # (id, overlay, key the error names): the #11 reports and other cross-section mistakes
    ("learning_starts-beyond-total", "dqn: {learning_starts: 70000}", "learning_starts"),
    ("hidden-zero", "dqn: {hidden_sizes: [0]}", "hidden_sizes"),
    ("hidden-negative", "dqn: {hidden_sizes: [64, -3]}", "hidden_sizes"),
    ("lr-inf", "dqn: {learning_rate: .inf}", "learning_rate"),
    ("buffer-1e10", "dqn: {buffer_size: 10000000000}", "buffer_size"),
    ("buffer-beyond-memory", "dqn: {buffer_size: 90000000}\ncollect: {group_size: 64}", "buffer_size"),
    ("negative-task-seed", "collect: {task_seed: -5}", "task_seed"),
    ("nan-range", "family: {ranges: {length: {train: [[.nan, 1.0]]}}}", "length"),
    ("inverted-range", "family: {ranges: {length: {train: [[2.0, 1.0]]}}}", "length"),
    ("negative-range", "family: {ranges: {masspole: {train: [[-0.1, 0.5]]}}}", "masspole"),
    ("empty-range", "family: {ranges: {length: {train: []}}}", "length"),
    ("discrete-range", "family: {ranges: {force_sign: {train: [[1.0, 1.0]]}}}", "force_sign"),
    ("unknown-range-param", "family: {ranges: {wind: {train: [[1.0, 2.0]]}}}", "wind"),
    ("candidate-lr", "meta_test: {search: {candidates: {x: {dqn: {learning_rate: -1}}}}}", "learning_rate"),
    ("candidate-unknown", "meta_test: {search: {candidates: {x: {dqn: {speed: 2}}}}}", "speed"),
    ("candidate-fixed", "meta_test: {search: {candidates: {x: {dqn: {total_steps: 5}}}}}", "total_steps"),
    ("candidate-nothing-tunes", "meta_test: {search: {candidates: {x: {dqn: {learning_starts: 25000}}}}}",
     "learning_starts"),
    ("candidate-protected-half", "meta_test: {search: {candidates: {x: {protected_steps: 64}}}}", "protected"),
    ("candidate-anchor-floor", "meta_test: {search: {candidates: {x: {anchor: kl, anchor_weight: 0.1, "
     "anchor_floor: 0.5, anchor_decay_steps: 100}}}}", "anchor_floor"),
    ("budget-below-context", "meta_test: {budget_steps: 64}", "budget_steps"),
    ("reptile-never-learns", "meta_train: {reptile: {inner_env_steps: 500}}", "inner_env_steps"),
    ("multitask-never-learns", "meta_train: {multitask: {total_steps: 999}}", "total_steps"),
    ("unknown-learner", "meta_train: {learners: [hypernet, maml]}", "maml"),
    ("unknown-method", "meta_test: {methods: [scratch, oracle2]}", "oracle2"),
    ("no-learners", "meta_train: {learners: []}", "learners"),
    ("unknown-family", "family: {name: pendulum}", "name"),
    ("dask-no-address", "runner: {kind: dask}", "address"),
    ("dask-bad-address", "runner: {kind: dask, address: 'localhost'}", "address"),
    ("dask-bad-scheme", "runner: {kind: dask, address: 'http://h:8786'}", "address"),
    ("timezone-mars", "schedule: {timezone: Mars/Olympus}", "timezone"),
    ("cron-61", "schedule: {cron: '61 3 * * *'}", "cron"),
    ("cron-words", "schedule: {cron: 'every night'}", "cron"),
    ("branch-space", "schedule: {branch: 'my branch'}", "branch"),
    ("branch-dash", "schedule: {branch: '-x'}", "branch"),
    ("empty-deployment", "schedule: {deployment: ''}", "deployment"),
    ("workers-zero", "runner: {workers: 0}", "workers"),
    ("unknown-top-section", "optimizer: {lr: 1}", "optimizer"),
    ("unknown-key", "dqn: {learning_rate: 0.001, learnig_rate: 0.01}", "learnig_rate"),
    ("section-list", "dqn: [1, 2]", "dqn"),
    ("section-scalar", "collect: 5", "collect"),
    ("duplicate-section", "dqn: {total_steps: 2000}\ndqn: {total_steps: 3000}\n", "dqn"),
    ("duplicate-key", "dqn:\n  total_steps: 2000\n  total_steps: 3000\n", "total_steps"),
    ("top-level-list", "- dqn\n- collect\n", "mapping"),
    ("top-level-scalar", "just words\n", "mapping"),
    ("broken-flow", "dqn: {total_steps: 2000\n", "YAML"),
    ("tab-indent", "dqn:\n\ttotal_steps: 2000\n", "YAML"),
    ("bad-anchor", "dqn: *nowhere\n", "YAML"),
    ("python-tag", "dqn: !!python/object/apply:os.system ['true']\n", "YAML"),
    ("unhashable-key", "? [a, b]\n: 1\n", "YAML"),
    ("deep", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("anchor-bomb", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n", "a"),
]


def _check(runner: CliRunner, overlay: Path, key: str) -> None:
    result = runner.invoke(app, ["check-params", "--base-params", str(BASE), "--params", str(overlay)])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), (
        f"{overlay.name}: traceback: {result.exception!r}")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, f"{overlay.name} accepted (exit {result.exit_code}): {result.output}"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(lines) == len(errors) + sum(ln.startswith("warning: ") for ln in lines), lines
    assert str(overlay) in errors[0] or str(BASE) in errors[0], errors[0]
    assert key in errors[0], f"{overlay.name}: {errors[0]!r} does not name {key!r}"


def test_params_fuzz_every_malformed_file_ends_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = _leaf_cases() + CROSS
    for i, (case_id, text, key) in enumerate(cases):
        overlay = tmp_path / f"case{i:04d}.yaml"
        overlay.write_text(text)
        try:
            _check(runner, overlay, key)
        except AssertionError as exc:
            raise AssertionError(f"case {case_id}: {exc}") from None
    assert len(cases) >= 100, len(cases)


@pytest.mark.parametrize("kind", ["directory", "binary", "utf16", "huge", "missing", "unreadable"])
def test_files_that_are_not_params_end_in_one_line_through_the_real_entry_point(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "params.over.yaml"
    if kind == "directory":
        target.mkdir()
    elif kind == "binary":
        target.write_bytes(bytes(range(256)) * 4)
    elif kind == "utf16":
        target.write_text("dqn: {total_steps: 2000}\n", encoding="utf-16")
    elif kind == "huge":
        target.write_text("# padding\n" * 200_000)
    elif kind == "unreadable":
        target.write_text("dqn: {}\n")
        target.chmod(0)
    proc = subprocess.run([sys.executable, "-m", "metadqn.cli", "check-params", "--base-params", str(BASE),
                           "--params", str(target)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if kind == "unreadable" and proc.returncode == 0:
        pytest.skip("running as root: chmod 0 does not stop reading")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr


def test_an_overlay_is_refused_inside_a_dvc_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC records params.yaml's values in dvc.lock; an overlay inside `dvc repro` would change results
    behind its back (#11)."""
    from metadqn.config import ParamsError

    overlay = tmp_path / "over.yaml"
    overlay.write_text("dqn: {total_steps: 2000}\n")
    assert load_params(BASE, overlay).dqn.total_steps == 2000
    monkeypatch.setenv("DVC_STAGE", "meta_test")
    with pytest.raises(ParamsError, match="refused inside the DVC stage meta_test"):
        load_params(BASE, overlay)
    monkeypatch.setenv("METADQN_PARAMS", str(overlay))
    with pytest.raises(ParamsError, match="refused inside the DVC stage"):
        load_params(BASE)
    monkeypatch.delenv("METADQN_PARAMS")
    assert load_params(BASE).dqn.total_steps == load_params(BASE).dqn.total_steps  # params.yaml alone is fine


def test_legal_but_useless_settings_warn_and_still_load(tmp_path: Path) -> None:
    overlay = tmp_path / "over.yaml"
    overlay.write_text("dqn: {epsilon_start: 0.1, epsilon_end: 0.5}\nmeta_train: {learners: [siamese]}\n")
    result = CliRunner().invoke(app, ["check-params", "--base-params", str(BASE), "--params", str(overlay)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any("epsilon_end" in w for w in warnings) and any("hypernet" in w for w in warnings), warnings
