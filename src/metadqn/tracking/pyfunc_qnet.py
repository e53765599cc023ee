"""The adapted Q-network pyfunc, logged *as code* like :mod:`metadqn.tracking.pyfunc_meta` (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class QNetPyfunc(PythonModel):
    def load_context(self, context: Any) -> None:
        from metadqn.data.io import load_state_dict
        from metadqn.dqn.qnetwork import QNetwork

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.net = QNetwork(spec["obs_dim"], spec["n_actions"], spec["hidden"])
        self.net.load_state_dict(load_state_dict(context.artifacts["weights"]))
        self.net.eval()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from metadqn.tracking.models import as_mlflow_error, q_actions

        with as_mlflow_error():
            return q_actions(self.net, model_input)


set_model(QNetPyfunc())
