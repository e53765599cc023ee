from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from metadqn.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    decide,
    metric_tags,
    model_name,
    promote,
    register_meta_models,
)
from tests.helpers import ROOT, free_port


def _tags(iqm: float | None, high: float | None = None, scratch_high: float | None = 0.2) -> dict[str, str]:
    tags = {}
    if iqm is not None:
        tags["metric.interp.zero_shot_iqm"] = str(iqm)
    if high is not None:
        tags["metric.interp.zero_shot_ci_high"] = str(high)
    if scratch_high is not None:
        tags["baseline.interp.zero_shot_ci_high"] = str(scratch_high)
    return tags


def test_promotion_rule():
    assert decide(_tags(0.5), None, "interp.zero_shot", "above_ci_high").promote  # first valid challenger
    assert not decide(_tags(None), None, "interp.zero_shot", "above_ci_high").promote  # missing metric
    assert not decide({"metric.interp.zero_shot_iqm": "nan"}, None, "interp.zero_shot", "above_ci_high").promote
    assert decide(_tags(0.9), _tags(0.8, 0.85), "interp.zero_shot", "above_ci_high").promote
    assert not decide(_tags(0.84), _tags(0.8, 0.85), "interp.zero_shot", "above_ci_high").promote
    assert decide(_tags(0.84), _tags(0.8, 0.85), "interp.zero_shot", "above_iqm").promote


def test_promotion_gate_against_the_baseline():
    # not above scratch's upper CI bound: refused, with or without a champion, whatever the champion's figure
    v = decide(_tags(0.5, scratch_high=0.6), None, "interp.zero_shot", "above_ci_high")
    assert not v.promote and "not above the baseline" in v.reason and "scratch" in v.reason and v.bar == 0.6
    assert not decide(_tags(0.6, scratch_high=0.6), None, "interp.zero_shot", "above_ci_high").promote  # ties lose
    assert not decide(_tags(0.5, scratch_high=0.6), _tags(0.1, 0.2), "interp.zero_shot", "above_iqm").promote
    # no baseline figure in the tags (e.g. meta-test ran without scratch): refused, never promoted blind
    v = decide(_tags(0.9, scratch_high=None), None, "interp.zero_shot", "above_ci_high")
    assert not v.promote and "baseline" in v.reason
    assert not decide({**_tags(0.9), "baseline.interp.zero_shot_ci_high": "nan"}, None, "interp.zero_shot",
                      "above_ci_high").promote
    # registry.floor replaces scratch as the bar
    assert decide(_tags(0.5, scratch_high=0.6), None, "interp.zero_shot", "above_ci_high", floor=0.4).promote
    v = decide(_tags(0.5, scratch_high=0.1), None, "interp.zero_shot", "above_ci_high", floor=0.7)
    assert not v.promote and "floor" in v.reason and v.bar == 0.7
    assert decide(_tags(0.9, scratch_high=None), None, "interp.zero_shot", "above_ci_high", floor=0.7).promote
    # the gate reads the rule's metric, not always zero_shot
    tags = {"metric.extrap.auc_iqm": "0.5", "baseline.extrap.auc_ci_high": "0.55", **_tags(0.9)}
    assert not decide(tags, None, "extrap.auc", "above_ci_high").promote


def test_metric_tags_carry_the_baseline():
    metrics = {"interp": {"hypernet": {"zero_shot_iqm": 0.9, "regret_iqm": 0.1},
                          "scratch": {"zero_shot_iqm": 0.1, "zero_shot_ci_high": 0.2, "auc_ci_high": None,
                                      "steps_to_threshold_iqm": 10.0}}}
    tags = metric_tags(metrics, "hypernet")
    assert tags["metric.interp.zero_shot_iqm"] == "0.9"
    assert tags["baseline.interp.zero_shot_ci_high"] == "0.2" and tags["baseline.interp.zero_shot_iqm"] == "0.1"
    assert tags["baseline.interp.auc_ci_high"] == "nan"
    assert not any("steps_to_threshold" in k for k in tags if k.startswith("baseline."))


@pytest.mark.parametrize("overlay, fragment", [
    ("registry: {metric: interp.steps_to_threshold}", "registry.metric must be one of 'interp.zero_shot'"),
    ("registry: {metric: interp.regret}", "'extrap.final'"),
    ("registry: {metric: zero_shot}", "registry.metric"),
    ("registry: {qnet_method: hypernett}", "registry.qnet_method must be one of hypernet"),
    ("registry: {floor: .inf}", "registry.floor must be a finite number"),
])
def test_registry_params_are_validated_at_load(tmp_path, overlay, fragment):
    from metadqn.config import ParamsError, load_params

    (tmp_path / "over.yaml").write_text(overlay + "\n")
    with pytest.raises(ParamsError) as info:
        load_params(ROOT / "params.yaml", tmp_path / "over.yaml")
    message = str(info.value)
    assert fragment in message and "\n" not in message
    (tmp_path / "ok.yaml").write_text("registry: {metric: extrap.auc, qnet_method: scratch, floor: 0.5}\n")
    assert load_params(ROOT / "params.yaml", tmp_path / "ok.yaml").registry.floor == 0.5


def _fake_version(client, name: str, tags: dict[str, str], alias: str | None = CHALLENGER) -> str:
    """A registered version without a logged model (promotion reads aliases and tags only)."""
    import mlflow

    with contextlib.suppress(mlflow.exceptions.MlflowException):  # already registered
        client.create_registered_model(name)
    version = client.create_model_version(name, source=str(Path(tempfile.gettempdir()) / "metadqn-no-model"), tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def test_promote_refuses_a_challenger_not_above_scratch(tiny_params, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    weak, strong = "metadqn-test-weak", "metadqn-test-strong"
    # weak: its IQM 0.45 is inside scratch's CI [.., 0.5] of the same run; strong: 0.8 is above it
    _fake_version(client, weak, {**_tags(0.45, 0.5, scratch_high=0.5), "baseline.interp.zero_shot_iqm": "0.4"})
    _fake_version(client, strong, _tags(0.8, 0.85, scratch_high=0.5))
    refused = promote(tiny_params, weak)[0]
    assert not refused.promoted and "not above the baseline" in refused.reason and refused.bar == 0.5
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(weak, CHAMPION)
    tags = client.get_model_version(weak, "1").tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.baseline"] == "scratch"
    assert float(tags["promotion.baseline_value"]) == 0.5
    promoted = promote(tiny_params, strong)[0]
    assert promoted.promoted and "scratch's upper CI bound 0.500" in promoted.reason
    assert str(client.get_model_version_by_alias(strong, CHAMPION).version) == "1"
    # with a floor above the challenger's figure, even the strong one would not have been promoted
    v2 = _fake_version(client, strong, _tags(0.9, 0.95, scratch_high=0.5))
    floored = tiny_params.model_copy(update={"registry": tiny_params.registry.model_copy(update={"floor": 0.95})})
    decision = promote(floored, strong)[0]
    assert not decision.promoted and "floor" in decision.reason
    assert client.get_model_version(strong, v2).tags["promotion.baseline"] == "floor"
    # the dry run shows the figures of a challenger that is already champion (it printed nan before)
    again = promote(tiny_params, strong, dry_run=True)[0]
    assert again.champion == "1" and again.challenger == v2
    _fake_version(client, strong, _tags(0.8, 0.85, scratch_high=0.5), alias=None)
    client.set_registered_model_alias(strong, CHALLENGER, "1")
    same = promote(tiny_params, strong, dry_run=True)[0]
    assert same.reason == "challenger is already champion"
    assert (same.challenger_value, same.champion_value, same.champion_bound, same.bar) == (0.8, 0.8, 0.85, 0.5)


def _metrics(path, value: float) -> None:
    entry = {"zero_shot_iqm": value, "zero_shot_ci_low": value - 0.05, "zero_shot_ci_high": value + 0.05}
    scratch = {"zero_shot_iqm": 0.1, "zero_shot_ci_low": 0.05, "zero_shot_ci_high": 0.15}
    path.write_text(json.dumps({"interp": {**{m: entry for m in ("hypernet", "siamese", "reptile", "multitask",
                                                                  "hypernet-oracle")}, "scratch": scratch}}))


@pytest.mark.slow
def test_register_promote_load_champion_and_refuse_a_worse_challenger(tiny_run, tmp_path, monkeypatch):
    import mlflow

    params, _, out, _, _ = tiny_run
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = model_name(params.family.name, "hypernet")
    provenance = {"git_commit": "abc", "dvc_data_hash": "d.dir", "prefect_flow_run_id": "f"}

    _metrics(tmp_path / "metrics.json", 0.7)
    first = register_meta_models(params, provenance, out.models, tmp_path / "metrics.json")
    assert {r.name for r in first if r.version} >= {name}
    again = register_meta_models(params, provenance, out.models, tmp_path / "metrics.json")
    assert all(r.version is None for r in again)  # unchanged models are not registered twice
    decisions = {d.name: d for d in promote(params)}
    assert decisions[name].promoted and decisions[name].reason.startswith("no champion yet")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(name, CHAMPION)
    for key in ("git_commit", "dvc_data_hash", "params_digest", "prefect_flow_run_id", "mlflow_run_id"):
        assert champion.tags[key]
    assert champion.tags["promotion.decision"] == "promoted"

    # a fresh process loads @champion and acts on a real gymnasium CartPole task
    code = f"""
import gymnasium as gym, mlflow, numpy as np, pandas as pd
from metadqn.tracking.models import example_input
mlflow.set_tracking_uri('sqlite:///{tmp_path / 'mlflow.db'}')
model = mlflow.pyfunc.load_model('models:/{name}@champion')
frame = example_input('{params.family.name}', {params.meta_train.context_size}, n_obs=1)
ctx = frame[frame.role == 'context']
env = gym.make('CartPole-v1'); obs, _ = env.reset(seed=0); total = 0.0
for _ in range(50):
    row = pd.DataFrame([{{'role': 'obs', **{{f'obs_{{i}}': float(obs[i]) for i in range(4)}}}}])
    action = int(model.predict(pd.concat([ctx, row], ignore_index=True))['action'].iloc[0])
    obs, r, term, trunc, _ = env.step(action); total += r
    if term or trunc: break
print('return', total)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "return" in proc.stdout

    # select's pyfunc carries its candidates' models: a fresh process loads it and acts as the stage's model does
    from metadqn.meta.model import MetaModel
    from metadqn.tracking.models import example_input, predict_actions

    select = model_name(params.family.name, "select")
    assert select in {r.name for r in first if r.version}
    frame = example_input(params.family.name, params.meta_train.context_size, n_obs=5)
    frame.to_parquet(tmp_path / "frame.parquet")
    code = (f"import mlflow, pandas as pd; mlflow.set_tracking_uri('sqlite:///{tmp_path / 'mlflow.db'}'); "
            f"m = mlflow.pyfunc.load_model('models:/{select}/1'); "
            f"print(list(m.predict(pd.read_parquet('{tmp_path / 'frame.parquet'}'))['action']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = list(predict_actions(MetaModel.load(out.models / "select"), frame)["action"])
    assert proc.stdout.strip().splitlines()[-1] == str(want)

    # `mlflow models serve` answers a real HTTP request for the champion on loopback
    _serve_and_query(tmp_path, name, params)

    # a changed, worse challenger is registered but not promoted
    worse = tmp_path / "meta2"
    shutil.copytree(out.models, worse)
    sd = torch.load(worse / "hypernet" / "model.pt", weights_only=True)
    sd["head.bias"] = sd["head.bias"] + 0.01
    torch.save(sd, worse / "hypernet" / "model.pt")
    _metrics(tmp_path / "metrics.json", 0.6)
    second = {r.name: r for r in register_meta_models(params, provenance, worse, tmp_path / "metrics.json")}
    assert second[name].version == "2"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    decisions = {d.name: d for d in promote(params)}
    assert not decisions[name].promoted
    assert client.get_model_version_by_alias(name, CHAMPION).version == champion.version
    assert client.get_model_version(name, "2").tags["promotion.decision"] == "rejected"


def _serve_and_query(tmp_path, name: str, params) -> None:
    import os
    import time
    import urllib.request
    from pathlib import Path

    from metadqn.tracking.models import example_input

    port = free_port()
    # the server execs uvicorn from PATH: put the venv's bin first, as `source .venv/bin/activate` would
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen([mlflow_bin, "models", "serve", "-m", f"models:/{name}@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not come up in 180 s"
            time.sleep(1)
        frame = example_input(params.family.name, params.meta_train.context_size, n_obs=3)
        body = json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        rows = answer["predictions"]
        assert len(rows) == 3 and all(row["action"] in (0, 1) for row in rows)
    finally:
        server.terminate()
        server.wait(timeout=30)
