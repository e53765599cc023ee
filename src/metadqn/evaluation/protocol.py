"""The meta-test protocol: every held-out task x method x seed, fine-tuned together in one batch.

For each test task (interpolation and extrapolation splits) and seed, a context of C transitions is
collected with the uniform-random policy; it is the same for every method (a paired design). Each method
builds its initial Q-network (meta-learners from the context, or the true physics for
``hypernet-oracle``; ``reptile`` and ``multitask`` ignore it; ``scratch`` starts from a fresh network).
Every run then gets the context in its replay buffer (so scratch and multitask get the same C steps as
extra exploration data, and budgets are equal) and fine-tunes with DQN for the rest of the budget T,
evaluated greedily every t steps. Learning-curve steps count the context: the first point, at step C,
is the zero-shot return. Returns are normalised by the task's expert return from collect (the oracle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from metadqn.config import Params
from metadqn.data.store import TaskStore
from metadqn.dqn.qnetwork import StateDict
from metadqn.dqn.rollout import collect_transitions
from metadqn.dqn.trainer import train_dqn
from metadqn.envs.families import Family
from metadqn.envs.sampling import task_matrix
from metadqn.meta.context import features_from_arrays, oracle_features
from metadqn.meta.model import MetaModel
from metadqn.progress import Progress

log = logging.getLogger("metadqn.meta_test")
TEST_SPLITS = ("interp", "extrap")


@dataclass
class ProtocolResult:
    runs: pd.DataFrame
    """One row per (task, method, seed) slot: task_id, split, method, seed."""
    curves: pd.DataFrame
    """task_id, split, method, seed, step, return, normalised_return."""
    final_params: list[StateDict]
    context_steps: int
    budget_steps: int


def available_methods(params: Params, models: Path) -> list[str]:
    out = []
    for m in params.meta_test.methods:
        if m == "scratch" or (models / m / "model.pt").exists():
            out.append(m)
        else:
            log.warning("meta-test: %s has no meta-model in %s; skipped", m, models)
    return out


def contexts(family: Family, matrix: np.ndarray, size: int, seed: int) -> list[dict[str, np.ndarray]]:
    """The first ``size`` transitions of a uniform-random policy on every task (one env per task)."""
    got = collect_transitions(family, matrix, 2 * size + 16, 1, seed)
    out = []
    for tr in got:
        if len(tr["action"]) < size:
            raise RuntimeError(f"could not collect {size} context transitions (got {len(tr['action'])})")
        out.append({k: v[:size] for k, v in tr.items()})
    return out


def check_equal_budgets(curves: pd.DataFrame, budget: int) -> None:
    """Every run must have been evaluated at the same steps and end at the same budget, whatever its method."""
    grids = curves.groupby(["task_id", "method", "seed"])["step"].apply(lambda s: tuple(sorted(s)))
    if grids.nunique() != 1 or grids.iloc[0][-1] != budget:
        raise AssertionError(f"unequal budgets across runs: {grids.value_counts().to_dict()} (budget {budget})")


def run_protocol(params: Params, store: TaskStore, models: Path) -> ProtocolResult:
    family = params.family.family()
    mt = params.meta_test
    c = params.meta_train.context_size
    tests = pd.concat([store.tasks(s) for s in TEST_SPLITS], ignore_index=True)
    matrix = task_matrix(tests, family)
    physics = torch.as_tensor(oracle_features(tests, family))
    methods = available_methods(params, models)
    loaded = {m: MetaModel.load(models / m) for m in methods if m != "scratch"}
    seeds = np.random.SeedSequence(mt.seed).generate_state(mt.seeds + 1)

    slots: list[tuple[int, str, int]] = []
    inits: list[StateDict | None] = []
    prefill: list[dict[str, np.ndarray]] = []
    for s in range(mt.seeds):
        ctx = contexts(family, matrix, c, int(seeds[s]))
        feats = torch.as_tensor(np.stack([features_from_arrays(tr, family) for tr in ctx]))
        for m in methods:
            init = [None] * len(tests) if m == "scratch" else \
                loaded[m].initial_params(context=feats, physics=physics, n_tasks=len(tests))
            for t in range(len(tests)):
                slots.append((t, m, s))
                inits.append(init[t])
                prefill.append(ctx[t])
    cfg = mt.dqn(params.dqn, c)
    log.info("meta-test: %d tasks x %d methods x %d seeds = %d runs of %d steps (+%d context)",
             len(tests), len(methods), mt.seeds, len(slots), cfg.total_steps, c)
    with Progress(cfg.total_steps, f"fine-tuning {len(slots)} runs") as bar:
        result = train_dqn(family, matrix[[t for t, _, _ in slots]], cfg, int(seeds[-1]), init=inits,
                           prefill=prefill, on_steps=bar.advance)

    runs = pd.DataFrame([{"slot": k, "task_id": tests["task_id"][t], "split": tests["split"][t], "method": m,
                          "seed": s} for k, (t, m, s) in enumerate(slots)])
    expert = store.expert_returns(list(tests["task_id"]))
    curves = result.curves.merge(runs, on="slot")
    curves["step"] = curves["step"] + c
    curves = curves.rename(columns={"eval_return": "return"})
    curves["normalised_return"] = curves["return"] / curves["task_id"].map(expert)
    curves = curves[["task_id", "split", "method", "seed", "step", "return", "normalised_return"]]
    check_equal_budgets(curves, mt.budget_steps)
    return ProtocolResult(runs.drop(columns="slot"), curves.sort_values(["split", "method", "task_id", "seed", "step"])
                          .reset_index(drop=True), result.final_params, c, mt.budget_steps)
