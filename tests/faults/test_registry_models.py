"""The logged pyfuncs (#11): logged from code, never pickled, so a pickle dropped into the artifacts does not run
at load; an input without what the model needs is one INVALID_PARAMETER_VALUE line; and every run and
model a stage logs lands in its family's experiment, not MLflow's `Default`."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from metadqn.tracking.runs import experiment_name, stage_run


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the experiments' artifacts go to ./mlruns
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_experiment(experiment_id="0")  # what an earlier test left active must not leak into the next


class _Payload:
    """What an attacker would drop in as python_model.pkl: unpickling it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _local_model_dir(model_uri: str) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(model_uri))


def _no_pickle(folder: Path) -> None:
    pickles = [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    assert not pickles, pickles
    pyfunc = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in pyfunc and pyfunc["model_code_path"].endswith(".py")
    assert (folder / Path(pyfunc["model_code_path"]).name).exists()


def _qnet(tmp_path: Path, family: str) -> Path:
    import torch

    from metadqn.data.io import save_state_dict
    from metadqn.dqn.qnetwork import QNetwork
    from metadqn.envs.families import get_family

    fam = get_family(family)
    torch.manual_seed(0)
    weights = tmp_path / "qnet.pt"
    save_state_dict(weights, QNetwork(fam.obs_dim, fam.n_actions, [8]).state_dict())
    return weights


def test_qnet_is_logged_from_code_and_a_dropped_in_pickle_never_runs(store, tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    from metadqn.tracking.models import log_qnetwork

    family = "cartpole-mirrored"
    with stage_run("register-qnets", family, {}, "digest", True):
        info = log_qnetwork(_qnet(tmp_path, family), family, [8], "qnet-test")
    folder = _local_model_dir(info.model_uri)
    _no_pickle(folder)

    # tamper with the stored model: a pickle with a payload where a pickled pyfunc would live
    marker = tmp_path / "marker"
    for target in {folder, Path(info.artifact_path.removeprefix("file://"))}:
        with open(target / "python_model.pkl", "wb") as handle:
            pickle.dump(_Payload(marker), handle)
    for uri in (str(folder), info.model_uri):
        model = mlflow.pyfunc.load_model(uri)
        out = model.predict(pd.DataFrame({f"obs_{i}": [0.1, -0.2] for i in range(4)}))
        assert list(out.columns) == ["action", "q_0", "q_1"] and len(out) == 2
    assert not marker.exists(), "the dropped-in pickle ran at load"

    with pytest.raises(MlflowException) as info_err:  # no rows to act on
        model.predict(pd.DataFrame({f"obs_{i}": pd.Series([], dtype="float64") for i in range(4)}))
    assert info_err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "no rows" in info_err.value.message and "\n" not in info_err.value.message


def test_meta_train_runs_and_models_land_in_the_family_experiment_and_refuse_bad_input(tiny_run, store):
    import mlflow
    from mlflow.exceptions import MlflowException

    from metadqn.stages.meta_train import _track
    from metadqn.tracking.models import example_input

    params, _, out, _, _ = tiny_run
    family = params.family.name
    result = SimpleNamespace(name="hypernet", metrics={"val_zero_shot_normalized": 0.5},
                             curves=[("train/loss", 0, 1.0), ("train/loss", 1, 0.5)])
    # the meta_train stage's own tracking: a stage run, one nested run per learner, its model logged inside
    with stage_run("meta_train", family, params.flat(), params.digest(), True) as run:
        _track(run, [result], out, family)

    client = mlflow.MlflowClient()
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    runs = client.search_runs(list(experiments))
    models = client.search_logged_models(experiment_ids=list(experiments))
    assert len(runs) == 2 and len(models) == 1
    assert {experiments[r.info.experiment_id] for r in runs} == {experiment_name(family)}
    assert {experiments[m.experiment_id] for m in models} == {experiment_name(family)}

    model_uri = f"models:/{models[0].model_id}"
    _no_pickle(_local_model_dir(model_uri))
    model = mlflow.pyfunc.load_model(model_uri)
    frame = example_input(family, params.meta_train.context_size, n_obs=2)
    assert len(model.predict(frame)) == 2
    obs_only = frame[frame["role"] == "obs"]  # a request without its task's context rows
    for request in (obs_only, obs_only[["role", *(f"obs_{i}" for i in range(4))]]):
        with pytest.raises(MlflowException) as info:
            model.predict(request)
        message = info.value.message
        assert info.value.error_code == "INVALID_PARAMETER_VALUE"
        assert "\n" not in message and "Traceback" not in message
        assert "'context'" in message  # it says which rows are missing, and what a context row holds
        assert "next_obs_0" in message and "terminated" in message
    no_obs = frame[frame["role"] == "context"]
    with pytest.raises(MlflowException, match="no rows with role 'obs'"):
        model.predict(no_obs)


def test_stage_run_leaves_the_family_experiment_active(store):
    import mlflow

    # a nested run without an experiment id, as meta_train's learners start theirs
    with stage_run("collect", "cartpole-mirrored", {}, "digest", True), mlflow.start_run(nested=True) as child:
        pass
    exp = mlflow.MlflowClient().get_experiment(child.info.experiment_id)
    assert exp.name == experiment_name("cartpole-mirrored")
    assert os.environ["MLFLOW_TRACKING_URI"] == store
