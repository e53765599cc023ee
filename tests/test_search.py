"""The fine-tuning configuration search: reads validation tasks only, selects per method, and meta-test
uses what it selected (with frozen-start controls beside every meta-learned method)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from metadqn.config import FROZEN_SUFFIX
from metadqn.data.io import load_state_dict
from metadqn.data.store import LeakageError, TaskStore
from metadqn.evaluation.search import SCRATCH_REFERENCE, SelectionError, load_selection, run_search
from metadqn.stages.finetune_search import SearchOutputs, run_finetune_search
from metadqn.stages.meta_test import MetaTestOutputs, run_meta_test

pytestmark = pytest.mark.slow

CANDIDATES = {"dqn": {}, "anchored": {"start_epsilon": 0.05, "anchor": "kl", "anchor_weight": 1.0,
                                      "protected_steps": 64, "protected_fraction": 0.25,
                                      "dqn": {"learning_rate": 0.0003}}}


def _search_params(params):
    mt = params.meta_test
    search = mt.search.model_validate({"seeds": 1, "candidates": CANDIDATES})
    return params.model_copy(update={"meta_test": mt.model_copy(update={"search": search})})


def _outputs(root):
    return SearchOutputs(selected=root / "selected.json", summary=root / "search.csv", scores=root / "scores.csv")


def test_search_selects_per_method_and_reads_no_test_task(tiny_run, tmp_path):
    params, store, meta, _, col = tiny_run
    params = _search_params(params)
    selected = run_finetune_search(params, store, meta.models, _outputs(tmp_path / "a"))
    summary = pd.read_csv(tmp_path / "a" / "search.csv")
    methods = set(summary["method"]) - {"scratch"}
    # hypernet-oracle and select are not searched: they fine-tune with the hypernet's choice (select: its
    # first candidate's)
    assert params.meta_train.select.candidates[0] == "hypernet"
    assert not {"hypernet-oracle", "select"} & methods
    for variant in ("hypernet-oracle", "select"):
        assert selected[variant] == {**selected["hypernet"], "as": "hypernet"}
    assert methods == set(selected) - {"hypernet-oracle", "select"} and "scratch" not in selected
    assert len(methods) >= 2
    assert set(summary.loc[summary["method"] != "scratch", "candidate"]) == set(CANDIDATES)
    # scratch runs once, with the dqn section, as the reference row; it is never selected
    ref = summary[summary["method"] == "scratch"]
    assert ref["candidate"].tolist() == [SCRATCH_REFERENCE] and not ref["selected"].any()
    assert (summary[summary["method"] != "scratch"].groupby("method")["selected"].sum() == 1).all()
    # the tiny params have out-of-range validation tasks: each split's AUC IQM counts half
    assert {"auc_iqm_val", "auc_iqm_val_extrap"} <= set(summary.columns)
    scores = pd.read_csv(tmp_path / "a" / "scores.csv")
    assert set(scores["split"]) == {"val", "val_extrap"}
    np.testing.assert_allclose(summary["selection_score"], (summary["auc_iqm_val"] + summary["auc_iqm_val_extrap"]) / 2,
                               atol=2e-6)
    for m in methods:
        pick, rows = selected[m], summary[summary["method"] == m]
        assert pick["candidate"] == rows.loc[rows["selection_score"].idxmax(), "candidate"]

    # the same search with every held-out test task erased from its inputs: byte-identical outputs
    clean = tmp_path / "clean"
    clean.mkdir()
    tasks = pd.read_parquet(col.tasks)
    training = tasks["split"].isin(["train", "val", "val_extrap"])
    tasks[training].to_parquet(clean / "tasks.parquet", index=False)
    metrics = json.loads(col.metrics.read_text())
    keep = set(tasks.loc[training, "task_id"])
    metrics["tasks"] = {k: v for k, v in metrics["tasks"].items() if k in keep}
    (clean / "collect.json").write_text(json.dumps(metrics))
    store_b = TaskStore(clean / "tasks.parquet", store.trajectories, store.experts, clean / "collect.json")
    run_finetune_search(params, store_b, meta.models, _outputs(tmp_path / "b"))
    for name in ("selected.json", "search.csv", "scores.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_search_store_refuses_test_splits(tiny_run, monkeypatch):
    params, store, meta, _, _ = tiny_run
    from metadqn.evaluation import search

    monkeypatch.setattr(search, "SEARCH_SPLITS", ("val", "interp"))  # a search that tried to read test tasks
    with pytest.raises(LeakageError):
        run_search(_search_params(params), store, meta.models)


def test_meta_test_uses_the_selection_and_reports_frozen_controls(tiny_run, tmp_path):
    params, store, meta, _, _ = tiny_run
    params = _search_params(params)
    sel = tmp_path / "selected.json"
    picks = {m: {"candidate": "anchored", "config": CANDIDATES["anchored"]} for m in ("hypernet", "siamese")}
    sel.write_text(json.dumps(picks))
    assert load_selection(sel)["hypernet"][1].anchor == "kl"
    out = MetaTestOutputs(curves_parquet=tmp_path / "c.parquet", curves_csv=tmp_path / "c.csv",
                          scores=tmp_path / "s.csv", metrics=tmp_path / "m.json", adapted=tmp_path / "adapted")
    metrics = run_meta_test(params, store, meta.models, out, selected=sel)
    learned = [m for m in metrics["interp"] if m != "scratch" and not m.endswith(FROZEN_SUFFIX)]
    assert learned
    for split in ("interp", "extrap"):
        for m in learned:
            frozen = metrics[split][m + FROZEN_SUFFIX]
            assert frozen["zero_shot_iqm"] == frozen["auc_iqm"] == frozen["final_iqm"]  # flat: the start
            assert "auc_diff_vs_scratch_ci_low" in metrics[split][m]
        assert FROZEN_SUFFIX not in "".join(k for k in metrics[split] if k == "scratch")
    curves = pd.read_parquet(tmp_path / "c.parquet")
    # hypernet's frozen control starts where its fine-tuning run starts (the same start, step 0)
    first = curves[curves["step"] == curves["step"].min()].set_index(["task_id", "seed", "method"])["return"]
    for (tid, seed, method), r in first.items():
        if method == "hypernet":
            assert first[(tid, seed, "hypernet" + FROZEN_SUFFIX)] == r
    # the selection is what changed the runs: without it, hypernet's fine-tuned curves differ, scratch's do not
    plain = MetaTestOutputs(curves_parquet=tmp_path / "p.parquet", curves_csv=tmp_path / "p.csv",
                            scores=tmp_path / "ps.csv", metrics=tmp_path / "pm.json", adapted=tmp_path / "padapted")
    run_meta_test(params, store, meta.models, plain)
    other = pd.read_parquet(tmp_path / "p.parquet")

    def method_curve(frame: pd.DataFrame, method: str) -> pd.Series:
        return frame[frame["method"] == method].set_index(["task_id", "seed", "step"])["return"].sort_index()

    # (the fine-tuned networks, not only the curves: at this budget two policies may score the same)
    index = pd.read_csv(tmp_path / "adapted" / "index.csv")

    def differs(rel: str) -> bool:
        a, b = load_state_dict(tmp_path / "adapted" / rel), load_state_dict(tmp_path / "padapted" / rel)
        return any(not torch.equal(a[k], b[k]) for k in a)

    changed = {m: any(differs(rel) for rel in index.loc[index["method"] == m, "path"]) for m in ("hypernet", "scratch")}
    assert changed == {"hypernet": True, "scratch": False}
    pd.testing.assert_series_equal(method_curve(curves, "scratch"), method_curve(other, "scratch"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hypernet": {"candidate": "x", "config": {"anchor": "nope"}}}))
    with pytest.raises(SelectionError, match="not a fine-tuning selection"):
        load_selection(bad)


def test_chunks_cover_every_slot_once_in_near_equal_runs():
    from metadqn.evaluation.search import _chunks

    for n, most in [(152, 96), (192, 96), (96, 96), (5, 2), (1, 96)]:
        runs = _chunks(list(range(n)), most)
        assert [x for r in runs for x in r] == list(range(n))
        sizes = [len(r) for r in runs]
        assert max(sizes) <= most and max(sizes) - min(sizes) <= 1 and len(runs) == -(-n // most)
    assert [len(r) for r in _chunks(list(range(83)), 96, at_least=2)] == [42, 41]
    assert len(_chunks(list(range(3)), 96, at_least=5)) == 3  # never an empty run


def test_no_search_run_is_longer_than_a_workers_share(tiny_run):
    """A costly set of candidates (here plain DQN at 8x the gradient steps) is split so that no run costs
    more than the search's cost / PLANNED_WORKERS (plus one slot): two workers then finish together."""
    from metadqn.evaluation import search
    from metadqn.evaluation.protocol import slot_cost

    params, store, meta, _, _ = tiny_run
    mt = params.meta_test
    cands = {"heavy": {"dqn": {"gradient_steps": 8 * params.dqn.gradient_steps}}, "light": {"shrink": 0.5}}
    params = params.model_copy(update={"meta_test": mt.model_copy(update={
        "search": mt.search.model_validate({"seeds": 1, "candidates": cands})})})
    groups = search.plan_search(params, store, meta.models).groups
    total = sum(g.cost for g in groups)
    one = max(slot_cost(g.cfg) for g in groups)
    assert len(groups) > 2 and max(g.cost for g in groups) <= total / search.PLANNED_WORKERS + one


def test_search_runs_are_capped_and_hold_each_slot_once(tiny_run, monkeypatch):
    from metadqn.evaluation import search

    params, store, meta, _, _ = tiny_run
    params = _search_params(params)
    whole = search.plan_search(params, store, meta.models).groups
    monkeypatch.setattr(search, "GROUP_SLOTS", 5)
    split = search.plan_search(params, store, meta.models).groups
    assert len(split) > len(whole) and max(len(g.task_ids) for g in split) <= 5

    def slots(groups):
        return sorted((c, m, t, s) for g in groups
                      for c, m, t, s in zip(g.candidates, g.methods, g.task_ids, g.seeds, strict=True))

    assert slots(split) == slots(whole) and len(set(slots(split))) == len(slots(split))


def test_a_fresh_candidate_is_not_trained_its_rows_are_scratchs(tiny_run):
    """``shrink: 0`` with no other lever trains exactly what scratch trains, so the search reuses scratch's
    reference runs for it instead of running them again."""
    from metadqn.evaluation.search import plan_search

    params, store, meta, _, _ = tiny_run
    mt = params.meta_test
    search = mt.search.model_validate({"seeds": 1, "candidates": {"dqn": {}, "fresh": {"shrink": 0.0},
                                                                  "half": {"shrink": 0.5}}})
    params = params.model_copy(update={"meta_test": mt.model_copy(update={"search": search})})
    planned = {c for g in plan_search(params, store, meta.models).groups for c in g.candidates}
    assert planned == {"dqn", "half", SCRATCH_REFERENCE}
    result = run_search(params, store, meta.models)
    summary = result.summary
    ref = summary[summary["method"] == "scratch"].iloc[0]
    fresh = summary[summary["candidate"] == "fresh"]
    assert set(fresh["method"]) == set(summary["method"]) - {"scratch"}
    for col in ("auc_iqm", "final_iqm", "zero_shot_iqm", "min_curve_iqm", "selection_score"):
        assert (fresh[col] == ref[col]).all(), col
    assert not (summary.loc[summary["candidate"] == "half", "auc_iqm"] == ref["auc_iqm"]).all()


def test_a_start_that_fails_its_check_is_not_trained_and_a_tie_goes_to_fresh(tiny_run):
    """With start_check 1.0 every tiny start fails: the checked candidate's slots are not planned, its rows
    are scratch's reference runs (fallback share 1), so it ties ``fresh``; the tie goes to ``fresh`` although
    the checked candidate is listed first."""
    from metadqn.evaluation.search import plan_search

    params, store, meta, _, _ = tiny_run
    mt = params.meta_test
    search = mt.search.model_validate({"seeds": 1, "candidates": {"checked": {"start_check": 1.0, "shrink": 0.5},
                                                                  "fresh": {"shrink": 0.0}}})
    params = params.model_copy(update={"meta_test": mt.model_copy(update={"search": search})})
    plan = plan_search(params, store, meta.models)
    assert {c for g in plan.groups for c in g.candidates} == {SCRATCH_REFERENCE}
    assert set(plan.fallen["candidate"]) == {"checked"} and len(plan.fallen) > 0
    summary = run_search(params, store, meta.models).summary
    ref = summary[summary["method"] == "scratch"].iloc[0]
    checked = summary[summary["candidate"] == "checked"]
    assert (checked["fallback_share"] == 1.0).all()
    for col in ("auc_iqm", "final_iqm", "selection_score"):
        assert (checked[col] == ref[col]).all(), col
    chosen = summary[summary["selected"]]
    assert len(chosen) == len(checked) and set(chosen["candidate"]) == {"fresh"}


def test_a_fresh_method_in_meta_test_is_scratchs_runs_with_its_own_frozen_control(tiny_run):
    """meta-test does not train a method whose selected configuration is ``fresh``: its curves and networks
    are scratch's, and its frozen control is its own start, evaluated as a trained run would evaluate it."""
    from metadqn.evaluation import protocol

    params, store, meta, _, _ = tiny_run
    opened = TaskStore(store.tasks_path, store.trajectories, store.experts, store.collect_metrics,
                       allowed=frozenset({"train", "val", "val_extrap", *protocol.TEST_SPLITS}))
    family = params.family.family()
    groups = protocol.plan_groups(params, opened.tasks_of(protocol.TEST_SPLITS), meta.models,
                                  {"multitask": ("fresh", protocol.FRESH)})
    methods = [g.method for g in groups]
    assert {"multitask", "scratch"} <= set(methods)
    trained: list[str] = []

    def mapper(fn, gs):
        trained.extend(g.method for g in gs)
        return [fn(g) for g in gs]

    runs = protocol._train_groups(family, groups, mapper)
    assert [r.method for r in runs] == methods
    assert "multitask" not in trained and "scratch" in trained
    mine, own = runs[methods.index("multitask")], runs[methods.index("scratch")]
    direct = protocol.finetune_group(family, groups[methods.index("multitask")], show_progress=False)
    pd.testing.assert_frame_equal(mine.curves, direct.curves)
    pd.testing.assert_frame_equal(mine.curves, own.curves)
    np.testing.assert_array_equal(mine.start_return, direct.start_return)
    assert not np.array_equal(mine.start_return, own.start_return)  # its start, not scratch's fresh network
    for a, b in zip(mine.final_params, direct.final_params, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_start_check_that_fails_everywhere_makes_meta_test_report_scratchs_runs(tiny_run):
    """With start_check 1.0 (the start must last the whole simulated episode) the tiny run's starts all fail:
    meta-test reports scratch's curves and networks for every slot of the method, and keeps its start for the
    frozen control; with the check off the method's own runs are reported."""
    from metadqn.config import FinetuneConfig
    from metadqn.evaluation import protocol

    params, store, meta, _, _ = tiny_run
    opened = TaskStore(store.tasks_path, store.trajectories, store.experts, store.collect_metrics,
                       allowed=frozenset({"train", "val", "val_extrap", *protocol.TEST_SPLITS}))
    family = params.family.family()
    tests = opened.tasks_of(protocol.TEST_SPLITS)
    checked = protocol.plan_groups(params, tests, meta.models, {"reptile": ("c", FinetuneConfig(start_check=1.0))})
    plain = protocol.plan_groups(params, tests, meta.models, {"reptile": ("c", FinetuneConfig())})
    methods = [g.method for g in checked]
    i, s = methods.index("reptile"), methods.index("scratch")
    assert checked[i].fallback and all(checked[i].fallback) and not plain[i].fallback
    trained: list[str] = []

    def mapper(fn, gs):
        trained.extend(g.method for g in gs)
        return [fn(g) for g in gs]

    runs = protocol._train_groups(family, checked, mapper)
    assert "reptile" not in trained and "scratch" in trained  # nothing of its own to train
    own = protocol._train_groups(family, plain, lambda fn, gs: [fn(g) for g in gs])
    pd.testing.assert_frame_equal(runs[i].curves, runs[s].curves)
    assert not own[i].curves.equals(own[s].curves)  # the check is what made them equal
    np.testing.assert_array_equal(runs[i].start_return, own[i].start_return)
    for a, b in zip(runs[i].final_params, runs[s].final_params, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
