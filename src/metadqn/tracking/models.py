"""MLflow pyfunc wrappers: a meta-model acts on a new task from a table of its transitions; an adapted
Q-network acts on observations.

Input: one DataFrame. Rows with ``role == "context"`` are the task's context transitions (obs_*, action,
reward, next_obs_*, terminated); rows with ``role == "obs"`` are the observations to act on (obs_*);
``hypernet-oracle`` also takes one ``role == "physics"`` row with the task's physics columns. Output: one
row per observation, ``action`` (greedy) and ``q_0..q_{A-1}``. Inside ``predict`` the meta-model generates
(or retrieves) the task's Q-network from the context. The model ships the ``metadqn`` package as code
and loads its weights with ``weights_only=True``. The pyfunc itself is logged as code
(:mod:`metadqn.tracking.pyfunc_meta`, :mod:`metadqn.tracking.pyfunc_qnet`), never pickled, so nothing in
the artifacts is unpickled at load. An input that lacks what the model needs is refused with an
``MlflowException`` (INVALID_PARAMETER_VALUE: HTTP 400 from ``mlflow models serve``) of one line naming it.

An adapted Q-network (``metadqn-<family>-qnet``) takes the ``obs_*`` columns only and returns the same
``action`` and ``q_*`` columns.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROLE = "role"
META_CODE = Path(__file__).with_name("pyfunc_meta.py")
QNET_CODE = Path(__file__).with_name("pyfunc_qnet.py")


class InputError(ValueError):
    """A pyfunc input that lacks rows or columns the model needs; the message is one line naming them."""


@contextlib.contextmanager
def as_mlflow_error() -> Iterator[None]:
    """Turns an :class:`InputError` into MLflow's INVALID_PARAMETER_VALUE (a 400 with the one line, no
    stack trace, from ``mlflow models serve``) instead of an unexpected error with a full trace."""
    try:
        yield
    except InputError as exc:
        from mlflow.exceptions import MlflowException

        raise MlflowException.invalid_parameter_value(str(exc)) from None


def _requirements() -> list[str]:
    out = []
    for dist in ("torch", "numpy", "pandas", "gymnasium", "pydantic", "pyyaml"):
        try:
            out.append(f"{dist}=={md.version(dist)}")
        except md.PackageNotFoundError:
            out.append(dist)
    return out


def example_input(family_name: str, context_size: int, n_obs: int = 4, seed: int = 0) -> pd.DataFrame:
    """A realistic input: a uniform-random context on the family's default task, and a few observations."""
    from metadqn.dqn.rollout import collect_transitions
    from metadqn.envs.families import get_family

    family = get_family(family_name)
    task = np.array([[family.defaults()[p] for p in family.param_names]])
    # autoreset steps are dropped from collected transitions, so ask for more than needed
    tr = collect_transitions(family, task, 2 * context_size + 8, 1, seed)[0]
    d = family.obs_dim
    ctx = pd.DataFrame({ROLE: "context", **{f"obs_{i}": tr["obs"][:, i] for i in range(d)},
                        "action": tr["action"].astype(float), "reward": tr["reward"].astype(float),
                        **{f"next_obs_{i}": tr["next_obs"][:, i] for i in range(d)},
                        "terminated": tr["terminated"].astype(float)}).head(context_size)
    obs = ctx.head(n_obs).copy()
    obs[ROLE] = "obs"
    for col in obs.columns:
        if col != ROLE and not col.startswith("obs_"):
            obs[col] = np.nan
    frame = pd.concat([ctx, obs], ignore_index=True)
    return frame.astype({c: "float64" for c in frame.columns if c != ROLE})



def _need_columns(frame: pd.DataFrame, cols: list[str], who: str) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise InputError(f"{who}: missing column(s) {', '.join(missing)} (needed: {_span(cols)})")


def _span(cols: list[str]) -> str:
    return ", ".join(cols)

def predict_actions(model, frame: pd.DataFrame) -> pd.DataFrame:
    """The pyfunc's predict, usable without MLflow: actions and Q-values for the ``obs`` rows."""
    import torch

    from metadqn.dqn.qnetwork import QNetwork
    from metadqn.meta.context import transition_features

    family = model.family
    d = family.obs_dim
    obs_cols = [f"obs_{i}" for i in range(d)]
    if ROLE not in frame.columns:
        raise InputError(f"input needs a {ROLE!r} column with 'context' and 'obs' rows")
    ctx_rows = frame[frame[ROLE] == "context"]
    obs_rows = frame[frame[ROLE] == "obs"]
    _need_columns(frame, obs_cols, "'obs' rows")
    if obs_rows.empty:
        raise InputError("input has no rows with role 'obs' to act on")
    context = physics = None
    if model.config.uses_context:
        ctx_cols = [*obs_cols, "action", "reward", *(f"next_obs_{i}" for i in range(d)), "terminated"]
        _need_columns(frame, ctx_cols, "'context' rows")
        need = model.config.context_size
        if len(ctx_rows) < need:
            raise InputError(f"{model.config.learner} needs {need} rows with role 'context' (the task's "
                             f"transitions: {_span(ctx_cols)}), got {len(ctx_rows)}")
        rows = ctx_rows.head(need)
        missing = [c for c in ctx_cols if rows[c].isna().any()]
        if missing:
            raise InputError(f"'context' rows have missing values in {', '.join(missing)}")
        rows = rows.astype({"action": "int64"})
        context = torch.as_tensor(transition_features(rows, family)).unsqueeze(0)
    if model.config.uses_physics:
        from metadqn.meta.context import oracle_features

        phys = frame[frame[ROLE] == "physics"]
        if phys.empty:
            raise InputError(f"{model.config.learner} needs a row with role 'physics' holding the task's "
                             f"parameters ({', '.join(family.param_names)})")
        _need_columns(frame, list(family.param_names), "the 'physics' row")
        physics = torch.as_tensor(oracle_features(phys.head(1), family))
    sd = model.initial_params(context=context, physics=physics, n_tasks=1)[0]
    net = QNetwork(family.obs_dim, family.n_actions, model.config.q_hidden)
    net.load_state_dict(sd)
    obs = torch.as_tensor(obs_rows[[f"obs_{i}" for i in range(family.obs_dim)]].to_numpy(np.float32))
    with torch.no_grad():
        q = net(obs).numpy()
    out = pd.DataFrame({"action": q.argmax(1).astype(np.int64)})
    for a in range(q.shape[1]):
        out[f"q_{a}"] = q[:, a].astype(np.float64)
    return out


def log_meta_model(folder: Path, family: str) -> Any:
    """Logs ``models/meta/<learner>/`` as an MLflow pyfunc from code (with signature and input example)."""
    import warnings

    import mlflow
    from mlflow.models import infer_signature

    import metadqn
    from metadqn.meta.model import MetaModel

    model = MetaModel.load(folder)
    example = example_input(family, model.config.context_size)
    if model.config.uses_physics:
        phys = pd.DataFrame([{ROLE: "physics", **model.family.defaults()}])
        example = pd.concat([example, phys], ignore_index=True)
    with warnings.catch_warnings():
        # MLflow hints about integer columns; the action column is never missing
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, predict_actions(model, example))
        return mlflow.pyfunc.log_model(
            name=model.config.learner, python_model=str(META_CODE), artifacts={"meta_model": str(folder)},
            signature=signature, input_example=example, pip_requirements=_requirements(),
            code_paths=[str(Path(metadqn.__file__).parent)],
        )


def q_actions(net, frame: pd.DataFrame) -> pd.DataFrame:
    """Greedy actions and Q-values of ``net`` for the ``obs_*`` columns of ``frame``."""
    import torch

    cols = [f"obs_{i}" for i in range(net.obs_dim)]
    _need_columns(frame, cols, "the input")
    if frame.empty:
        raise InputError(f"input has no rows (one row per observation: {_span(cols)})")
    with torch.no_grad():
        q = net(torch.as_tensor(frame[cols].to_numpy(np.float32))).numpy()
    out = pd.DataFrame({"action": q.argmax(1).astype(np.int64)})
    for a in range(q.shape[1]):
        out[f"q_{a}"] = q[:, a].astype(np.float64)
    return out


def log_qnetwork(weights: Path, family_name: str, hidden: list[int], name: str) -> Any:
    """Logs one adapted Q-network (a state_dict file) as an MLflow pyfunc with signature and example."""
    import json
    import tempfile
    import warnings

    import mlflow
    from mlflow.models import infer_signature

    import metadqn
    from metadqn.data.io import load_state_dict
    from metadqn.dqn.qnetwork import QNetwork
    from metadqn.envs.families import get_family

    family = get_family(family_name)
    net = QNetwork(family.obs_dim, family.n_actions, hidden)
    net.load_state_dict(load_state_dict(weights))
    example = example_input(family_name, 8, n_obs=4)
    example = example[example[ROLE] == "obs"][[f"obs_{i}" for i in range(family.obs_dim)]].reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        spec = Path(tmp) / "qnet.json"
        spec.write_text(json.dumps({"obs_dim": family.obs_dim, "n_actions": family.n_actions,
                                    "hidden": list(hidden), "family": family_name}))
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(QNET_CODE), artifacts={"weights": str(weights), "spec": str(spec)},
            signature=infer_signature(example, q_actions(net, example)), input_example=example,
            pip_requirements=_requirements(), code_paths=[str(Path(metadqn.__file__).parent)],
        )
