"""Task contexts and the encoders that turn them into task embeddings.

A task's *context* is C transitions (s, a, r, s', terminated) collected on it by a fixed exploration
policy: uniform random (the ``exploration`` source of the trajectory dataset). Context transitions count
against a task's interaction budget at meta-test.

Each transition becomes a feature vector [s, one_hot(a), r, s' - s, terminated], standardised with
statistics of the training tasks' contexts (stored with the model). Two encoders read a set of them:

* ``deepset``: a per-transition MLP, mean-pooled, then an MLP (permutation invariant; Zaheer et al. 2017);
* ``gru``: a GRU over the transitions in collection order (the recurrent encoder the product brief names).

With ``action_effect`` (``meta_train.action_effect``) both also read :class:`ActionEffect`, the mean effect
of each action on the (standardised) state change in the context, as a unit direction plus its log-size
clipped to the training contexts' range: which way an action pushes survives out of range even where the
raw features do not (a weak motor shrinks every state change but not their signs).

``oracle`` features skip the context: the task's physics parameters scaled to [0, 1] over the training
ranges (only for analysis: a real new task does not tell you its physics).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from metadqn.envs.families import Family


def transition_features(frame: pd.DataFrame, family: Family) -> np.ndarray:
    """[N, 2 * obs_dim + n_actions + 2] raw features of transitions (one row per transition)."""
    d = family.obs_dim
    return features_from_arrays({
        "obs": frame[[f"obs_{i}" for i in range(d)]].to_numpy(np.float32),
        "next_obs": frame[[f"next_obs_{i}" for i in range(d)]].to_numpy(np.float32),
        "action": frame["action"].to_numpy(), "reward": frame["reward"].to_numpy(),
        "terminated": frame["terminated"].to_numpy(),
    }, family)


def features_from_arrays(tr: dict[str, np.ndarray], family: Family) -> np.ndarray:
    """The same features from transition arrays (as ``collect_transitions`` returns them)."""
    obs, nxt = np.asarray(tr["obs"], np.float32), np.asarray(tr["next_obs"], np.float32)
    onehot = np.eye(family.n_actions, dtype=np.float32)[np.asarray(tr["action"], dtype=np.int64)]
    reward = np.asarray(tr["reward"], np.float32)[:, None]
    term = np.asarray(tr["terminated"], np.float32)[:, None]
    return np.concatenate([obs, onehot, reward, nxt - obs, term], axis=1)


def transitions_from_features(ctx: Tensor, family: Family) -> dict[str, Tensor]:
    """The inverse of :func:`features_from_arrays` on a batch of contexts [T, C, F]: obs, action (long),
    reward, next_obs and terminated, each [T, C] or [T, C, obs_dim]."""
    d, a = family.obs_dim, family.n_actions
    obs = ctx[..., :d]
    return {"obs": obs, "action": ctx[..., d:d + a].argmax(-1), "reward": ctx[..., d + a],
            "next_obs": obs + ctx[..., d + a + 1:2 * d + a + 1], "terminated": ctx[..., -1]}


def feature_dim(family: Family) -> int:
    return 2 * family.obs_dim + family.n_actions + 2


def oracle_features(tasks: pd.DataFrame, family: Family) -> np.ndarray:
    """Physics parameters scaled to [0, 1] over the training ranges R (fixed parameters give 0)."""
    cols = []
    for spec in family.params:
        values = tasks[spec.name].to_numpy(np.float64)
        if spec.discrete is not None:
            lo, hi = min(spec.discrete), max(spec.discrete)
        else:
            lo, hi = min(iv[0] for iv in spec.train), max(iv[1] for iv in spec.train)
        cols.append((values - lo) / (hi - lo) if hi > lo else np.zeros_like(values))
    return np.stack(cols, axis=1).astype(np.float32)


class ContextSampler:
    """Random C-transition contexts of each task, drawn from its exploration transitions.

    Training draws a fresh subset every step (augmentation: the model must work from any C transitions);
    evaluation uses :meth:`first`, the first C transitions collected, as a new task would give them.
    """

    def __init__(self, features: Sequence[np.ndarray], size: int):
        short = [i for i, f in enumerate(features) if len(f) < size]
        if short:
            raise ValueError(f"context_size {size} exceeds the exploration transitions of {len(short)} task(s) "
                             f"(min {min(len(features[i]) for i in short)}); lower meta_train.context_size "
                             "or raise collect.exploration_steps")
        self.features = [torch.as_tensor(f) for f in features]
        self.size = size

    def sample(self, gen: torch.Generator, task_index: Sequence[int] | None = None) -> Tensor:
        """[T, C, F]: one random context per task (sorted, so a GRU sees collection order)."""
        index = range(len(self.features)) if task_index is None else task_index
        out = []
        for i in index:
            f = self.features[i]
            pick = torch.randperm(len(f), generator=gen)[: self.size].sort().values
            out.append(f[pick])
        return torch.stack(out)

    def first(self) -> Tensor:
        return self.window(0)

    def window(self, index: int) -> Tensor:
        """[T, C, F]: transitions [index * C, (index + 1) * C) of each task (disjoint contexts)."""
        lo = index * self.size
        if any(len(f) < lo + self.size for f in self.features):
            raise ValueError(f"context window {index} needs {lo + self.size} exploration transitions per task")
        return torch.stack([f[lo: lo + self.size] for f in self.features])


class Standardiser(nn.Module):
    """Fixed feature scaling, fitted on training contexts and saved with the model."""

    mean: Tensor  # buffers (register_buffer), declared for the type checker
    std: Tensor

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, features: Tensor) -> Standardiser:
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-3))
        return self

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ActionEffect(nn.Module):
    """Per context: the mean standardised state change after each action minus its mean over actions
    ([n_actions, obs_dim], flattened), as a unit vector, plus the log of its norm clipped to the range seen
    on the training contexts (:meth:`fit`). Contexts come from a uniform-random policy, so the action is
    independent of the state and the difference of conditional means estimates the action's own effect. An
    action absent from a context counts as having the mean effect (with 64 transitions and 2-3 actions,
    rare)."""

    lo: Tensor  # buffers (register_buffer), declared for the type checker
    hi: Tensor

    def __init__(self, obs_dim: int, n_actions: int):
        super().__init__()
        self.obs_dim, self.n_actions = obs_dim, n_actions
        self.out_dim = obs_dim * n_actions + 1
        self.register_buffer("lo", torch.tensor(-20.0))
        self.register_buffer("hi", torch.tensor(20.0))

    def _effect(self, raw: Tensor, scaled: Tensor) -> tuple[Tensor, Tensor]:
        d, a = self.obs_dim, self.n_actions
        onehot = raw[..., d:d + a]  # [T, C, A], exact 0/1 before standardising
        delta = scaled[..., d + a + 1:2 * d + a + 1]  # [T, C, d]
        mean = onehot.transpose(1, 2) @ delta / onehot.sum(1).clamp(min=1.0).unsqueeze(-1)  # [T, A, d]
        present = (onehot.sum(1) > 0).unsqueeze(-1)
        mean = torch.where(present, mean, delta.mean(1, keepdim=True))
        contrast = (mean - mean.mean(1, keepdim=True)).flatten(1)
        norm = contrast.norm(dim=1, keepdim=True)
        return contrast / (norm + 1e-6), torch.log(norm + 1e-6)

    @torch.no_grad()
    def fit(self, raw: Tensor, scaled: Tensor) -> ActionEffect:
        log_norm = self._effect(raw, scaled)[1]
        self.lo.copy_(log_norm.min())
        self.hi.copy_(log_norm.max())
        return self

    def forward(self, raw: Tensor, scaled: Tensor) -> Tensor:
        unit, log_norm = self._effect(raw, scaled)
        return torch.cat([unit, torch.minimum(torch.maximum(log_norm, self.lo), self.hi)], dim=1)


class DeepSetEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, embed_dim: int, extra: int = 0):
        super().__init__()
        self.phi = _mlp([in_dim, hidden, hidden])
        self.rho = _mlp([hidden + extra, hidden, embed_dim])

    def forward(self, ctx: Tensor, extra: Tensor | None = None) -> Tensor:
        """[T, C, F] (and [T, extra]) -> [T, embed_dim]."""
        pooled = torch.relu(self.phi(ctx)).mean(1)
        return self.rho(pooled if extra is None else torch.cat([pooled, extra], 1))


class GRUEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int, embed_dim: int, extra: int = 0):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden + extra, embed_dim)

    def forward(self, ctx: Tensor, extra: Tensor | None = None) -> Tensor:
        _, h = self.gru(torch.relu(self.inp(ctx)))
        return self.out(h[-1] if extra is None else torch.cat([h[-1], extra], 1))


class OracleEncoder(nn.Module):
    """Maps scaled physics parameters to an embedding (the 'oracle' task features)."""

    def __init__(self, in_dim: int, hidden: int, embed_dim: int):
        super().__init__()
        self.net = _mlp([in_dim, hidden, embed_dim])

    def forward(self, physics: Tensor) -> Tensor:
        return self.net(physics)


class ContextEncoder(nn.Module):
    """Standardise, then encode: a context [T, C, F] (or oracle physics [T, P]) -> embedding [T, D].

    ``action_effect``: the family's (obs_dim, n_actions) to add :class:`ActionEffect` (context encoders
    only); None: without it."""

    def __init__(self, kind: str, in_dim: int, hidden: int, embed_dim: int,
                 action_effect: tuple[int, int] | None = None):
        super().__init__()
        self.kind = kind
        self.scale = Standardiser(in_dim)
        encoders = {"deepset": DeepSetEncoder, "gru": GRUEncoder}
        self.effect: ActionEffect | None = None
        self.body: nn.Module
        if kind == "oracle":
            self.body = OracleEncoder(in_dim, hidden, embed_dim)
        elif kind in encoders:
            self.effect = ActionEffect(*action_effect) if action_effect is not None else None
            self.body = encoders[kind](in_dim, hidden, embed_dim, self.effect.out_dim if self.effect else 0)
        else:
            raise ValueError(f"unknown encoder {kind!r}; known: deepset, gru, oracle")

    @torch.no_grad()
    def fit(self, contexts: ContextSampler) -> ContextEncoder:
        """Fits the fixed statistics on the training tasks' contexts: the standardiser on all their
        transitions, the action effect's range on every disjoint context window."""
        self.scale.fit(torch.cat(contexts.features))
        if self.effect is not None:
            n = min(len(f) for f in contexts.features) // contexts.size
            raw = torch.cat([contexts.window(i) for i in range(n)])
            self.effect.fit(raw, self.scale(raw))
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "oracle":
            return self.body(x)
        scaled = self.scale(x)
        return self.body(scaled, self.effect(x, scaled) if self.effect is not None else None)


def build_encoder(kind: str, family: Family, hidden: int, embed_dim: int, action_effect: bool,
                  n_physics: int = 0) -> ContextEncoder:
    """An untrained encoder: ``kind`` deepset | gru (a context input) or oracle (``n_physics`` inputs)."""
    in_dim = n_physics if kind == "oracle" else feature_dim(family)
    layout = (family.obs_dim, family.n_actions) if action_effect else None
    return ContextEncoder(kind, in_dim, hidden, embed_dim, layout)
