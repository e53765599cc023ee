from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from metadqn.envs import FAMILIES, SPLITS, get_family, sample_tasks, task_matrix

COUNTS = {"train": 6, "val": 3, "interp": 3, "extrap": 3, "val_extrap": 3}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_task_passes_check_env(name):
    family = get_family(name)
    tasks = sample_tasks(family, COUNTS, seed=1)
    for _, row in tasks.groupby("split").head(1).iterrows():
        env = family.make_env(row[family.param_names].to_dict())
        check_env(env.unwrapped, skip_render_check=True)  # rendering needs pygame, which we do not ship


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_splits_are_disjoint_seeded_and_in_range(name):
    family = get_family(name)
    a = sample_tasks(family, COUNTS, seed=7)
    b = sample_tasks(family, COUNTS, seed=7)
    c = sample_tasks(family, COUNTS, seed=8)
    assert a.equals(b)
    assert not a[family.param_names].equals(c[family.param_names])
    assert set(a["split"]) == set(SPLITS)
    assert not a.duplicated(subset=family.param_names).any()
    assert a["task_id"].is_unique
    for spec in family.params:
        for split, group in a.groupby("split"):
            values = group[spec.name].to_numpy()
            if spec.discrete is not None:
                assert set(values) <= set(spec.discrete)
                continue
            ranges = spec.extrap if split in ("extrap", "val_extrap") else spec.train
            inside = np.zeros(len(values), dtype=bool)
            for lo, hi in ranges:
                inside |= (values >= lo) & (values <= hi)
            assert inside.all(), (spec.name, split, values)


def test_growing_one_split_keeps_the_others():
    family = get_family("cartpole")
    small = sample_tasks(family, COUNTS, seed=3)
    big = sample_tasks(family, {**COUNTS, "train": 10}, seed=3)
    for split in ("val", "interp", "extrap"):
        assert small[small.split == split].reset_index(drop=True).equals(big[big.split == split].reset_index(drop=True))


def test_out_of_range_validation_tasks_are_drawn_from_e_apart_from_the_test_tasks():
    family = get_family("cartpole-mirrored")
    without = sample_tasks(family, {**COUNTS, "val_extrap": 0}, seed=3)
    with_ = sample_tasks(family, {**COUNTS, "val_extrap": 6}, seed=3)
    # adding the split changed no other split's tasks (the committed task sets stay what they were)
    assert with_[with_.split != "val_extrap"].reset_index(drop=True).equals(without)
    vx, ex = with_[with_.split == "val_extrap"], with_[with_.split == "extrap"]
    assert len(vx) == 6 and vx["task_id"].str.startswith("val_extrap-").all()
    assert not set(map(tuple, vx[family.param_names].to_numpy())) & set(map(tuple, ex[family.param_names].to_numpy()))
    length = next(p for p in family.params if p.name == "length")
    outside = np.zeros(len(vx), dtype=bool)
    for lo, hi in length.extrap:
        outside |= (vx["length"].to_numpy() >= lo) & (vx["length"].to_numpy() <= hi)
    assert outside.all()


def test_mirrored_family_has_both_push_directions():
    family = get_family("cartpole-mirrored")
    tasks = sample_tasks(family, {"train": 40}, seed=0)
    assert set(tasks["force_sign"]) == {-1.0, 1.0}


LIMIT = 25
"""A short time limit (gymnasium's default is 200 or 500 steps) so that a few hundred steps see many truncations."""
NEAR_END = {"cartpole": [0.0, 0.0, 0.205, 1.0], "cartpole-mirrored": [0.0, 0.0, 0.205, 1.0],
            "acrobot": [np.pi - 0.05, 0.0, 0.0, 0.0], "mountaincar": [0.49, 0.07]}
"""A state one step before termination whatever the action (pole past 12 degrees, link up, car at the flag):
planted now and then so that every family terminates too, not only CartPole under random actions."""


def _reference(family, tasks, limit: int) -> SyncVectorEnv:
    """gymnasium's own NEXT_STEP vector env over the single environments, each with its TimeLimit."""
    def make(task):
        def thunk():
            env = gym.make(family.env_id, max_episode_steps=limit)
            family.apply(env.unwrapped, task)
            return env
        return thunk

    return SyncVectorEnv([make(row[family.param_names].to_dict()) for _, row in tasks.iterrows()],
                         autoreset_mode=AutoresetMode.NEXT_STEP)


def _ours(family, matrix: np.ndarray, envs_per_task: int, limit: int):
    vec = family.vector_env(matrix, envs_per_task)
    assert vec.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    vec.unwrapped.max_episode_steps = limit  # an attribute of CartPoleVectorEnv and of ours alike
    return vec


def _set_vector_state(name, inner, i, state) -> None:
    if name.startswith("cartpole"):
        inner.state[:, i] = state
    else:
        inner.state[i] = state


def _single_obs(name, env) -> np.ndarray:
    """The observation a single env would return for its current state."""
    inner = env.unwrapped
    return inner._get_ob() if name == "acrobot" else np.array(inner.state, dtype=np.float32)


def _compare_step(ours, ref, step) -> None:
    for what, a, b in zip(("obs", "reward", "terminated", "truncated"), ours, ref, strict=True):
        if what == "obs":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"obs at step {step}")
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{what} at step {step}")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_vector_env_matches_gymnasium_through_terminations_truncations_and_autoresets(name):
    """Each task's vector env (one env per task) against gymnasium's SyncVectorEnv of the single envs, step
    for step over many episodes: same observations, rewards, terminations, truncations, and NEXT_STEP
    autoresets (reward 0, neither flag, the action ignored). Our envs draw each env's reset states from its
    own stream (gymnasium's from one), so at every reset the reference env is given our new state, checked
    to be a fresh start of gymnasium's reset distribution."""
    family = get_family(name)
    tasks = sample_tasks(family, {"train": 2, "extrap": 2}, seed=5)
    matrix = task_matrix(tasks, family)
    ref = _reference(family, tasks, LIMIT)
    vecs = [_ours(family, matrix[i:i + 1], 1, LIMIT) for i in range(len(tasks))]
    ref.reset(seed=11)
    obs = np.concatenate([v.reset(seed=11 + i)[0] for i, v in enumerate(vecs)])
    for i, v in enumerate(vecs):
        state = _state_from_vector(name, v.unwrapped, 0)
        _check_fresh_start(name, state)
        ref.envs[i].unwrapped.state = state
    np.testing.assert_allclose(obs, np.stack([_single_obs(name, env) for env in ref.envs]), rtol=1e-6)
    rng = np.random.default_rng(0)
    seen = {"terminated": 0, "truncated": 0, "reset after termination": 0, "reset after truncation": 0}
    prev_term = prev_trunc = np.zeros(len(tasks), dtype=bool)
    for step in range(400):
        actions = rng.integers(0, family.n_actions, size=len(tasks))
        mine = [v.step(actions[i:i + 1]) for i, v in enumerate(vecs)]
        ours = tuple(np.concatenate([m[j] for m in mine]) for j in range(4))
        theirs = list(ref.step(actions)[:4])
        for i in np.flatnonzero(prev_term | prev_trunc):  # this step reset env i, in both
            state = _state_from_vector(name, vecs[i].unwrapped, 0)
            _check_fresh_start(name, state)
            ref.envs[i].unwrapped.state = state
            theirs[0][i] = _single_obs(name, ref.envs[i])
        _compare_step(ours, theirs, step)
        assert not (ours[1][prev_term | prev_trunc]).any()  # autoreset steps pay nothing
        seen["reset after termination"] += int(prev_term.sum())
        seen["reset after truncation"] += int(prev_trunc.sum())
        prev_term, prev_trunc = ours[2], ours[3]
        seen["terminated"] += int(prev_term.sum())
        seen["truncated"] += int(prev_trunc.sum())
        if step % 40 == 7:  # plant a near-terminal state in task 0's env, in both
            state = np.asarray(NEAR_END[name], dtype=np.float64)
            _set_vector_state(name, vecs[0].unwrapped, 0, state)
            ref.envs[0].unwrapped.state = state.copy()
    assert min(seen.values()) >= 5, seen  # every case was compared, several times


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_env_resets_from_its_own_stream(name):
    """Env 0's start states, episode after episode, are the same whatever env 1 does (its episodes end at
    other steps, under other actions and planted near-terminal states): a run's resets never depend on its
    neighbours' (the pairing by common random numbers of meta-test's runs rests on it). With a different
    seed they differ."""
    family = get_family(name)
    matrix = task_matrix(sample_tasks(family, {"train": 2}, seed=5), family)

    def starts(seed: int, other_actions_seed: int) -> list[np.ndarray]:
        vec = _ours(family, matrix, 1, LIMIT)
        vec.reset(seed=seed)
        out = [_state_from_vector(name, vec.unwrapped, 0).copy()]
        mine, other = np.random.default_rng(0), np.random.default_rng(other_actions_seed)
        done = np.zeros(2, dtype=bool)
        for step in range(200):
            actions = np.array([mine.integers(family.n_actions), other.integers(family.n_actions)])
            _, _, term, trunc, _ = vec.step(actions)
            if other_actions_seed == 2 and step % 17 == 3:  # env 1 ends early now and then (random actions
                _set_vector_state(name, vec.unwrapped, 1, np.asarray(NEAR_END[name], dtype=np.float64))
            if done[0]:
                out.append(_state_from_vector(name, vec.unwrapped, 0).copy())
            done = term | trunc
        return out

    a, b = starts(3, 1), starts(3, 2)
    assert len(a) >= 5
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(starts(4, 1))[:len(a)])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_many_envs_per_task_reset_independently(name):
    """The layout training uses (E envs per task, task-major, one vector env): an env's episode end resets that
    env only. Reset states come from each env's own stream here, so at each autoreset the reference env is
    given our new state (checked to be a fresh start) and the comparison goes on from there."""
    family = get_family(name)
    tasks = sample_tasks(family, {"train": 2, "extrap": 1}, seed=5)
    e = 3
    vec = _ours(family, task_matrix(tasks, family), e, LIMIT)
    ref = _reference(family, tasks.loc[tasks.index.repeat(e)], LIMIT)
    obs, _ = vec.reset(seed=1)
    ref.reset(seed=2)
    n = len(tasks) * e
    for i in range(n):
        ref.envs[i].unwrapped.state = _state_from_vector(name, vec.unwrapped, i)
    np.testing.assert_allclose(obs, np.stack([_single_obs(name, env) for env in ref.envs]), rtol=1e-6)
    rng = np.random.default_rng(1)
    done = np.zeros(n, dtype=bool)
    resets = mixed = 0
    for step in range(300):
        actions = rng.integers(0, family.n_actions, size=n)
        ours = vec.step(actions)[:4]
        theirs = list(ref.step(actions)[:4])
        if done.any():
            resets += int(done.sum())
            mixed += int(not done.all())
            for i in np.flatnonzero(done):
                state = _state_from_vector(name, vec.unwrapped, i)
                _check_fresh_start(name, state)
                ref.envs[i].unwrapped.state = state
                theirs[0][i] = _single_obs(name, ref.envs[i])
        _compare_step(ours, theirs, step)
        done = ours[2] | ours[3]
        if step % 30 == 4:
            k = step // 30 % n
            state = np.asarray(NEAR_END[name], dtype=np.float64)
            _set_vector_state(name, vec.unwrapped, k, state)
            ref.envs[k].unwrapped.state = state.copy()
    assert resets >= 10 and mixed >= 5, (resets, mixed)


def _check_fresh_start(name, state) -> None:
    """gymnasium's reset distributions: U(-0.05, 0.05) for CartPole, U(-0.1, 0.1) for Acrobot, position
    U(-0.6, -0.4) and velocity 0 for MountainCar."""
    state = np.asarray(state)
    if name == "mountaincar":
        assert -0.6 <= state[0] <= -0.4 and state[1] == 0.0, state
    else:
        bound = 0.05 if name.startswith("cartpole") else 0.1
        assert (np.abs(state) <= bound).all(), state


def _state_from_vector(name, inner, i):
    if name.startswith("cartpole"):
        return inner.state[:, i].copy()
    if name == "acrobot":
        return inner.state[i].copy()
    return inner.state[i].copy()
