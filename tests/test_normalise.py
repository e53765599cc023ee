"""The return scale (#14): 0 is the random policy, 1 the expert, for any sign of returns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metadqn.data.io import CorruptDataError
from metadqn.data.normalise import ReturnScale, ScaleError, reference_return
from metadqn.data.store import TaskStore
from metadqn.dqn.rollout import GreedyEvaluator, uniform_policy
from metadqn.envs import get_family, sample_tasks, task_matrix
from metadqn.evaluation.summary import per_run_scores

# (random, expert) per family: CartPole-like positive, MountainCar-like negative, and a mixed-sign task
SCALES = {"positive": (22.0, 500.0), "negative": (-200.0, -110.0), "mixed": (-5.0, 10.0)}


def _scale(random: float, expert: float, solved: float = -np.inf) -> ReturnScale:
    return ReturnScale.build(["t"], {"t": random}, {"t": reference_return(expert, solved)})


@pytest.mark.parametrize("kind", SCALES)
def test_random_is_zero_and_expert_is_one_for_any_sign(kind: str) -> None:
    random, expert = SCALES[kind]
    scale = _scale(random, expert)
    got = scale(np.array([[random], [expert], [(random + expert) / 2], [expert + (expert - random)]]))[:, 0]
    np.testing.assert_allclose(got, [0.0, 1.0, 0.5, 2.0])
    # better is higher: order is kept whatever the sign of the returns
    assert np.all(np.diff(scale(np.linspace(random, expert, 7)[:, None])[:, 0]) > 0)


def test_the_old_ratio_inverted_for_negative_returns() -> None:
    """The bug this replaces: a failing -200 over an expert's -21 scored 9.5 (MountainCar, #14)."""
    random, expert = -200.0, -21.0
    assert random / expert > 9  # what R / R_expert said
    assert _scale(random, expert)(np.array([random]))[0] == 0.0


def _curve(returns: list[float], budget: int = 20_000) -> pd.DataFrame:
    steps = np.linspace(64, budget, len(returns)).astype(int)
    return pd.DataFrame({"task_id": "t", "split": "interp", "method": "m", "seed": 0, "step": steps,
                         "return": returns})


@pytest.mark.parametrize("kind", ["negative", "mixed"])
def test_a_run_that_never_improves_is_censored_near_zero_and_an_expert_run_is_one(kind: str) -> None:
    random, expert = SCALES[kind]
    scale = _scale(random, expert)
    rng = np.random.default_rng(0)
    flat = _curve(list(random + rng.normal(0, 0.02 * abs(expert - random), 21)))
    good = _curve([expert] * 21)
    rows = []
    for name, curve in (("flat", flat), ("expert", good)):
        curve["normalised_return"] = scale.column(curve["return"], curve["task_id"])
        rows.append(per_run_scores(curve, 0.9, 20_000).assign(run=name))
    scores = pd.concat(rows).set_index("run")
    assert scores.loc["flat", "auc"] <= 0.1
    assert bool(scores.loc["flat", "censored"])
    assert scores.loc["expert", "auc"] == pytest.approx(1.0)
    assert not bool(scores.loc["expert", "censored"])
    assert scores.loc["expert", "steps_to_threshold"] == 64


def test_an_expert_short_of_solved_is_scored_against_the_solved_return() -> None:
    """A failed MountainCar expert stuck at the random -200 would make the scale 0/0."""
    scale = _scale(-200.0, -200.0, solved=-110.0)
    assert scale.reference[0] == -110.0
    assert scale(np.array([-110.0]))[0] == 1.0


def test_a_scale_that_cannot_normalise_is_refused_in_one_line() -> None:
    for random, ref in ((-110.0, -110.0), (5.0, 1.0), (float("nan"), 1.0)):
        with pytest.raises(ScaleError, match=r"^m.json: task t's reference return .* cannot be normalised") as e:
            ReturnScale.build(["t"], {"t": random}, {"t": ref}, "m.json")
        assert "\n" not in str(e.value)


def test_column_and_concat_follow_the_task_ids() -> None:
    a = ReturnScale.build(["a"], {"a": 0.0}, {"a": 10.0})
    b = ReturnScale.build(["b"], {"b": -100.0}, {"b": -50.0})
    both = ReturnScale.concat(a, b)
    np.testing.assert_allclose(both(np.array([5.0, -75.0])), [0.5, 0.5])
    got = both.column(pd.Series([-50.0, 10.0, 0.0]), pd.Series(["b", "a", "a"]))
    np.testing.assert_allclose(got, [1.0, 1.0, 0.0])
    with pytest.raises(KeyError, match="'c'"):
        both.column(pd.Series([1.0]), pd.Series(["c"]))


def test_the_store_reads_the_scale_that_collect_wrote(tmp_path: Path) -> None:
    tasks = pd.DataFrame({"task_id": ["a", "b"], "split": ["train", "train"], "family": "mountaincar"})
    tasks.to_parquet(tmp_path / "tasks.parquet")
    metrics = {"tasks": {"a": {"random_return": -200.0, "reference_return": -100.0},
                         "b": {"random_return": -200.0, "reference_return": -110.0}}}
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    store = TaskStore(tasks_path=tmp_path / "tasks.parquet", collect_metrics=tmp_path / "m.json")
    np.testing.assert_allclose(store.return_scale(["b", "a"])(np.array([-155.0, -150.0])), [0.5, 0.5])
    del metrics["tasks"]["a"]["random_return"]  # a metrics file from before #14
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    with pytest.raises(CorruptDataError, match=r"no usable return scale.*rerun `dvc repro collect`"):
        store.return_scale(["a"])


@pytest.mark.parametrize(("name", "low", "high"), [("cartpole", 10, 40), ("mountaincar", -200, -190),
                                                   ("acrobot", -500, -300)])
def test_the_random_policy_return_is_what_each_family_is_known_for(name: str, low: float, high: float) -> None:
    """R_random as collect measures it: ~22 on CartPole, the -200 floor on MountainCar, near -500 on Acrobot."""
    family = get_family(name)
    tasks = task_matrix(sample_tasks(family, {"train": 2}, seed=0), family)
    evaluate = GreedyEvaluator(family, tasks, 20, seed=3)
    got = evaluate(uniform_policy(family.n_actions, 5))
    assert np.all((low <= got) & (got <= high)), got
    np.testing.assert_array_equal(got, evaluate(uniform_policy(family.n_actions, 5)))  # seeded: the same again
