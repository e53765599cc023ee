"""The MLflow model registry: registering a pipeline run's models and promoting by alias.

Names: ``metadqn-<family>-<learner>`` for the meta-models (hypernet, hypernet-oracle, siamese, reptile,
multitask) and ``metadqn-<family>-qnet`` for adapted Q-networks (one version per test task). Aliases only
(``challenger``, ``champion``; MLflow's deprecated stages are never used).

Every version carries tags that trace it to its data and code: ``git_commit``, ``dvc_data_hash``,
``params_digest``, ``prefect_flow_run_id``, ``mlflow_run_id``, ``content_hash`` (the DVC hash of the model
folder, which makes registration idempotent: an unchanged model is not registered again), the
held-out meta-test metrics of the run that produced it (``metric.<split>.<name>``) and the no-meta-learning
baseline's (scratch's) figures from the same metrics file (``baseline.<split>.<name>``), which promotion reads.

Promotion is a read-decide-write on aliases, so concurrent promotes are serialised by an OS lock (beside a
sqlite store, or per tracking URI on this machine for a server); conflicts a server reports are retried.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import tempfile
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from metadqn import paths
from metadqn.config import Params, RegistryConfig
from metadqn.data.io import dvc_md5
from metadqn.errors import UserError
from metadqn.learners import LEARNERS, SCRATCH

CHALLENGER, CHAMPION = "challenger", "champion"
PROMOTABLE = typing.get_args(RegistryConfig.model_fields["metric"].annotation)
"""The ``<split>.<metric>`` figures promotion may compare (higher is better), as params allow them."""
LOCK_WAIT_S = 120.0
_T = TypeVar("_T")


class PromotionBusy(UserError, ValueError):
    """Another promote held the promotion lock for too long; the message is one line."""


def model_name(family: str, learner: str) -> str:
    return f"metadqn-{family}-{learner}"


def metric_tags(metrics: dict[str, Any], method: str) -> dict[str, str]:
    """``method``'s meta-test figures as ``metric.<split>.<name>`` tags, plus the baseline's (scratch's)
    figures that promotion compares against as ``baseline.<split>.<name>``, from the same metrics."""
    tags = {}
    for split in ("interp", "extrap"):
        for key, value in metrics.get(split, {}).get(method, {}).items():
            tags[f"metric.{split}.{key}"] = "nan" if value is None else str(value)
    for figure in PROMOTABLE:
        split, base = figure.split(".", 1)
        scratch = metrics.get(split, {}).get(SCRATCH, {})
        for suffix in ("_iqm", "_ci_low", "_ci_high"):
            if base + suffix in scratch:
                value = scratch[base + suffix]
                tags[f"baseline.{split}.{base}{suffix}"] = "nan" if value is None else str(value)
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
    bar: float = math.nan
    """The baseline bar the challenger had to clear: registry.floor, else scratch's upper CI bound."""


@dataclass(frozen=True)
class Verdict:
    promote: bool
    challenger: float
    """The challenger's IQM on the rule's metric."""
    champion: float
    bound: float
    """What the challenger had to beat on the champion's side: its upper CI bound or its IQM."""
    bar: float
    """The baseline bar: ``registry.floor`` when set, else scratch's upper CI bound."""
    reason: str


def decide(challenger_tags: dict[str, str], champion_tags: dict[str, str] | None, metric: str,
           rule: str, floor: float | None = None) -> Verdict:
    """The promotion rule, pure. A challenger is promoted only if its IQM is finite, above the baseline bar
    (``floor``, else scratch's upper CI bound from the challenger's own run: a model that does not beat
    learning from scratch is no model to serve) and, when there is a champion, above the champion (its
    upper CI bound or its IQM, per ``rule``)."""
    split, base = metric.split(".", 1)
    c = _tag_float(challenger_tags, f"metric.{split}.{base}_iqm")
    champ = _tag_float(champion_tags or {}, f"metric.{split}.{base}_iqm")
    bound = champ if rule != "above_ci_high" else _tag_float(champion_tags or {}, f"metric.{split}.{base}_ci_high")
    if floor is not None:
        bar, bar_what = floor, "the floor (registry.floor)"
    else:
        bar, bar_what = _tag_float(challenger_tags, f"baseline.{split}.{base}_ci_high"), \
            f"{SCRATCH}'s upper CI bound"
    if not math.isfinite(c):
        return Verdict(False, c, champ, bound, bar, f"challenger has no finite {metric}_iqm")
    if not math.isfinite(bar):
        return Verdict(False, c, champ, bound, bar, f"no finite {SCRATCH} baseline for {metric} in its tags "
                       "(register it again from a meta-test that ran scratch, or set registry.floor)")
    if c <= bar:
        return Verdict(False, c, champ, bound, bar, f"{c:.3f} <= {bar_what} {bar:.3f}: not above the baseline")
    beats = f"{c:.3f} > {bar_what} {bar:.3f}"
    if champion_tags is None:
        return Verdict(True, c, champ, bound, bar, f"no champion yet; {beats}")
    if not math.isfinite(bound):
        return Verdict(True, c, champ, bound, bar, f"champion has no finite metric; {beats}")
    what = "upper CI bound" if rule == "above_ci_high" else "IQM"
    if c > bound:
        return Verdict(True, c, champ, bound, bar, f"{c:.3f} > champion's {what} {bound:.3f}; {beats}")
    return Verdict(False, c, champ, bound, bar, f"{c:.3f} <= champion's {what} {bound:.3f}")


def _missing(exc: Exception) -> bool:
    """A registry answer meaning "no such model or alias", as opposed to a store that failed."""
    return getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def lock_path(uri: str) -> Path:
    """Where promotes on ``uri`` take turns: beside a sqlite database (every process that opens it sees
    the same file), else a per-URI file in the temporary folder (this machine's processes only)."""
    if uri.startswith("sqlite:"):
        path = uri.split("://", 1)[1]
        path = path[1:] if path.startswith("/") else path
        path = path.split("?", 1)[0]
        if path not in ("", ":memory:"):
            db = Path(path).resolve()
            return db.with_name(db.name + ".promote.lock")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"metadqn-promote-{digest}.lock"


@contextlib.contextmanager
def promotion_lock(uri: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Holds the promotion lock of ``uri``; an OS lock, so a killed holder never blocks the next one."""
    path = lock_path(uri)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PromotionBusy(f"another promote has held {path} for over {wait_s:g} s; "
                                        "try again when it has finished") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_CONFLICTS = ("RESOURCE_ALREADY_EXISTS", "ABORTED", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
              "RESOURCE_CONFLICT")


def _conflict(exc: Exception) -> bool:
    """An error that a second try may not meet: another writer got there first, or a busy store."""
    if getattr(exc, "error_code", None) in _CONFLICTS:
        return True
    text = str(exc).lower()
    return "database is locked" in text or "unique constraint" in text or "integrityerror" in text


def _retrying(step: Callable[[], _T], tries: int = 4) -> _T:
    """Runs one read-decide-write again when the store reports a conflict: the next read sees the winner's
    write, so the step decides anew (e.g. "already champion") instead of dying with a traceback."""
    for attempt in range(tries):
        try:
            return step()
        except Exception as exc:
            if attempt == tries - 1 or not _conflict(exc):
                raise
            time.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


def promote(params: Params, name: str | None = None, dry_run: bool = False) -> list[Decision]:
    """Moves ``champion`` to each model's challenger where the rule holds; records the decision as tags.

    Safe to run concurrently: the whole read-decide-write holds :func:`promotion_lock`, so of several
    promotes of one challenger exactly one promotes it and the others find it already champion.
    """
    import mlflow

    client = mlflow.MlflowClient()
    names = [name] if name else [model_name(params.family.name, m) for m in LEARNERS]
    guard = contextlib.nullcontext() if dry_run else promotion_lock(mlflow.get_tracking_uri())
    with guard:
        decisions = [_retrying(functools.partial(_promote_one, client, n, params, dry_run)) for n in names]
    return [d for d in decisions if d is not None]


def _alias(client: Any, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception as exc:
        if _missing(exc):
            return None
        raise  # a store that does not answer is not "no challenger"


def _promote_one(client: Any, n: str, params: Params, dry_run: bool) -> Decision | None:
    reg = params.registry
    challenger = _alias(client, n, CHALLENGER)
    if challenger is None:
        return None
    champion = _alias(client, n, CHAMPION)
    v = decide(challenger.tags, champion.tags if champion else None, reg.metric, reg.rule, reg.floor)
    # versions are ints from a sqlite store and strings from a server: the decision speaks strings
    mine, theirs = str(challenger.version), str(champion.version) if champion is not None else None
    if mine == theirs:
        return Decision(n, mine, theirs, v.challenger, v.champion, v.bound, False, "challenger is already champion",
                        v.bar)
    decision = Decision(n, mine, theirs, v.challenger, v.champion, v.bound, v.promote, v.reason, v.bar)
    if dry_run:
        return decision
    tags = {"promotion.decision": "promoted" if v.promote else "rejected", "promotion.reason": v.reason,
            "promotion.metric": reg.metric, "promotion.rule": reg.rule,
            "promotion.compared_to": theirs or "none",
            "promotion.baseline": "floor" if reg.floor is not None else SCRATCH,
            "promotion.baseline_value": repr(v.bar)}
    for key, value in tags.items():
        client.set_model_version_tag(n, challenger.version, key, value)
    if v.promote:
        client.set_registered_model_alias(n, CHAMPION, challenger.version)
    return decision


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
