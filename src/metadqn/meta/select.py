"""A start chosen from the context (``select``): among other learners' starts for a new task, the one whose
greedy policy does best in a model of the task's dynamics fitted to its own context transitions
(``score: model``, the default), or whose Q-values best satisfy the task's Bellman equation there
(``squared``, ``relative``).

The model score (:class:`metadqn.meta.dynamics.ModelScore`): a linear model of the state change
per action, fitted by ridge regression to the C context transitions, in which each candidate's greedy
policy is rolled out from the family's start states; the candidate that lasts longest (CartPole) or
reaches the goal soonest (MountainCar, Acrobot) wins. It asks what a start would *do* on the task, which
is what the zero-shot return measures; the TD error only asks whether its values are self-consistent on
64 random transitions, where a generated network and an expert whose policies differ can look alike. On
24 out-of-range tasks drawn apart from the project's it chooses within 0.02 of the best candidate, where
the TD error (with the margin validation keeps) does no better than the hypernet alone (README, "A start
chosen from the context").

Candidates (``meta_train.select.candidates``): the hypernetwork's generated network, the siamese index's
``select.k`` nearest training experts (each one a candidate, not their average), and the multitask
network.

The TD-error scores (the first version, kept for comparison): each candidate Q is scored on the C context
transitions (s, a, r, s', terminated) by its mean squared one-step TD error
``Q(s, a) - (r + gamma (1 - terminated) max_a' Q(s', a'))``, with the dqn section's gamma (the discount
every candidate was trained with), and the lowest wins.

Why this score. A network trained on a task is close to a fixed point of that task's Bellman operator; on
another task's transitions, where the same action leads to other next states or terminations (another
push direction, a heavier pole), it is not. The score needs no training, no labelled data and no
environment step beyond the context every method already gets, and it cannot extrapolate badly itself:
it only chooses among networks, so the chosen start is as good as the best candidate it recognises. It
was chosen over the mean absolute and the relative TD error (``meta_train.select.score``) on validation
tasks only: 8 validation tasks and the 32 training tasks with each one's own expert left out (all tied
or nearly), then the 4 out-of-range validation tasks (squared 0.75, relative 0.74, absolute 0.73; README,
"A start chosen from the context").

The margin (``meta_train.select.margins``, the best on validation): the first candidate (the hypernet's)
wins unless another's score is below its own divided by the margin. The TD error ranks a real expert
above a generated network whose policy is as good; the margin says how much validation discounts that.
With the model score a start that lasts the whole simulated episode scores 0, so no margin lets another
candidate displace it.

Where the TD error can fail: a candidate whose Q-values are flat (all equal) has a small TD error wherever rewards
are constant, whatever its policy; the hypernetwork's ``value_offset`` puts generated Q-values on the
experts' scale, so its candidates compete on the same footing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metadqn.dqn.qnetwork import functional_q, param_shapes
from metadqn.dqn.trainer import bellman_target
from metadqn.envs.families import Family
from metadqn.meta.context import transitions_from_features
from metadqn.meta.dynamics import ModelScore
from metadqn.meta.hypernet import HyperQ
from metadqn.meta.siamese import SiameseIndex

TD_SCORES = ("squared", "relative")
"""The scores :func:`td_errors` computes."""
SCORES = (*TD_SCORES, "model")
"""How candidates are scored (``meta_train.select.score``): :func:`td_errors` (squared, relative) or
:class:`~metadqn.meta.dynamics.ModelScore` (model). Lower is better for each."""


def td_errors(flat: Tensor, ctx: Tensor, family: Family, shapes: Sequence[tuple[str, tuple[int, ...]]],
              gamma: float, score: str = "squared") -> Tensor:
    """Mean squared one-step TD error of M candidate networks per task on that task's context: flat
    [T, M, P], ctx [T, C, F] -> [T, M]; ``score="relative"`` divides it by the candidate's mean squared
    Q(s, a) on the same transitions."""
    t, m, p = flat.shape
    tr = transitions_from_features(ctx, family)
    obs = torch.cat([tr["obs"], tr["next_obs"]], 1)  # one forward pass for s and s'
    obs = obs.unsqueeze(1).expand(t, m, *obs.shape[1:]).reshape(t * m, *obs.shape[1:])
    q = functional_q(flat.reshape(t * m, p), obs, shapes).reshape(t, m, obs.shape[1], -1)
    c = ctx.shape[1]
    q_s, q_next = q[:, :, :c], q[:, :, c:]
    action = tr["action"].unsqueeze(1).expand(t, m, c)
    q_sa = q_s.gather(-1, action.unsqueeze(-1)).squeeze(-1)
    target = bellman_target(tr["reward"].unsqueeze(1), tr["terminated"].unsqueeze(1), q_next.max(-1).values, gamma)
    squared = ((q_sa - target) ** 2).mean(-1)
    if score == "relative":
        return squared / (q_sa**2).mean(-1).clamp(min=1e-6)
    if score != "squared":
        raise ValueError(f"unknown TD score {score!r} (one of: {', '.join(TD_SCORES)})")
    return squared


class SelectQ(nn.Module):
    """The candidates' sources (a hypernetwork, a retrieval index, fixed networks) and the chooser that scores
    them on the task's context (``score``)."""

    fixed: Tensor  # buffers (register_buffer), declared for the type checker
    gamma: Tensor

    def __init__(self, family: Family, q_hidden: Sequence[int], hypernet: HyperQ | None, index: SiameseIndex | None,
                 fixed: Tensor, k: int, gamma: float, fixed_names: Sequence[str] = (), score: str = "squared",
                 margin: float = 1.0, model_score: ModelScore | None = None):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"unknown select score {score!r} (one of: {', '.join(SCORES)})")
        self.score = score
        """How candidates are scored (``meta_train.select.score``)."""
        if fixed_names and len(fixed_names) != fixed.shape[0]:
            raise ValueError(f"{len(fixed_names)} names for {fixed.shape[0]} fixed networks")
        self.fixed_names = list(fixed_names) or [f"fixed-{i}" for i in range(fixed.shape[0])]
        """The learner each fixed network comes from (e.g. multitask), in row order."""
        self.family = family
        self.shapes = param_shapes(family.obs_dim, family.n_actions, q_hidden)
        self.model_score = model_score or ModelScore(family, self.shapes)
        """The ``model`` score with its start states and ridge (``meta_train.model_score``; the one object
        siamese's re-ranking uses too)."""
        self.hypernet = hypernet
        self.index = index
        self.k = k
        self.register_buffer("fixed", fixed)
        """[F, P]: networks that are a candidate for every task (the multitask network), F may be 0."""
        self.register_buffer("gamma", torch.tensor(float(gamma)))
        self.set_margin(margin)

    def set_margin(self, margin: float) -> None:
        """The first candidate wins unless another's score is below its own / ``margin`` (``select.margins``).
        A buffer only when it is not 1, so models saved before it existed load unchanged."""
        if margin < 1.0:
            raise ValueError(f"select margin {margin} < 1")
        if margin == 1.0:
            self._buffers.pop("margin", None)
        else:
            self.register_buffer("margin", torch.tensor(float(margin)))

    @property
    def first_margin(self) -> float:
        m = self._buffers.get("margin")
        return 1.0 if m is None else float(m)

    def sources(self) -> list[str]:
        """The name of each candidate column, in :meth:`candidates`' order: ``hypernet``, ``siamese-<i>``
        (the i-th nearest expert), then the fixed networks' learners."""
        out = ["hypernet"] if self.hypernet is not None else []
        if self.index is not None:
            out += [f"siamese-{i}" for i in range(min(self.k, len(self.index.task_ids)))]
        return out + self.fixed_names

    def source_learners(self) -> list[str]:
        """The learner each candidate column comes from (every nearest expert counts as ``siamese``)."""
        return ["siamese" if s.startswith("siamese-") else s for s in self.sources()]

    @torch.no_grad()
    def candidates(self, ctx: Tensor) -> Tensor:
        """[T, M, P]: every candidate start of each task, flat."""
        cols = []
        if self.hypernet is not None:
            cols.append(self.hypernet(ctx).unsqueeze(1))
        if self.index is not None:
            _, idx = self.index.neighbours(ctx, self.k)
            cols.append(self.index.expert_flat[idx])
        if self.fixed.shape[0]:
            cols.append(self.fixed.unsqueeze(0).expand(ctx.shape[0], *self.fixed.shape))
        return torch.cat(cols, 1)

    @torch.no_grad()
    def choose(self, ctx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(chosen flat parameters [T, P], chosen column [T], scores [T, M], lower is better); the first
        column's score is divided by the margin first; ties go to the first column."""
        flat = self.candidates(ctx)
        if self.score == "model":
            err = self.model_score(flat, ctx)
        else:
            err = td_errors(flat, ctx, self.family, self.shapes, float(self.gamma), self.score)
        pick = self.pick(err)
        return flat[torch.arange(len(pick)), pick], pick, err

    def pick(self, err: Tensor) -> Tensor:
        """[T]: the chosen column for scores [T, M] (:meth:`choose`'s), at the current margin."""
        return torch.cat([err[:, :1] / self.first_margin, err[:, 1:]], 1).argmin(1)

    def init_flat(self, ctx: Tensor) -> Tensor:
        return self.choose(ctx)[0]
