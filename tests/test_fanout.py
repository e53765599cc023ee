"""The fan-out contract: mappers return fn(group) in order; the process runner really runs groups in
single-thread worker processes; and the torch thread count does not change a training result (which is
what lets the runner choose it)."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from metadqn.fanout import group_label, run_in_process
from tests.helpers import ROOT


def _probe(offset: int, group: int) -> tuple[int, int, int]:
    """Where and how a group ran: (process id, torch threads, the computed value)."""
    return os.getpid(), torch.get_num_threads(), group + offset


def test_run_in_process_keeps_the_order_of_the_groups():
    assert run_in_process(functools.partial(_probe, 10), [3, 1, 2]) == [(os.getpid(), torch.get_num_threads(), v)
                                                                         for v in (13, 11, 12)]


class _Sized(int):
    """An int group that says how long it takes (its value)."""

    @property
    def cost(self) -> float:
        return float(self)


def test_groups_are_submitted_longest_first_ties_and_costless_in_plan_order():
    from flows.runners import submission_order

    assert submission_order([_Sized(1), _Sized(5), 3, _Sized(5), _Sized(2)]) == [1, 3, 4, 0, 2]
    assert submission_order([3, 1, 2]) == [0, 1, 2]


def test_group_label_uses_a_string_label_and_falls_back_to_the_index():
    class Labelled:
        label = "hypernet-dqn"

    assert group_label(Labelled(), 3) == "hypernet-dqn"
    assert group_label({"label": "not an attribute"}, 3) == "group-3"


@pytest.mark.slow
def test_process_runner_runs_each_group_in_a_worker_process_of_the_configured_threads(tiny_params):
    from flows.runners import prefect_mapper, task_runner
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    runner = tiny_params.runner.model_copy(update={"kind": "processes", "workers": 2, "threads": 1})
    params = tiny_params.model_copy(update={"runner": runner})

    @flow
    def fan_out() -> list[tuple[int, int, int]]:
        # submitted longest first (8 first), returned in the groups' order
        return prefect_mapper(functools.partial(_probe, 100), [_Sized(v) for v in (5, 6, 7, 8)])

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the workers must not inherit the parent's setting
    try:
        with prefect_test_harness(server_startup_timeout=60):
            out = fan_out.with_options(task_runner=task_runner(params))()
    finally:
        torch.set_num_threads(torch_threads)
    assert [v for _, _, v in out] == [105, 106, 107, 108]
    pids = {pid for pid, _, _ in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {threads for _, threads, _ in out} == {1}


def test_torch_thread_count_does_not_change_a_training_run():
    from metadqn.config import DQNConfig
    from metadqn.dqn import train_dqn
    from metadqn.envs import get_family, sample_tasks, task_matrix

    family = get_family("cartpole-mirrored")
    tasks = task_matrix(sample_tasks(family, {"train": 4}, seed=0), family)
    # the default network and batch (what the stages train), a short run with a few gradient bursts
    cfg = DQNConfig(total_steps=1536, learning_starts=256, train_frequency=256, gradient_steps=32,
                    eval_interval=768, eval_episodes=2)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(train_dqn(family, tasks, cfg, seed=3))
    finally:
        torch.set_num_threads(threads)
    one, two = runs
    np.testing.assert_array_equal(one.best_return, two.best_return)
    for a, b in zip(one.final_params, two.final_params, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_meta_train_submits_reptile_before_the_short_learners():
    """Reptile's online inner loops take about a hypernet seed's time; in plan order it started last and ran
    alone at the end of the stage. Longest first, it follows the hypernet seeds."""
    from flows.runners import submission_order

    from metadqn.config import load_params
    from metadqn.stages.meta_train import learner_names, plan_jobs

    params = load_params(ROOT / "params.yaml")
    jobs = plan_jobs(params, learner_names(params))
    order = [jobs[i].label for i in submission_order(jobs)]
    assert order == ["hypernet seed 0", "hypernet seed 1", "hypernet seed 2", "reptile", "hypernet-oracle seed 0",
                     "siamese", "multitask"]
