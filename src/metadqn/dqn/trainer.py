"""The batched multi-task DQN trainer: K independent DQN runs ("slots") trained as one module.

Each slot has its own task, its own ``envs_per_task`` environments, its own replay buffer, its own
Q-network and target network, its own Adam state and its own gradient clip; they share only the loop.
Adam is elementwise and the loss is a sum of per-slot losses, so slot k's updates are exactly those of a
lone DQN run on its task. The loop reads top to bottom like CleanRL's ``dqn.py``:

    act (epsilon-greedy) -> step all envs -> store -> [every train_frequency steps: gradient_steps TD
    updates, target update every target_update_interval of them] -> [every eval_interval: greedy eval,
    keep each slot's best checkpoint]

API: ``train_dqn(family, tasks, cfg, seed, init=...)`` takes one row of physics parameters and optionally
one initial ``QNetwork`` state_dict per slot, and returns learning curves and final and best parameters per
slot. Collect uses it to train experts; meta-test uses it to fine-tune many (task, method, seed) slots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from metadqn.config import DQNConfig
from metadqn.dqn.qnetwork import BatchedQNetwork, StateDict, init_state_dict
from metadqn.dqn.replay import BatchedReplayBuffer, ReplayBatch
from metadqn.dqn.rollout import EpisodeTracker, GreedyEvaluator, epsilon_greedy
from metadqn.envs.families import Family


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("dqn.device is 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(device)


def configure_torch() -> None:
    """Process-wide torch settings every training entry point wants.

    Adam's second moments of tiny gradients underflow into denormals, which x86 CPUs process ~10x slower
    (measured: fused Adam 1.1 -> 0.13 ms per step at K=56); flushing them to zero changes no result that
    matters and keeps runs deterministic.
    """
    torch.set_flush_denormal(True)


def linear_epsilon(cfg: DQNConfig, step: int) -> float:
    """Linear decay from epsilon_start to epsilon_end over exploration_fraction * total_steps."""
    horizon = cfg.exploration_fraction * cfg.total_steps
    if horizon <= 0:
        return cfg.epsilon_end
    frac = min(step / horizon, 1.0)
    return cfg.epsilon_start + frac * (cfg.epsilon_end - cfg.epsilon_start)


def linear_learning_rate(cfg: DQNConfig, step: int) -> float:
    if cfg.learning_rate_end is None:
        return cfg.learning_rate
    frac = min(step / cfg.total_steps, 1.0)
    return cfg.learning_rate + frac * (cfg.learning_rate_end - cfg.learning_rate)


def td_loss(online: BatchedQNetwork, target: BatchedQNetwork, batch: ReplayBatch, gamma: float,
            double_dqn: bool) -> torch.Tensor:
    """Per-slot Huber TD loss, [K]; masked transitions (weight 0) do not count."""
    with torch.no_grad():
        q_next_target = target(batch.next_obs)
        if double_dqn:
            best = online(batch.next_obs).argmax(-1, keepdim=True)
            q_next = q_next_target.gather(-1, best).squeeze(-1)
        else:
            q_next = q_next_target.max(-1).values
        y = batch.rewards + gamma * (1.0 - batch.terminated) * q_next
    q = online(batch.obs).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
    per = F.smooth_l1_loss(q, y, reduction="none") * batch.weights
    return per.sum(1) / batch.weights.sum(1).clamp(min=1.0)


@torch.no_grad()
def clip_grad_norm_per_slot(params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clips each slot's gradient to ``max_norm`` separately (a lone run's ``clip_grad_norm_``)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]).norm(dim=0)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    if bool((coef < 1.0).any()):  # most steps clip nothing; skip the extra pass over the gradients
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return norms


def make_optimizer(params: Sequence[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam; the fused kernel where this torch build has it (one pass over memory instead of ~10)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True)


@torch.no_grad()
def update_target(target: BatchedQNetwork, online: BatchedQNetwork, tau: float) -> None:
    if tau >= 1.0:
        torch._foreach_copy_(list(target.parameters()), list(online.parameters()))
    else:
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


@dataclass
class TrainResult:
    """What one batched run returns, per slot."""

    curves: pd.DataFrame
    """Columns slot, step, eval_return: greedy evaluations (step 0 is the initial network)."""
    final_params: list[StateDict]
    best_params: list[StateDict]
    """The checkpoint with the highest greedy evaluation (latest on ties)."""
    best_return: np.ndarray
    best_step: np.ndarray
    env_steps: int
    """Environment steps per slot (all slots step in lockstep)."""
    wall_s: float
    replay: list[dict[str, np.ndarray]] = field(default_factory=list)
    """Each slot's last ``keep_replay`` real transitions (only if asked for)."""


def train_dqn(
    family: Family,
    tasks: np.ndarray,
    cfg: DQNConfig,
    seed: int,
    init: Sequence[StateDict | None] | None = None,
    keep_replay: int = 0,
    prefill: Sequence[dict[str, np.ndarray]] | None = None,
    evaluate: bool = True,
    on_steps: Callable[[int], None] | None = None,
) -> TrainResult:
    """Trains one DQN per row of ``tasks`` ([K, n_params] physics), all at once.

    ``tasks`` may also be [K, E, n_params]: slot k then steps E environments with their own physics
    (domain randomisation, as the multitask baseline does); E overrides ``cfg.envs_per_task`` and
    ``evaluate`` must be off (there is no single task to evaluate a slot on).

    ``init[k]`` is slot k's initial QNetwork state_dict (``None``: a fresh network from its own seed).
    ``prefill[k]`` are transitions already collected on slot k's task (meta-test: the task's context),
    written into its replay before the first step; they count towards ``learning_starts``.
    ``on_steps`` is called with the env steps per slot done since the last call (progress bars).
    Deterministic on CPU for a given ``seed``.
    """
    start = time.perf_counter()
    configure_torch()
    device = resolve_device(cfg.device)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    if tasks.ndim == 3:
        if evaluate:
            raise ValueError("per-environment tasks [K, E, P] need evaluate=False")
        k, e = int(tasks.shape[0]), int(tasks.shape[1])
    else:
        k, e = int(tasks.shape[0]), cfg.envs_per_task
    seeds = np.random.SeedSequence(seed).generate_state(4 + k)
    env_seed, eval_seed, torch_seed, np_seed = (int(s) for s in seeds[:4])
    rng = np.random.default_rng(np_seed)
    gen = torch.Generator(device=device).manual_seed(torch_seed)

    online = BatchedQNetwork(k, family.obs_dim, family.n_actions, cfg.hidden_sizes).to(device)
    init = list(init) if init is not None else [None] * k
    if len(init) != k:
        raise ValueError(f"got {len(init)} initial parameter sets for {k} tasks")
    online.load_slots([
        sd if sd is not None else init_state_dict(family.obs_dim, family.n_actions, cfg.hidden_sizes, int(s))
        for sd, s in zip(init, seeds[4:], strict=True)
    ])
    target = BatchedQNetwork(k, family.obs_dim, family.n_actions, cfg.hidden_sizes).to(device)
    target.load_state_dict(online.state_dict())
    best = BatchedQNetwork(k, family.obs_dim, family.n_actions, cfg.hidden_sizes).to(device)
    best.load_state_dict(online.state_dict())
    params = list(online.parameters())
    optimizer = make_optimizer(params, cfg.learning_rate)

    env = family.vector_env(tasks.reshape(k * e, -1), 1) if tasks.ndim == 3 else family.vector_env(tasks, e)
    obs_np, _ = env.reset(seed=env_seed)
    obs = torch.as_tensor(obs_np, device=device).view(k, e, -1)
    replay = BatchedReplayBuffer(k, cfg.buffer_size, family.obs_dim, e, device)
    prefilled = 0
    if prefill is not None:
        replay.extend(list(prefill))
        prefilled = len(prefill[0]["action"])
    tracker = EpisodeTracker(k, e)
    prev_done = np.zeros(k * e, dtype=bool)
    evaluator = GreedyEvaluator(family, tasks, cfg.eval_episodes, eval_seed, device) if evaluate else None

    def policy(o: torch.Tensor) -> torch.Tensor:
        return online(o).argmax(-1)

    curves: list[tuple[int, int, float]] = []
    best_return = np.full(k, -np.inf)
    best_step = np.zeros(k, dtype=np.int64)
    stopped = False

    def run_eval(step: int) -> None:
        nonlocal stopped
        if evaluator is None:
            return
        with torch.no_grad():
            returns = evaluator(policy)
        curves.extend((slot, step, float(r)) for slot, r in enumerate(returns))
        improved = returns >= best_return
        if improved.any():
            mask = torch.as_tensor(improved, device=device)
            with torch.no_grad():
                for b, o in zip(best.parameters(), online.parameters(), strict=True):
                    b.copy_(torch.where(mask.view(-1, *([1] * (o.dim() - 1))), o, b))
            best_return[improved] = returns[improved]
            best_step[improved] = step
        if cfg.early_stop_return is not None and (best_return >= cfg.early_stop_return).all():
            stopped = True

    run_eval(0)
    n_iter = math.ceil(cfg.total_steps / e)
    train_due = 0
    grad_steps = 0
    next_eval = cfg.eval_interval
    steps = 0
    for _ in range(n_iter):
        if stopped:
            break
        eps = linear_epsilon(cfg, steps)
        with torch.no_grad():
            greedy = policy(obs).reshape(-1).cpu().numpy()
        actions = epsilon_greedy(greedy, eps, family.n_actions, rng)
        episode, step_idx = tracker.current()
        next_obs_np, reward, term, trunc, _ = env.step(actions)
        next_obs = torch.as_tensor(next_obs_np, device=device).view(k, e, -1)

        def kt(x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.as_tensor(x, device=device).to(dtype).view(k, e)

        replay.add(obs, kt(actions, torch.long), kt(reward), next_obs, kt(term), kt(trunc), kt(~prev_done),
                   kt(episode, torch.long), kt(step_idx, torch.long))
        tracker.advance(prev_done)
        prev_done = term | trunc
        obs = next_obs
        steps += e
        if on_steps is not None:
            on_steps(e)

        if steps + prefilled >= cfg.learning_starts:
            train_due += e
            while train_due >= cfg.train_frequency:
                train_due -= cfg.train_frequency
                for group in optimizer.param_groups:
                    group["lr"] = linear_learning_rate(cfg, steps)
                for _ in range(cfg.gradient_steps):
                    batch = replay.sample(cfg.batch_size, gen)
                    loss = td_loss(online, target, batch, cfg.gamma, cfg.double_dqn).sum()
                    optimizer.zero_grad(set_to_none=False)
                    loss.backward()
                    clip_grad_norm_per_slot(params, cfg.max_grad_norm)
                    optimizer.step()
                    grad_steps += 1
                    if grad_steps % cfg.target_update_interval == 0:
                        update_target(target, online, cfg.tau)

        if steps >= next_eval or steps >= cfg.total_steps:
            run_eval(steps)
            next_eval += cfg.eval_interval

    return TrainResult(
        curves=pd.DataFrame(curves, columns=["slot", "step", "eval_return"]),
        final_params=online.state_dicts(),
        best_params=best.state_dicts() if evaluator is not None else online.state_dicts(),
        best_return=best_return,
        best_step=best_step,
        env_steps=steps,
        wall_s=time.perf_counter() - start,
        replay=[replay.latest(slot, keep_replay) for slot in range(k)] if keep_replay else [],
    )
