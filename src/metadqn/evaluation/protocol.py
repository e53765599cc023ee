"""The meta-test protocol: every held-out task x method x seed, fine-tuned in one batch per method.

For each test task (interpolation and extrapolation splits) and seed, a context of C transitions is
collected with the uniform-random policy; it is the same for every method (a paired design). Each method
builds its initial Q-network (meta-learners from the context, or the true physics for
``hypernet-oracle``; ``reptile`` and ``multitask`` ignore it; ``scratch`` starts from a fresh network).
Every run then gets the context in its replay buffer (so scratch and multitask get the same C steps as
extra exploration data, and budgets are equal) and fine-tunes with DQN for the rest of the budget T,
evaluated greedily every t steps. Learning-curve steps count the context: the first point, at step C,
is the zero-shot return. Returns are normalised per task, 0 = the random policy, 1 = the expert
(:mod:`metadqn.data.normalise`).

Groups. Contexts and initial networks are built in the stage process (they need the meta-models on
disk); the fine-tuning is split into one :class:`ProtocolGroup` per method (every test task x seed of
that method, one batched trainer run), and ``map_groups`` trains the groups wherever the runner says (in
process, in worker processes, one Dask task per group; see :mod:`metadqn.fanout`). A group carries
everything it needs, so a worker reads no file. Per method because: a method's numbers then never depend
on which other methods were compared; the groups are equal-sized, so they balance across workers; and
K = tasks x seeds (80 with the default params) is where the batched trainer is most efficient on CPU
(measured on 2 cores, one thread, 4k-step budget: 480 runs in one batch 94 s, 6 x 80 in 70 s, 3 x 160 in
67 s, 30 x 16 in 94 s).

Fine-tuning configurations. Each meta-learned method fine-tunes with its own configuration (a
:class:`~metadqn.config.FinetuneConfig`), chosen on validation tasks by the finetune_search stage
(:mod:`metadqn.evaluation.search`) and read from its DVC-tracked output; scratch always fine-tunes with the
dqn section (tuned for learning from scratch). The group carries its DQN config and levers. A method whose
configuration is :data:`FRESH` (its start discarded) is not trained again: its runs are scratch's, slot for
slot, and only its start is evaluated, for its frozen control.

Frozen controls. Each meta-learned method is also reported as ``<method>-frozen``: its start network with
no updates. Every evaluation of a learning curve plays the same start states (:class:`GreedyEvaluator`)
and environments and greedy policies are deterministic, so an unchanged network scores exactly its first
evaluation at every point: the control's curve is that value repeated, and costs no extra environment step.

Seeds. A group's training seed derives from ``meta_test.seed`` and its (task, seed index) slots only,
never from the method or from the other groups, so every runner gives the same result, and every method
fine-tunes under common random numbers: the same environment resets, exploration draws, replay-sample
indices and evaluation start states for the same (task, seed) slot. Methods differ only in their initial
network, which sharpens the paired comparison.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metadqn.config import FROZEN_SUFFIX, DQNConfig, FinetuneConfig, Params
from metadqn.data.store import TaskStore
from metadqn.dqn.qnetwork import StateDict, flatten_state_dict
from metadqn.dqn.rollout import collect_transitions
from metadqn.dqn.trainer import start_returns, train_dqn
from metadqn.envs.families import Family
from metadqn.envs.sampling import task_matrix
from metadqn.fanout import GroupMapper, run_in_process
from metadqn.learners import SCRATCH
from metadqn.meta.context import features_from_arrays, oracle_features
from metadqn.meta.dynamics import ModelScore
from metadqn.meta.model import MetaModel
from metadqn.progress import Progress
from metadqn.seeding import derive_seed

log = logging.getLogger("metadqn.meta_test")
TEST_SPLITS = ("interp", "extrap")


@dataclass
class ProtocolGroup:
    """One method's fine-tuning runs (one slot per test task x seed): one batched trainer, one Prefect or
    Dask task. Picklable and self-contained."""

    method: str
    task_ids: list[str]
    """Slot k's test task."""
    seeds: list[int]
    """Slot k's seed index (0 .. meta_test.seeds - 1)."""
    tasks: np.ndarray = field(repr=False)
    """[K, n_params] physics of each slot's task."""
    init: list[StateDict | None] = field(repr=False)
    """Each slot's initial Q-network (None: a fresh network, for scratch)."""
    prefill: list[dict[str, np.ndarray]] = field(repr=False)
    """Each slot's context transitions (written into its replay buffer before the first step)."""
    seed: int
    """The training seed: from meta_test.seed and the slots only (see :func:`group_seed`)."""
    cfg: DQNConfig = field(repr=False)
    """The fine-tuning runs' DQN config (budget T minus the context, the candidate's dqn overrides)."""
    finetune: FinetuneConfig | list[FinetuneConfig] = field(default_factory=FinetuneConfig)
    """The fine-tuning levers (all off for scratch), or one config per slot (the search)."""
    candidate: str = "dqn"
    """The name of the fine-tuning configuration (a key of meta_test.search.candidates)."""
    methods: list[str] = field(default_factory=list)
    """Slot k's method, when a group mixes methods (the search); empty: every slot is ``method``."""
    candidates: list[str] = field(default_factory=list)
    """Slot k's configuration, when a group mixes them (the search); empty: every slot is ``candidate``."""
    fallback: list[bool] = field(default_factory=list)
    """Slot k's start failed its configuration's start check (:func:`failed_start_check`): the slot's
    reported run is scratch's on the same slot, not its own; empty: no slot fell back."""

    @property
    def cost(self) -> float:
        """A rough estimate of its training time, only for ordering groups (longest first, see
        ``flows.runners``): slots x (gradient updates + env steps / 8). Measured on 2 cores: a group of 80
        slots with 128 gradient steps per 256 env steps takes ~2.3x one with 32, which this gives (2.4x)."""
        return len(self.task_ids) * slot_cost(self.cfg)

    @property
    def label(self) -> str:
        """Its name in logs and the Prefect UI: the method and configuration, or the configurations of a
        search group (which mixes methods)."""
        if self.candidates:
            return "search: " + ", ".join(dict.fromkeys(self.candidates))
        return f"{self.method} ({self.candidate})"


def slot_cost(cfg: DQNConfig) -> float:
    """One slot's share of :attr:`ProtocolGroup.cost`: gradient updates + env steps / 8."""
    bursts = max(cfg.total_steps - cfg.learning_starts, 0) / cfg.train_frequency
    return bursts * cfg.gradient_steps + cfg.total_steps / 8


@dataclass
class GroupRun:
    """What one group's fine-tuning returns (picklable, so it can come back from a worker)."""

    method: str
    curves: pd.DataFrame
    """Columns slot (within the group), step (fine-tuning steps, context excluded), eval_return."""
    final_params: list[StateDict]
    start_return: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Each slot's start network's greedy evaluation (the frozen control's value at every point)."""
    wall_s: float = 0.0


@dataclass
class ProtocolResult:
    runs: pd.DataFrame
    """One row per (task, method, seed) slot: task_id, split, method, seed, fallback (its start failed the
    start check and its run is scratch's)."""
    curves: pd.DataFrame
    """task_id, split, method, seed, step, return, normalised_return."""
    final_params: list[StateDict]
    context_steps: int
    budget_steps: int
    groups: int = 1
    """How many groups (batched trainer runs) the fine-tuning was split into."""


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


def context_seed(seed: int, index: int) -> int:
    """The seed of the contexts of seed index ``index`` (shared by every method)."""
    return derive_seed(seed, index)


def group_seed(seed: int, task_ids: Sequence[str], seeds: Sequence[int]) -> int:
    """A group's training seed: a hash of ``meta_test.seed`` and its (task, seed index) slots. The method
    is left out on purpose (common random numbers across methods)."""
    slots = ",".join(f"{t}/{s}" for t, s in zip(task_ids, seeds, strict=True))
    digest = hashlib.sha256(f"{seed}:{slots}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def finetune_config(params: Params, finetune: FinetuneConfig | None = None) -> DQNConfig:
    """A fine-tuning run's DQN config: budget T minus the context's C steps, the candidate's dqn overrides."""
    return params.meta_test.dqn(params.dqn, params.meta_train.context_size, finetune)


def check_equal_budgets(curves: pd.DataFrame, budget: int) -> None:
    """Every run must have been evaluated at the same steps and end at the same budget, whatever its method."""
    grids = curves.groupby(["task_id", "method", "seed"])["step"].apply(lambda s: tuple(sorted(s)))
    if grids.nunique() != 1 or grids.iloc[0][-1] != budget:
        raise AssertionError(f"unequal budgets across runs: {grids.value_counts().to_dict()} (budget {budget})")


FRESH = FinetuneConfig(shrink=0.0)
"""A configuration that keeps nothing of the start and sets no other lever: every run of it is the run scratch
makes on the same slot (a fresh network of the slot's own seed, trained with the dqn section; scratch and
every method get the same slot seeds), so neither the search nor meta-test trains it again: scratch's runs
stand for it (:func:`reuses_scratch`)."""


def reuses_scratch(ft: FinetuneConfig) -> bool:
    return ft == FRESH


def start_fractions(params: Params, init: Sequence[StateDict | None],
                    prefill: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    """[K]: start k's model fraction (:meth:`~metadqn.meta.dynamics.ModelScore.fraction`) from its own context
    ``prefill[k]``: the share of the best return its greedy policy gets in the task's model."""
    starts = [sd for sd in init if sd is not None]
    if len(starts) != len(init):
        raise ValueError("a fresh network (scratch's) has no start to check")
    if not starts:
        return np.zeros(0)
    family = params.family.family()
    score = ModelScore.from_params(params, family)
    feats = torch.as_tensor(np.stack([features_from_arrays(ctx, family) for ctx in prefill]))
    flat = torch.stack([flatten_state_dict(sd, score.shapes) for sd in starts]).unsqueeze(1)
    return score.fraction(flat, feats)[:, 0].numpy()


def fails_check(fraction: float, threshold: float | None) -> bool:
    """The start check's rule: a start whose model fraction (:func:`start_fractions`) is below the
    configuration's ``start_check`` fails; without a threshold nothing fails."""
    return threshold is not None and bool(fraction < threshold)


def failed_start_check(params: Params, init: Sequence[StateDict | None], prefill: Sequence[dict[str, np.ndarray]],
                       thresholds: Sequence[float | None]) -> list[bool]:
    """Slot k's start fails the start check (``FinetuneConfig.start_check``) when its model fraction
    (:func:`start_fractions`) is below ``thresholds[k]``; a slot without a threshold or without a start
    (scratch) never fails."""
    checked = [k for k, (sd, q) in enumerate(zip(init, thresholds, strict=True)) if q is not None and sd is not None]
    out = [False] * len(init)
    frac = start_fractions(params, [init[k] for k in checked], [prefill[k] for k in checked])
    for k, f in zip(checked, frac, strict=True):
        out[k] = fails_check(f, thresholds[k])
    return out


Choice = tuple[str, FinetuneConfig]
"""A fine-tuning configuration: its name and its levers."""
SCRATCH_CHOICE: Choice = ("dqn", FinetuneConfig())


def initial_networks(params: Params, tasks: pd.DataFrame, models: Path, methods: Sequence[str], n_seeds: int,
                     seed: int) -> tuple[dict[str, list[StateDict | None]], list[dict[str, np.ndarray]]]:
    """Every method's initial network and the shared context of each (seed index, task) slot, seed-major.

    The contexts of seed index s come from ``context_seed(seed, s)`` and are the same for every method.
    """
    family = params.family.family()
    c = params.meta_train.context_size
    matrix = task_matrix(tasks, family)
    physics = torch.as_tensor(oracle_features(tasks, family))
    ctx = [contexts(family, matrix, c, context_seed(seed, s)) for s in range(n_seeds)]
    feats = [torch.as_tensor(np.stack([features_from_arrays(tr, family) for tr in ctx_s])) for ctx_s in ctx]
    n = len(tasks)
    init: dict[str, list[StateDict | None]] = {}
    for m in methods:
        model = None if m == "scratch" else MetaModel.load(models / m)
        init[m] = []
        for s in range(n_seeds):
            init[m].extend([None] * n if model is None else
                           model.initial_params(context=feats[s], physics=physics, n_tasks=n))
    return init, [tr for ctx_s in ctx for tr in ctx_s]


def plan_groups(params: Params, tests: pd.DataFrame, models: Path,
                choices: dict[str, Choice] | None = None) -> list[ProtocolGroup]:
    """Contexts, initial networks, seeds and fine-tuning configs of every run, one group per available method.

    ``choices[method]`` is the method's fine-tuning configuration (default, and always for scratch: the
    dqn section with no levers).
    """
    family = params.family.family()
    mt = params.meta_test
    methods = available_methods(params, models)
    init, prefill = initial_networks(params, tests, models, methods, mt.seeds, mt.seed)
    matrix = task_matrix(tests, family)
    n = len(tests)
    task_ids = [tid for _ in range(mt.seeds) for tid in tests["task_id"]]
    seeds = [s for s in range(mt.seeds) for _ in range(n)]
    rows = [t for _ in range(mt.seeds) for t in range(n)]
    seed = group_seed(mt.seed, task_ids, seeds)
    groups = []
    for m in methods:
        if choices is not None and m != "scratch" and m not in choices:
            log.warning("meta-test: the fine-tuning selection has no configuration for %s; it fine-tunes with the "
                        "dqn section (rerun `dvc repro finetune_search`)", m)
        name, ft = SCRATCH_CHOICE if m == "scratch" else (choices or {}).get(m, SCRATCH_CHOICE)
        fallback = failed_start_check(params, init[m], prefill, [ft.start_check] * len(task_ids)) \
            if ft.start_check is not None else []
        if any(fallback) and SCRATCH not in methods:  # config validation requires scratch with a start check
            raise RuntimeError(f"{m}: a start check fell back, but scratch is not in meta_test.methods")
        groups.append(ProtocolGroup(method=m, task_ids=task_ids, seeds=seeds, tasks=matrix[rows], init=init[m],
                                    prefill=prefill, seed=seed, cfg=finetune_config(params, ft), finetune=ft,
                                    candidate=name, fallback=fallback))
    return groups


def finetune_group(family: Family, group: ProtocolGroup, show_progress: bool = True) -> GroupRun:
    """Fine-tunes every slot of one group in one batched trainer run (a pure function of its arguments)."""
    start = time.perf_counter()
    desc = f"fine-tuning {group.method} [{group.candidate}] ({len(group.task_ids)} runs)"
    with Progress(group.cfg.total_steps, desc) if show_progress else contextlib.nullcontext() as bar:
        result = train_dqn(family, group.tasks, group.cfg, group.seed, init=group.init, prefill=group.prefill,
                           on_steps=bar.advance if bar is not None else None, finetune=group.finetune)
    return GroupRun(group.method, result.curves, result.final_params, result.start_return,
                    time.perf_counter() - start)


def frozen_curves(curves: pd.DataFrame, start_return: np.ndarray) -> pd.DataFrame:
    """The frozen-start control of a group: each slot's start evaluation at every evaluation step."""
    frozen = curves[["slot", "step"]].copy()
    frozen["eval_return"] = start_return[frozen["slot"].to_numpy()]
    return frozen


def _train_groups(family: Family, groups: list[ProtocolGroup], map_groups: GroupMapper) -> list[GroupRun]:
    """Every group's run, in order. A method whose configuration is :data:`FRESH`, or whose start failed its
    start check on every slot, is not trained when scratch is in the protocol: its curves and final networks
    are scratch's (the same runs, slot for slot), and only its start is evaluated, for its frozen control.
    (A group where only some slots fall back is trained whole, its fallen slots then replaced by scratch's:
    training fewer slots would change the random draws of the others, which common random numbers keep equal
    to scratch's.)"""
    scratch = [i for i, g in enumerate(groups) if g.method == SCRATCH]
    reused = {i for i, g in enumerate(groups) if scratch and g.method != SCRATCH
              and ((isinstance(g.finetune, FinetuneConfig) and reuses_scratch(g.finetune))
                   or (g.fallback and all(g.fallback)))}
    trained = [g for i, g in enumerate(groups) if i not in reused]
    runs = map_groups(functools.partial(finetune_group, family), trained)
    if [r.method for r in runs] != [g.method for g in trained]:
        raise RuntimeError("map_groups must return one result per group, in order")
    by_index = dict(zip([i for i in range(len(groups)) if i not in reused], runs, strict=True))
    for i in sorted(reused):
        g, own = groups[i], by_index[scratch[0]]
        why = f"fine-tunes with {g.candidate}" if not any(g.fallback) else "failed its start check on every run"
        log.info("meta-test: %s %s, so scratch's runs stand for its own", g.method, why)
        by_index[i] = GroupRun(g.method, own.curves, own.final_params,
                               start_returns(family, g.tasks, g.cfg, g.seed, g.init))
    for i, g in enumerate(groups):
        if any(g.fallback) and i not in reused:
            log.info("meta-test: %s's start failed its start check on %d of %d runs; scratch's runs stand for "
                     "those", g.method, sum(g.fallback), len(g.fallback))
            by_index[i] = splice_scratch(by_index[i], by_index[scratch[0]], g.fallback)
    return [by_index[i] for i in range(len(groups))]


def splice_scratch(own: GroupRun, scratch: GroupRun, fallback: Sequence[bool]) -> GroupRun:
    """``own`` with scratch's curve and final network in the slots where ``fallback`` is set (both groups
    have the same slots); its start's evaluation (the frozen control) stays its own."""
    fell = np.flatnonzero(np.asarray(fallback, dtype=bool))
    curves = pd.concat([own.curves[~own.curves["slot"].isin(fell)], scratch.curves[scratch.curves["slot"].isin(fell)]],
                       ignore_index=True).sort_values(["step", "slot"], kind="stable").reset_index(drop=True)
    final = [scratch.final_params[k] if fb else sd for k, (sd, fb) in enumerate(zip(own.final_params, fallback,
                                                                                    strict=True))]
    return GroupRun(own.method, curves, final, own.start_return, own.wall_s)


def run_protocol(params: Params, store: TaskStore, models: Path, map_groups: GroupMapper = run_in_process,
                 choices: dict[str, Choice] | None = None) -> ProtocolResult:
    """The whole protocol. ``map_groups`` trains the groups (see :mod:`metadqn.fanout`);
    ``choices`` are the meta-learned methods' fine-tuning configurations (from the search)."""
    family = params.family.family()
    mt = params.meta_test
    c = params.meta_train.context_size
    tests = store.tasks_of(TEST_SPLITS)
    groups = plan_groups(params, tests, models, choices)
    log.info("meta-test: %d tasks x %d methods x %d seeds = %d runs of %d steps (+%d context), one group per "
             "method; configurations: %s", len(tests), len(groups), mt.seeds, sum(len(g.task_ids) for g in groups),
             mt.budget_steps - c, c, ", ".join(f"{g.method}={g.candidate}" for g in groups))

    scale = store.return_scale(list(tests["task_id"]))  # before any training: a bad normaliser fails fast
    results = _train_groups(family, groups, map_groups)

    split = dict(zip(tests["task_id"], tests["split"], strict=True))
    runs: list[dict[str, Any]] = []
    curves: list[pd.DataFrame] = []
    final_params: list[StateDict] = []

    def add(method: str, group: ProtocolGroup, curve: pd.DataFrame, params_: list[StateDict],
            fallback: Sequence[bool] = ()) -> None:
        offset = len(runs)
        fell = list(fallback) or [False] * len(group.task_ids)
        runs.extend({"slot": offset + k, "task_id": tid, "split": split[tid], "method": method, "seed": s,
                     "fallback": fb}
                    for k, (tid, s, fb) in enumerate(zip(group.task_ids, group.seeds, fell, strict=True)))
        curves.append(curve.assign(slot=curve["slot"] + offset))
        final_params.extend(params_)

    for group, res in zip(groups, results, strict=True):
        add(group.method, group, res.curves, res.final_params, group.fallback)
        if mt.frozen_controls and group.method != "scratch":
            starts = [sd for sd in group.init if sd is not None]  # meta-learned starts are never None
            add(group.method + FROZEN_SUFFIX, group, frozen_curves(res.curves, res.start_return), starts)
    frame = pd.DataFrame(runs)
    curve = pd.concat(curves, ignore_index=True).merge(frame, on="slot")
    curve["step"] = curve["step"] + c
    curve = curve.rename(columns={"eval_return": "return"})
    curve["normalised_return"] = scale.column(curve["return"], curve["task_id"])
    curve = curve[["task_id", "split", "method", "seed", "step", "return", "normalised_return"]]
    check_equal_budgets(curve, mt.budget_steps)
    return ProtocolResult(frame.drop(columns="slot"), curve.sort_values(["split", "method", "task_id", "seed", "step"])
                          .reset_index(drop=True), final_params, c, mt.budget_steps, len(groups))
