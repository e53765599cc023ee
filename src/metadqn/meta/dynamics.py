"""A task's dynamics fitted to its context, and a policy's return simulated in that model: the ``model``
score, with which select chooses among its candidates and siamese re-ranks its nearest experts
(:class:`ModelScore`).

The model is linear: ``s' - s = W [s, onehot(a)]``, fitted per task by ridge regression on the C context
transitions (no environment step beyond the context). Linear because C is small (64 random transitions
give 64 equations for (obs_dim + n_actions) x obs_dim unknowns) and because what tells a good start from a
bad one is first-order: which way and how hard each action pushes, how fast the pole falls. On CartPole
the small-angle dynamics are linear in the state and the force, so the fit is close where a good policy
keeps the state. A candidate Q-network's greedy policy is then rolled out in the model from the family's
start states until the family's termination rule fires or the episode's step limit, and its simulated
return is the context's mean reward times the steps it lasted.

What the simulation knows that is not in the context: the family's termination rule and start-state
distribution, read from gymnasium's own environment (the same for every task of a family, since tasks only
change the physics). The rules for the four families are here, each next to the gymnasium attribute it
reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor

from metadqn.config import Params
from metadqn.dqn.qnetwork import functional_q, param_shapes
from metadqn.envs.families import Family
from metadqn.meta.context import transitions_from_features

Termination = Callable[[Tensor], Tensor]
"""obs [..., obs_dim] -> bool [...]: whether the episode has ended in that state."""


@cache
def termination(family: Family) -> Termination:
    """The family's termination rule on observations, with gymnasium's thresholds."""
    made = family.make_env(family.defaults())
    try:
        return _termination(family, made.unwrapped)
    finally:
        made.close()


def _termination(family: Family, env: object) -> Termination:
    env_id = family.env_id
    if env_id == "CartPole-v1":
        x_max, theta_max = float(env.x_threshold), float(env.theta_threshold_radians)  # type: ignore[attr-defined]
        return lambda s: (s[..., 0].abs() > x_max) | (s[..., 2].abs() > theta_max)
    if env_id == "MountainCar-v0":
        pos, vel = float(env.goal_position), float(env.goal_velocity)  # type: ignore[attr-defined]
        return lambda s: (s[..., 0] >= pos) & (s[..., 1] >= vel)
    if env_id == "Acrobot-v1":
        # gymnasium's _terminal: -cos(t1) - cos(t1 + t2) > 1, with obs = cos t1, sin t1, cos t2, sin t2, ...
        return lambda s: -s[..., 0] - (s[..., 0] * s[..., 2] - s[..., 1] * s[..., 3]) > 1.0
    raise ValueError(f"no termination rule for {env_id} (family {family.name}): the model score needs one")


@cache
def start_states(family: Family, n: int) -> Tensor:
    """[n, obs_dim]: n draws of the family's start-state distribution (gymnasium's reset, seeds 0..n-1;
    it does not depend on a task's physics in any of the families)."""
    env = family.make_env(family.defaults())
    out = np.stack([env.reset(seed=i)[0] for i in range(n)])
    env.close()
    return torch.as_tensor(out, dtype=torch.float32)


def fit_linear(obs: Tensor, action: Tensor, next_obs: Tensor, n_actions: int, ridge: float) -> Tensor:
    """[T, obs_dim + n_actions, obs_dim]: per task, the ridge least-squares W of ``s' - s = [s, onehot(a)] W``
    from obs [T, C, d], action [T, C] (long) and next_obs [T, C, d]. Float64 for the solve (a task whose
    context never moves a coordinate gives a near-singular system the ridge term keeps solvable)."""
    x = torch.cat([obs, torch.nn.functional.one_hot(action, n_actions).to(obs.dtype)], -1).double()
    y = (next_obs - obs).double()
    gram = x.transpose(1, 2) @ x + ridge * torch.eye(x.shape[-1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.transpose(1, 2) @ y).float()


@torch.no_grad()
def simulated_steps(flat: Tensor, model: Tensor, starts: Tensor, shapes: Sequence[tuple[str, tuple[int, ...]]],
                    n_actions: int, terminated: Termination, horizon: int) -> Tensor:
    """[T, M]: mean steps (over the start states) that each of M candidate networks' greedy policy lasts in
    its task's model before ``terminated`` (the terminal step counts, as in gymnasium), at most ``horizon``.
    flat [T, M, P], model [T, d + A, d] (:func:`fit_linear`), starts [B, d]."""
    t, m, _ = flat.shape
    b, d = starts.shape
    s = starts.expand(t * m, b, d).clone()
    w = model.unsqueeze(1).expand(t, m, *model.shape[1:]).reshape(t * m, *model.shape[1:])
    nets = flat.reshape(t * m, -1)
    alive = torch.ones(t * m, b, dtype=torch.bool)
    steps = torch.zeros(t * m, b)
    for _ in range(horizon):
        a = functional_q(nets, s, shapes).argmax(-1)
        x = torch.cat([s, torch.nn.functional.one_hot(a, n_actions).to(s.dtype)], -1)
        # an ended episode's state stays put (a diverging model would otherwise overflow it)
        s = torch.where(alive.unsqueeze(-1), s + torch.bmm(x, w), s)
        steps += alive.to(steps.dtype)
        alive &= ~terminated(s)
        if not alive.any():
            break
    return steps.mean(-1).reshape(t, m)


def model_shortfall(flat: Tensor, ctx: Tensor, family: Family, shapes: Sequence[tuple[str, tuple[int, ...]]],
                    n_starts: int, ridge: float) -> Tensor:
    """[T, M]: how far each of M candidate networks' return, simulated in a linear model of its task's
    dynamics fitted to the task's context ctx [T, C, F] (:func:`fit_linear`), falls short of the best a
    policy can get in that model: with r the context's mean reward and n the steps the greedy policy lasts
    (at most the family's episode limit H), ``H max(r, 0) - r n`` (CartPole, reward +1 until failure:
    H - n; MountainCar and Acrobot, -1 until the goal: n). flat [T, M, P]; lower is better."""
    tr = transitions_from_features(ctx, family)
    model = fit_linear(tr["obs"], tr["action"], tr["next_obs"], family.n_actions, ridge)
    horizon = family.max_episode_steps
    steps = simulated_steps(flat, model, start_states(family, n_starts), shapes, family.n_actions,
                            termination(family), horizon)
    r = tr["reward"].mean(-1, keepdim=True)
    return horizon * r.clamp(min=0.0) - r * steps


@dataclass(frozen=True)
class ModelScore:
    """:func:`model_shortfall` with its settings bound (``meta_train.model_score``): flat [T, M, P] and
    ctx [T, C, F] -> [T, M], lower is better. One object shared by select and siamese's re-ranking."""

    family: Family
    shapes: Sequence[tuple[str, tuple[int, ...]]]
    starts: int = 8
    """Start states each policy is simulated from (``meta_train.model_score.starts``)."""
    ridge: float = 1e-3
    """The dynamics fit's ridge term (``meta_train.model_score.ridge``)."""

    @classmethod
    def from_params(cls, params: Params, family: Family) -> ModelScore:
        """The model score of ``meta_train.model_score``, for the Q-networks of ``dqn.hidden_sizes``: the one
        builder of select's, siamese's re-ranking's and the start check's."""
        ms = params.meta_train.model_score
        shapes = param_shapes(family.obs_dim, family.n_actions, params.dqn.hidden_sizes)
        return cls(family, shapes, ms.starts, ms.ridge)

    def __call__(self, flat: Tensor, ctx: Tensor) -> Tensor:
        return model_shortfall(flat, ctx, self.family, self.shapes, self.starts, self.ridge)

    def fraction(self, flat: Tensor, ctx: Tensor) -> Tensor:
        """[T, M]: the score as the share of the model's best return each policy gets, ``1 - shortfall /
        (H |r|)`` (CartPole: the share of the episode limit it lasts; MountainCar and Acrobot: 1 - the share
        of it that it needs to reach the goal), 1 at best, 0 for a policy that fails at once or never
        arrives. An absolute verdict on one start, where the shortfall itself only ranks them."""
        r = transitions_from_features(ctx, self.family)["reward"].mean(-1, keepdim=True)
        best = self.family.max_episode_steps * r.abs().clamp(min=1e-6)
        return 1.0 - self(flat, ctx) / best
