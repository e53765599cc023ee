"""The collect stage: sample the task sets, train one expert per task, write the trajectory dataset.

For every task of every split (the test tasks' experts are the oracle that later normalises returns):
train a DQN expert with the batched trainer, keep its best checkpoint by periodic greedy evaluation,
re-evaluate that checkpoint on fresh start states (the figure reported, free of selection bias), then
record the task's transitions from three sources: ``exploration`` (uniform-random policy; later the
task's context), ``expert`` (the expert's epsilon-greedy rollouts) and ``replay`` (the end of its DQN
replay buffer).

Tasks are trained in groups of ``collect.group_size`` (one batched trainer each). The seed of a group
derives from ``collect.seed`` and its task ids only, so a group's result is the same whichever runner
(in-process, Prefect threads, a Dask worker) trains it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metadqn import paths
from metadqn.config import CollectConfig, DQNConfig, Params
from metadqn.data import trajectories as traj
from metadqn.data.io import atomic_path, dvc_md5, save_state_dict, write_json
from metadqn.dqn.qnetwork import BatchedQNetwork, StateDict
from metadqn.dqn.rollout import GreedyEvaluator, collect_transitions
from metadqn.dqn.trainer import train_dqn
from metadqn.envs.families import Family
from metadqn.envs.sampling import sample_tasks, task_matrix
from metadqn.progress import Progress

log = logging.getLogger("metadqn.collect")


@dataclass(frozen=True)
class CollectOutputs:
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
    return [tasks.iloc[i:i + group_size].reset_index(drop=True) for i in range(0, len(tasks), group_size)]


def _batched_policy(family: Family, params: Sequence[StateDict], hidden: Sequence[int]) -> BatchedQNetwork:
    net = BatchedQNetwork(len(params), family.obs_dim, family.n_actions, hidden)
    net.load_slots(params)
    return net.eval()


def _greedy(net: BatchedQNetwork):
    def act(o: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net(o).argmax(-1)

    return act


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
        ret = GreedyEvaluator(family, tasks[todo], dqn.eval_episodes, s_select)(_greedy(net))
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
    eval_return = GreedyEvaluator(family, tasks, dqn.eval_episodes, s_report)(_greedy(net))
    explore = collect_transitions(family, tasks, collect.exploration_steps, collect.rollout_envs_per_task,
                                  s_explore) if collect.exploration_steps else [None] * k
    expert = collect_transitions(family, tasks, collect.expert_steps, collect.rollout_envs_per_task, s_expert,
                                 policy=_greedy(net), epsilon=collect.expert_epsilon) if collect.expert_steps \
        else [None] * k
    frames: dict[str, pd.DataFrame] = {}
    for slot, tid in enumerate(ids):
        sources = (("exploration", explore), ("expert", expert), ("replay", replay))
        parts = [traj.to_frame(tid, source, data[slot]) for source, data in sources
                 if data[slot] is not None and len(data[slot])]
        frames[tid] = pd.concat(parts, ignore_index=True)
    return GroupResult(
        task_ids=ids, best_params=best_params, eval_return=eval_return, selection_return=selection_return,
        best_step=best_step, trained_steps=steps_spent, rounds=rounds,
        curves=pd.concat(curves, ignore_index=True)[["task_id", "step", "eval_return"]], frames=frames,
        wall_s=time.perf_counter() - start,
    )


GroupMapper = Callable[[Callable[[pd.DataFrame], GroupResult], list[pd.DataFrame]], list[GroupResult]]


def run_in_process(fn: Callable[[pd.DataFrame], GroupResult], groups: list[pd.DataFrame]) -> list[GroupResult]:
    return [fn(g) for g in groups]


def _clear_stale(folder: Path, keep: set[str], suffix: str) -> None:
    for p in folder.glob(f"*{suffix}"):
        if p.name.removesuffix(suffix) not in keep:
            p.unlink()


def write_outputs(family: Family, tasks: pd.DataFrame, results: Sequence[GroupResult], out: CollectOutputs,
                  wall_s: float) -> dict[str, Any]:
    """Writes experts, trajectories, curves and metrics (each file atomically); returns the metrics."""
    ids = set(tasks["task_id"])
    out.trajectories.mkdir(parents=True, exist_ok=True)
    out.experts.mkdir(parents=True, exist_ok=True)
    _clear_stale(out.trajectories, ids, ".parquet")
    _clear_stale(out.experts, ids, ".pt")
    split = dict(zip(tasks["task_id"], tasks["split"], strict=True))
    per_task: dict[str, dict[str, Any]] = {}
    for res in results:
        for slot, tid in enumerate(res.task_ids):
            save_state_dict(out.experts / f"{tid}.pt", res.best_params[slot])
            traj.write_task(out.trajectories / f"{tid}.parquet", res.frames[tid], family.obs_dim)
            per_task[tid] = {
                "split": split[tid], "return": float(res.eval_return[slot]),
                "selection_return": float(res.selection_return[slot]),
                "steps": int(res.trained_steps[slot]), "best_step": int(res.best_step[slot]),
                "round": int(res.rounds[slot]),
            }
    curves = pd.concat([r.curves for r in results], ignore_index=True)
    curves = curves.merge(tasks[["task_id", "split"]], on="task_id")[["task_id", "split", "step", "eval_return"]]
    with atomic_path(out.curves) as tmp:
        curves.to_csv(tmp, index=False)
    returns = np.array([v["return"] for v in per_task.values()])
    metrics = {
        "fraction_solved": float(np.mean(returns >= family.solved_return)),
        "solved_return": family.solved_return,
        "tasks": dict(sorted(per_task.items())),
        "wall_s": round(wall_s, 2),
    }
    write_json(out.metrics, metrics)
    return metrics


def sample_task_sets(params: Params) -> pd.DataFrame:
    return sample_tasks(params.family.family(), params.collect.counts(), params.collect.task_seed)


def run_collect(params: Params, out: CollectOutputs = CollectOutputs(),
                map_groups: GroupMapper = run_in_process, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The whole stage. ``map_groups`` runs ``train_group`` over the groups (in process, Prefect, Dask)."""
    from metadqn.tracking.runs import log_dataset, log_step_metrics, stage_run

    start = time.perf_counter()
    family = params.family.family()
    tasks = sample_task_sets(params)
    with atomic_path(out.tasks) as tmp:
        tasks.to_parquet(tmp, index=False)
    groups = plan_groups(tasks, params.collect.group_size)
    log.info("collect: %d tasks of %s in %d group(s)", len(tasks), family.name, len(groups))

    def fn(group: pd.DataFrame) -> GroupResult:
        return train_group(family, group, params.dqn, params.collect)

    results = map_groups(fn, groups)
    metrics = write_outputs(family, tasks, results, out, time.perf_counter() - start)
    log.info("collect: %.0f%% of tasks solved (greedy return >= %g) in %.0f s",
             100 * metrics["fraction_solved"], family.solved_return, metrics["wall_s"])

    with stage_run("collect", family.name, params.flat(), params.digest(), params.tracking.enabled, tags) as run:
        if run is not None:
            import mlflow

            mlflow.log_metrics({"fraction_solved": metrics["fraction_solved"], "wall_s": metrics["wall_s"]})
            curves = pd.concat([r.curves for r in results], ignore_index=True)
            log_step_metrics(run, curves, "task_id", "step", "eval_return", "expert_curve/")
            frame = traj.read_tasks(out.trajectories, list(tasks["task_id"]), family.obs_dim)
            log_dataset(run, frame, "trajectories", str(out.trajectories), dvc_md5(out.trajectories), "collect")
            mlflow.log_artifact(str(out.metrics))
    return metrics
