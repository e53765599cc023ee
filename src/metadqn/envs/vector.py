"""Numpy vector environments: gymnasium's ``CartPoleVectorEnv`` with independent resets, and the families
that gymnasium ships without a vector entry point (Acrobot, MountainCar).

All follow gymnasium's ``CartPoleVectorEnv`` conventions, so the trainer treats every family alike:
per-environment physics as arrays, ``AutoresetMode.NEXT_STEP`` (the step after an episode ends resets that
environment, ignores its action and returns reward 0), and time limits as ``truncated``. The dynamics are
the single environments' own equations, vectorised; ``tests/test_envs.py`` checks them step for step
against gymnasium's.

One departure from gymnasium, on purpose: every environment draws its reset states from its own random
stream (:class:`EnvStreams`). gymnasium draws the reset states of all the environments that end on a step
from one generator, so an environment's next start state depends on which *other* environments ended on
the same step. Our vector envs hold many independent runs (the batched trainer's slots), so with one
generator a run's resets would depend on its neighbours' episodes, and meta-test's runs of two methods on
the same (task, seed) would not share their resets: the pairing by common random numbers the paired
comparisons rely on would hold for the context, exploration draws and evaluation start states only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv as _GymCartPoleVectorEnv
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space


class EnvStreams:
    """One random stream per environment for its reset states: environment i's n-th episode starts from the
    n-th draw of stream i, whatever the other environments do. The streams are spawned from one draw of the
    vector env's own generator at reset, so a seeded reset fixes them all."""

    def __init__(self, parent: np.random.Generator, n_envs: int):
        seq = np.random.SeedSequence(int(parent.integers(2**63)))
        self.streams = [np.random.default_rng(child) for child in seq.spawn(n_envs)]

    def uniform(self, envs: np.ndarray, low: float, high: float, size: int) -> np.ndarray:
        """[len(envs), size]: one draw of ``size`` uniforms from each listed environment's stream."""
        if len(envs) == 0:
            return np.empty((0, size))
        return np.stack([self.streams[i].uniform(low, high, size) for i in envs])


class CartPoleVectorEnv(_GymCartPoleVectorEnv):
    """gymnasium's ``CartPoleVectorEnv`` (its dynamics, bounds and autoreset), each environment's reset
    states from its own stream (:class:`EnvStreams`; the module docstring says why)."""

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed, options=options)
        self._streams = EnvStreams(self.np_random, self.num_envs)
        state = self._streams.uniform(np.arange(self.num_envs), self.low, self.high, 4)
        self.state = state.T  # type: ignore[assignment]  # gymnasium annotates state as None until reset
        return state.astype(np.float32), {}

    def step(self, actions: np.ndarray):
        resetting = np.flatnonzero(self.prev_done)  # the envs this step resets (NEXT_STEP autoreset)
        obs, reward, terminated, truncated, info = super().step(actions)
        if resetting.size:  # replace gymnasium's shared draws by each env's own
            assert self.state is not None
            self.state[:, resetting] = self._streams.uniform(resetting, self.low, self.high, 4).T
            obs = self.state.T.astype(np.float32)
        return obs, reward, terminated, truncated, info


class _NumpyVectorEnv(VectorEnv):
    # typed as VectorEnv declares it (an instance attribute there, so no ClassVar here); a class-level default as before
    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.NEXT_STEP}  # noqa: RUF012
    max_episode_steps: int
    reset_low: float
    reset_high: float

    def _init_common(self, n_envs: int, single_obs: spaces.Box, n_actions: int) -> None:
        self.num_envs = n_envs
        self.single_observation_space = single_obs
        self.observation_space = batch_space(single_obs, n_envs)
        self.single_action_space = spaces.Discrete(n_actions)
        self.action_space = batch_space(self.single_action_space, n_envs)
        self.steps = np.zeros(n_envs, dtype=np.int32)
        self.prev_done = np.zeros(n_envs, dtype=np.bool_)
        self.state: np.ndarray | None = None

    def _initial_state(self, envs: np.ndarray) -> np.ndarray:
        """Start states of the listed environments, each from its own stream (``self._streams``)."""
        raise NotImplementedError

    def _dynamics(self, state: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(next state, reward, terminated) for every environment."""
        raise NotImplementedError

    def _obs(self) -> np.ndarray:
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._streams = EnvStreams(self.np_random, self.num_envs)
        self.state = self._initial_state(np.arange(self.num_envs))
        self.steps[:] = 0
        self.prev_done[:] = False
        return self._obs(), {}

    def step(self, actions: np.ndarray):
        assert self.state is not None, "call reset() before step()"
        actions = np.asarray(actions)
        state, reward, terminated = self._dynamics(self.state, actions)
        self.steps += 1
        truncated = self.steps >= self.max_episode_steps
        done = self.prev_done
        if done.any():
            state[done] = self._initial_state(np.flatnonzero(done))
            self.steps[done] = 0
            reward[done] = 0.0
            terminated[done] = False
            truncated[done] = False
        self.state = state
        self.prev_done = terminated | truncated
        return self._obs(), reward.astype(np.float32), terminated, truncated, {}


class AcrobotVectorEnv(_NumpyVectorEnv):
    """Acrobot-v1 ("book" dynamics, RK4 over dt=0.2) over environments with their own link parameters.

    ``params`` columns: link_length_1, link_length_2, link_mass_1, link_mass_2, link_moi.
    """

    dt = 0.2
    max_episode_steps = 500
    link_com_pos = 0.5
    max_vel_1 = 4 * np.pi
    max_vel_2 = 9 * np.pi
    torques = np.array([-1.0, 0.0, 1.0])

    def __init__(self, params: np.ndarray):
        params = np.asarray(params, dtype=np.float64)
        self.l1, self.l2, self.m1, self.m2, self.moi = (params[:, i] for i in range(5))
        high = np.array([1.0, 1.0, 1.0, 1.0, self.max_vel_1, self.max_vel_2], dtype=np.float32)
        self._init_common(params.shape[0], spaces.Box(-high, high, dtype=np.float32), 3)

    def _initial_state(self, envs: np.ndarray) -> np.ndarray:
        return self._streams.uniform(envs, -0.1, 0.1, 4).astype(np.float32).astype(np.float64)

    def _dsdt(self, s: np.ndarray, a: np.ndarray) -> np.ndarray:
        m1, m2, l1, i1 = self.m1, self.m2, self.l1, self.moi
        lc1 = lc2 = self.link_com_pos
        i2 = i1
        g = 9.8
        theta1, theta2, dtheta1, dtheta2 = s.T
        d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * np.cos(theta2)) + i1 + i2
        d2 = m2 * (lc2**2 + l1 * lc2 * np.cos(theta2)) + i2
        phi2 = m2 * lc2 * g * np.cos(theta1 + theta2 - np.pi / 2.0)
        phi1 = (
            -m2 * l1 * lc2 * dtheta2**2 * np.sin(theta2)
            - 2 * m2 * l1 * lc2 * dtheta2 * dtheta1 * np.sin(theta2)
            + (m1 * lc1 + m2 * l1) * g * np.cos(theta1 - np.pi / 2)
            + phi2
        )
        ddtheta2 = (a + d2 / d1 * phi1 - m2 * l1 * lc2 * dtheta1**2 * np.sin(theta2) - phi2) / (
            m2 * lc2**2 + i2 - d2**2 / d1
        )
        ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
        return np.stack([dtheta1, dtheta2, ddtheta1, ddtheta2], axis=1)

    def _dynamics(self, state, action):
        torque = self.torques[action]
        dt, half = self.dt, self.dt / 2.0
        k1 = self._dsdt(state, torque)
        k2 = self._dsdt(state + half * k1, torque)
        k3 = self._dsdt(state + half * k2, torque)
        k4 = self._dsdt(state + dt * k3, torque)
        ns = state + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        ns[:, 0] = _wrap(ns[:, 0])
        ns[:, 1] = _wrap(ns[:, 1])
        ns[:, 2] = np.clip(ns[:, 2], -self.max_vel_1, self.max_vel_1)
        ns[:, 3] = np.clip(ns[:, 3], -self.max_vel_2, self.max_vel_2)
        terminated = -np.cos(ns[:, 0]) - np.cos(ns[:, 1] + ns[:, 0]) > 1.0
        reward = np.where(terminated, 0.0, -1.0)
        return ns, reward, terminated

    def _obs(self) -> np.ndarray:
        s = self.state
        assert s is not None, "call reset() before step()"
        return np.stack(
            [np.cos(s[:, 0]), np.sin(s[:, 0]), np.cos(s[:, 1]), np.sin(s[:, 1]), s[:, 2], s[:, 3]], axis=1
        ).astype(np.float32)


def _wrap(x: np.ndarray) -> np.ndarray:
    """Wraps angles into [-pi, pi), as gymnasium's ``wrap`` does for one value."""
    return (x + np.pi) % (2 * np.pi) - np.pi


class MountainCarVectorEnv(_NumpyVectorEnv):
    """MountainCar-v0 over environments with their own engine force and gravity.

    ``params`` columns: force, gravity.
    """

    max_episode_steps = 200
    min_position, max_position, max_speed, goal_position = -1.2, 0.6, 0.07, 0.5

    def __init__(self, params: np.ndarray):
        params = np.asarray(params, dtype=np.float64)
        self.force, self.gravity = params[:, 0], params[:, 1]
        low = np.array([self.min_position, -self.max_speed], dtype=np.float32)
        high = np.array([self.max_position, self.max_speed], dtype=np.float32)
        self._init_common(params.shape[0], spaces.Box(low, high, dtype=np.float32), 3)

    def _initial_state(self, envs: np.ndarray) -> np.ndarray:
        return np.concatenate([self._streams.uniform(envs, -0.6, -0.4, 1), np.zeros((len(envs), 1))], axis=1)

    def _dynamics(self, state, action):
        position, velocity = state[:, 0].copy(), state[:, 1].copy()
        velocity += (action - 1) * self.force + np.cos(3 * position) * (-self.gravity)
        velocity = np.clip(velocity, -self.max_speed, self.max_speed)
        position += velocity
        position = np.clip(position, self.min_position, self.max_position)
        velocity[(position == self.min_position) & (velocity < 0)] = 0.0
        terminated = (position >= self.goal_position) & (velocity >= 0)
        reward = -np.ones(state.shape[0])
        return np.stack([position, velocity], axis=1), reward, terminated

    def _obs(self) -> np.ndarray:
        assert self.state is not None, "call reset() before step()"
        return self.state.astype(np.float32)
