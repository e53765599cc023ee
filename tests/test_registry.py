from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from metadqn.tracking.registry import CHALLENGER, CHAMPION, decide, model_name, promote, register_meta_models
from tests.helpers import free_port


def _tags(iqm: float | None, high: float | None = None) -> dict[str, str]:
    tags = {}
    if iqm is not None:
        tags["metric.interp.zero_shot_iqm"] = str(iqm)
    if high is not None:
        tags["metric.interp.zero_shot_ci_high"] = str(high)
    return tags


def test_promotion_rule():
    assert decide(_tags(0.5), None, "interp.zero_shot", "above_ci_high")[0]  # first valid challenger
    assert not decide(_tags(None), None, "interp.zero_shot", "above_ci_high")[0]  # missing metric
    assert not decide({"metric.interp.zero_shot_iqm": "nan"}, None, "interp.zero_shot", "above_ci_high")[0]
    assert decide(_tags(0.9), _tags(0.8, 0.85), "interp.zero_shot", "above_ci_high")[0]
    assert not decide(_tags(0.84), _tags(0.8, 0.85), "interp.zero_shot", "above_ci_high")[0]
    assert decide(_tags(0.84), _tags(0.8, 0.85), "interp.zero_shot", "above_iqm")[0]


def _metrics(path, value: float) -> None:
    entry = {"zero_shot_iqm": value, "zero_shot_ci_low": value - 0.05, "zero_shot_ci_high": value + 0.05}
    path.write_text(json.dumps({"interp": {m: entry for m in ("hypernet", "siamese", "reptile", "multitask",
                                                               "hypernet-oracle")}}))


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
    assert decisions[name].promoted and decisions[name].reason == "no champion yet"
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
