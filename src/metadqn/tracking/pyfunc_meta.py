"""The meta-model pyfunc, logged *as code* (MLflow's models-from-code): MLflow stores this file with the
model and runs it at load, instead of unpickling a python object (a pickle in the artifacts could run
anything at load; a dropped-in ``python_model.pkl`` is ignored). It imports ``metadqn`` from the model's
``code/`` folder, which MLflow puts on the path first. See :mod:`metadqn.tracking.models`."""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class MetaModelPyfunc(PythonModel):
    def load_context(self, context: Any) -> None:
        from metadqn.meta.model import MetaModel

        self.model = MetaModel.load(context.artifacts["meta_model"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from metadqn.tracking.models import as_mlflow_error, predict_actions

        with as_mlflow_error():
            return predict_actions(self.model, model_input)


set_model(MetaModelPyfunc())
