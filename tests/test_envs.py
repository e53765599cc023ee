from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from metadqn.envs import FAMILIES, SPLITS, get_family, sample_tasks, task_matrix

COUNTS = {"train": 6, "val": 3, "interp": 3, "extrap": 3}


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
            ranges = spec.extrap if split == "extrap" else spec.train
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


def test_mirrored_family_has_both_push_directions():
    family = get_family("cartpole-mirrored")
    tasks = sample_tasks(family, {"train": 40}, seed=0)
    assert set(tasks["force_sign"]) == {-1.0, 1.0}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_vector_env_matches_single_envs_step_for_step(name):
    """Each env of the vector env follows its own task's physics, exactly as the single gymnasium env."""
    family = get_family(name)
    tasks = sample_tasks(family, {"train": 2, "extrap": 2}, seed=5)
    matrix = task_matrix(tasks, family)
    vec = family.vector_env(matrix, envs_per_task=1)
    obs, _ = vec.reset(seed=0)
    singles = [family.make_env(row[family.param_names].to_dict()).unwrapped for _, row in tasks.iterrows()]
    rng = np.random.default_rng(0)
    for i, env in enumerate(singles):
        env.reset(seed=0)
        env.state = _state_from_vector(name, vec.unwrapped, i)
    for _ in range(60):
        actions = rng.integers(0, family.n_actions, size=len(singles))
        obs, reward, term, _, _ = vec.step(actions)
        for i, env in enumerate(singles):
            o, r, t, _, _ = env.step(int(actions[i]))
            np.testing.assert_allclose(obs[i], o, rtol=1e-5, atol=1e-5)
            assert r == reward[i] and t == term[i]
        if term.any():
            break


def _state_from_vector(name, inner, i):
    if name.startswith("cartpole"):
        return inner.state[:, i].copy()
    if name == "acrobot":
        return inner.state[i].copy()
    return inner.state[i].copy()
