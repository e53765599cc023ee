from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from metadqn.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("collect: {n_train_tasks: 0}", "collect.n_train_tasks must be >= 2 (got 0)"),
        ("collect: {n_trian_tasks: 5}", "collect.n_trian_tasks is not a known key"),
        ("bogus: {}", "bogus is not a known key"),
        ("dqn: {gamma: 1.5}", "dqn.gamma must be <= 1.0 (got 1.5)"),
        ("dqn: {learning_rate: fast}", "dqn.learning_rate must be a number (got 'fast')"),
        ("dqn: {hidden_sizes: []}", "dqn.hidden_sizes must have at least 1 item(s)"),
        ("dqn: {device: tpu}", "dqn.device must be one of"),
        ("family: {name: pong}", "family.name must be one of cartpole, cartpole-mirrored"),
        ("family: {ranges: {lenght: {train: [[0.1, 0.2]]}}}", "family.ranges has unknown parameter 'lenght'"),
        ("collect: [1, 2", "not valid YAML"),
        ("dqn_presets: {pong: {gamma: 0.9}}", "dqn_presets has unknown family 'pong'"),
        ("dqn_presets: {acrobot: {gamma: 1.5}}", "dqn_presets.acrobot: gamma must be <= 1.0 (got 1.5)"),
        ("dqn_presets: {acrobot: {gama: 0.9}}", "dqn_presets.acrobot: gama is not a known key"),
        ("meta_train: {siamese: {rerank: 1}}", "meta_train.siamese rerank must be 0 (off) or at least 2"),
        ("meta_train: {siamese: {rerank: 3, k: 2}}", "meta_train.siamese k 2 averages the nearest experts"),
        ("meta_train: {select: {model_starts: 8}}", "meta_train.select.model_starts is not a known key"),
        ("meta_train: {model_score: {ridge: 0}}", "meta_train.model_score.ridge must be > 0.0 (got 0)"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_overlay_merges_key_by_key_and_is_named_in_errors(tmp_path):
    base = _write(tmp_path, "collect: {n_train_tasks: 10, n_val_tasks: 3}\n")
    over = tmp_path / "over.yaml"
    over.write_text("collect: {n_val_tasks: 4}\n")
    p = load_params(base, over)
    assert (p.collect.n_train_tasks, p.collect.n_val_tasks) == (10, 4)
    over.write_text("collect: {n_val_tasks: 0}\n")
    with pytest.raises(ParamsError, match=r"over\.yaml: collect\.n_val_tasks must be >= 1"):
        load_params(base, over)


def test_overlay_from_environment(tmp_path, monkeypatch):
    base = _write(tmp_path, "{}")
    over = tmp_path / "over.yaml"
    over.write_text("dqn: {total_steps: 1234}\n")
    monkeypatch.setenv("METADQN_PARAMS", str(over))
    assert load_params(base).dqn.total_steps == 1234


def test_shipped_params_are_valid_and_digest_is_stable():
    a = load_params(ROOT / "params.yaml")
    b = load_params(ROOT / "params.yaml")
    assert a.digest() == b.digest()
    assert a.family.name == "cartpole-mirrored"


def test_cli_refuses_bad_params_with_exit_2_and_touches_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text("collect: {n_train_tasks: 0}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "metadqn.cli", "collect", "--tasks", str(tmp_path / "data" / "tasks.parquet")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: params.yaml: collect.n_train_tasks must be >= 2 (got 0)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_stage_commands_refuse_missing_or_foreign_inputs_in_one_line(tmp_path):
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "params.yaml").write_text((root / "params.yaml").read_text())

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "metadqn.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)

    proc = run("meta-train")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: data/tasks.parquet: not found; run `dvc repro collect` (or `dvc pull`) first"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tasks.parquet").write_text("not parquet")
    proc = run("meta-test")
    assert proc.returncode == 2 and "data/tasks.parquet: not a readable task table" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("report")
    assert proc.returncode == 2 and "reports/metrics.json: not found" in proc.stderr


def test_the_family_picks_its_dqn_preset_and_dqn_keys_override_it(tmp_path):
    """#14: each family trains with its own DQN settings; a key under dqn wins for every family."""
    presets = "dqn_presets: {acrobot: {learning_rate: 0.00063, gamma: 0.99}, mountaincar: {gamma: 0.98}}\n"
    acrobot = load_params(_write(tmp_path, presets + "family: {name: acrobot}"))
    assert (acrobot.dqn.learning_rate, acrobot.dqn.gamma) == (0.00063, 0.99)
    car = load_params(_write(tmp_path, presets + "family: {name: mountaincar}"))
    assert car.dqn.gamma == 0.98 and car.dqn.learning_rate == 2.3e-3  # schema default where the preset is silent
    over = load_params(_write(tmp_path, presets + "family: {name: acrobot}\ndqn: {learning_rate: 0.01}"))
    assert (over.dqn.learning_rate, over.dqn.gamma) == (0.01, 0.99)
    cartpole = load_params(_write(tmp_path, presets + "family: {name: cartpole}"))  # no preset: the schema's
    assert cartpole.dqn.gamma == 0.99 and cartpole.dqn.learning_rate == 2.3e-3
    # the presets of other families are not part of a run's identity; the dqn section in effect is
    other = load_params(_write(tmp_path, presets.replace("0.98", "0.97") + "family: {name: acrobot}"))
    assert other.digest() == acrobot.digest() and "dqn_presets.mountaincar.gamma" not in other.flat()


def test_shipped_presets_differ_per_family():
    shipped = load_params(ROOT / "params.yaml")
    assert set(shipped.dqn_presets) == {"cartpole", "cartpole-mirrored", "acrobot", "mountaincar"}
    lrs = {name: shipped.dqn_presets[name]["learning_rate"] for name in shipped.dqn_presets}
    assert lrs["acrobot"] != lrs["cartpole"] != lrs["mountaincar"]
    assert shipped.dqn.learning_rate == lrs[shipped.family.name]
