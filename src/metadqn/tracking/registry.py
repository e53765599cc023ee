"""The MLflow model registry: registering a pipeline run's models and promoting by alias.

Names: ``metadqn-<family>-<learner>`` for the meta-models (hypernet, hypernet-oracle, siamese, reptile,
multitask) and ``metadqn-<family>-qnet`` for adapted Q-networks (one version per test task). Aliases only
(``challenger``, ``champion``; MLflow's deprecated stages are never used).

Every version carries tags that trace it to its data and code: ``git_commit``, ``dvc_data_hash``,
``params_digest``, ``prefect_flow_run_id``, ``mlflow_run_id``, ``content_hash`` (the DVC hash of the model
folder, which makes registration idempotent: an unchanged model is not registered again), and the
held-out meta-test metrics of the run that produced it (``metric.<split>.<name>``), which promotion reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metadqn import paths
from metadqn.config import Params
from metadqn.data.io import dvc_md5
from metadqn.learners import LEARNERS

CHALLENGER, CHAMPION = "challenger", "champion"


def model_name(family: str, learner: str) -> str:
    return f"metadqn-{family}-{learner}"


def metric_tags(metrics: dict[str, Any], method: str) -> dict[str, str]:
    tags = {}
    for split in ("interp", "extrap"):
        for key, value in metrics.get(split, {}).get(method, {}).items():
            tags[f"metric.{split}.{key}"] = "nan" if value is None else str(value)
    return tags


def _tag_float(tags: dict[str, str], key: str) -> float:
    try:
        value = float(tags[key])
    except (KeyError, ValueError):
        return math.nan
    return value


def _latest_version(client: Any, name: str) -> Any | None:
    versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"], max_results=1)
    return versions[0] if versions else None


@dataclass
class Registered:
    name: str
    version: str | None
    """None when the model was unchanged and nothing was registered."""


def register_meta_models(params: Params, provenance: dict[str, str], models: Path = paths.META_MODELS,
                         metrics_path: Path = paths.METRICS) -> list[Registered]:
    """Logs and registers every meta-model whose content changed; new versions get the challenger alias."""
    import mlflow

    from metadqn.tracking.models import log_meta_model
    from metadqn.tracking.runs import stage_run

    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    family = params.family.name
    client = mlflow.MlflowClient()
    out: list[Registered] = []
    todo = []
    for learner in LEARNERS:
        folder = models / learner
        if not (folder / "model.pt").exists():
            continue
        name = model_name(family, learner)
        content = dvc_md5(folder)
        try:
            latest = _latest_version(client, name)
        except mlflow.exceptions.MlflowException:
            latest = None
        if latest is not None and latest.tags.get("content_hash") == content:
            out.append(Registered(name, None))
            continue
        todo.append((learner, folder, name, content))
    if not todo:
        return out
    with stage_run("register", family, {}, params.digest(), True, provenance) as run:
        for learner, folder, name, content in todo:
            info = log_meta_model(folder, family)
            tags = {**provenance, "params_digest": params.digest(), "mlflow_run_id": run.info.run_id,
                    "content_hash": content, "learner": learner, **metric_tags(metrics, learner)}
            version = mlflow.register_model(info.model_uri, name, tags=tags)
            client.set_registered_model_alias(name, CHALLENGER, version.version)
            out.append(Registered(name, str(version.version)))
    return out


@dataclass
class Decision:
    name: str
    challenger: str | None
    champion: str | None
    challenger_value: float
    champion_value: float
    champion_bound: float
    promoted: bool
    reason: str


def decide(challenger_tags: dict[str, str], champion_tags: dict[str, str] | None, metric: str,
           rule: str) -> tuple[bool, float, float, float, str]:
    """(promote?, challenger IQM, champion IQM, champion bound, reason) — the promotion rule, pure."""
    split, base = metric.split(".", 1)
    c = _tag_float(challenger_tags, f"metric.{split}.{base}_iqm")
    if not math.isfinite(c):
        return False, c, math.nan, math.nan, f"challenger has no finite {metric}_iqm"
    if champion_tags is None:
        return True, c, math.nan, math.nan, "no champion yet"
    champ = _tag_float(champion_tags, f"metric.{split}.{base}_iqm")
    bound = _tag_float(champion_tags, f"metric.{split}.{base}_ci_high") if rule == "above_ci_high" else champ
    if not math.isfinite(bound):
        return True, c, champ, bound, "champion has no finite metric"
    what = "upper CI bound" if rule == "above_ci_high" else "IQM"
    if c > bound:
        return True, c, champ, bound, f"{c:.3f} > champion's {what} {bound:.3f}"
    return False, c, champ, bound, f"{c:.3f} <= champion's {what} {bound:.3f}"


def promote(params: Params, name: str | None = None, dry_run: bool = False) -> list[Decision]:
    """Moves ``champion`` to each model's challenger where the rule holds; records the decision as tags."""
    import mlflow

    client = mlflow.MlflowClient()
    names = [name] if name else [model_name(params.family.name, m) for m in LEARNERS]
    decisions = []
    for n in names:
        try:
            challenger = client.get_model_version_by_alias(n, CHALLENGER)
        except mlflow.exceptions.MlflowException:
            continue
        try:
            champion = client.get_model_version_by_alias(n, CHAMPION)
        except mlflow.exceptions.MlflowException:
            champion = None
        if champion is not None and champion.version == challenger.version:
            decisions.append(Decision(n, challenger.version, champion.version, math.nan, math.nan, math.nan, False,
                                      "challenger is already champion"))
            continue
        ok, c, champ, bound, reason = decide(challenger.tags, champion.tags if champion else None,
                                             params.registry.metric, params.registry.rule)
        decisions.append(Decision(n, challenger.version, champion.version if champion else None, c, champ, bound,
                                  ok, reason))
        if dry_run:
            continue
        for key, value in {"promotion.decision": "promoted" if ok else "rejected", "promotion.reason": reason,
                           "promotion.metric": params.registry.metric, "promotion.rule": params.registry.rule,
                           "promotion.compared_to": champion.version if champion else "none"}.items():
            client.set_model_version_tag(n, challenger.version, key, value)
        if ok:
            client.set_registered_model_alias(n, CHAMPION, challenger.version)
    return decisions


def qnet_alias(task_id: str) -> str:
    """Each test task's newest adapted Q-network carries the task id as alias (``@interp-003``)."""
    return task_id


def register_qnets(params: Params, provenance: dict[str, str], adapted: Path = paths.ADAPTED,
                   tasks_path: Path = paths.TASKS) -> list[Registered]:
    """Registers the adapted Q-networks of ``registry.qnet_method`` (seed 0), one version per test task.

    Tags: task_id, split, method, seed, ``physics.<name>`` and ``normalised_return`` (final, after
    fine-tuning), plus the provenance tags. A task whose network did not change is not registered again.
    """
    import mlflow
    import pandas as pd

    from metadqn.data.io import file_md5
    from metadqn.tracking.models import log_qnetwork
    from metadqn.tracking.runs import stage_run

    index_path = adapted / "index.csv"
    if not index_path.exists():
        return []
    index = pd.read_csv(index_path)
    method = params.registry.qnet_method
    rows = index[(index["method"] == method) & (index["seed"] == index["seed"].min())]
    if rows.empty:
        return []
    family = params.family.family()
    physics = pd.read_parquet(tasks_path).set_index("task_id")[family.param_names]
    name = model_name(family.name, "qnet")
    client = mlflow.MlflowClient()
    todo, out = [], []
    for row in rows.itertuples(index=False):
        weights = adapted / row.path
        content = f"{row.task_id}:{file_md5(weights)}"
        try:
            current = client.get_model_version_by_alias(name, qnet_alias(row.task_id))
        except mlflow.exceptions.MlflowException:
            current = None
        if current is not None and current.tags.get("content_hash") == content:
            out.append(Registered(name, None))
        else:
            todo.append((row, weights, content))
    if not todo:
        return out
    with stage_run("register-qnets", family.name, {}, params.digest(), True, provenance) as run:
        for row, weights, content in todo:
            info = log_qnetwork(weights, family.name, params.dqn.hidden_sizes, f"qnet-{row.task_id}")
            tags = {**provenance, "params_digest": params.digest(), "mlflow_run_id": run.info.run_id,
                    "content_hash": content, "task_id": row.task_id, "split": row.split, "method": method,
                    "seed": str(row.seed), "normalised_return": str(row.final_normalised_return),
                    **{f"physics.{k}": repr(float(v)) for k, v in physics.loc[row.task_id].items()}}
            version = mlflow.register_model(info.model_uri, name, tags=tags)
            client.set_registered_model_alias(name, qnet_alias(row.task_id), version.version)
            out.append(Registered(name, str(version.version)))
    return out
