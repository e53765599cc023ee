"""Model-based meta-learner: a context encoder and a hypernetwork that generates a task's Q-network.

``QNetwork.load_state_dict(model.generate(context))`` works: the hypernetwork outputs every parameter of
the same ``QNetwork`` DQN uses. It starts out generating a sensible base network for every context
(Bias-HyperInit, Beck et al. 2022: output-layer weights zero, output bias = a normally initialised
QNetwork), and is trained offline on the training tasks with three losses through the generated
parameters:

* policy distillation, KL(softmax(Q_teacher / T) || softmax(Q_gen / T)) (Rusu et al. 2016): action-aware,
  which a plain Q-value MSE is not (CartPole experts' Q-values sit around 67 with action gaps ~0.07);
* a small Huber loss to the teacher's Q-values, so generated networks keep a scale DQN can fine-tune;
* a TD loss on the task's transitions with targets from a slowly updated (Polyak) copy.

Each training task's *teacher* is an expert that solves it (:func:`teacher_indices`: its own, or a broad
one, ``hypernet.teacher``). Distillation states are the task's own expert's rollouts, the end of its
replay buffer, and DAgger states: the generated policies are rolled out on the training tasks every
``dagger_interval`` steps and the states they visit are labelled by the task's teacher. Checkpoints are
selected by zero-shot return on the validation tasks; several seeds are trained and the best kept.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metadqn.config import HypernetConfig
from metadqn.dqn.qnetwork import (
    BatchedQNetwork,
    StateDict,
    flatten_state_dict,
    functional_q,
    init_state_dict,
    n_params,
    param_shapes,
    unflatten_state_dict,
)
from metadqn.dqn.trainer import bellman_target, update_target
from metadqn.meta.context import ContextEncoder, build_encoder
from metadqn.seeding import Salt, derive_seed

if TYPE_CHECKING:  # annotations only; fit_hypernet imports metadqn.meta.dataset lazily, as before
    from metadqn.envs.families import Family
    from metadqn.meta.dataset import Transitions

log = logging.getLogger("metadqn.meta.hypernet")


class HyperQ(nn.Module):
    """Encoder + hypernetwork: task input (context [T, C, F] or physics [T, P]) -> flat QNetwork params."""

    value_offset: Tensor  # a buffer (register_buffer), declared for the type checker

    def __init__(self, encoder: ContextEncoder, embed_dim: int, hidden: int, obs_dim: int, n_actions: int,
                 q_hidden: Sequence[int], base_seed: int):
        super().__init__()
        self.encoder = encoder
        self.shapes = param_shapes(obs_dim, n_actions, q_hidden)
        self.trunk = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_params(obs_dim, n_actions, q_hidden))
        base = flatten_state_dict(init_state_dict(obs_dim, n_actions, q_hidden, base_seed), self.shapes)
        with torch.no_grad():  # Bias-HyperInit
            self.head.weight.zero_()
            self.head.bias.copy_(base)
        self.n_actions = n_actions
        # Added to every generated network's output-layer bias: shifts all Q-values equally, so the policy
        # (and the distillation KL) is unchanged, but the Q-values start on the experts' scale, which keeps
        # DQN fine-tuning from wrecking the policy while it lifts them. Zero while training; set by
        # calibrate_value_offset at the end.
        self.register_buffer("value_offset", torch.zeros(()))

    def set_gate(self, points: Tensor) -> None:
        """Switches the out-of-range gate on: ``points`` [N, E] are the training tasks' embeddings; a task
        whose embedding is farther from all of them than any of them is from the others gets the nearest
        one's embedding instead (its generated network is then that training task's). The diagnosis found
        that out of range the embedding leaves the training region and the generator, fed an input it never
        saw, fails, while the nearest training task's start transfers (``ret_gen_nn``)."""
        d = torch.cdist(points, points)
        d.fill_diagonal_(float("inf"))
        self.register_buffer("gate_points", points.detach().clone())
        self.register_buffer("gate_radius", d.min(1).values.max().detach().clone())

    def gate_off(self) -> None:
        for name in ("gate_points", "gate_radius"):
            if name in self._buffers:
                del self._buffers[name]

    def embed(self, task_input: Tensor) -> tuple[Tensor, Tensor]:
        """(embedding [T, E], gated [T] bool): the encoder's output, gated when the gate is on."""
        emb = self.encoder(task_input)
        points, radius = self._buffers.get("gate_points"), self._buffers.get("gate_radius")
        if points is None or radius is None:
            return emb, torch.zeros(len(emb), dtype=torch.bool)
        dist, nearest = torch.cdist(emb, points).min(1)
        gated = dist > radius
        return torch.where(gated.unsqueeze(1), points[nearest], emb), gated

    def forward(self, task_input: Tensor) -> Tensor:
        flat = self.head(self.trunk(self.embed(task_input)[0]))
        if self.value_offset.item() != 0.0:
            flat = torch.cat([flat[:, :-self.n_actions], flat[:, -self.n_actions:] + self.value_offset], dim=1)
        return flat

    def q_values(self, flat: Tensor, obs: Tensor) -> Tensor:
        return functional_q(flat, obs, self.shapes)

    @torch.no_grad()
    def generate(self, task_input: Tensor) -> list[StateDict]:
        """One ordinary QNetwork state_dict per task."""
        flat = self(task_input)
        return [{k: v.clone() for k, v in unflatten_state_dict(row, self.shapes).items()} for row in flat]


def hypernet_name(oracle: bool) -> str:
    """The learner's name: ``hypernet-oracle`` is fed the physics, ``hypernet`` a context."""
    return "hypernet-oracle" if oracle else "hypernet"


@dataclass
class StatePool:
    """Per-task distillation states with their expert Q-values, padded to [T, N, ...]."""

    obs: Tensor
    q: Tensor
    count: Tensor

    @classmethod
    def from_lists(cls, obs: Sequence[np.ndarray], q: Sequence[np.ndarray], capacity: int) -> StatePool:
        t, d, a = len(obs), obs[0].shape[1], q[0].shape[1]
        pool = cls(torch.zeros(t, capacity, d), torch.zeros(t, capacity, a), torch.zeros(t, dtype=torch.long))
        for i in range(t):
            pool.replace(i, obs[i][-capacity:], q[i][-capacity:])
        return pool

    def replace(self, i: int, obs: np.ndarray, q: np.ndarray) -> None:
        n = len(obs)
        self.obs[i, :n] = torch.tensor(obs)
        self.q[i, :n] = torch.as_tensor(q)
        self.count[i] = n

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        u = torch.rand(self.count.shape[0], n, generator=gen)
        idx = (u * self.count.unsqueeze(1)).long()
        k = torch.arange(self.count.shape[0]).unsqueeze(1)
        return self.obs[k, idx], self.q[k, idx]


@torch.no_grad()
def calibrate_value_offset(model: HyperQ, task_input: Tensor, obs: Tensor, q_expert: Tensor) -> float:
    """Sets the offset to the mean gap between the experts' and the generated networks' value level."""
    model.value_offset.zero_()
    gap = (q_expert.mean(-1) - model.q_values(model(task_input), obs).mean(-1)).mean()
    model.value_offset.fill_(float(gap))
    return float(gap)


def distillation_losses(model: HyperQ, flat: Tensor, obs: Tensor, q_expert: Tensor,
                        cfg: HypernetConfig) -> tuple[Tensor, Tensor]:
    """(KL policy distillation, Huber to the expert's Q-values) averaged over tasks and states.

    The Huber weight must stay small: at weight 1 (on the values, or on their mean over actions) the
    generated Q-values chase the experts' level (~100) and the KL on action gaps of ~0.07 falls apart
    (validation zero-shot 0.02 instead of 0.95 in our runs).
    """
    q_gen = model.q_values(flat, obs)
    t = cfg.kl_temperature
    kl = F.kl_div(F.log_softmax(q_gen / t, -1), F.log_softmax(q_expert / t, -1), log_target=True,
                  reduction="none").sum(-1).mean()
    return kl, F.smooth_l1_loss(q_gen, q_expert)


def td_loss_generated(model: HyperQ, target: HyperQ, flat: Tensor, target_input: Tensor, batch: Sequence[Tensor],
                      gamma: float) -> Tensor:
    """Huber TD loss of the generated networks on transitions [T, B, ...] (targets from ``target``)."""
    obs, actions, rewards, next_obs, terminated = batch
    with torch.no_grad():
        target_flat = target(target_input)
        q_next = target.q_values(target_flat, next_obs).max(-1).values
        y = bellman_target(rewards, terminated, q_next, gamma)
    q = model.q_values(flat, obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return F.smooth_l1_loss(q, y)


def clone_frozen(model: HyperQ) -> HyperQ:
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@dataclass
class FitResult:
    model: nn.Module
    val_score: float
    """Zero-shot normalised validation return of the kept checkpoint (it selected the checkpoint)."""
    curves: list[tuple[str, int, float]]
    """(metric, step, value) of training: losses and validation scores, for MLflow step metrics."""
    seed_scores: list[float]
    gate: dict[str, float] = field(default_factory=dict)
    """Whether the out-of-range gate is on, and the validation figures that decided it."""


def _train_step(model: HyperQ, target: HyperQ, opt: torch.optim.Optimizer, x: Tensor, base: StatePool,
                dagger: StatePool | None, transitions: Transitions, cfg: HypernetConfig, gamma: float,
                gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """One update of the hypernetwork: distillation on expert-labelled states (half from the DAgger pool
    once there is one), plus the TD loss of the generated networks on real transitions; returns the
    (kl, q_huber, td) losses."""
    flat = model(x)
    if dagger is not None:
        half = cfg.batch_states // 2
        o1, q1 = base.sample(cfg.batch_states - half, gen)
        o2, q2 = dagger.sample(half, gen)
        obs, q = torch.cat([o1, o2], 1), torch.cat([q1, q2], 1)
    else:
        obs, q = base.sample(cfg.batch_states, gen)
    kl, qh = distillation_losses(model, flat, obs, q, cfg)
    loss = cfg.kl_weight * kl + cfg.q_weight * qh
    td = torch.zeros(())
    if cfg.td_weight > 0:
        td = td_loss_generated(model, target, flat, x, transitions.sample(cfg.batch_transitions, gen), gamma)
        loss = loss + cfg.td_weight * td
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    opt.step()
    update_target(target, model, cfg.target_tau)
    return kl, qh, td


def _dagger_pool(family: Family, tasks: np.ndarray, policy_net: BatchedQNetwork, experts_net: BatchedQNetwork,
                 dagger_obs: list[np.ndarray], cfg: HypernetConfig, seed: int) -> tuple[list[np.ndarray], StatePool]:
    """DAgger: the states the generated networks visit (epsilon-greedy rollouts on the training tasks),
    appended to each task's pool (the latest ``dagger_capacity`` kept) and labelled by the task's expert."""
    from metadqn.dqn.rollout import collect_transitions

    with torch.no_grad():
        rolls = collect_transitions(family, tasks, cfg.dagger_steps, 2, seed, policy=policy_net.act,
                                    epsilon=cfg.dagger_epsilon)
    dagger_obs = [np.concatenate([d, r["obs"]])[-cfg.dagger_capacity:] for d, r in zip(dagger_obs, rolls, strict=True)]
    n = max(len(d) for d in dagger_obs)
    padded = torch.zeros(len(dagger_obs), n, family.obs_dim)
    for i, d in enumerate(dagger_obs):
        padded[i, :len(d)] = torch.as_tensor(d)
    with torch.no_grad():
        labels = experts_net(padded).numpy()
    pool = StatePool.from_lists(dagger_obs, [labels[i, :len(d)] for i, d in enumerate(dagger_obs)],
                                cfg.dagger_capacity)
    return dagger_obs, pool


@dataclass
class SeedFit:
    """One seed's training (:func:`fit_hypernet_seed`): its best checkpoint on validation zero-shot."""

    seed: int
    """The seed's index (0 .. n_seeds - 1)."""
    score: float
    """Its best validation zero-shot score (-inf if every evaluation was NaN)."""
    state: dict[str, Tensor] | None
    """The state_dict of its first checkpoint at that score (None if there is none)."""
    curves: list[tuple[str, int, float]]
    wall_s: float = 0.0


def n_seeds(cfg: HypernetConfig, oracle: bool) -> int:
    """How many independent seeds a hypernet trains (the oracle has its own count)."""
    return cfg.oracle_seeds if oracle else cfg.n_seeds


def teacher_indices(cfg: HypernetConfig, scores: np.ndarray | None, splits: Sequence[str]) -> list[int]:
    """The expert (its training-task index) whose Q-values teach each training task's generated network.

    ``scores``: the normalised cross-evaluation matrix, expert i (a training task's) on task j, whose
    columns are the tasks of ``splits`` (``train`` first, then the validation splits). ``hypernet.teacher:
    own``: each task's own expert. ``robust``: among the experts whose score on training task j is within
    ``teacher_tolerance`` of the best expert's, the broadest: the highest mean score over every task, each
    split weighing the same (ties: the task's own expert, then the lowest index). Why: out of range even the
    physically nearest training task's own expert transfers poorly, while retrieval by how experts transfer
    (siamese) does well (README, the diagnosis); experts differ widely in how far they transfer, and a
    generator that maps many tasks to a few broad teachers has less to extrapolate. The out-of-range
    validation tasks weigh as much as the training tasks because every training expert is near-perfect on
    most training tasks, so they are what tells the broad experts apart. ``local``: the same, but the mean
    over each split weights task k by task j's own expert's score on it (clipped to [0, 1]): broad among the
    tasks like j, not across the family. Why: with tasks of two kinds (mirrored CartPole's push directions),
    an expert that half-solves the other kind is broad across the family but no better a teacher for j,
    whose generated network only has to stand in for tasks of j's kind (README, "Teachers"). Every teacher
    still solves its task (on the cross-evaluation's episodes)."""
    split = np.asarray(splits)
    n_train = int((split == "train").sum())
    if cfg.teacher == "own":
        return list(range(n_train))
    if scores is None or scores.shape != (n_train, len(split)) or (split[:n_train] != "train").any():
        raise ValueError(f"hypernet.teacher {cfg.teacher} needs the cross-evaluation scores of the {n_train} training "
                         f"experts on the {len(split)} tasks, training tasks first")
    picks = []
    for j in range(n_train):
        breadth = _breadth(scores, split, np.clip(scores[j], 0.0, 1.0) if cfg.teacher == "local" else None)
        able = np.flatnonzero(scores[:, j] >= scores[:, j].max() - cfg.teacher_tolerance)
        broadest = able[breadth[able] >= breadth[able].max() - 1e-12]
        picks.append(j if j in broadest else int(broadest[0]))
    return picks


def _breadth(scores: np.ndarray, split: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """Each expert's mean score over the tasks, each split weighing the same; ``weight`` [tasks]: a weighted
    mean within each split (splits of zero weight left out; all zero, as for an expert that fails even its
    own task: unweighted)."""
    w = np.ones(split.shape) if weight is None or not weight.any() else weight
    parts = [scores[:, split == name] @ w[split == name] / w[split == name].sum()
             for name in dict.fromkeys(split.tolist()) if w[split == name].sum() > 0]
    return np.mean(parts, axis=0)


def _teacher_states(data, teachers: Sequence[int] | None) -> list[StateDict]:
    """The teaching experts' state_dicts, one per training task (None: each task's own expert)."""
    return list(data.experts) if teachers is None else [data.experts[j] for j in teachers]


def _base_pool(data, hidden: list[int], teachers: Sequence[int] | None) -> StatePool:
    """Each training task's distillation states (its own expert's rollouts and replay) with its teacher's
    Q-values."""
    from metadqn.meta.dataset import expert_q

    base_q = expert_q(data.family, _teacher_states(data, teachers), hidden, data.states)
    return StatePool.from_lists(data.states, base_q, max(len(s) for s in data.states))


def fit_hypernet_seed(data, params, oracle: bool, s: int, teachers: Sequence[int] | None = None) -> SeedFit:
    """Trains the hypernetwork of seed ``s``; keeps its best checkpoint on validation zero-shot.

    Seeds are independent (each starts from its own torch seed and generator) and train on one thread
    (:func:`metadqn.determinism.one_thread`), so they may train in any order, in this process or in
    workers: :func:`combine_seeds` gives the same model either way."""
    from metadqn.determinism import one_thread

    with one_thread():
        return _fit_seed(data, params, oracle, s, teachers)


def _fit_seed(data, params, oracle: bool, s: int, teachers: Sequence[int] | None) -> SeedFit:
    import time

    from metadqn.dqn.trainer import configure_torch, make_optimizer
    from metadqn.meta.dataset import batched, greedy_returns

    start = time.perf_counter()
    mt, cfg, dqn, family = params.meta_train, params.meta_train.hypernet, params.dqn, data.family
    configure_torch()
    hidden = dqn.hidden_sizes
    base = _base_pool(data, hidden, teachers)
    experts_net = batched(family, _teacher_states(data, teachers), hidden)  # labels the DAgger states
    name = hypernet_name(oracle)
    curves: list[tuple[str, int, float]] = []
    val_input = data.val.physics if oracle else data.val.contexts.first()

    seed = derive_seed(mt.seed, s, int(oracle))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    encoder = build_encoder("oracle" if oracle else mt.encoder, family, mt.encoder_hidden, mt.embed_dim,
                            "hypernet" in mt.action_effect, int(data.train.physics.shape[1]))
    if not oracle:
        encoder.fit(data.train.contexts)
    model = HyperQ(encoder, mt.embed_dim, cfg.hidden, family.obs_dim, family.n_actions, hidden, seed)
    target = clone_frozen(model)
    opt = make_optimizer(list(model.parameters()), cfg.learning_rate)
    dagger_obs: list[np.ndarray] = [np.zeros((0, family.obs_dim), np.float32) for _ in data.experts]
    dagger: StatePool | None = None
    best: tuple[float, dict[str, Tensor] | None] = (-np.inf, None)

    def task_input() -> Tensor:
        return data.train.physics if oracle else data.train.contexts.sample(gen)

    for it in range(1, cfg.iterations + 1):
        kl, qh, td = _train_step(model, target, opt, task_input(), base, dagger, data.transitions, cfg,
                                 dqn.gamma, gen)
        if it % 50 == 0:
            curves += [(f"{name}/seed{s}/kl", it, kl.item()), (f"{name}/seed{s}/q_huber", it, qh.item()),
                       (f"{name}/seed{s}/td", it, td.item())]

        if cfg.dagger_steps and it % cfg.dagger_interval == 0:
            gen_net = batched(family, model.generate(task_input()), hidden)
            dagger_obs, dagger = _dagger_pool(family, data.train.matrix, gen_net, experts_net, dagger_obs, cfg,
                                              int(rng.integers(2**31)))

        if it % cfg.eval_interval == 0 or it == cfg.iterations:
            returns = greedy_returns(family, data.val.matrix, model.generate(val_input), hidden,
                                     mt.eval_episodes, seed)
            score = data.val.balanced_mean(data.val.scale(returns))
            curves.append((f"{name}/seed{s}/val_zero_shot_normalized", it, score))
            if score > best[0]:  # the first checkpoint at the best score (NaN never wins)
                best = (score, copy.deepcopy(model.state_dict()))
            log.info("%s seed %d step %d: kl %.4f q %.3f td %.3f val zero-shot %.3f", name, s, it, kl.item(),
                     qh.item(), td.item(), score)
    return SeedFit(s, best[0], best[1], curves, time.perf_counter() - start)


def combine_seeds(data, params, oracle: bool, fits: Sequence[SeedFit],
                  teachers: Sequence[int] | None = None) -> FitResult:
    """The best seed's checkpoint (ties: the lowest seed), with the value offset calibrated on the
    training tasks; curves in seed order."""
    mt, cfg, family = params.meta_train, params.meta_train.hypernet, data.family
    name = hypernet_name(oracle)
    fits = sorted(fits, key=lambda f: f.seed)
    if [f.seed for f in fits] != list(range(n_seeds(cfg, oracle))):
        raise ValueError(f"{name}: seed fits {[f.seed for f in fits]} are not seeds 0..{n_seeds(cfg, oracle) - 1}")
    winner = max((f for f in fits if f.state is not None), key=lambda f: f.score, default=None)
    assert winner is not None and winner.state is not None, f"{name}: no validation score above -inf (all NaN?)"
    # max() keeps the first of equal scores: the lowest seed, as training the seeds in order would
    encoder = build_encoder("oracle" if oracle else mt.encoder, family, mt.encoder_hidden, mt.embed_dim,
                            "hypernet" in mt.action_effect, int(data.train.physics.shape[1]))
    final = HyperQ(encoder, mt.embed_dim, cfg.hidden, family.obs_dim, family.n_actions, params.dqn.hidden_sizes, 0)
    final.load_state_dict(winner.state)
    base = _base_pool(data, params.dqn.hidden_sizes, teachers)
    gen = torch.Generator().manual_seed(mt.seed)
    obs, q = base.sample(cfg.batch_states, gen)
    offset = calibrate_value_offset(final, data.train.physics if oracle else data.train.contexts.sample(gen), obs, q)
    log.info("%s: value offset %.2f added to the generated output biases", name, offset)
    gate = _choose_gate(final, data, params, oracle)
    return FitResult(final.eval(), winner.score, [c for f in fits for c in f.curves], [f.score for f in fits], gate)


def _choose_gate(model: HyperQ, data, params, oracle: bool) -> dict[str, float]:
    """``hypernet.gate``: off, on, or validated (on only if it raises the validation zero-shot, on the
    contexts that selected the checkpoint, each validation split weighing the same). Returns the figures
    that decided it (for the metrics)."""
    from metadqn.meta.dataset import greedy_returns

    mt, mode = params.meta_train, params.meta_train.hypernet.gate
    if mode == "off":
        return {"gate": 0.0}
    with torch.no_grad():
        points = model.encoder(data.train.physics if oracle else data.train.contexts.first())
    model.set_gate(points)
    if mode == "on":
        return {"gate": 1.0}
    val_input = data.val.physics if oracle else data.val.contexts.first()

    def score() -> float:
        returns = greedy_returns(data.family, data.val.matrix, model.generate(val_input), params.dqn.hidden_sizes,
                                 mt.eval_episodes, derive_seed(mt.seed, int(oracle), Salt.GATE))
        return data.val.balanced_mean(data.val.scale(returns))

    with torch.no_grad():
        fired = float(model.embed(val_input)[1].float().mean())
    on = score()
    model.gate_off()
    off = score()
    keep = on > off
    if keep:
        model.set_gate(points)
    log.info("gate: validation zero-shot %.3f with, %.3f without (fires on %.0f%% of validation tasks): %s",
             on, off, 100 * fired, "on" if keep else "off")
    return {"gate": float(keep), "gate_val_with": on, "gate_val_without": off, "gate_val_fired": fired}


def fit_hypernet(data, params, oracle: bool = False, teachers: Sequence[int] | None = None) -> FitResult:
    """Trains ``n_seeds`` hypernetworks on the training tasks, one after another; keeps the best on
    validation zero-shot. The meta_train stage trains the seeds in parallel instead (same result).
    ``teachers``: :func:`teacher_indices` (None: every task's own expert)."""
    return combine_seeds(data, params, oracle, [fit_hypernet_seed(data, params, oracle, s, teachers)
                                                for s in range(n_seeds(params.meta_train.hypernet, oracle))],
                         teachers)
