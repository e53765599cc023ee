"""The evaluation report on small synthetic inputs: threshold and confidence from params, the paired verdict,
frozen-start controls, the fine-tuning configuration search, and tolerance of older inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metadqn.config import load_params
from metadqn.evaluation.report import (
    SEARCH_SECTION,
    SECTIONS,
    _curve_bands,
    build_report,
    frozen_differences,
    headline_table,
    ordered_methods,
    verdict,
)
from metadqn.evaluation.summary import per_run_scores

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("interp", "extrap")
METHODS = ("scratch", "hypernet", "hypernet-frozen", "siamese", "siamese-frozen")
CANDIDATES = ("default", "low-lr", "frozen-body")


def make_params(threshold: float = 0.9, confidence: float = 0.95):
    params = load_params(ROOT / "params.yaml", ROOT / "tests" / "params.tiny.yaml")
    return params.model_copy(update={
        "meta_test": params.meta_test.model_copy(update={"threshold": threshold, "confidence": confidence}),
        "tracking": params.tracking.model_copy(update={"enabled": False}),
    })


def entry(zero_shot: float, auc: float, diff: tuple[float, float] | None, new: bool = True) -> dict:
    """One metrics.json entry; ``diff`` is the paired AUC difference's CI vs scratch (None for scratch)."""
    e = {"runs": 4, "tasks": 2, "censored_fraction": 0.5, "steps_ratio_vs_scratch": 2.0,
         "prob_improvement_vs_scratch": 0.5}
    for key, v in (("zero_shot", zero_shot), ("auc", auc), ("final", auc + 0.1), ("steps_to_threshold", 264.0)):
        e.update({f"{key}_iqm": v, f"{key}_ci_low": v - 0.05, f"{key}_ci_high": v + 0.05})
    if new:
        e.update({"regret_iqm": 1 - auc, "regret_ci_low": 0.95 - auc, "regret_ci_high": 1.05 - auc,
                  "min_curve_iqm": zero_shot / 2})
        if diff is not None:
            e.update({"auc_diff_vs_scratch": (diff[0] + diff[1]) / 2, "auc_diff_vs_scratch_ci_low": diff[0],
                      "auc_diff_vs_scratch_ci_high": diff[1]})
    return e


def make_metrics(new: bool = True) -> dict:
    split = {
        "scratch": entry(0.02, 0.30, None, new),
        "hypernet": entry(0.95, 0.50, (0.1, 0.3), new),   # CI above zero: better than scratch
        "siamese": entry(1.00, 0.35, (-0.1, 0.2), new),   # CI contains zero: not significant
    }
    if new:
        split["hypernet-frozen"] = entry(0.95, 0.45, (0.05, 0.25))
        split["siamese-frozen"] = entry(1.00, 0.40, (-0.3, -0.1))
    return {"budget_steps": 464, "context_steps": 64, **{s: split for s in SPLITS}}


def make_curves(new: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for split in SPLITS:
        for task in range(2):
            tid = f"{split}-{task:03d}"
            for method in METHODS if new else [m for m in METHODS if not m.endswith("-frozen")]:
                for seed in range(2):
                    start = 0.0 if method == "scratch" else 0.9
                    for i, step in enumerate((64, 264, 464)):
                        value = start if method.endswith("-frozen") else min(1.0, start + 0.2 * i)
                        value += 0.02 * rng.standard_normal()
                        rows.append({"task_id": tid, "split": split, "method": method, "seed": seed,
                                     "step": step, "return": 500 * value, "normalised_return": value})
    return pd.DataFrame(rows)


def make_search() -> pd.DataFrame:
    rows = []
    for method in ("hypernet", "siamese"):
        for i, cand in enumerate(CANDIDATES):
            rows.append({"method": method, "candidate": cand, "runs": 4, "zero_shot_iqm": 0.9,
                         "auc_iqm": 0.4 + 0.1 * i, "auc_ci_low": 0.35 + 0.1 * i, "auc_ci_high": 0.45 + 0.1 * i,
                         "final_iqm": 0.8, "final_ci_low": 0.7, "final_ci_high": 0.9, "min_curve_iqm": 0.3 + 0.1 * i,
                         "selected": cand == "frozen-body"})
    return pd.DataFrame(rows)


def write_inputs(root: Path, *, new: bool = True, search: bool = True) -> dict[str, Path]:
    p = {k: root / "in" / v for k, v in {
        "metrics_path": "metrics.json", "curves_path": "curves.parquet", "scores_path": "scores.csv",
        "meta_train_path": "meta_train.json", "collect_path": "collect.json", "tasks_path": "tasks.parquet",
        "search_path": "finetune/search.csv", "selected_path": "finetune/selected.json"}.items()}
    p["search_path"].parent.mkdir(parents=True)
    p["metrics_path"].write_text(json.dumps(make_metrics(new)))
    curves = make_curves(new)
    curves.to_parquet(p["curves_path"])
    per_run_scores(curves, 0.9, 464).to_csv(p["scores_path"], index=False)
    p["meta_train_path"].write_text(json.dumps({"siamese": {"top1_retrieval": 0.8, "random_top1": 0.3}}))
    tasks = pd.DataFrame({"task_id": ["train-000", "val-000", "interp-000", "interp-001", "extrap-000", "extrap-001"],
                          "split": ["train", "val", "interp", "interp", "extrap", "extrap"]})
    tasks.to_parquet(p["tasks_path"])
    p["collect_path"].write_text(json.dumps({"fraction_solved": 1.0, "tasks": {
        t: {"split": s, "return": 500.0} for t, s in zip(tasks["task_id"], tasks["split"], strict=True)}}))
    if search:
        make_search().to_csv(p["search_path"], index=False)
        p["selected_path"].write_text(json.dumps({
            "hypernet": {"candidate": "frozen-body", "config": {"learning_rate": 0.0001, "freeze_body": True}},
            "siamese": {"candidate": "frozen-body", "config": {"learning_rate": 0.0001, "freeze_body": True}}}))
    return p


def build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params=None, **kw):
    monkeypatch.chdir(tmp_path)  # no dvc.lock, no git: nothing read from or written to the repository
    inputs = write_inputs(tmp_path, **kw)
    result = build_report(params or make_params(), tmp_path / "out", **inputs)
    return result, result.markdown.read_text(), result.html.read_text()


def test_threshold_and_confidence_come_from_params(tmp_path, monkeypatch):
    _, md, page = build(tmp_path, monkeypatch, make_params(threshold=0.8, confidence=0.9))
    for text in (md, page):
        assert "80%" in text and "90%" in text
        assert "95%" not in text
    assert "steps to 80%" in md and "90% stratified-bootstrap CI" in md
    assert "reached 80% of the expert" in md


def test_default_params_state_95_percent(tmp_path, monkeypatch):
    _, md, _ = build(tmp_path, monkeypatch)
    assert "95% stratified-bootstrap CI" in md and "steps to 90%" in md and "80%" not in md


def test_curve_bands_use_the_confidence():
    curves = make_curves()
    narrow = _curve_bands(curves, 0.5, 400, 0)
    wide = _curve_bands(curves, 0.99, 400, 0)
    fine = ~narrow["method"].str.endswith("-frozen")
    assert ((wide["high"] - wide["low"])[fine] >= (narrow["high"] - narrow["low"])[fine]).all()
    assert ((wide["high"] - wide["low"])[fine] > (narrow["high"] - narrow["low"])[fine]).any()
    frozen = wide[~fine]
    assert (frozen["low"] == frozen["iqm"]).all() and (frozen["high"] == frozen["iqm"]).all()


def _line(lines: list[str], start: str) -> str:
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


def test_verdict_significance_from_the_paired_ci():
    metrics = make_metrics()
    metrics["interp"] = {**metrics["interp"], "reptile": entry(0.1, 0.2, (-0.3, -0.05))}
    lines = verdict(metrics, threshold=0.9, confidence=0.9)
    hyper = _line(lines, "On interpolation tasks, **hypernet** ")
    siam = _line(lines, "On interpolation tasks, **siamese** ")
    rep = _line(lines, "On interpolation tasks, **reptile** ")
    assert "has a significantly higher AUC than scratch" in hyper and "+0.10, +0.30" in hyper
    assert "not significantly different from scratch in AUC" in siam and "significantly higher" not in siam
    assert "has a significantly lower AUC than scratch" in rep
    assert all("90% CI" in line for line in (hyper, siam, rep))
    # the AUC point estimates overlap-test would say otherwise for siamese: only the paired CI decides
    metrics["interp"]["siamese"] = {**metrics["interp"]["siamese"], "auc_iqm": 0.9, "auc_ci_low": 0.85}
    siam = _line(verdict(metrics, threshold=0.9, confidence=0.9), "On interpolation tasks, **siamese** ")
    assert "not significantly different from scratch in AUC" in siam


def test_verdict_on_fine_tuning_against_the_frozen_start():
    metrics = make_metrics()
    diffs = {("interp", "hypernet"): (0.05, 0.02, 0.08), ("interp", "siamese"): (-0.05, -0.1, 0.01)}
    lines = verdict(metrics, threshold=0.9, confidence=0.95, frozen_diffs=diffs)
    assert "fine-tuning improved significantly on hypernet's frozen start" in _line(
        lines, "On interpolation tasks, fine-tuning improved")
    siam = _line(lines, "On interpolation tasks, fine-tuning did not significantly change siamese")
    assert "the frozen start alone is significantly worse than scratch" in siam
    # without paired differences: the IQMs, said to be IQMs
    ext = _line(lines, "On extrapolation tasks, fine-tuned hypernet")
    assert "has a higher AUC IQM than its frozen start" in ext and "IQMs only" in ext
    assert "fine-tuned siamese has a lower AUC IQM than its frozen start" in " ".join(lines)


def test_frozen_differences_are_paired_by_task_and_seed():
    rows = []
    for task in ("a", "b"):
        for seed in range(3):
            base = 0.1 * seed + (0.5 if task == "b" else 0.0)  # large seed/task spread, constant paired gain
            rows += [{"split": "interp", "task_id": task, "seed": seed, "method": "hypernet", "auc": base + 0.05},
                     {"split": "interp", "task_id": task, "seed": seed, "method": "hypernet-frozen", "auc": base},
                     {"split": "interp", "task_id": task, "seed": seed, "method": "scratch", "auc": base}]
    cfg = make_params().meta_test
    diffs = frozen_differences(pd.DataFrame(rows), cfg)
    assert set(diffs) == {("interp", "hypernet")}
    point, lo, hi = diffs[("interp", "hypernet")]
    assert point == pytest.approx(0.05) and lo == pytest.approx(0.05) and hi == pytest.approx(0.05)


def test_headline_has_new_columns_and_frozen_rows_after_their_method():
    table = headline_table(make_metrics(), "interp", threshold=0.9)
    header, _, *rows = table.splitlines()
    assert "regret" in header and "AUC diff vs scratch (paired)" in header and "final" in header
    assert [r.split("|")[1].strip() for r in rows] == ["scratch", "hypernet", "hypernet-frozen", "siamese",
                                                      "siamese-frozen"]
    assert "+0.10, +0.30" in rows[1] and "0.50 [0.45, 0.55]" in rows[1]  # paired diff, regret
    assert ordered_methods(["siamese-frozen", "zeta", "hypernet", "scratch", "siamese", "orphan-frozen"]) == [
        "scratch", "hypernet", "siamese", "siamese-frozen", "zeta", "orphan-frozen"]


def test_search_section_lists_every_candidate_and_marks_the_selected(tmp_path, monkeypatch):
    _, md, page = build(tmp_path, monkeypatch)
    assert f"## {SEARCH_SECTION}" in md
    section = md.split(f"## {SEARCH_SECTION}")[1].split("## Verdict")[0]
    assert "validation tasks only" in section and "by AUC IQM" in section and "`dqn` section" in section
    rows = [r for r in section.splitlines() if r.startswith("| hypernet |") or r.startswith("| siamese |")]
    assert len(rows) == 2 * len(CANDIDATES)
    for method in ("hypernet", "siamese"):
        for cand in CANDIDATES:
            row = _line(rows, f"| {method} | {'**' + cand + '**' if cand == 'frozen-body' else cand} |")
            assert ("**yes**" in row) == (cand == "frozen-body")
    assert "0.60 [0.55, 0.65]" in _line(rows, "| hypernet | **frozen-body** |")
    assert "learning_rate=0.0001" in section
    assert page.count("<strong>frozen-body</strong>") == 2 and SEARCH_SECTION in page
    for section_name in SECTIONS:
        assert f"## {section_name}" in md


def test_missing_search_and_old_metrics_still_build(tmp_path, monkeypatch):
    result, md, page = build(tmp_path, monkeypatch, new=False, search=False)
    assert SEARCH_SECTION not in md and SEARCH_SECTION not in page
    for section_name in SECTIONS:
        if section_name != SEARCH_SECTION:
            assert f"## {section_name}" in md
    header = next(line for line in md.splitlines() if line.startswith("| method | zero-shot"))
    assert "regret" not in header and "paired" not in header
    assert "frozen" not in md
    assert "learns significantly faster (AUC) (overlap of the 95% CIs)" in md  # hypernet vs scratch by CIs
    assert page.count("data:image/png;base64,") == len(result.figures) == 5 and "<script" not in page


def test_html_is_the_markdown_rendered(tmp_path, monkeypatch):
    from markdown_it import MarkdownIt

    result, md, page = build(tmp_path, monkeypatch)
    assert page.count("data:image/png;base64,") == 5 and "<script" not in page and 'src="figures/' not in page
    assert "hypernet-frozen" in page and "frozen-start controls (no updates): hypernet-frozen, siamese-frozen" in md
    headings = [line.lstrip("#").strip() for line in md.splitlines() if line.startswith("## ")]
    assert re.findall(r"<h2>(.*?)</h2>", page) == headings
    tables = sum(1 for i, line in enumerate(md.splitlines()) if line.startswith("|---"))
    assert page.count("<table>") == tables >= 3
    renderer = MarkdownIt("commonmark").enable("table")
    for line in (x[2:] for x in md.split("## Verdict")[1].splitlines() if x.startswith("- ")):
        assert renderer.renderInline(line) in page
    # summary.md: the headline tables and the verdict, exactly as in the report
    summary = result.summary.read_text()
    assert summary.startswith("## Headline results") and "## Verdict" in summary
    assert summary.split("## Verdict")[1].strip() in md and "| method | zero-shot" in summary


def test_markup_in_inputs_is_escaped_in_the_html(tmp_path, monkeypatch):
    params = make_params()
    params = params.model_copy(update={"report": params.report.model_copy(
        update={"title": "<script>alert(1)</script> report"})})
    _, md, page = build(tmp_path, monkeypatch, params)
    assert md.startswith("# <script>") and "<script" not in page and "&lt;script&gt;alert(1)" in page


# --- the verdict's decisions, at their boundaries ------------------------------------------------------------

def _verdict_on(method_entry: dict, scratch_entry: dict | None = None, **kw) -> list[str]:
    split = {"scratch": scratch_entry or entry(0.02, 0.30, None), "hypernet": method_entry}
    return verdict({"interp": split}, threshold=0.9, confidence=0.95, **kw)


@pytest.mark.parametrize(("low", "high", "said"), [
    (0.01, 0.2, "has a significantly higher AUC than scratch"),
    (-0.2, -0.01, "has a significantly lower AUC than scratch"),
    (0.0, 0.2, "is not significantly different from scratch in AUC"),     # a CI that touches zero contains it
    (-0.2, 0.0, "is not significantly different from scratch in AUC"),
    (-0.1, 0.1, "is not significantly different from scratch in AUC"),
    (float("nan"), float("nan"), "is not significantly different from scratch in AUC"),  # unknown: no claim
])
def test_paired_auc_verdict_needs_a_ci_that_excludes_zero(low, high, said):
    m = entry(0.5, 0.5, (low, high))
    line = _line(_verdict_on(m), "On interpolation tasks, **hypernet** ")
    assert said in line and "(paired AUC difference" in line
    others = {"has a significantly higher AUC than scratch", "has a significantly lower AUC than scratch",
              "is not significantly different from scratch in AUC"} - {said}
    assert not any(o in line for o in others)


def test_paired_auc_verdict_without_its_ci_makes_no_claim():
    m = entry(0.5, 0.5, (0.1, 0.3))
    del m["auc_diff_vs_scratch_ci_low"], m["auc_diff_vs_scratch_ci_high"]
    line = _line(_verdict_on(m), "On interpolation tasks, **hypernet** ")
    assert "is not significantly different from scratch in AUC" in line


@pytest.mark.parametrize(("zero_shot", "said"), [
    (0.5, "significantly better than scratch at zero-shot"),
    (0.12, "not significantly different from scratch at zero-shot"),  # [0.07, 0.17] overlaps scratch's [-0.03, 0.07]
    (-0.2, "significantly worse than scratch at zero-shot"),
])
def test_zero_shot_verdict_is_from_the_overlap_of_the_cis(zero_shot, said):
    line = _line(_verdict_on(entry(zero_shot, 0.5, (0.1, 0.3))), "On interpolation tasks, **hypernet** ")
    assert said in line


def test_unpaired_auc_verdict_is_from_the_overlap_of_the_cis():
    touching = entry(0.5, 0.40, None, new=False)  # AUC CI [0.35, 0.45] ...
    touching["auc_ci_low"] = 0.35
    scratch = entry(0.02, 0.30, None, new=False)  # ... vs scratch's [0.25, 0.35]: they share a point
    assert "is not significantly different in AUC" in _line(_verdict_on(touching, scratch), "On interpolation")
    above = entry(0.5, 0.41, None, new=False)
    assert "learns significantly faster (AUC)" in _line(_verdict_on(above, scratch), "On interpolation")
    below = entry(0.5, 0.19, None, new=False)
    assert "learns significantly slower (AUC)" in _line(_verdict_on(below, scratch), "On interpolation")


@pytest.mark.parametrize(("paired", "said"), [
    ((0.05, 0.01, 0.1), "fine-tuning improved significantly on hypernet's frozen start"),
    ((-0.05, -0.1, -0.01), "fine-tuning made significantly worse hypernet's frozen start"),
    ((0.02, 0.0, 0.05), "fine-tuning did not significantly change hypernet's frozen start"),
])
def test_fine_tuning_verdict_against_the_frozen_start(paired, said):
    split = {"scratch": entry(0.02, 0.30, None), "hypernet": entry(0.9, 0.5, (0.1, 0.3)),
             "hypernet-frozen": entry(0.9, 0.45, (0.05, 0.25))}
    lines = verdict({"interp": split}, threshold=0.9, confidence=0.95,
                    frozen_diffs={("interp", "hypernet"): paired})
    line = _line(lines, "On interpolation tasks, fine-tuning ")
    assert line.startswith(f"On interpolation tasks, {said}")
    assert "the frozen start alone is significantly better than scratch" in line
    # a frozen control is a control, not a method of its own: no verdict line against scratch for it
    assert not any(x.startswith("On interpolation tasks, **hypernet-frozen**") for x in lines)


def test_verdict_says_nothing_about_a_split_without_scratch():
    metrics = make_metrics()
    metrics["extrap"] = {k: v for k, v in metrics["extrap"].items() if k != "scratch"}  # splits share one dict
    lines = verdict(metrics, threshold=0.9, confidence=0.95)
    assert not any("extrapolation" in line for line in lines)
    assert any(line.startswith("On interpolation tasks, **hypernet** ") for line in lines)


def test_diagnosis_section_is_one_well_formed_table_per_model():
    from metadqn.evaluation.report import DIAGNOSIS_ROWS, diagnosis_section

    splits = {s: {key: 0.5 for key, _ in DIAGNOSIS_ROWS} for s in ("train", "val", "interp", "extrap")}
    lines = diagnosis_section({"hypernet": splits, "hypernet-oracle": splits})
    rows = [line for line in lines if line.startswith("|")]
    assert len(rows) == 2 * (2 + len(DIAGNOSIS_ROWS))
    assert {line.count("|") for line in rows} == {6}  # a "|" inside a label would split its cell
    assert "Not run" in diagnosis_section({})[2]


def test_selected_lines_say_which_choice_is_borrowed():
    from metadqn.evaluation.report import selected_lines

    pick = {"candidate": "anchored", "config": {"anchor": "kl"}}
    lines = selected_lines({"hypernet": pick, "hypernet-oracle": {**pick, "as": "hypernet"}})
    assert lines == ["hypernet: `anchored` (anchor=kl)",
                     "hypernet-oracle: `anchored`, hypernet's choice, not searched (anchor=kl)"]


@pytest.mark.parametrize(("low", "high", "said"), [
    (0.01, 0.2, "final return is significantly above scratch's"),
    (-0.2, -0.01, "final return is significantly below scratch's"),
    (-0.1, 0.1, "final return is not significantly different from scratch's"),
])
def test_paired_final_verdict_and_column(low, high, said):
    m = {**entry(0.5, 0.5, (0.1, 0.2)), "final_diff_vs_scratch": (low + high) / 2,
         "final_diff_vs_scratch_ci_low": low, "final_diff_vs_scratch_ci_high": high}
    metrics = {"interp": {"scratch": entry(0.0, 0.3, None), "reptile": m}}
    line = next(x for x in verdict(metrics, threshold=0.9, confidence=0.9) if "**reptile**" in x)
    assert said in line and "has a significantly higher AUC than scratch" in line
    assert f"{low:+.2f}, {high:+.2f}" in line
    header = headline_table(metrics, "interp", threshold=0.9).splitlines()[0]
    assert "final diff vs scratch (paired)" in header
