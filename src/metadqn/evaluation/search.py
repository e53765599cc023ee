"""The fine-tuning configuration search: each meta-learned method's fine-tuning levers, chosen on the
validation tasks only.

Every candidate of ``meta_test.search.candidates`` fine-tunes every meta-learned method's start on every
validation task for ``meta_test.search.seeds`` seeds, under the meta-test protocol itself (same context
size, same budget T, same evaluation), so the choice is made on the quantity that is reported. Per method,
the candidate with the highest selection score wins: the AUC IQM on the validation
tasks, or, when there are out-of-range validation tasks (``collect.n_val_extrap_tasks``), the mean of the
AUC IQMs of the two validation splits, so that what works out of range counts as much as what works in
range (a pooled IQM would trim the few out-of-range tasks away as outliers). With
``meta_test.search.guard_final`` (the default), a candidate whose final return on the validation tasks is
below scratch's reference runs, paired per (task, seed) (the IQM of the differences below 0), is not
eligible, whatever its AUC: a start that speeds up the beginning but leaves the network worse at the end of
the budget (the multitask network of replicate 1 at ``c241054``: validation AUC 0.32 against scratch's 0.28,
final 0.20 against 0.56) is discarded for ``fresh``, whose difference is exactly 0. The rule is the point
estimate, not a significance test: until 2026-11-29 (fourth session) it asked for the difference's CI to lie
entirely below 0, and replicate 1 at ``294e160`` kept multitask's start with plain DQN on a validation final
difference of -0.07 [-0.38, +0.27] (AUC 0.30 against 0.27); on the test tasks it ended at 0.29 against
scratch's 0.41, the failure of ``c241054`` again. Twelve validation tasks cannot show such a loss
significantly, and the cost of the stricter rule is small: a start whose final return is truly scratch's is
dropped about half the time for ``fresh``, which is scratch's runs. If no candidate of a method is eligible,
the AUC score alone decides.

Ties go to a candidate that keeps nothing of the start (:data:`~metadqn.evaluation.protocol.FRESH`), then to
the first listed. Why: a candidate whose start check fails on every validation run scores exactly scratch's
runs, as ``fresh`` does, but on a test task where its check passes it keeps a start that validation never saw
trained (multitask's ``anchored`` at ``39c3203``: its check failed on all 12 validation runs, it tied
``fresh`` and won as the first listed; on the test tasks 2% of its starts passed the check and its
out-of-range final IQM ended below scratch's, 0.37 against 0.39). ``fresh`` does on every task what
validation saw.

Scratch is not searched: it keeps the dqn section, which is tuned for learning from scratch; it runs once
as a reference row (the bar a start must clear on the same tasks). A variant that borrows another method's
configuration (``Learner.finetunes_as``: hypernet-oracle the hypernet's; ``select`` its first candidate's,
see :func:`borrowed`) is not searched; the selection file gives it the borrowed choice, marked
``"as": <method>``.

Held-out test tasks are never read: the search gets a :class:`TaskStore` that opens only the train and
validation splits (a read of a test task raises ``LeakageError``), and its contexts come from
``meta_test.search.seed``, not from meta-test's.

Groups. Candidates that differ only in per-slot levers (start_epsilon, the anchor's weights, the protected
share, shrink; see :mod:`metadqn.dqn.levers`) train together in one batched run of every (candidate,
method, validation task, seed) slot, because a batched run's per-step overhead is paid once for all its
slots: the default candidates train as two sets instead of one run each (measured on 2 cores, one seed per
task, seven candidates: 191 s instead of 292 s), each set split into runs of at most :data:`GROUP_SLOTS`
slots, and into at least as many as its share of the search's cost asks (:data:`PLANNED_WORKERS`), so that two
workers share the work evenly. Each slot's result is still that of its own
configuration; the random draws of a slot depend on its place in the run, so candidates are not compared
under common random numbers. A candidate that keeps nothing of the start
(:data:`~metadqn.evaluation.protocol.FRESH`, ``shrink: 0`` and no other lever) is not trained: its runs
would be scratch's, so scratch's reference runs stand for it; nor is a slot whose start fails its candidate's
start check (``start_check``, decided from the context before any training): scratch's reference run on the
same (task, seed) is its run, as in meta-test (with the default candidates, multitask's and reptile's starts
fail the check on every validation task, a third of the search's slots).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metadqn.config import FinetuneConfig, Params
from metadqn.data.store import TRAINING_SPLITS, VALIDATION_SPLITS, TaskStore
from metadqn.dqn.levers import shared_part
from metadqn.envs.sampling import task_matrix
from metadqn.errors import UserError
from metadqn.evaluation.metrics import iqm, task_bootstrap_iqm_ci
from metadqn.evaluation.protocol import (
    Choice,
    ProtocolGroup,
    fails_check,
    finetune_config,
    finetune_group,
    group_seed,
    initial_networks,
    reuses_scratch,
    slot_cost,
    start_fractions,
)
from metadqn.evaluation.summary import min_curve_iqm, per_run_scores
from metadqn.fanout import GroupMapper, run_in_process
from metadqn.learners import SCRATCH, get_learner

log = logging.getLogger("metadqn.finetune_search")
SEARCH_SPLITS = VALIDATION_SPLITS
SCRATCH_REFERENCE = "dqn section"
"""Scratch runs in the search as a reference row (the bar a start must clear), with the dqn section; it is
never selected for anything."""


@dataclass
class SearchResult:
    summary: pd.DataFrame
    """One row per (method, candidate): IQMs with CIs of zero-shot, AUC, final; min_curve_iqm; selected."""
    scores: pd.DataFrame
    """Per-run scores (method, candidate, task_id, seed, zero_shot, auc, final, ...)."""
    selected: dict[str, dict[str, Any]]
    """{method: {"candidate": name, "config": levers}}: what meta_test reads."""


def learned_methods(params: Params, models: Path) -> list[str]:
    """The meta-learned methods of meta_test.methods that meta_train produced."""
    return [m for m in params.meta_test.methods if m != SCRATCH and (models / m / "model.pt").exists()]


def borrowed(methods: list[str], params: Params) -> dict[str, str]:
    """``{variant: learner}`` for the methods that take another searched method's configuration instead of
    being searched: those with ``Learner.finetunes_as`` (hypernet-oracle takes the hypernet's), and
    ``select``, which takes its first candidate's (``meta_train.select.candidates[0]``, the hypernet by
    default). Why select: its start *is* one of its candidates' starts, and on most validation tasks the
    first one's (``val_picks_hypernet`` in reports/meta_train/metrics.json: 1.00 with the TD-error score at
    margin 1000, 0.92 with the model score), so its own search mostly repeated the first candidate's at a
    fifth of the search's time. A source
    that is not searched itself lends nothing (the variant is then searched)."""
    out = {}
    for m in methods:
        source = get_learner(m).finetunes_as
        if m == "select":
            source = params.meta_train.select.candidates[0]
        if source is not None and source in methods:  # a source never borrows: select's candidates and
            out[m] = source                             # the finetunes_as targets are searched learners
    return out


def searched_methods(params: Params, models: Path) -> list[str]:
    """The methods the search fine-tunes: the meta-learned ones, less those that borrow a configuration."""
    methods = learned_methods(params, models)
    lent = borrowed(methods, params)
    return [m for m in methods if m not in lent]


@dataclass
class SearchPlan:
    groups: list[ProtocolGroup]
    """The batched runs."""
    fallen: pd.DataFrame
    """The slots whose start fails their candidate's start check (method, candidate, task_id, seed): not
    trained, their runs are scratch's reference runs (:func:`_fall_back`)."""


def plan_search(params: Params, store: TaskStore, models: Path) -> SearchPlan:
    """The batched runs: the slots of each set of candidates that can share a run (same optimisation, see
    the module docstring), in the order of meta_test.search.candidates, split into runs of at most
    :data:`GROUP_SLOTS` slots; less the slots whose start fails their candidate's start check."""
    family = params.family.family()
    search = params.meta_test.search
    tasks = store.tasks_of(SEARCH_SPLITS)
    methods = searched_methods(params, models)
    if not methods:
        return SearchPlan([], pd.DataFrame(columns=FALLEN_COLUMNS))
    init, prefill = initial_networks(params, tasks, models, [*methods, "scratch"], search.seeds, search.seed)
    matrix = task_matrix(tasks, family)
    configs = {**search.candidates, SCRATCH_REFERENCE: FinetuneConfig()}
    n = len(tasks)
    # one model fraction per (method, seed, task): every candidate's check reads the same start
    fraction = {m: start_fractions(params, init[m], prefill) for m in methods} \
        if any(ft.start_check is not None for ft in configs.values()) else {}
    batches: dict[str, list[str]] = {}
    for name, ft in configs.items():  # scratch (the reference) joins the plain-DQN run, if there is one
        if not reuses_scratch(ft):
            batches.setdefault(shared_part(ft).model_dump_json(), []).append(name)
    sets, fallen = [], []
    for names in batches.values():
        every = [(c, m, s, t) for c in names for m in (["scratch"] if c == SCRATCH_REFERENCE else methods)
                 for s in range(search.seeds) for t in range(n)]
        fell = [(c, m, s, t) for c, m, s, t in every
                if m in fraction and fails_check(fraction[m][s * n + t], configs[c].start_check)]
        fallen.extend(fell)
        skip = set(fell)
        kept = [slot for slot in every if slot not in skip]
        if kept:
            sets.append((names, kept, len(kept) * slot_cost(finetune_config(params, configs[names[0]]))))
    total = sum(cost for *_, cost in sets)
    groups = [_search_group(slots, names, configs, init, prefill, matrix, tasks, params)
              for names, kept, cost in sets
              for slots in _chunks(kept, GROUP_SLOTS, math.ceil(PLANNED_WORKERS * cost / total - 1e-9))]
    return SearchPlan(groups, pd.DataFrame([(m, c, str(tasks["task_id"].iloc[t]), s) for c, m, s, t in fallen],
                                           columns=FALLEN_COLUMNS))


FALLEN_COLUMNS = ["method", "candidate", "task_id", "seed"]


GROUP_SLOTS = 96
"""The most slots one batched run of the search holds; a larger set of candidates sharing their optimisation
is split into near-equal runs. Why: the default plan was 152 slots of 128-gradient-step candidates and 192
of 32-step ones; as two runs on two workers the first was the critical path (the search took 382 s), as four
runs of <= 96 slots each worker got about half of each (measured in the README's timing table)."""

PLANNED_WORKERS = 2
"""A set of candidates is also split into at least ``ceil(PLANNED_WORKERS x its share of the search's cost)``
runs (cost: :func:`~metadqn.evaluation.protocol.slot_cost`), so that no run is longer than a worker's fair
share. Why: at ``294e160`` the plain-DQN set (``dqn``, ``no-damping`` and scratch's reference, 83 slots of
128 gradient steps a burst) was one run of 4.6 min, the critical path, while the other worker finished the
two runs of the 32-step set in 2.3 min and waited. A constant, not the runner's worker count: the runs'
random draws depend on how the slots are split, so the split must not depend on where they run."""


def _chunks(slots: list[Any], most: int, at_least: int = 1) -> list[list[Any]]:
    """``slots`` in max(ceil(len / most), at_least) contiguous runs (never more than len) whose sizes differ
    by at most one."""
    k = min(max(-(-len(slots) // most), at_least), len(slots))
    size, extra = divmod(len(slots), k)
    bounds = [i * size + min(i, extra) for i in range(k + 1)]
    return [slots[a:b] for a, b in itertools.pairwise(bounds)]


def _search_group(slots: list[tuple[str, str, int, int]], names: list[str], configs: dict[str, FinetuneConfig],
                  init: dict[str, list[Any]], prefill: list[Any], matrix: Any, tasks: pd.DataFrame,
                  params: Params) -> ProtocolGroup:
    search, n = params.meta_test.search, len(tasks)
    task_ids = [str(tasks["task_id"].iloc[t]) for _, _, _, t in slots]
    seeds = [s for _, _, s, _ in slots]
    return ProtocolGroup(
        method="+".join(names), task_ids=task_ids, seeds=seeds, tasks=matrix[[t for *_, t in slots]],
        init=[init[m][s * n + t] for _, m, s, t in slots], prefill=[prefill[s * n + t] for _, _, s, t in slots],
        seed=group_seed(search.seed, task_ids, seeds), cfg=finetune_config(params, configs[names[0]]),
        finetune=[configs[c] for c, *_ in slots], candidate="+".join(names),
        methods=[m for _, m, _, _ in slots], candidates=[c for c, *_ in slots])


def run_search(params: Params, store: TaskStore, models: Path,
               map_groups: GroupMapper = run_in_process) -> SearchResult:
    """Runs every candidate on the validation tasks and selects one per meta-learned method."""
    store = TaskStore(store.tasks_path, store.trajectories, store.experts, store.collect_metrics,
                      allowed=TRAINING_SPLITS)
    family = params.family.family()
    mt = params.meta_test
    c = params.meta_train.context_size
    plan = plan_search(params, store, models)
    groups = plan.groups
    if not groups:
        log.warning("finetune search: no meta-learned method to search; nothing selected")
        return SearchResult(pd.DataFrame(columns=SUMMARY_COLUMNS), pd.DataFrame(), {})
    learned = {m for g in groups for m in g.methods} - {"scratch"}
    tasks = store.tasks_of(SEARCH_SPLITS)
    log.info("finetune search: %d candidates x %d methods x %d validation tasks x %d seeds (+ scratch as the "
             "reference), in %d batched runs; %d runs whose start fails its check are scratch's",
             len(mt.search.candidates), len(learned), len(tasks), mt.search.seeds, len(groups), len(plan.fallen))

    split_of = dict(zip(tasks["task_id"], tasks["split"], strict=True))
    scale = store.return_scale(list(tasks["task_id"]))  # before any training: fail fast
    results = map_groups(functools.partial(finetune_group, family), groups)
    frames = []
    for group, res in zip(groups, results, strict=True):
        slots = pd.DataFrame({"slot": range(len(group.task_ids)), "task_id": group.task_ids,
                              "method": group.methods, "seed": group.seeds, "candidate": group.candidates,
                              "fallback": False})
        curve = res.curves.merge(slots, on="slot").rename(columns={"eval_return": "return"})
        curve["step"] = curve["step"] + c
        curve["normalised_return"] = scale.column(curve["return"], curve["task_id"])
        frames.append(curve.assign(split=curve["task_id"].map(split_of)).drop(columns="slot"))
    curves = _reuse_scratch(_fall_back(pd.concat(frames, ignore_index=True), plan.fallen), mt.search.candidates,
                            searched_methods(params, models))
    scores = pd.concat([per_run_scores(g.drop(columns="candidate"), mt.threshold, mt.budget_steps)
                        .assign(candidate=cand) for cand, g in curves.groupby("candidate", sort=False)],
                       ignore_index=True)
    summary = summarise_search(scores, curves, params)
    selected = select(summary, params, borrowed(learned_methods(params, models), params))
    return SearchResult(summary, scores, selected)


def _fall_back(curves: pd.DataFrame, fallen: pd.DataFrame) -> pd.DataFrame:
    """``curves`` with scratch's reference curve, on the same (task, seed), as the run of every ``fallen`` slot
    (method, candidate, task_id, seed: its start failed its candidate's start check, so it was not trained),
    as meta-test does (:func:`~metadqn.evaluation.protocol.splice_scratch`); they are marked ``fallback``, so
    the table can count them."""
    if fallen.empty:
        return curves
    ref = curves[curves["candidate"] == SCRATCH_REFERENCE].drop(columns=["method", "candidate", "fallback"])
    spliced = fallen.merge(ref, on=["task_id", "seed"]).assign(fallback=True)
    return pd.concat([curves, spliced[curves.columns]], ignore_index=True)


def _reuse_scratch(curves: pd.DataFrame, candidates: dict[str, FinetuneConfig], methods: list[str]) -> pd.DataFrame:
    """Adds, for every candidate that reuses scratch's runs (:data:`~metadqn.evaluation.protocol.FRESH`),
    scratch's reference curves as that candidate's for every searched method."""
    reused = [name for name, ft in candidates.items() if reuses_scratch(ft)]
    ref = curves[curves["candidate"] == SCRATCH_REFERENCE]
    copies = [ref.assign(method=m, candidate=name) for name in reused for m in methods]
    return pd.concat([curves, *copies], ignore_index=True) if copies else curves


SUMMARY_COLUMNS = ["method", "candidate", "runs", "zero_shot_iqm", "auc_iqm", "auc_ci_low", "auc_ci_high",
                   "final_iqm", "final_ci_low", "final_ci_high", "min_curve_iqm", "final_diff_vs_scratch",
                   "final_diff_vs_scratch_ci_low", "final_diff_vs_scratch_ci_high", "eligible", "fallback_share",
                   "auc_iqm_val", "auc_iqm_val_extrap", "selection_score", "selected"]
"""The per-split AUC IQMs are there when the split has tasks; ``selection_score`` is their mean (each
validation split weighs the same, whatever its task count), the AUC IQM itself when there is one split.
``final_diff_vs_scratch`` with ``_ci_low`` / ``_ci_high`` (metrics.json's names): the IQM of the paired
per-(task, seed) final-return difference with scratch's reference runs and its task-bootstrap CI;
``eligible``: not below scratch at the end (see the module docstring; always true with
``guard_final`` off and for the scratch row); ``fallback_share``: the share of its runs whose start failed the
candidate's start check (their runs are scratch's reference runs)."""


def summarise_search(scores: pd.DataFrame, curves: pd.DataFrame, params: Params) -> pd.DataFrame:
    mt = params.meta_test
    order = [*mt.search.candidates, SCRATCH_REFERENCE]
    run_key = ["task_id", "seed"]
    reference = scores[scores["method"] == "scratch"].set_index(run_key)["final"]
    rows = []
    for (method, cand), g in scores.groupby(["method", "candidate"], sort=False):
        row: dict[str, Any] = {"method": method, "candidate": cand, "runs": len(g)}
        for key in ("zero_shot", "auc", "final"):
            point, lo, hi = task_bootstrap_iqm_ci(g[key].to_numpy(float), g["task_id"].to_numpy(), mt.confidence,
                                                  mt.bootstrap_resamples, mt.search.seed)
            row.update({f"{key}_iqm": point, f"{key}_ci_low": lo, f"{key}_ci_high": hi})
        mc = curves[(curves["method"] == method) & (curves["candidate"] == cand)]
        row["min_curve_iqm"] = min_curve_iqm(mc)
        row["fallback_share"] = float(mc.groupby(["task_id", "seed"])["fallback"].first().astype(bool).mean()) \
            if "fallback" in mc.columns else 0.0
        # the reference row against itself: no difference (every column stays finite for require_finite)
        row.update({"final_diff_vs_scratch": 0.0, "final_diff_vs_scratch_ci_low": 0.0,
                    "final_diff_vs_scratch_ci_high": 0.0, "eligible": True})
        if method != "scratch" and len(reference):
            runs = g.set_index(run_key)["final"]
            if not runs.index.isin(reference.index).all():
                raise ValueError(f"{method}/{cand} has runs that scratch's reference lacks; cannot pair them")
            point, lo, hi = task_bootstrap_iqm_ci((runs - reference.loc[runs.index]).to_numpy(float),
                                                  runs.index.get_level_values(0).to_numpy(), mt.confidence,
                                                  mt.bootstrap_resamples, mt.search.seed)
            row.update({"final_diff_vs_scratch": point, "final_diff_vs_scratch_ci_low": lo,
                        "final_diff_vs_scratch_ci_high": hi, "eligible": not (mt.search.guard_final and point < 0)})
        per_split = {f"auc_iqm_{s}": float(iqm(g.loc[g["split"] == s, "auc"].to_numpy(float)))
                     for s in dict.fromkeys(g["split"])}
        row.update(per_split)
        row["selection_score"] = float(np.mean(list(per_split.values())))
        rows.append(row)
    out = pd.DataFrame(rows)
    out["order"] = out["candidate"].map(order.index)
    out = out.sort_values(["method", "order"], key=lambda c: c.map(_method_rank) if c.name == "method" else c,
                          kind="stable").drop(columns="order").reset_index(drop=True)
    # the eligible candidates compete; a method none of whose candidates is eligible falls back on all
    pool = out["eligible"].astype(bool) | ~out["eligible"].astype(bool).groupby(out["method"]).transform("any")
    best = out["selection_score"].where(pool).groupby(out["method"], sort=False).transform("max")
    top = pool & (out["selection_score"] == best)
    # a tie goes to a candidate that keeps nothing of the start (its runs are scratch's, so validation has
    # seen everything it does), then to the first listed; see the module docstring
    cands = params.meta_test.search.candidates
    fresh = top & out["candidate"].map(lambda c: c in cands and reuses_scratch(cands[c]))
    top = fresh.where(fresh.groupby(out["method"]).transform("any"), top)
    first = top & ~top.groupby(out["method"]).cumsum().gt(1)
    out["selected"] = first & (out["method"] != "scratch")
    out = out[[c for c in SUMMARY_COLUMNS if c in out.columns]]
    return out.round({c: 6 for c in out.columns if out[c].dtype == float})


def _method_rank(method: str) -> str:
    return "~" if method == "scratch" else method  # the reference row last


def select(summary: pd.DataFrame, params: Params, lent: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Each searched method's selected configuration, and for each ``variant: source`` of ``lent`` the
    source's (marked ``"as": source``)."""
    cands = params.meta_test.search.candidates
    out: dict[str, dict[str, Any]] = {row.method: {"candidate": row.candidate,
                                                   "config": cands[row.candidate].model_dump(mode="json")}
                                      for row in summary[summary["selected"]].itertuples()}
    for variant, source in (lent or {}).items():
        out[variant] = {**out[source], "as": source}
    return out


class SelectionError(UserError, ValueError):
    """The selection file is missing or unreadable (one-line message)."""


def load_selection(path: Path) -> dict[str, Choice]:
    """meta_test's view of the search's output: ``{method: (candidate name, FinetuneConfig)}``."""
    if not path.exists():
        raise SelectionError(f"{path}: not found; run `dvc repro finetune_search` first")
    try:
        raw = json.loads(path.read_text())
        return {m: (str(v["candidate"]), FinetuneConfig.model_validate(v["config"])) for m, v in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        msg = str(exc).splitlines()[0]
        raise SelectionError(f"{path}: not a fine-tuning selection ({msg}); rerun `dvc repro finetune_search`") \
            from None


def selection_to_json(selected: dict[str, dict[str, Any]]) -> str:
    return json.dumps(selected, indent=2, sort_keys=True) + "\n"


__all__ = ["SearchResult", "load_selection", "run_search", "selection_to_json"]
