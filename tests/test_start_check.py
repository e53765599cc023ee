"""The start check (``FinetuneConfig.start_check``): a start whose greedy policy fails in the model of the task
fitted to its context is discarded, and the run reported for it is scratch's on the same slot, in meta-test
(:func:`metadqn.evaluation.protocol.splice_scratch`) and in the search (``_fall_back``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from metadqn.config import ParamsError, load_params
from metadqn.dqn.qnetwork import unflatten_state_dict
from metadqn.evaluation.protocol import GroupRun, contexts, failed_start_check, splice_scratch
from metadqn.evaluation.search import SCRATCH_REFERENCE, _fall_back
from tests.test_dynamics import FAMILY, HIDDEN, SHAPES, _context, _lean_controller, _task

ROOT = Path(__file__).resolve().parents[1]


def _params():
    params = load_params(ROOT / "params.yaml", ROOT / "tests" / "params.tiny.yaml")
    return params.model_copy(update={"dqn": params.dqn.model_copy(update={"hidden_sizes": HIDDEN})})


def test_model_fraction_tells_the_right_balancer_from_its_mirror():
    from metadqn.meta.dynamics import ModelScore

    tasks = np.array([_task(1.0), _task(-1.0)])
    flat = torch.stack([_lean_controller(1.0), _lean_controller(-1.0)]).expand(2, 2, -1)
    frac = ModelScore(FAMILY, SHAPES).fraction(flat, _context(tasks))
    assert frac[0, 0] > 0.95 and frac[1, 1] > 0.95  # lasts the simulated episode
    assert frac[0, 1] < 0.1 and frac[1, 0] < 0.1  # falls within a few dozen of 500 steps
    assert ((frac >= 0) & (frac <= 1)).all()


def test_a_start_that_fails_in_its_own_context_model_falls_back_and_scratch_never_does():
    tasks = np.array([_task(1.0), _task(1.0), _task(-1.0), _task(-1.0)])
    ctx = contexts(FAMILY, tasks, 64, 3)
    right, mirror = (unflatten_state_dict(_lean_controller(s), SHAPES) for s in (1.0, -1.0))
    starts = [right, mirror, right, None]  # slot 3: scratch's fresh network
    params = _params()
    assert failed_start_check(params, starts, ctx, [0.5] * 4) == [False, True, True, False]
    # no threshold: never checked
    assert failed_start_check(params, starts, ctx, [None, None, 0.5, 0.5]) == [False, False, True, False]


def _run(method: str, value: float, k: int = 3) -> GroupRun:
    curves = pd.DataFrame([(slot, step, value + slot) for step in (0, 10, 20) for slot in range(k)],
                          columns=["slot", "step", "eval_return"])
    return GroupRun(method, curves, [{"w": torch.full((1,), value + slot)} for slot in range(k)],
                    np.full(k, value))


def test_splice_puts_scratchs_run_in_the_failed_slots_and_keeps_the_start_for_the_frozen_control():
    own, scratch = _run("hypernet", 100.0), _run("scratch", 0.0)
    out = splice_scratch(own, scratch, [False, True, False])
    by_slot = out.curves.groupby("slot")["eval_return"].apply(list).to_dict()
    assert by_slot == {0: [100.0] * 3, 1: [1.0] * 3, 2: [102.0] * 3}
    assert out.curves[["slot", "step"]].equals(own.curves[["slot", "step"]])  # same rows, same order
    assert [float(p["w"]) for p in out.final_params] == [100.0, 1.0, 102.0]
    np.testing.assert_array_equal(out.start_return, own.start_return)


def test_the_search_scores_a_failed_start_with_scratchs_reference_run():
    def rows(method, candidate, seed_values, tasks=(0, 1)):
        return [{"task_id": f"val-{t}", "seed": 0, "method": method, "candidate": candidate, "step": step,
                 "return": v, "normalised_return": v, "split": "val", "fallback": False}
                for t, v in zip(tasks, seed_values, strict=True) for step in (64, 128)]

    # the checked candidate's start failed on val-1: that slot was not trained, it has no rows of its own
    curves = pd.DataFrame(rows("scratch", SCRATCH_REFERENCE, [0.1, 0.2]) + rows("hypernet", "checked", [0.9], (0,))
                          + rows("hypernet", "unchecked", [0.9, 0.0]))
    fallen = pd.DataFrame([("hypernet", "checked", "val-1", 0)], columns=["method", "candidate", "task_id", "seed"])
    out = _fall_back(curves, fallen)
    got = out.groupby(["candidate", "task_id"])["normalised_return"].first().to_dict()
    assert got[("checked", "val-0")] == 0.9 and got[("checked", "val-1")] == 0.2  # scratch's on val-1
    assert got[("unchecked", "val-1")] == 0.0
    assert len(out) == len(curves) + 2 and set(out.columns) == set(curves.columns)
    assert out.loc[out["candidate"] == "checked", "method"].eq("hypernet").all()
    assert out.loc[out["candidate"] == "checked"].groupby("task_id")["fallback"].all().to_dict() == \
        {"val-0": False, "val-1": True}


def test_a_start_check_needs_scratch_among_the_methods(tmp_path):
    params = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    text = text.replace("methods: [hypernet, hypernet-oracle, siamese, reptile, multitask, select, scratch]",
                        "methods: [hypernet, siamese]")
    text = text.replace("      dqn: {}\n      # every lever", "      dqn: {start_check: 0.5}\n      # every lever")
    assert "start_check: 0.5" in text
    params.write_text(text)
    with pytest.raises(ParamsError, match=r"start_check.*scratch"):
        load_params(params)
