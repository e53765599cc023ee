"""Task families: a gymnasium environment plus named physics parameters with ranges per split.

A *task* is one point in a family's parameter space; it is fully described by its parameter vector
(the columns of ``data/tasks.parquet``). Default ranges follow Packer et al. 2018, "Assessing
Generalization in Deep Reinforcement Learning": training, validation and interpolation-test tasks are drawn
from R, extrapolation-test tasks from E (the union of intervals outside R). Parameters that Packer et al.
do not vary (CartPole's cart mass and gravity) default to a fixed value (a zero-width range); widen them in
``params.yaml`` under ``family.ranges``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

if TYPE_CHECKING:
    from gymnasium.envs.classic_control.acrobot import AcrobotEnv
    from gymnasium.envs.classic_control.cartpole import CartPoleEnv
    from gymnasium.envs.classic_control.mountain_car import MountainCarEnv

Interval = tuple[float, float]


@dataclass(frozen=True)
class ParamSpec:
    """One physics parameter of a family."""

    name: str
    doc: str
    default: float
    train: tuple[Interval, ...]
    """R: ranges for train, validation and interpolation-test tasks."""
    extrap: tuple[Interval, ...]
    """E: ranges for extrapolation-test tasks (equal to R for parameters that do not vary)."""
    discrete: tuple[float, ...] | None = None
    """If set, the parameter takes one of these values (uniformly), in every split."""


@dataclass(frozen=True)
class Family:
    """A task family: one gymnasium environment id and the parameters that vary between tasks."""

    name: str
    env_id: str
    doc: str
    params: tuple[ParamSpec, ...]
    obs_dim: int
    n_actions: int
    max_episode_steps: int
    solved_return: float
    """Greedy return at which a task counts as solved (gymnasium's reward_threshold: 475 for CartPole-v1,
    i.e. 95% of the maximum of 500)."""
    apply: Callable[[Any, Mapping[str, float]], None] = field(repr=False)
    """Sets one task's physics on an unwrapped single environment (of the family's own class)."""
    make_vector: Callable[[np.ndarray, int], gym.vector.VectorEnv] = field(repr=False)
    """Builds one vector env over many tasks: (task parameter matrix [n_envs, n_params], n_envs)."""

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params}

    def with_ranges(self, overrides: Mapping[str, Mapping[str, Sequence[Sequence[float]]]]) -> Family:
        """A copy whose parameter ranges are replaced by ``overrides`` ({name: {train: [[lo, hi]], ...}})."""
        if not overrides:
            return self
        specs = []
        for spec in self.params:
            new = overrides.get(spec.name)
            if new is None:
                specs.append(spec)
                continue
            train = tuple(tuple(map(float, iv)) for iv in new.get("train", spec.train))
            extrap = tuple(tuple(map(float, iv)) for iv in new.get("extrap", train))
            # (ignore: tuple(map(...)) has no static length; each interval is a validated (lo, hi) pair)
            specs.append(ParamSpec(spec.name, spec.doc, spec.default, train, extrap, spec.discrete))  # type: ignore[arg-type]
        return Family(
            self.name, self.env_id, self.doc, tuple(specs), self.obs_dim, self.n_actions,
            self.max_episode_steps, self.solved_return, self.apply, self.make_vector,
        )

    def make_env(self, task: Mapping[str, float]) -> gym.Env:
        """One gymnasium environment (with its registered TimeLimit) set to ``task``'s physics."""
        env = gym.make(self.env_id)
        self.apply(env.unwrapped, task)
        return env

    def vector_env(self, task_matrix: np.ndarray, envs_per_task: int) -> gym.vector.VectorEnv:
        """A vector env with ``envs_per_task`` copies of every task, task-major (env i is task i // E)."""
        params = np.repeat(np.asarray(task_matrix, dtype=np.float64), envs_per_task, axis=0)
        return self.make_vector(params, params.shape[0])


def _fixed(value: float) -> tuple[Interval, ...]:
    return ((value, value),)


# --------------------------------------------------------------------------------------------- CartPole
def _cartpole_apply(env: CartPoleEnv, task: Mapping[str, float]) -> None:
    env.force_mag = float(task["force_mag"]) * float(task.get("force_sign", 1.0))
    env.length = float(task["length"])
    env.masspole = float(task["masspole"])
    env.masscart = float(task["masscart"])
    env.gravity = float(task["gravity"])
    # CartPole caches these two at construction; they must follow the masses and length.
    env.total_mass = env.masspole + env.masscart
    env.polemass_length = env.masspole * env.length


def _cartpole_vector(names: Sequence[str]) -> Callable[[np.ndarray, int], gym.vector.VectorEnv]:
    def make(params: np.ndarray, n_envs: int) -> gym.vector.VectorEnv:
        from metadqn.envs.vector import CartPoleVectorEnv

        env = CartPoleVectorEnv(num_envs=n_envs)  # CartPole-v1's vector entry point, independent resets
        col = {name: params[:, i] for i, name in enumerate(names)}
        # CartPoleVectorEnv types its physics as floats; per-environment arrays broadcast through its step
        inner: Any = env.unwrapped
        inner.force_mag = col["force_mag"] * col.get("force_sign", 1.0)
        inner.length = col["length"]
        inner.masspole = col["masspole"]
        inner.masscart = col["masscart"]
        inner.gravity = col["gravity"]
        inner.total_mass = inner.masspole + inner.masscart
        inner.polemass_length = inner.masspole * inner.length
        return env

    return make


_CARTPOLE_PARAMS = (
    ParamSpec("force_mag", "magnitude of the push [N]", 10.0, ((5.0, 15.0),), ((1.0, 5.0), (15.0, 20.0))),
    ParamSpec("length", "half the pole's length [m]", 0.5, ((0.25, 0.75),), ((0.05, 0.25), (0.75, 1.0))),
    ParamSpec("masspole", "pole mass [kg]", 0.1, ((0.05, 0.5),), ((0.01, 0.05), (0.5, 1.0))),
    ParamSpec("masscart", "cart mass [kg] (fixed by default, as in Packer et al.)", 1.0, _fixed(1.0), _fixed(1.0)),
    ParamSpec("gravity", "gravity [m/s^2] (fixed by default)", 9.8, _fixed(9.8), _fixed(9.8)),
)
_FORCE_SIGN = ParamSpec(
    "force_sign", "+1: action 1 pushes right (as CartPole-v1); -1: the push direction is mirrored", 1.0,
    _fixed(1.0), _fixed(1.0), discrete=(-1.0, 1.0),
)

CARTPOLE = Family(
    name="cartpole",
    env_id="CartPole-v1",
    doc="CartPole-v1 with varied push force, pole length and pole mass (Packer et al. 2018).",
    params=_CARTPOLE_PARAMS,
    obs_dim=4, n_actions=2, max_episode_steps=500, solved_return=475.0,
    apply=_cartpole_apply,
    make_vector=_cartpole_vector([p.name for p in _CARTPOLE_PARAMS]),
)

CARTPOLE_MIRRORED = Family(
    name="cartpole-mirrored",
    env_id="CartPole-v1",
    doc=(
        "As cartpole, but each task's push direction is mirrored with probability 0.5 (force_sign -1). "
        "No single policy solves both halves, so a new task's policy has to be inferred from its data."
    ),
    params=(*_CARTPOLE_PARAMS, _FORCE_SIGN),
    obs_dim=4, n_actions=2, max_episode_steps=500, solved_return=475.0,
    apply=_cartpole_apply,
    make_vector=_cartpole_vector([p.name for p in (*_CARTPOLE_PARAMS, _FORCE_SIGN)]),
)


# ---------------------------------------------------------------------------------------------- Acrobot
def _acrobot_apply(env: AcrobotEnv, task: Mapping[str, float]) -> None:
    env.LINK_LENGTH_1 = float(task["link_length_1"])
    env.LINK_LENGTH_2 = float(task["link_length_2"])
    env.LINK_MASS_1 = float(task["link_mass_1"])
    env.LINK_MASS_2 = float(task["link_mass_2"])
    env.LINK_MOI = float(task["link_moi"])


_ACRO_R, _ACRO_E = ((0.75, 1.25),), ((0.5, 0.75), (1.25, 1.5))
_ACROBOT_PARAMS = (
    ParamSpec("link_length_1", "length of link 1 [m]", 1.0, _ACRO_R, _ACRO_E),
    ParamSpec("link_length_2", "length of link 2 [m]", 1.0, _ACRO_R, _ACRO_E),
    ParamSpec("link_mass_1", "mass of link 1 [kg]", 1.0, _ACRO_R, _ACRO_E),
    ParamSpec("link_mass_2", "mass of link 2 [kg]", 1.0, _ACRO_R, _ACRO_E),
    ParamSpec("link_moi", "moment of inertia of each link (gymnasium uses one for both)", 1.0, _ACRO_R, _ACRO_E),
)


def _acrobot_vector(params: np.ndarray, n_envs: int) -> gym.vector.VectorEnv:
    from metadqn.envs.vector import AcrobotVectorEnv

    return AcrobotVectorEnv(params)


ACROBOT = Family(
    name="acrobot",
    env_id="Acrobot-v1",
    doc="Acrobot-v1 with varied link lengths, masses and moment of inertia (Packer et al. 2018).",
    params=_ACROBOT_PARAMS,
    obs_dim=6, n_actions=3, max_episode_steps=500, solved_return=-100.0,
    apply=_acrobot_apply,
    make_vector=_acrobot_vector,
)


# ------------------------------------------------------------------------------------------ MountainCar
def _mountaincar_apply(env: MountainCarEnv, task: Mapping[str, float]) -> None:
    env.force = float(task["force"])
    env.gravity = float(task["gravity"])


def _mountaincar_vector(params: np.ndarray, n_envs: int) -> gym.vector.VectorEnv:
    from metadqn.envs.vector import MountainCarVectorEnv

    return MountainCarVectorEnv(params)


MOUNTAINCAR = Family(
    name="mountaincar",
    env_id="MountainCar-v0",
    doc="MountainCar-v0 with varied engine force and gravity (Packer et al.'s 'mass').",
    params=(
        ParamSpec("force", "engine force", 0.001, ((0.0005, 0.005),), ((0.0001, 0.0005), (0.005, 0.01))),
        ParamSpec("gravity", "gravity (Packer et al.'s 'mass')", 0.0025, ((0.001, 0.005),),
                  ((0.0005, 0.001), (0.005, 0.01))),
    ),
    obs_dim=2, n_actions=3, max_episode_steps=200, solved_return=-110.0,
    apply=_mountaincar_apply,
    make_vector=_mountaincar_vector,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (CARTPOLE, CARTPOLE_MIRRORED, ACROBOT, MOUNTAINCAR)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}") from None
