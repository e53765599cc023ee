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
slot. Collect uses it to train experts; meta-test uses it to fine-tune many (task, method, seed) slots,
with the fine-tuning levers of a :class:`~metadqn.config.FinetuneConfig` (start-policy acting, learning-rate
warm-up, an anchor to the frozen start, a protected replay partition, shrink-and-perturb). With every lever
off (the default) the loop is plain DQN, draw for draw.
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

from metadqn.config import DQNConfig, FinetuneConfig
from metadqn.dqn.levers import SlotLevers
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
    """Process-wide torch settings every training entry point wants. Thread counts are not among them: the
    stage process sets ``dqn.torch_threads`` at its start and a worker ``runner.threads`` (both from params,
    see :mod:`metadqn.determinism`).

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


def bellman_target(reward: torch.Tensor, terminated: torch.Tensor, q_next: torch.Tensor,
                   gamma: float) -> torch.Tensor:
    """The one-step target ``r + gamma * (1 - terminated) * q_next``, elementwise. ``q_next`` is the
    bootstrap value of s' (max, or the double-DQN choice); a truncated step has ``terminated = 0``, so it
    bootstraps. Every TD formula of the package uses this: the trainer's loss, the hypernet's TD loss and
    select's score."""
    return reward + gamma * (1.0 - terminated) * q_next


def td_loss(online: BatchedQNetwork, target: BatchedQNetwork, batch: ReplayBatch, gamma: float,
            double_dqn: bool, q_all: torch.Tensor | None = None) -> torch.Tensor:
    """Per-slot Huber TD loss, [K]; masked transitions (weight 0) do not count. ``q_all`` is
    ``online(batch.obs)`` when the caller already has it (the kl anchor needs it too)."""
    with torch.no_grad():
        q_next_target = target(batch.next_obs)
        if double_dqn:
            best = online(batch.next_obs).argmax(-1, keepdim=True)
            q_next = q_next_target.gather(-1, best).squeeze(-1)
        else:
            q_next = q_next_target.max(-1).values
        y = bellman_target(batch.rewards, batch.terminated, q_next, gamma)
    q_all = online(batch.obs) if q_all is None else q_all
    q = q_all.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
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
def update_target(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """Target network update: a copy (tau >= 1) or Polyak averaging ``target += tau * (online - target)``."""
    if tau >= 1.0:
        torch._foreach_copy_(list(target.parameters()), list(online.parameters()))
    else:
        torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


@dataclass
class Updater:
    """The learning half of DQN: online and target networks, Adam, and the fine-tuning levers that act on
    updates (warm-up, anchor, protected replay). One :meth:`burst` is ``gradient_steps`` TD updates."""

    cfg: DQNConfig
    levers: SlotLevers
    online: BatchedQNetwork
    target: BatchedQNetwork
    start: BatchedQNetwork | None
    """The frozen start (only kept when an anchor needs it)."""
    gen: torch.Generator
    optimizer: torch.optim.Optimizer = field(init=False)
    grad_steps: int = 0

    def __post_init__(self) -> None:
        self.params = list(self.online.parameters())
        self.optimizer = make_optimizer(self.params, self.cfg.learning_rate)

    def burst(self, replay: BatchedReplayBuffer, protected: BatchedReplayBuffer | None, steps: int,
              trained_steps: int) -> None:
        cfg, lv = self.cfg, self.levers
        lr = linear_learning_rate(cfg, steps) * lv.warmup(trained_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        w_anchor = lv.anchor_weights(steps) if self.start is not None else None
        for _ in range(cfg.gradient_steps):
            batch = lv.sample(replay, protected, cfg.batch_size, self.gen)
            q_all = self.online(batch.obs)
            loss = td_loss(self.online, self.target, batch, cfg.gamma, cfg.double_dqn, q_all)
            if w_anchor is not None:
                assert self.start is not None  # w_anchor is only set when there is a start
                loss = loss + w_anchor * lv.anchor_loss(self.online, self.start, batch, q_all)
            self.optimizer.zero_grad(set_to_none=False)
            loss.sum().backward()
            clip_grad_norm_per_slot(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            self.grad_steps += 1
            if self.grad_steps % cfg.target_update_interval == 0:
                update_target(self.target, self.online, cfg.tau)


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
    start_return: np.ndarray
    """Greedy evaluation of each slot's start network (``init``, before any shrink), on the start states of
    every evaluation: a network that never changes scores exactly this at each one (the frozen control)."""
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
    finetune: FinetuneConfig | Sequence[FinetuneConfig] | None = None,
) -> TrainResult:
    """Trains one DQN per row of ``tasks`` ([K, n_params] physics), all at once.

    ``tasks`` may also be [K, E, n_params]: slot k then steps E environments with their own physics
    (domain randomisation, as the multitask baseline does); E overrides ``cfg.envs_per_task`` and
    ``evaluate`` must be off (there is no single task to evaluate a slot on).

    ``init[k]`` is slot k's initial QNetwork state_dict (``None``: a fresh network from its own seed).
    ``prefill[k]`` are transitions already collected on slot k's task (meta-test: the task's context),
    written into its replay before the first step; they count towards ``learning_starts``.
    ``finetune`` holds the levers for starting from a given network (None: plain DQN), one config for every
    slot or one per slot (slots may differ only in the per-slot levers, see :mod:`metadqn.dqn.levers`).
    ``on_steps`` is called with the env steps per slot done since the last call (progress bars).
    Deterministic on CPU for a given ``seed``.
    """
    start = time.perf_counter()
    configure_torch()
    device = resolve_device(cfg.device)
    k, e = _slots(tasks, cfg, evaluate)
    levers = SlotLevers.build(finetune, k, device)
    env_seed, eval_seed, torch_seed, np_seed, slot_seeds = _run_seeds(seed, k)
    rng = np.random.default_rng(np_seed)
    gen = torch.Generator(device=device).manual_seed(torch_seed)

    nets = _Networks.build(family, cfg, k, device, init, slot_seeds, levers)
    online = nets.online
    updater = Updater(cfg, levers, online, nets.target, nets.start if levers.anchor != "none" else None, gen)
    collector = _Collector(family, tasks, k, e, device, env_seed, cfg.buffer_size, levers.protected_steps, prefill)
    evaluator = GreedyEvaluator(family, tasks, cfg.eval_episodes, eval_seed, device) if evaluate else None
    curves = _Curves(k, evaluator, online, nets.best, cfg.early_stop_return)
    curves.evaluate(0)
    start_return = curves.start_return(nets.start if nets.shrunk else None)

    learn_from = max(cfg.learning_starts - collector.prefilled, 0)
    train_due = 0
    next_eval = cfg.eval_interval
    steps = 0
    for _ in range(math.ceil(cfg.total_steps / e)):
        if curves.stopped:
            break
        eps = levers.epsilon(linear_epsilon(cfg, steps), e)
        collector.step(online, eps, rng, protect=steps < levers.protected_steps)
        steps += e
        if on_steps is not None:
            on_steps(e)

        if steps >= learn_from:
            train_due += e
            while train_due >= cfg.train_frequency:
                train_due -= cfg.train_frequency
                updater.burst(collector.replay, collector.protected, steps, steps - learn_from)

        if steps >= next_eval or steps >= cfg.total_steps:
            curves.evaluate(steps)
            next_eval += cfg.eval_interval

    return TrainResult(
        curves=pd.DataFrame(curves.rows, columns=["slot", "step", "eval_return"]),
        final_params=online.state_dicts(),
        best_params=nets.best.state_dicts() if evaluator is not None else online.state_dicts(),
        best_return=curves.best_return,
        best_step=curves.best_step,
        start_return=start_return,
        env_steps=steps,
        wall_s=time.perf_counter() - start,
        replay=[collector.replay.latest(slot, keep_replay) for slot in range(k)] if keep_replay else [],
    )


def start_returns(family: Family, tasks: np.ndarray, cfg: DQNConfig, seed: int,
                  init: Sequence[StateDict | None]) -> np.ndarray:
    """``train_dqn(family, tasks, cfg, seed, init=init).start_return`` without the training: the greedy
    evaluation of each slot's start, on the same start states (meta-test's frozen control of a method whose
    fine-tuning run is scratch's own, see :mod:`metadqn.evaluation.protocol`)."""
    configure_torch()
    device = resolve_device(cfg.device)
    k = int(tasks.shape[0])
    _, eval_seed, _, _, slot_seeds = _run_seeds(seed, k)
    nets = _Networks.build(family, cfg, k, device, init, slot_seeds, SlotLevers.build(None, k, device))
    with torch.no_grad():
        return GreedyEvaluator(family, tasks, cfg.eval_episodes, eval_seed, device)(nets.start.act)


def _run_seeds(seed: int, k: int) -> tuple[int, int, int, int, np.ndarray]:
    """A run's environment, evaluation, torch and numpy seeds, and its K slots' network seeds."""
    seeds = np.random.SeedSequence(seed).generate_state(4 + k)
    env_seed, eval_seed, torch_seed, np_seed = (int(s) for s in seeds[:4])
    return env_seed, eval_seed, torch_seed, np_seed, seeds[4:]


def _slots(tasks: np.ndarray, cfg: DQNConfig, evaluate: bool) -> tuple[int, int]:
    """(K slots, E environments per slot) of ``tasks``: [K, P] physics, or [K, E, P] per environment."""
    if tasks.ndim == 3:
        if evaluate:
            raise ValueError("per-environment tasks [K, E, P] need evaluate=False")
        return int(tasks.shape[0]), int(tasks.shape[1])
    return int(tasks.shape[0]), cfg.envs_per_task


@dataclass
class _Networks:
    """A run's networks: the frozen start, the online network (the start, shrunk if asked), its target,
    and the best checkpoint so far."""

    start: BatchedQNetwork
    online: BatchedQNetwork
    target: BatchedQNetwork
    best: BatchedQNetwork
    shrunk: bool

    @classmethod
    def build(cls, family: Family, cfg: DQNConfig, k: int, device: torch.device,
              init: Sequence[StateDict | None] | None, slot_seeds: np.ndarray, levers: SlotLevers) -> _Networks:
        def network() -> BatchedQNetwork:
            return BatchedQNetwork(k, family.obs_dim, family.n_actions, cfg.hidden_sizes).to(device)

        def fresh(s: np.uint32) -> StateDict:
            return init_state_dict(family.obs_dim, family.n_actions, cfg.hidden_sizes, int(s))

        init = list(init) if init is not None else [None] * k
        if len(init) != k:
            raise ValueError(f"got {len(init)} initial parameter sets for {k} tasks")
        start = network()
        start.load_slots([sd if sd is not None else fresh(s) for sd, s in zip(init, slot_seeds, strict=True)])
        online = network()
        online.load_state_dict(start.state_dict())
        shrunk = bool((levers.shrink < 1.0).any())
        if shrunk:  # shrink-and-perturb towards a fresh network of the slot's own seed
            noise = network()
            noise.load_slots([fresh(s) for s in slot_seeds])
            levers.shrink_towards(online, noise)
        target = network()
        target.load_state_dict(online.state_dict())
        best = network()
        best.load_state_dict(online.state_dict())
        return cls(start, online, target, best, shrunk)


class _Collector:
    """The acting half of DQN: the K x E environments, epsilon-greedy actions from the online network, and
    the replay buffer (plus the protected partition, when a lever keeps one) every transition goes to."""

    def __init__(self, family: Family, tasks: np.ndarray, k: int, e: int, device: torch.device, env_seed: int,
                 buffer_size: int, protected_steps: int, prefill: Sequence[dict[str, np.ndarray]] | None):
        self.k, self.e, self.device, self.n_actions = k, e, device, family.n_actions
        self.env = family.vector_env(tasks.reshape(k * e, -1), 1) if tasks.ndim == 3 else family.vector_env(tasks, e)
        obs_np, _ = self.env.reset(seed=env_seed)
        self.obs = torch.as_tensor(obs_np, device=device).view(k, e, -1)
        self.replay = BatchedReplayBuffer(k, buffer_size, family.obs_dim, e, device)
        self.protected = BatchedReplayBuffer(k, protected_steps, family.obs_dim, e, device) \
            if protected_steps > 0 else None
        self.prefilled = 0
        if prefill is not None:
            self.replay.extend(list(prefill))
            self.prefilled = len(prefill[0]["action"])
        self.tracker = EpisodeTracker(k, e)
        self.prev_done = np.zeros(k * e, dtype=bool)

    def _kt(self, x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.as_tensor(x, device=self.device).to(dtype).view(self.k, self.e)

    def step(self, online: BatchedQNetwork, eps: float | np.ndarray, rng: np.random.Generator,
             protect: bool) -> None:
        """One step of every environment; the transition goes to the replay (and to the protected
        partition while ``protect``). Rows after an episode's end (autoreset) are stored with weight 0."""
        greedy = online.act(self.obs).reshape(-1).cpu().numpy()
        actions = epsilon_greedy(greedy, eps, self.n_actions, rng)
        episode, step_idx = self.tracker.current()
        next_obs_np, reward, term, trunc, _ = self.env.step(actions)
        next_obs = torch.as_tensor(next_obs_np, device=self.device).view(self.k, self.e, -1)
        kt = self._kt
        row = (self.obs, kt(actions, torch.long), kt(reward), next_obs, kt(term), kt(trunc), kt(~self.prev_done),
               kt(episode, torch.long), kt(step_idx, torch.long))
        self.replay.add(*row)
        if self.protected is not None and protect:
            self.protected.add(*row)
        self.tracker.advance(self.prev_done)
        self.prev_done = term | trunc
        self.obs = next_obs


class _Curves:
    """Greedy evaluations of the online network: the learning curve, the best checkpoint, early stopping."""

    def __init__(self, k: int, evaluator: GreedyEvaluator | None, online: BatchedQNetwork, best: BatchedQNetwork,
                 early_stop_return: float | None):
        self.evaluator, self.online, self.best, self.early_stop = evaluator, online, best, early_stop_return
        self.rows: list[tuple[int, int, float]] = []
        self.best_return = np.full(k, -np.inf)
        self.best_step = np.zeros(k, dtype=np.int64)
        self.first = np.full(k, np.nan)
        self.stopped = False

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        if self.evaluator is None:
            return
        returns = self.evaluator(self.online.act)
        if not self.rows:
            self.first = returns.copy()
        self.rows.extend((slot, step, float(r)) for slot, r in enumerate(returns))
        improved = returns >= self.best_return
        if improved.any():
            for b, o in zip(self.best.parameters(), self.online.parameters(), strict=True):
                mask = torch.as_tensor(improved, device=o.device).view(-1, *([1] * (o.dim() - 1)))
                b.copy_(torch.where(mask, o, b))
            self.best_return[improved] = returns[improved]
            self.best_step[improved] = step
        if self.early_stop is not None and (self.best_return >= self.early_stop).all():
            self.stopped = True

    @torch.no_grad()
    def start_return(self, start: BatchedQNetwork | None) -> np.ndarray:
        """The start network's evaluation: the step-0 one, unless the online network no longer is the start."""
        if self.evaluator is None:
            return np.full(len(self.best_return), np.nan)
        return self.first.copy() if start is None else self.evaluator(start.act)

