"""Running policies on many tasks at once: greedy evaluation and transition collection.

All vector envs here are task-major (env i belongs to task i // E) and use gymnasium's NEXT_STEP
autoreset: the step after an episode ends is a reset step, whose transition is not real.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from metadqn.envs.families import Family

Policy = Callable[[Tensor], Tensor]
"""Greedy actions for observations shaped [K, E, obs_dim] -> [K, E]."""


class EpisodeTracker:
    """Episode ids (counted per task) and in-episode step indices for every env of a vector env."""

    def __init__(self, n_tasks: int, envs_per_task: int):
        self.k, self.e = n_tasks, envs_per_task
        self.episode = np.tile(np.arange(envs_per_task, dtype=np.int64), n_tasks)
        self.next_episode = np.full(n_tasks, envs_per_task, dtype=np.int64)
        self.step = np.zeros(n_tasks * envs_per_task, dtype=np.int64)

    def current(self) -> tuple[np.ndarray, np.ndarray]:
        return self.episode.copy(), self.step.copy()

    def advance(self, reset_mask: np.ndarray) -> None:
        """Call after each vector step with the envs that were reset by it (the previous step's done)."""
        self.step += 1
        if reset_mask.any():
            m = reset_mask.reshape(self.k, self.e)
            new_ids = self.next_episode[:, None] + np.cumsum(m, axis=1) - 1
            self.episode = np.where(m, new_ids, self.episode.reshape(self.k, self.e)).reshape(-1)
            self.next_episode += m.sum(axis=1)
            self.step[reset_mask] = 0


def epsilon_greedy(greedy: np.ndarray, epsilon: float | np.ndarray, n_actions: int,
                   rng: np.random.Generator) -> np.ndarray:
    explore = rng.random(greedy.shape[0]) < epsilon
    return np.where(explore, rng.integers(0, n_actions, size=greedy.shape[0]), greedy)


def uniform_policy(n_actions: int, seed: int) -> Policy:
    """The uniform-random policy as a :data:`Policy` (its own seeded generator: the same actions per seed)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda obs: torch.randint(n_actions, obs.shape[:-1], generator=gen)


class GreedyEvaluator:
    """Mean greedy return per task over ``episodes`` episodes; the same start states at every call.

    Keeping the start states fixed (one seed) makes successive evaluations of a learning curve differ
    only by the policy, which is what checkpoint selection compares.
    """

    def __init__(self, family: Family, tasks: np.ndarray, episodes: int, seed: int,
                 device: torch.device | str = "cpu"):
        self.family, self.k, self.episodes, self.seed = family, tasks.shape[0], episodes, seed
        self.env = family.vector_env(tasks, episodes)
        self.device = torch.device(device)

    def __call__(self, policy: Policy) -> np.ndarray:
        return self.returns(policy).mean(axis=1)

    def returns(self, policy: Policy) -> np.ndarray:
        """[K, episodes] undiscounted returns."""
        obs, _ = self.env.reset(seed=self.seed)
        n = obs.shape[0]
        total = np.zeros(n)
        done = np.zeros(n, dtype=bool)
        for _ in range(self.family.max_episode_steps + 1):
            o = torch.as_tensor(obs, device=self.device).view(self.k, self.episodes, -1)
            actions = policy(o).reshape(-1).cpu().numpy()
            obs, reward, term, trunc, _ = self.env.step(actions)
            total += np.where(done, 0.0, reward)
            done |= term | trunc
            if done.all():
                break
        return total.reshape(self.k, self.episodes)


def collect_transitions(family: Family, tasks: np.ndarray, steps_per_task: int, envs_per_task: int,
                        seed: int, policy: Policy | None = None, epsilon: float = 1.0,
                        device: torch.device | str = "cpu") -> list[dict[str, np.ndarray]]:
    """Runs ``policy`` epsilon-greedily (``None``: uniform random) and returns each task's real transitions.

    Each task gets ``steps_per_task`` vector steps' worth of transitions (autoreset steps dropped, so
    slightly fewer), with per-task episode ids and in-episode step indices.
    """
    k, e = tasks.shape[0], envs_per_task
    env = family.vector_env(tasks, e)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=int(rng.integers(2**31)))
    tracker = EpisodeTracker(k, e)
    prev_done = np.zeros(k * e, dtype=bool)
    keys = ("obs", "action", "reward", "next_obs", "terminated", "truncated", "episode", "step", "valid")
    chunks: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    n_iter = -(-steps_per_task // e)
    for _ in range(n_iter):
        if policy is None:
            greedy = rng.integers(0, family.n_actions, size=k * e)
        else:
            o = torch.as_tensor(obs, device=torch.device(device)).view(k, e, -1)
            greedy = policy(o).reshape(-1).cpu().numpy()
        actions = epsilon_greedy(greedy, epsilon, family.n_actions, rng) if policy is not None else greedy
        episode, step = tracker.current()
        next_obs, reward, term, trunc, _ = env.step(actions)
        for key, val in zip(keys, (obs, actions, reward, next_obs, term, trunc, episode, step, ~prev_done),
                            strict=True):
            chunks[key].append(np.asarray(val).reshape(k, e, *np.shape(val)[1:]))
        tracker.advance(prev_done)
        prev_done = term | trunc
        obs = next_obs
    stacked = {key: np.stack(v, axis=1).reshape(k, n_iter * e, *v[0].shape[2:]) for key, v in chunks.items()}
    out = []
    for slot in range(k):
        keep = stacked["valid"][slot]
        out.append({key: stacked[key][slot][keep] for key in keys if key != "valid"})
    return out
