"""The collect stage: assemble the task sets, train one expert per task, write the trajectory dataset.

The training tasks come from the task pool (``data/task_pool.csv``, see :mod:`metadqn.data.pool`); the
held-out tasks (val, interp, extrap) are drawn from params and never change when the pool grows. For every
task of every split (the test tasks' experts are the oracle that later normalises returns):
train a DQN expert with the batched trainer, keep its best checkpoint by periodic greedy evaluation,
re-evaluate that checkpoint on fresh start states (the figure reported, free of selection bias), measure
the uniform-random policy's return (with the expert's, the task's scale: :mod:`metadqn.data.normalise`), then
record the task's transitions from three sources: ``exploration`` (uniform-random policy; later the
task's context), ``expert`` (the expert's epsilon-greedy rollouts) and ``replay`` (the end of its DQN
replay buffer).

Tasks are trained in groups (one batched trainer each): the held-out tasks, then each batch of the pool,
each cut into chunks of ``collect.group_size``. The seed of a group derives from ``collect.seed`` and its
task ids only, so a group's result is the same whichever runner (in-process, a worker process, a Dask
worker) trains it, and whether it is trained today or recomputed from scratch in a fresh clone.

Collect is incremental: every task's outputs are keyed by its task_id (``<task_id>.pt``, ``.parquet`` and
a ``<task_id>.json`` card beside the expert), and the card records the *fingerprint* of the group that
made it: the group's tasks, the family, collect and dqn params, and the source of the code collect runs.
The card also records the md5 of the task's expert and trajectory files, and a group is reused only if
every card matches and every file still has its recorded hash: a truncated, edited or half-restored file
is never reused (and so never recorded by DVC as good); its group is trained again, which heals it.
A group whose every card matches is reused as it is; any other group is trained. So a grown pool costs
only its new batch, while a change of params or code retrains everything, as DVC would. The metrics and
curves are rebuilt from the cards of the current tasks, so they are the same as a from-scratch run's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metadqn import paths
from metadqn.config import CollectConfig, DQNConfig, Params
from metadqn.dag import code_digest
from metadqn.data import pool as task_pool
from metadqn.data import trajectories as traj
from metadqn.data.io import (
    atomic_path,
    dvc_md5,
    file_md5,
    remove_stale_temps,
    require_finite,
    save_state_dict,
    write_json,
)
from metadqn.data.normalise import reference_return
from metadqn.dqn.qnetwork import BatchedQNetwork, StateDict
from metadqn.dqn.rollout import GreedyEvaluator, collect_transitions, uniform_policy
from metadqn.dqn.trainer import train_dqn
from metadqn.envs.families import Family
from metadqn.envs.sampling import check_disjoint, sample_tasks, task_matrix
from metadqn.fanout import GroupMapper, run_in_process
from metadqn.progress import Progress

log = logging.getLogger("metadqn.collect")


@dataclass(frozen=True)
class CollectOutputs:
    """The stage's files: the pool it reads and everything it writes."""

    pool: Path = paths.TASK_POOL
    tasks: Path = paths.TASKS
    trajectories: Path = paths.TRAJECTORIES
    experts: Path = paths.EXPERTS
    metrics: Path = paths.COLLECT_METRICS
    curves: Path = paths.COLLECT_CURVES


@dataclass
class GroupResult:
    """One group's experts and data (picklable, so it can come back from a Prefect or Dask worker)."""

    task_ids: list[str]
    best_params: list[StateDict]
    eval_return: np.ndarray
    """Greedy return of the kept checkpoint on fresh start states (eval_episodes episodes)."""
    selection_return: np.ndarray
    """The return that selected the checkpoint (biased upwards by the selection)."""
    random_return: np.ndarray
    """The uniform-random policy's mean return (collect.random_episodes episodes): 0 on the normalised scale."""
    best_step: np.ndarray
    trained_steps: np.ndarray
    """Environment steps spent on each task, over all its rounds."""
    rounds: np.ndarray
    """The round whose run was kept."""
    curves: pd.DataFrame
    frames: dict[str, pd.DataFrame] = field(repr=False)
    wall_s: float = 0.0


def group_seed(seed: int, task_ids: Sequence[str]) -> int:
    digest = hashlib.sha256(f"{seed}:{','.join(task_ids)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def plan_groups(tasks: pd.DataFrame, group_size: int) -> list[pd.DataFrame]:
    """Chunks of ``group_size`` tasks, never mixing batches (a ``batch`` column; absent: one batch)."""
    keys = tasks["batch"] if "batch" in tasks else pd.Series("", index=tasks.index)
    groups = []
    for key in dict.fromkeys(keys):
        part = tasks[keys == key]
        groups += [part.iloc[i:i + group_size].reset_index(drop=True) for i in range(0, len(part), group_size)]
    return groups


def _batched_policy(family: Family, params: Sequence[StateDict], hidden: Sequence[int]) -> BatchedQNetwork:
    net = BatchedQNetwork(len(params), family.obs_dim, family.n_actions, hidden)
    net.load_slots(params)
    return net.eval()


def train_group(family: Family, group: pd.DataFrame, dqn: DQNConfig, collect: CollectConfig,
                show_progress: bool = True) -> GroupResult:
    """Trains and records the experts of one group of tasks (a pure function of its arguments).

    Round 1 trains every task; each later round retrains, from a new seed, the tasks whose kept
    checkpoint is not yet solved on the round-selection evaluation, keeping whichever run is better. The
    reported return is measured once more at the end on start states no selection has seen.
    """
    start = time.perf_counter()
    ids = list(group["task_id"])
    seed = group_seed(collect.seed, ids)
    seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(4 + collect.max_rounds)]
    s_select, s_report, s_explore, s_expert = seeds[:4]
    # its own stream (not a fifth entry above), so adding it left every expert's seeds as they were
    s_random = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    tasks = task_matrix(group, family)
    k = len(ids)

    best_params: list[StateDict] = [{}] * k
    select_return = np.full(k, -np.inf)
    selection_return = np.zeros(k)
    best_step = np.zeros(k, dtype=np.int64)
    rounds = np.zeros(k, dtype=np.int64)
    steps_spent = np.zeros(k, dtype=np.int64)
    replay: list[dict[str, np.ndarray]] = [{}] * k
    curves: list[pd.DataFrame] = [pd.DataFrame()] * k
    todo = np.arange(k)
    for r in range(collect.max_rounds):
        desc = f"experts {ids[todo[0]]}..{ids[todo[-1]]} ({len(todo)} tasks, round {r + 1})"
        with Progress(dqn.total_steps, desc) if show_progress else contextlib.nullcontext() as bar:
            result = train_dqn(family, tasks[todo], dqn, seeds[4 + r], keep_replay=collect.replay_rows,
                               on_steps=bar.advance if bar is not None else None)
        net = _batched_policy(family, result.best_params, dqn.hidden_sizes)
        ret = GreedyEvaluator(family, tasks[todo], dqn.eval_episodes, s_select)(net.act)
        for j, slot in enumerate(todo):
            steps_spent[slot] += result.env_steps
            if ret[j] > select_return[slot]:
                select_return[slot], best_params[slot] = ret[j], result.best_params[j]
                selection_return[slot], best_step[slot] = result.best_return[j], result.best_step[j]
                replay[slot], rounds[slot] = result.replay[j], r + 1
                curves[slot] = result.curves[result.curves["slot"] == j].assign(task_id=ids[slot])
        todo = np.flatnonzero(select_return < family.solved_return)
        if len(todo) == 0:
            break

    net = _batched_policy(family, best_params, dqn.hidden_sizes)
    eval_return = GreedyEvaluator(family, tasks, dqn.eval_episodes, s_report)(net.act)
    random_return = GreedyEvaluator(family, tasks, collect.random_episodes, s_random)(
        uniform_policy(family.n_actions, s_random))
    explore = collect_transitions(family, tasks, collect.exploration_steps, collect.rollout_envs_per_task,
                                  s_explore) if collect.exploration_steps else [None] * k
    expert = collect_transitions(family, tasks, collect.expert_steps, collect.rollout_envs_per_task, s_expert,
                                 policy=net.act, epsilon=collect.expert_epsilon) if collect.expert_steps \
        else [None] * k
    frames: dict[str, pd.DataFrame] = {}
    for i, tid in enumerate(ids):
        sources = (("exploration", explore), ("expert", expert), ("replay", replay))
        parts = [traj.to_frame(tid, source, rows) for source, data in sources
                 if (rows := data[i]) is not None and len(rows)]
        frames[tid] = pd.concat(parts, ignore_index=True)
    return GroupResult(
        task_ids=ids, best_params=best_params, eval_return=eval_return, selection_return=selection_return,
        random_return=random_return,
        best_step=best_step, trained_steps=steps_spent, rounds=rounds,
        curves=pd.concat(curves, ignore_index=True)[["task_id", "step", "eval_return"]], frames=frames,
        wall_s=time.perf_counter() - start,
    )


HELD_OUT = "held-out"
"""Batch name of the held-out tasks in the group plan."""


def group_fingerprint(params: Params, group: pd.DataFrame, code: str) -> str:
    family = params.family.family()
    counts = {"n_train_tasks", "n_val_tasks", "n_interp_tasks", "n_extrap_tasks", "n_val_extrap_tasks", "task_seed",
              "group_size"}
    blob = {
        "tasks": group[["task_id", *family.param_names]].to_dict(orient="list"),
        "family": params.family.model_dump(mode="json"),
        "collect": params.collect.model_dump(mode="json", exclude=counts),
        "dqn": params.dqn.model_dump(mode="json"),
        "code": code,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _card_path(out: CollectOutputs, tid: str) -> Path:
    return out.experts / f"{tid}.json"


def _task_files(out: CollectOutputs, tid: str) -> dict[str, Path]:
    return {"expert": out.experts / f"{tid}.pt", "trajectories": out.trajectories / f"{tid}.parquet"}


def _read_card(out: CollectOutputs, tid: str) -> dict[str, Any] | None:
    """The task's card if it and the files it vouches for are intact (each file's md5 as recorded)."""
    path = _card_path(out, tid)
    files = _task_files(out, tid)
    if not path.exists() or not all(f.exists() for f in files.values()):
        return None
    try:
        card = json.loads(path.read_text())
        recorded = card["md5"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(recorded, dict) or any(recorded.get(k) != file_md5(f) for k, f in files.items()):
        log.warning("collect: %s's files do not match its card (changed, truncated or corrupted); its group is "
                    "trained again", tid)
        return None
    return card


def _is_current(out: CollectOutputs, group: pd.DataFrame, fingerprint: str) -> bool:
    cards = [_read_card(out, tid) for tid in group["task_id"]]
    return all(c is not None and c.get("fingerprint") == fingerprint for c in cards)


def _clear_stale(folder: Path, keep: set[str], suffixes: Sequence[str]) -> None:
    for suffix in suffixes:
        for p in folder.glob(f"*{suffix}"):
            if p.name.removesuffix(suffix) not in keep:
                p.unlink()


def write_group(family: Family, result: GroupResult, out: CollectOutputs, fingerprint: str) -> None:
    """Writes one group's experts, trajectories and cards, the card last (so a crash leaves no card that
    vouches for a half-written task)."""
    for slot, tid in enumerate(result.task_ids):
        files = _task_files(out, tid)
        save_state_dict(files["expert"], result.best_params[slot])
        traj.write_task(files["trajectories"], result.frames[tid], family.obs_dim)
        curve = require_finite(result.curves[result.curves["task_id"] == tid], f"expert curve of {tid}")
        card = {
            "fingerprint": fingerprint, "group": result.task_ids,
            "md5": {k: file_md5(f) for k, f in files.items()},
            "return": float(result.eval_return[slot]), "selection_return": float(result.selection_return[slot]),
            "random_return": float(result.random_return[slot]),
            "steps": int(result.trained_steps[slot]), "best_step": int(result.best_step[slot]),
            "round": int(result.rounds[slot]),
            "curve": {"step": curve["step"].astype(int).tolist(), "eval_return": curve["eval_return"].tolist()},
        }
        write_json(_card_path(out, tid), card)


def write_summary(family: Family, tasks: pd.DataFrame, out: CollectOutputs) -> dict[str, Any]:
    """Metrics and curves of every current task, from the cards (each file written atomically)."""
    per_task: dict[str, dict[str, Any]] = {}
    curves = []
    for tid, split in zip(tasks["task_id"], tasks["split"], strict=True):
        card = _read_card(out, tid)
        if card is None:
            raise RuntimeError(f"collect: no expert card for {tid} after training")
        per_task[tid] = {"split": split, **{k: card[k] for k in ("return", "selection_return", "random_return",
                                                                  "steps", "best_step", "round")},
                         "reference_return": reference_return(card["return"], family.solved_return)}
        curves.append(pd.DataFrame({"task_id": tid, "split": split, **card["curve"]}))
    frame = pd.concat(curves, ignore_index=True)[["task_id", "split", "step", "eval_return"]]
    with atomic_path(out.curves) as tmp:
        frame.to_csv(tmp, index=False)
    returns = np.array([v["return"] for v in per_task.values()])
    metrics = {
        "family": family.name,
        "fraction_solved": float(np.mean(returns >= family.solved_return)),
        "solved_return": family.solved_return,
        "mean_expert_return": float(np.mean(returns)),
        "mean_random_return": float(np.mean([v["random_return"] for v in per_task.values()])),
        "tasks": dict(sorted(per_task.items())),
    }
    write_json(out.metrics, metrics)
    return metrics


def held_out_tasks(params: Params) -> pd.DataFrame:
    """The val, val_extrap, interp and extrap tasks: drawn from params, independent of the pool."""
    counts = {**params.collect.counts(), "train": 0}
    return sample_tasks(params.family.family(), counts, params.collect.task_seed)


def load_pool(params: Params, path: Path = paths.TASK_POOL) -> pd.DataFrame:
    """The pool, checked against params (raises :class:`metadqn.data.pool.PoolError`)."""
    family = params.family.family()
    pool = task_pool.read_pool(path, family)
    task_pool.check_initial(pool, family, params.collect.n_train_tasks, params.collect.task_seed, path)
    return pool


def prepare_pool(params: Params, path: Path = paths.TASK_POOL, force: bool = False) -> str:
    """Makes sure the pool exists (recreated from params where it can be, see
    :func:`metadqn.data.pool.ensure_pool`) and that DVC tracks what was written; returns what was done."""
    from metadqn.versioning import dvc_add

    done = task_pool.ensure_pool(path, params.family.family(), params.collect.n_train_tasks,
                                 params.collect.task_seed, force)
    if done != "present":
        dvc_add(path)
    return done


def grow_pool(params: Params, n: int, when: datetime, path: Path = paths.TASK_POOL) -> pd.DataFrame:
    """Appends ``n`` tasks to the pool file (and ``dvc add``s it); returns the added rows (none if the
    batch of ``when`` is already there)."""
    from metadqn.versioning import dvc_add

    family = params.family.family()
    pool = load_pool(params, path)
    grown = task_pool.grow(pool, family, n, when, held_out_tasks(params))
    if len(grown) > len(pool):
        task_pool.write_pool(path, grown)
        dvc_add(path)
    return grown.iloc[len(pool):]


def task_sets(params: Params, pool: pd.DataFrame) -> pd.DataFrame:
    """Every task of the run (pool first, then held-out), with its ``batch`` for the group plan."""
    held_out = held_out_tasks(params).assign(batch=HELD_OUT)
    frame = pd.concat([pool.drop(columns=["seed"]), held_out], ignore_index=True)
    check_disjoint(frame, params.family.family())
    return frame


def run_collect(params: Params, out: CollectOutputs = CollectOutputs(),
                map_groups: GroupMapper = run_in_process, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The whole stage. ``map_groups`` runs ``train_group`` over the groups that need training (see
    :mod:`metadqn.fanout`: in process, in worker processes, on Dask)."""
    from metadqn.tracking.runs import log_dataset, log_step_metrics, stage_run

    start = time.perf_counter()
    family = params.family.family()
    tasks = task_sets(params, load_pool(params, out.pool))
    columns = ["task_id", "split", "family", *family.param_names]
    with atomic_path(out.tasks) as tmp:
        tasks[columns].to_parquet(tmp, index=False)
    out.trajectories.mkdir(parents=True, exist_ok=True)
    out.experts.mkdir(parents=True, exist_ok=True)
    for folder in (out.trajectories, out.experts):  # a kill -9 mid-write leaves a temp file; never hash one
        for stale in remove_stale_temps(folder):
            log.info("collect: removed %s, left by an interrupted write", stale)
    ids = set(tasks["task_id"])
    _clear_stale(out.trajectories, ids, (".parquet",))
    _clear_stale(out.experts, ids, (".pt", ".json"))

    code = code_digest("collect")  # collect's code deps in dvc.yaml: a code change retrains every expert
    groups = plan_groups(tasks, params.collect.group_size)
    prints = [group_fingerprint(params, g, code) for g in groups]
    todo = [(g, fp) for g, fp in zip(groups, prints, strict=True) if not _is_current(out, g, fp)]
    n_new = sum(len(g) for g, _ in todo)
    log.info("collect: %d tasks of %s in %d group(s); training %d task(s) in %d group(s), reusing %d",
             len(tasks), family.name, len(groups), n_new, len(todo), len(tasks) - n_new)

    fn = functools.partial(train_group, family, dqn=params.dqn, collect=params.collect)
    results = map_groups(fn, [g for g, _ in todo]) if todo else []
    for (_, fp), result in zip(todo, results, strict=True):
        write_group(family, result, out, fp)
    metrics = write_summary(family, tasks, out)
    wall_s = time.perf_counter() - start
    log.info("collect: trained %d task(s), reused %d; %.0f%% of tasks solved (greedy return >= %g); %.0f s",
             n_new, len(tasks) - n_new, 100 * metrics["fraction_solved"], family.solved_return, wall_s)

    with stage_run("collect", family.name, params.flat(), params.digest(), params.tracking.enabled, tags) as run:
        if run is not None:
            import mlflow

            mlflow.log_metrics({"fraction_solved": metrics["fraction_solved"], "wall_s": wall_s,
                                "trained_tasks": n_new, "reused_tasks": len(tasks) - n_new})
            curves = pd.read_csv(out.curves)
            log_step_metrics(run, curves, "task_id", "step", "eval_return", "expert_curve/")
            frame = traj.read_tasks(out.trajectories, list(tasks["task_id"]), family.obs_dim)
            log_dataset(run, frame, "trajectories", str(out.trajectories), dvc_md5(out.trajectories), "collect")
            mlflow.log_artifact(str(out.metrics))
    return {**metrics, "trained_tasks": n_new}
