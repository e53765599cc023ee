"""What meta-training reads: training and validation tasks only, through a split-checked store."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from metadqn.config import Params
from metadqn.data.normalise import ReturnScale
from metadqn.data.store import TRAINING_SPLITS, VALIDATION_SPLITS, LeakageError, TaskStore
from metadqn.dqn.qnetwork import BatchedQNetwork, StateDict
from metadqn.dqn.rollout import GreedyEvaluator
from metadqn.envs.families import Family
from metadqn.envs.sampling import task_matrix
from metadqn.meta.context import ContextSampler, oracle_features, transition_features


@dataclass
class Transitions:
    """Stored transitions of T tasks, [T, N, ...] tensors (N equal for all tasks), for offline TD."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    terminated: Tensor

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, ...]:
        t, total = self.actions.shape
        idx = torch.randint(0, total, (t, n), generator=gen)
        k = torch.arange(t).unsqueeze(1)
        return (self.obs[k, idx], self.actions[k, idx], self.rewards[k, idx], self.next_obs[k, idx],
                self.terminated[k, idx])


@dataclass
class SplitData:
    tasks: pd.DataFrame
    matrix: np.ndarray
    """[T, n_params] physics (used only to build the tasks' environments, never as a model input)."""
    physics: Tensor
    """[T, n_params] oracle features (scaled physics): only the oracle variants read them."""
    contexts: ContextSampler
    scale: ReturnScale
    """Normalises returns on these tasks (0 random, 1 expert; :mod:`metadqn.data.normalise`)."""

    def balanced_mean(self, values: np.ndarray) -> float:
        """The mean of per-task ``values`` with every split weighing the same (the validation tasks: in
        range and out of range, whatever their counts); the plain mean when the tasks are of one split."""
        splits = self.tasks["split"].to_numpy()
        values = np.asarray(values, dtype=np.float64)
        return float(np.mean([values[splits == s].mean() for s in dict.fromkeys(splits)]))


@dataclass
class MetaData:
    family: Family
    train: SplitData
    val: SplitData
    """The validation tasks: split val, then split val_extrap (``collect.n_val_extrap_tasks``, may be 0)."""
    experts: list[StateDict]
    """The training tasks' experts (validation experts are never needed: their returns set the scale)."""
    states: list[np.ndarray]
    """Per training task: distillation states (the expert's rollouts and the end of its replay)."""
    transitions: Transitions
    """Per training task: the expert's and replay transitions, for TD losses."""


def _split(store: TaskStore, family: Family, splits: tuple[str, ...],
           context_size: int) -> tuple[SplitData, pd.DataFrame]:
    tasks = store.tasks_of(splits)
    ids = list(tasks["task_id"])
    frame = store.transitions(ids, family.obs_dim)
    explore = frame[frame["source"] == "exploration"]
    feats = [transition_features(explore[explore["task_id"] == tid], family) for tid in ids]
    data = SplitData(tasks=tasks, matrix=task_matrix(tasks, family),
                     physics=torch.as_tensor(oracle_features(tasks, family)),
                     contexts=ContextSampler(feats, context_size),
                     scale=store.return_scale(ids))
    return data, frame


def load_meta_data(store: TaskStore, params: Params) -> MetaData:
    if not store.allowed <= TRAINING_SPLITS:
        raise LeakageError(f"meta-training may read only {sorted(TRAINING_SPLITS)}, got {sorted(store.allowed)}")
    family = params.family.family()
    c = params.meta_train.context_size
    train, frame = _split(store, family, ("train",), c)
    val, _ = _split(store, family, VALIDATION_SPLITS, c)  # val_extrap may hold no task
    ids = list(train.tasks["task_id"])
    experts = [store.expert(t) for t in ids]
    d = family.obs_dim
    obs_cols, next_cols = [f"obs_{i}" for i in range(d)], [f"next_obs_{i}" for i in range(d)]
    states, per_task = [], []
    for tid in ids:
        rows = frame[(frame["task_id"] == tid) & frame["source"].isin(["expert", "replay"])]
        states.append(rows[obs_cols].to_numpy(np.float32))
        per_task.append(rows)
    n = min(len(r) for r in per_task)

    def stack(cols: list[str] | str, dtype: torch.dtype) -> Tensor:
        return torch.stack([torch.tensor(r[cols].to_numpy()[-n:]).to(dtype) for r in per_task])

    transitions = Transitions(stack(obs_cols, torch.float32), stack("action", torch.long),
                              stack("reward", torch.float32), stack(next_cols, torch.float32),
                              stack("terminated", torch.float32))
    return MetaData(family, train, val, experts, states, transitions)


def batched(family: Family, params: list[StateDict], hidden: list[int]) -> BatchedQNetwork:
    net = BatchedQNetwork(len(params), family.obs_dim, family.n_actions, hidden)
    net.load_slots(params)
    return net.eval()


def greedy_returns(family: Family, tasks: np.ndarray, params: list[StateDict], hidden: list[int],
                   episodes: int, seed: int) -> np.ndarray:
    """Mean greedy return of network i on task i."""
    net = batched(family, params, hidden)
    return GreedyEvaluator(family, tasks, episodes, seed)(net.act)


def expert_q(family: Family, experts: list[StateDict], hidden: list[int], states: list[np.ndarray]) -> list[np.ndarray]:
    """Expert i's Q-values on task i's states."""
    out = []
    for sd, s in zip(experts, states, strict=True):
        net = batched(family, [sd], hidden)
        with torch.no_grad():
            out.append(net(torch.tensor(s).unsqueeze(0))[0].numpy())
    return out
