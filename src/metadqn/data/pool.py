"""The training task pool, ``data/task_pool.csv`` (tracked by DVC): the tasks meta-training learns from.

The pool starts as ``collect.n_train_tasks`` tasks drawn with ``collect.task_seed`` (batch ``initial``)
and grows by ``metadqn grow-tasks`` (each scheduled run): every growth appends a *batch* of tasks drawn
from the family's training ranges R with a seed derived from the batch's time, both recorded in the
file, so the file says where each task came from. Growing is idempotent per time (a retried scheduled
run does not grow twice). The held-out tasks (val, interp, extrap) never live here: they are drawn from
params (``collect.task_seed`` and the split counts) and stay fixed, so that runs remain comparable; a
grown task never repeats a held-out task's parameter vector.

Columns: ``task_id, split, family, <physics parameters...>, batch, seed``. Floats are written as their
shortest exact representation, so a task's physics are exactly the same after a save and a load.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from metadqn.data.io import atomic_path
from metadqn.envs.families import Family
from metadqn.envs.sampling import check_disjoint, sample_param, sample_tasks
from metadqn.errors import UserError

INITIAL = "initial"
"""Batch name of the tasks the pool starts with."""


class PoolError(UserError, ValueError):
    """A missing, foreign or inconsistent pool file; the message is one line, ready to print."""


def _columns(family: Family) -> list[str]:
    return ["task_id", "split", "family", *family.param_names, "batch", "seed"]


def initial_pool(family: Family, n_tasks: int, task_seed: int) -> pd.DataFrame:
    """The pool's first batch: exactly the train split of :func:`sample_tasks` with ``task_seed``."""
    frame = sample_tasks(family, {"train": n_tasks}, task_seed)
    return frame.assign(batch=INITIAL, seed=task_seed)[_columns(family)]


def batch_seed(family: Family, batch: str) -> int:
    """The seed of a growth batch: derived from the family and the batch's (scheduled) time only."""
    digest = hashlib.sha256(f"{family.name}:{batch}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def parse_time(text: str | None) -> datetime:
    """An ISO 8601 time (``Z`` or an offset; naive means UTC) as an aware datetime; None means now."""
    if text is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time (e.g. 2026-11-27T03:00:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def batch_name(when: datetime) -> str:
    """A batch is named after its time in UTC, to the second (e.g. ``2026-11-27T03:00:00Z``)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def grow(pool: pd.DataFrame, family: Family, n: int, when: datetime, held_out: pd.DataFrame) -> pd.DataFrame:
    """Appends ``n`` tasks drawn from the training ranges; returns the pool unchanged if ``when``'s batch
    is already in it. Ids continue the pool's numbering (``train-<index>``)."""
    name = batch_name(when)
    if n <= 0 or name in set(pool["batch"]):
        return pool
    seed = batch_seed(family, name)
    rng = np.random.default_rng(seed)
    values = {spec.name: sample_param(rng, spec, "train", n) for spec in family.params}
    start = 1 + max(int(t.split("-", 1)[1]) for t in pool["task_id"])
    rows = [{"task_id": f"train-{start + i:03d}", "split": "train", "family": family.name,
             **{k: float(v[i]) for k, v in values.items()}, "batch": name, "seed": seed} for i in range(n)]
    grown = pd.concat([pool, pd.DataFrame(rows, columns=_columns(family))], ignore_index=True)
    check_disjoint(pd.concat([grown, held_out], ignore_index=True), family)
    return grown


def write_pool(path: Path, pool: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(_csv_bytes(pool))


def read_pool(path: Path, family: Family) -> pd.DataFrame:
    """Reads and checks the pool; any problem is a :class:`PoolError` naming the file and the fix."""
    if not path.exists():
        dvc_file = path.with_name(path.name + ".dvc")
        fix = f"`dvc pull {dvc_file}`" if dvc_file.exists() else "`metadqn init-pool`"
        raise PoolError(f"{path}: not found; run {fix}")
    try:
        pool = pd.read_csv(path, dtype={"task_id": str, "split": str, "family": str, "batch": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PoolError(f"{path}: not a task pool CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in _columns(family) if c not in pool.columns]
    if missing:
        raise PoolError(f"{path}: missing column(s) {', '.join(missing)} for family {family.name}; "
                        "rebuild it with `metadqn init-pool --force`")
    if len(pool) == 0:
        raise PoolError(f"{path}: holds no tasks; rebuild it with `metadqn init-pool --force`")
    if set(pool["family"]) != {family.name}:
        raise PoolError(f"{path}: holds tasks of {sorted(set(pool['family']))}, not of {family.name}; "
                        "rebuild it with `metadqn init-pool --force`")
    ids = pool["task_id"]
    if ids.duplicated().any() or not ids.str.fullmatch(r"train-\d+").all() or (pool["split"] != "train").any():
        raise PoolError(f"{path}: task ids must be unique train-<n> ids of split train")
    try:
        pool = pool.astype({**dict.fromkeys(family.param_names, "float64"), "seed": "int64"})
    except (ValueError, TypeError):
        raise PoolError(f"{path}: physics parameters and seeds must be numbers") from None
    if not np.isfinite(pool[family.param_names].to_numpy()).all():
        raise PoolError(f"{path}: physics parameters must be finite numbers")
    return pool[_columns(family)].reset_index(drop=True)


def check_initial(pool: pd.DataFrame, family: Family, n_tasks: int, task_seed: int, path: Path) -> None:
    """The pool's initial batch must be the one params describe (else params and pool disagree)."""
    expected = initial_pool(family, n_tasks, task_seed)
    got = pool[pool["batch"] == INITIAL].reset_index(drop=True)
    if not got.equals(expected):
        raise PoolError(f"{path}: its initial tasks are not collect.n_train_tasks={n_tasks} drawn with "
                        f"collect.task_seed={task_seed}; rebuild it with `metadqn init-pool --force` "
                        "(drops grown tasks) or restore the params it was made with")


def _csv_bytes(pool: pd.DataFrame) -> bytes:
    # pandas writes the shortest repr that reads back to the same float: exact, and readable
    return pool.to_csv(index=False).encode()


def ensure_pool(path: Path, family: Family, n_tasks: int, task_seed: int, force: bool = False) -> str:
    """Makes sure the pool file exists; returns what it did (``present``, ``created``, ``rebuilt``).

    A missing pool is created from params (its initial batch). If a ``.dvc`` file tracks the pool, the
    recreated file must hash to what it records (true until the pool has grown); otherwise the pool has
    to come from the DVC remote. ``force`` rebuilds the initial pool, dropping grown tasks.
    """
    if path.exists() and not force:
        read_pool(path, family)
        return "present"
    frame = initial_pool(family, n_tasks, task_seed)
    dvc_file = path.with_name(path.name + ".dvc")
    if not force and dvc_file.exists():
        import yaml

        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        if outs[0].get("md5") != hashlib.md5(_csv_bytes(frame)).hexdigest():
            raise PoolError(f"{path}: not found, and {dvc_file} tracks a pool that params cannot recreate "
                            f"(it has grown, or params changed); run `dvc pull {dvc_file}`")
    existed = path.exists()
    with atomic_path(path) as tmp:
        tmp.write_bytes(_csv_bytes(frame))
    return "rebuilt" if existed else "created"
