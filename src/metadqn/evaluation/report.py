"""The evaluation report: ``reports/report.md`` (figures under ``reports/figures/``), ``reports/report.html``
rendered from that Markdown by markdown-it-py (self-contained: figures embedded as base64 PNGs, no scripts,
renders offline), and ``reports/summary.md`` (headline tables and verdict: the pipeline's Prefect artifact).
Every input is a path the stage command passes (see dvc.yaml).

Sections: what was run (family, splits, task counts, seeds, budgets, params digest, git commit, DVC data
hash), headline table per split (every meta-learned method followed by its frozen-start control), learning
curves (IQM with a shaded CI per method, its frozen start dashed, a panel per split), zero-shot bars with
CIs, per-task scatter of each method against scratch, siamese retrieval quality, expert returns, the
fine-tuning configuration search on validation tasks, and a plain-language verdict. Differences against
scratch are significant when the CI of the paired per-(task, seed) AUC difference excludes zero. The
threshold and the confidence level come from ``params.meta_test``.

Every input added with the frozen controls and the configuration search (``-frozen`` methods, regret,
paired differences, ``reports/finetune/``) is optional: without it that part is left out.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from markdown_it import MarkdownIt
from matplotlib.lines import Line2D

from metadqn import paths
from metadqn.config import FROZEN_SUFFIX, MetaTestConfig, Params
from metadqn.dag import recorded_md5
from metadqn.data.io import atomic_path, dvc_md5, write_text
from metadqn.evaluation.metrics import iqm, stratified_iqm_ci
from metadqn.learners import LEARNERS, SCRATCH, SCRATCH_COLOR

SEARCH_SECTION = "Fine-tuning configuration search (validation tasks)"
DIAGNOSIS_SECTION = "Out-of-range diagnosis"
SECTIONS = ("What was run", "Headline results", "Learning curves", "Zero-shot return", "Per-task comparison",
            "Siamese retrieval", "Expert returns", SEARCH_SECTION, DIAGNOSIS_SECTION, "Verdict")
DIAGNOSIS_ROWS = (
    ("input_outlier_frac", "input outliers (standardised feature beyond 3, or physics outside [0, 1])"),
    ("embed_nn_ratio", "embedding: distance to nearest training task (1 = typical)"),
    ("embed_outside_box", "embedding: dimensions outside the training range"),
    ("params_nn_ratio", "generated parameters: distance to nearest training task's"),
    ("nn_physics_gap", "physics of the embedding's nearest training task (1 = the physically nearest)"),
    ("nn_discrete_match", "embedding's nearest training task has the same discrete physics"),
    ("probe_mae", "physics probe error from the embedding (scaled units)"),
    ("q_scale", "generated Q level over the expert's"),
    ("gap_ratio", "generated action gap over the expert's"),
    ("ret_gen", "return: generated start (mean)"),
    ("ret_gen_nn", "return: generator at the nearest training embedding (mean)"),
    ("ret_gen_clip", "return: generator at the embedding clipped to the training range (mean)"),
    ("gated", "embedding farther out than any training task's (share of tasks)"),
    ("ret_gen_gate", "return: nearest training embedding only where farther out, else generated (mean)"),
    ("ret_expert_phys_nn", "return: expert of the physically nearest training task (mean)"),
)
"""The diagnosis rows the report shows (the CSV has them all), in chain order: input, encoder, generator."""
SPLIT_NAMES = {"interp": "interpolation", "extrap": "extrapolation"}
METHOD_ORDER = (SCRATCH, *LEARNERS)
COLORS = {SCRATCH: SCRATCH_COLOR, **{name: entry.color for name, entry in LEARNERS.items()}}


@dataclass
class ReportResult:
    html: Path
    markdown: Path
    summary: Path
    summary_markdown: str
    figures: list[Path]


_MD = MarkdownIt("commonmark", {"html": False}).enable("table")
"""The one Markdown renderer (raw HTML in the text is escaped, never passed through)."""


def pct(x: float) -> str:
    """0.9 -> '90%', 0.975 -> '97.5%'."""
    return f"{100 * x:.4g}%"


def is_frozen(method: str) -> bool:
    return method.endswith(FROZEN_SUFFIX)


def base_method(method: str) -> str:
    return method.removesuffix(FROZEN_SUFFIX)


def color(method: str) -> str:
    """A frozen control takes its base method's colour."""
    return COLORS.get(base_method(method), "#333333")


def ordered_methods(methods: Iterable[str]) -> list[str]:
    """scratch, then the meta-learners (known ones first), each followed by its frozen control if present."""
    methods = list(dict.fromkeys(methods))
    bases = sorted((m for m in methods if not is_frozen(m)),
                   key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    out: list[str] = []
    for m in bases:
        out.append(m)
        if m + FROZEN_SUFFIX in methods:
            out.append(m + FROZEN_SUFFIX)
    return out + sorted(m for m in methods if m not in out)


def _split_methods(metrics: Mapping[str, Any], split: str) -> dict[str, dict[str, Any]]:
    ms = metrics.get(split, {})
    return {m: ms[m] for m in ordered_methods(ms)} if isinstance(ms, dict) else {}


def _fmt(v: Any, digits: int = 2, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, (float, np.floating)):
        return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
    return str(v)


def _ci(m: Mapping[str, Any], key: str, digits: int = 2, sign: bool = False, point: str = "_iqm") -> str:
    """'point [low, high]' of ``key``; '-' where the entry lacks it (e.g. scratch has no difference to itself)."""
    if f"{key}{point}" not in m:
        return "-"
    return (f"{_fmt(m[f'{key}{point}'], digits, sign)} [{_fmt(m.get(f'{key}_ci_low'), digits, sign)}, "
            f"{_fmt(m.get(f'{key}_ci_high'), digits, sign)}]")


def _has(ms: Mapping[str, Mapping[str, Any]], key: str) -> bool:
    return any(key in m for m in ms.values())


def headline_table(metrics: Mapping[str, Any], split: str, *, threshold: float) -> str:
    """A markdown table: one row per method, each frozen control right after its method.

    Columns that an (older) metrics.json lacks for every method of the split are left out.
    """
    ms = _split_methods(metrics, split)
    cols: list[tuple[str, Any]] = [
        ("method", lambda n, m: n),
        ("zero-shot", lambda n, m: _ci(m, "zero_shot")),
        ("AUC", lambda n, m: _ci(m, "auc")),
    ]
    if _has(ms, "final_iqm"):
        cols.append(("final", lambda n, m: _ci(m, "final")))
    if _has(ms, "regret_iqm"):
        cols.append(("regret (1 - AUC)", lambda n, m: _ci(m, "regret")))
    if _has(ms, "auc_diff_vs_scratch"):
        cols.append(("AUC diff vs scratch (paired)",
                     lambda n, m: _ci(m, "auc_diff_vs_scratch", sign=True, point="")))
    if _has(ms, "final_diff_vs_scratch"):
        cols.append(("final diff vs scratch (paired)",
                     lambda n, m: _ci(m, "final_diff_vs_scratch", sign=True, point="")))
    cols += [(f"steps to {pct(threshold)}", lambda n, m: _ci(m, "steps_to_threshold", 0)),
             ("censored", lambda n, m: f"{100 * m['censored_fraction']:.0f}%" if m.get("censored_fraction")
              is not None else "n/a")]
    rows = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for name, m in ms.items():
        rows.append("| " + " | ".join(str(f(name, m)) for _, f in cols) + " |")
    return "\n".join(rows)


def headline_caption(metrics: Mapping[str, Any], split: str, *, confidence: float) -> str:
    ms = _split_methods(metrics, split)
    parts = [f"IQM over (task, seed) runs [{pct(confidence)} stratified-bootstrap CI]."]
    if any(is_frozen(m) for m in ms):
        parts.append("`M-frozen`: M's meta-learned start evaluated with no updates (flat curve).")
    if _has(ms, "auc_diff_vs_scratch"):
        parts.append("AUC (final) diff vs scratch: IQM of the paired per-(task, seed) difference, method minus "
                     "scratch (common random numbers).")
    return " ".join(parts)


def _compare(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> int:
    """0: a's CI lies above b's, 1: below, 2: they overlap (not significant)."""
    if a[f"{key}_ci_low"] > b[f"{key}_ci_high"]:
        return 0
    if a[f"{key}_ci_high"] < b[f"{key}_ci_low"]:
        return 1
    return 2


def _sign_test(low: float | None, high: float | None) -> int:
    """0: the CI of a difference lies above zero, 1: below zero, 2: it contains zero (or is unknown)."""
    if low is not None and low > 0:
        return 0
    if high is not None and high < 0:
        return 1
    return 2


def frozen_differences(scores: pd.DataFrame, cfg: MetaTestConfig) -> dict[tuple[str, str], tuple[float, float, float]]:
    """``{(split, M): (IQM, CI low, CI high)}`` of the paired per-(task, seed) AUC difference M minus M-frozen."""
    out: dict[tuple[str, str], tuple[float, float, float]] = {}
    if scores.empty or not {"split", "method", "task_id", "seed", "auc"} <= set(scores.columns):
        return out
    for split, sg in scores.groupby("split", sort=True):
        present = set(sg["method"])
        for method in sorted(m for m in present if not is_frozen(m) and m + FROZEN_SUFFIX in present):
            key = ["task_id", "seed"]
            pair = sg[sg["method"] == method][[*key, "auc"]].merge(
                sg[sg["method"] == method + FROZEN_SUFFIX][[*key, "auc"]], on=key, suffixes=("", "_frozen"))
            if len(pair):
                out[(str(split), method)] = stratified_iqm_ci(
                    (pair["auc"] - pair["auc_frozen"]).to_numpy(float), pair["task_id"].to_numpy(),
                    cfg.confidence, cfg.bootstrap_resamples, cfg.seed)
    return out


def verdict(metrics: Mapping[str, Any], *, threshold: float, confidence: float,
            frozen_diffs: Mapping[tuple[str, str], tuple[float, float, float]] | None = None) -> list[str]:
    """Plain-language statements at the ``confidence`` level.

    Against scratch: from the CI of the paired AUC difference (``auc_diff_vs_scratch``) where metrics.json
    has it, else from non-overlapping CIs. Fine-tuning against the frozen start: from the paired difference
    in ``frozen_diffs`` where given, else a plain comparison of the AUC IQMs.
    """
    conf = pct(confidence)
    frozen_diffs = frozen_diffs or {}
    lines = []
    for split in ("interp", "extrap"):
        ms = _split_methods(metrics, split)
        if "scratch" not in ms:
            continue
        name = SPLIT_NAMES[split]
        s = ms["scratch"]
        for method, m in ms.items():
            if method == "scratch" or is_frozen(method):
                continue
            zs = ("significantly better than scratch", "significantly worse than scratch",
                  "not significantly different from scratch")[_compare(m, s, "zero_shot")]
            if "auc_diff_vs_scratch" in m:
                auc = ("has a significantly higher AUC than scratch", "has a significantly lower AUC than scratch",
                       "is not significantly different from scratch in AUC")[
                    _sign_test(m.get("auc_diff_vs_scratch_ci_low"), m.get("auc_diff_vs_scratch_ci_high"))]
                auc += (f" (paired AUC difference {_ci(m, 'auc_diff_vs_scratch', sign=True, point='')}, "
                        f"{conf} CI)")
            else:
                auc = ("learns significantly faster (AUC)", "learns significantly slower (AUC)",
                       "is not significantly different in AUC")[_compare(m, s, "auc")]
                auc += f" (overlap of the {conf} CIs)"
            if "final_diff_vs_scratch" in m:
                auc += (", and its final return is " + ("significantly above", "significantly below",
                                                         "not significantly different from")[
                    _sign_test(m.get("final_diff_vs_scratch_ci_low"), m.get("final_diff_vs_scratch_ci_high"))]
                    + f" scratch's (paired difference {_ci(m, 'final_diff_vs_scratch', sign=True, point='')}, "
                    f"{conf} CI)")
            ratio = m.get("steps_ratio_vs_scratch")
            ratio_txt = ""
            if ratio:
                ratio_txt = f"; it reaches {pct(threshold)} of the expert in {1 / ratio:.2g}x scratch's steps"
            dip = ""
            if m.get("min_curve_iqm") is not None:
                dip = f"; its IQM curve's lowest point after the context is {_fmt(m['min_curve_iqm'])}"
            lines.append(f"On {name} tasks, **{method}** starts at {_fmt(m['zero_shot_iqm'])} of the expert's "
                         f"return (IQM), {zs} at zero-shot (overlap of the {conf} CIs), and {auc}"
                         f"{ratio_txt}{dip}.")
            frozen = ms.get(method + FROZEN_SUFFIX)
            if frozen is not None:
                lines.append(_frozen_line(name, method, m, frozen, frozen_diffs.get((split, method)), conf))
        for a, b in (("hypernet", "multitask"), ("hypernet", "siamese"), ("select", "hypernet"),
                     ("select", "siamese")):
            if a in ms and b in ms:
                ma, mb = ms[a], ms[b]
                sig = _compare(ma, mb, "zero_shot") != 2
                lines.append(f"On {name} tasks, {a} vs {b} zero-shot: {_fmt(ma['zero_shot_iqm'])} vs "
                             f"{_fmt(mb['zero_shot_iqm'])}, {'a' if sig else 'not a'} significant difference "
                             f"(overlap of the {conf} CIs).")
    lines.append(f"Steps to threshold of runs that never reached {pct(threshold)} of the expert are counted at "
                 "the budget (censored), so ratios against a mostly censored scratch are lower bounds.")
    return lines


def _frozen_line(name: str, method: str, m: Mapping[str, Any], frozen: Mapping[str, Any],
                 paired: tuple[float, float, float] | None, conf: str) -> str:
    if paired is not None:
        point, lo, hi = paired
        what = ("improved significantly on", "made significantly worse",
                "did not significantly change")[_sign_test(lo, hi)]
        txt = (f"On {name} tasks, fine-tuning {what} {method}'s frozen start: paired AUC difference "
               f"fine-tuned minus frozen {_fmt(point, sign=True)} [{_fmt(lo, sign=True)}, {_fmt(hi, sign=True)}] "
               f"(IQM, {conf} CI)")
    else:
        a, f = m.get("auc_iqm"), frozen.get("auc_iqm")
        if a is None or f is None:
            what = "cannot be compared with"
        else:
            what = "has a higher AUC IQM than" if a > f else "has a lower AUC IQM than" if a < f else \
                "has the same AUC IQM as"
        txt = (f"On {name} tasks, fine-tuned {method} {what} its frozen start: AUC IQM {_fmt(a)} vs {_fmt(f)} "
               "(IQMs only, no paired interval)")
    if "auc_diff_vs_scratch" in frozen:
        vs = ("significantly better than", "significantly worse than", "not significantly different from")[
            _sign_test(frozen.get("auc_diff_vs_scratch_ci_low"), frozen.get("auc_diff_vs_scratch_ci_high"))]
        txt += (f"; the frozen start alone is {vs} scratch in AUC (paired difference "
                f"{_ci(frozen, 'auc_diff_vs_scratch', sign=True, point='')}, {conf} CI)")
    return txt + "."


def search_table(search: pd.DataFrame) -> str:
    """A markdown table of the configuration search: per method its candidates, the selected one in bold."""
    def cell(row: Mapping[str, Any], key: str, digits: int = 2) -> str:
        v = row.get(key)
        return _fmt(float(v), digits) if v is not None and not pd.isna(v) else "n/a"

    def ci(row: Mapping[str, Any], key: str) -> str:
        return f"{cell(row, f'{key}_iqm')} [{cell(row, f'{key}_ci_low')}, {cell(row, f'{key}_ci_high')}]"

    # with out-of-range validation tasks, the per-split AUCs and the score that chose (their mean)
    split_cols = [("auc_iqm_val", "AUC in range"), ("auc_iqm_val_extrap", "AUC out of range"),
                  ("selection_score", "score")] if "auc_iqm_val_extrap" in search.columns else []
    guard = [("final_diff", "final vs scratch (paired)")] if "final_diff_vs_scratch" in search.columns else []
    # the share of runs whose start failed the start check (scratch's runs stand for them)
    split_cols = ([("fallback_share", "start check failed")] if "fallback_share" in search.columns else []) \
        + split_cols
    rows = ["| method | candidate | runs | zero-shot | AUC | final | min curve | "
            + "".join(f"{label} | " for _, label in guard + split_cols) + "selected |",
            "|---|---|---|---|---|---|---|---|" + "---|" * len(guard + split_cols)]
    order = {m: i for i, m in enumerate(ordered_methods(search["method"].astype(str)))}
    frame = search.assign(_order=search["method"].astype(str).map(order)).sort_values("_order", kind="stable")
    for row in frame.to_dict("records"):
        chosen = _truthy(row.get("selected"))
        cand = str(row.get("candidate", "n/a"))
        runs = row.get("runs")
        rows.append(f"| {row['method']} | {f'**{cand}**' if chosen else cand} | "
                    f"{int(runs) if runs is not None and not pd.isna(runs) else 'n/a'} | "
                    f"{cell(row, 'zero_shot_iqm')} | {ci(row, 'auc')} | {ci(row, 'final')} | "
                    f"{cell(row, 'min_curve_iqm')} | " + "".join(f"{_diff(row)} | " for _ in guard)
                    + "".join(f"{cell(row, k)} | " for k, _ in split_cols)
                    + f"{'**yes**' if chosen else ''} |")
    return "\n".join(rows)


def _diff(row: Mapping[str, Any]) -> str:
    """The paired final difference with scratch and its CI; "(not eligible)" where the guard dropped it."""
    v = row.get("final_diff_vs_scratch")
    if v is None or pd.isna(v):
        return ""
    txt = _ci(row, "final_diff_vs_scratch", sign=True, point="")
    return txt if _truthy(row.get("eligible", True)) else txt + " (not eligible)"


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v) and not pd.isna(v)


def search_text(confidence: float) -> str:
    return ("Fine-tuning configurations were chosen on validation tasks only (the interpolation and "
            "extrapolation test tasks played no part), per method by AUC IQM (with out-of-range validation "
            "tasks: by the mean of the in-range and out-of-range AUC IQMs, the score column), among the "
            "candidates whose final return is not below scratch's (the IQM of the paired per-(task, seed) "
            "differences; "
            "`meta_test.search.guard_final`, marked \"not eligible\" otherwise); the selected "
            f"candidate is in bold. Intervals: {pct(confidence)} bootstrap CIs that resample validation tasks. "
            "scratch keeps the `dqn` section's configuration (tuned for learning from scratch) and appears as the "
            "reference row.")


def selected_lines(selected: Mapping[str, Any]) -> list[str]:
    out = []
    for method in ordered_methods(selected):
        entry = selected[method] or {}
        config = entry.get("config") or {}
        levers = ", ".join(f"{k}={v}" for k, v in config.items()) or "no overrides"
        borrowed = f", {entry['as']}'s choice, not searched" if entry.get("as") else ""
        out.append(f"{method}: `{entry.get('candidate', 'n/a')}`{borrowed} ({levers})")
    return out


def _curve_bands(curves: pd.DataFrame, confidence: float, resamples: int, seed: int) -> pd.DataFrame:
    """IQM and CI per (split, method, step); frozen controls get the IQM only (no band is drawn)."""
    rows = []
    for (split, method, step), g in curves.groupby(["split", "method", "step"], sort=True):
        values = g["normalised_return"].to_numpy(float)
        if is_frozen(str(method)):
            point = float(iqm(values))
            lo = hi = point
        else:
            point, lo, hi = stratified_iqm_ci(values, g["task_id"].to_numpy(), confidence, resamples, seed)
        rows.append({"split": split, "method": method, "step": step, "iqm": point, "low": lo, "high": hi})
    return pd.DataFrame(rows)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def figure_curves(bands: pd.DataFrame, path: Path, *, threshold: float, confidence: float) -> Path:
    splits = [s for s in ("interp", "extrap") if s in set(bands["split"])]
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4.6), squeeze=False, sharey=True)
    legend: dict[str, Any] = {}
    any_frozen = False
    for ax, split in zip(axes[0], splits, strict=True):
        d = bands[bands["split"] == split]
        for method in ordered_methods(d["method"]):
            g = d[d["method"] == method].sort_values("step")
            c = color(method)
            if is_frozen(method):
                any_frozen = True
                ax.plot(g["step"], g["iqm"], ls="--", lw=1.2, color=c)
                continue
            legend.setdefault(method, ax.plot(g["step"], g["iqm"], color=c)[0])
            ax.fill_between(g["step"], g["low"], g["high"], alpha=0.2, color=c)
        legend.setdefault("threshold", ax.axhline(threshold, ls=":", lw=0.8, color="k"))
        ax.set_title(f"{SPLIT_NAMES[split]} tasks")
        ax.set_xlabel("environment steps (context included)")
        ax.set_ylabel(f"normalised return (IQM, {pct(confidence)} CI)")
    labels = [k if k != "threshold" else f"threshold ({pct(threshold)})" for k in legend]
    handles = list(legend.values())
    if any_frozen:
        handles.append(Line2D([], [], ls="--", color="k"))
        labels.append("dashed: frozen start (same colour)")
    # below the panels: inside, it hid the curves that sit mid-height
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(fig, path)


def figure_zero_shot(metrics: Mapping[str, Any], path: Path, *, confidence: float) -> Path:
    """Zero-shot bars; frozen controls are left out (their zero-shot is their method's by construction)."""
    splits = [s for s in ("interp", "extrap") if s in metrics]
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 3.5), squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits, strict=True):
        ms = _split_methods(metrics, split)
        names = [n for n in ms if not is_frozen(n)]
        iqms = [ms[n]["zero_shot_iqm"] for n in names]
        lo = [iqms[i] - ms[n]["zero_shot_ci_low"] for i, n in enumerate(names)]
        hi = [ms[n]["zero_shot_ci_high"] - iqms[i] for i, n in enumerate(names)]
        ax.bar(names, iqms, yerr=[lo, hi], capsize=4, color=[color(n) for n in names])
        ax.set_title(f"zero-shot, {SPLIT_NAMES[split]} tasks")
        ax.set_ylabel(f"normalised return (IQM, {pct(confidence)} CI)")
        ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def figure_scatter(scores: pd.DataFrame, path: Path) -> Path:
    per_task = scores.groupby(["split", "method", "task_id"])["auc"].mean().reset_index()
    splits = [s for s in ("interp", "extrap") if s in set(per_task["split"])]
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        d = per_task[per_task["split"] == split]
        base = d[d["method"] == "scratch"].set_index("task_id")["auc"]
        for method in ordered_methods(d["method"]):
            if method == "scratch" or is_frozen(method):
                continue
            g = d[d["method"] == method].set_index("task_id")
            ax.scatter(base.reindex(g.index), g["auc"], label=method, s=18, color=color(method))
        lim = [0, max(1.05, float(d["auc"].max()) + 0.05)]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.set_xlabel("scratch: normalised AUC (mean over seeds)")
        ax.set_ylabel("method (fine-tuned): normalised AUC")
        ax.set_title(f"per task, {SPLIT_NAMES[split]}")
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def figure_retrieval(meta_train: Mapping[str, Any], path: Path) -> Path:
    s = meta_train.get("siamese", {})
    fig, ax = plt.subplots(figsize=(4, 3))
    vals = [s.get("top1_retrieval", np.nan), s.get("random_top1", np.nan)]
    ax.bar(["siamese top-1", "random neighbour"], vals, color=["#2ca02c", "#7f7f7f"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("retrieved task is a best source")
    ax.set_title("siamese retrieval (validation tasks)")
    return _save(fig, path)


def figure_experts(collect: Mapping[str, Any], path: Path, solved: float) -> Path:
    frame = pd.DataFrame([{"task_id": k, **v} for k, v in collect["tasks"].items()])
    fig, ax = plt.subplots(figsize=(8, 3))
    order = ["train", "val", "val_extrap", "interp", "extrap"]
    colors = {"train": "#1f77b4", "val": "#2ca02c", "val_extrap": "#98df8a", "interp": "#ff7f0e", "extrap": "#d62728"}
    x = 0
    for split in order:
        g = frame[frame["split"] == split]
        ax.bar(range(x, x + len(g)), g["return"], color=colors[split], label=split)
        x += len(g)
    ax.axhline(solved, ls="--", color="k", lw=0.8)
    ax.set_ylabel("expert greedy return")
    ax.set_xlabel("task")
    ax.legend(fontsize=8, ncol=4)
    ax.set_title(f"experts: {100 * collect['fraction_solved']:.0f}% solved (>= {solved:g})")
    return _save(fig, path)


def _data_hash() -> str:
    recorded = recorded_md5(paths.TRAJECTORIES)
    if recorded:
        return recorded
    return dvc_md5(paths.TRAJECTORIES) if paths.TRAJECTORIES.exists() else "unknown"


def render_html(markdown: str, title: str, base: Path) -> str:
    """The self-contained HTML page of a Markdown report: rendered by markdown-it-py (CommonMark and
    tables), every image under ``base`` embedded as a base64 PNG, no scripts, no external resource."""

    def embed(match: re.Match[str]) -> str:
        data = base64.b64encode((base / match.group(2)).read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    body = _MD.render(re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", embed, markdown))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;font-size:90%}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")


@dataclass
class _Inputs:
    """What the report reads (optional inputs: empty when absent)."""

    metrics: dict[str, Any]
    curves: pd.DataFrame
    scores: pd.DataFrame
    meta_train: dict[str, Any]
    collect: dict[str, Any]
    tasks: pd.DataFrame
    search: pd.DataFrame | None
    selected: dict[str, Any]
    diagnosis: dict[str, Any]

    @classmethod
    def read(cls, metrics: Path, curves: Path, scores: Path, meta_train: Path, collect: Path, tasks: Path,
             search: Path, selected: Path, diagnosis: Path) -> _Inputs:
        table = pd.read_csv(search) if search.exists() else None
        if table is not None and (table.empty or "method" not in table.columns):
            table = None
        return cls(json.loads(metrics.read_text()), pd.read_parquet(curves), pd.read_csv(scores),
                   json.loads(meta_train.read_text()) if meta_train.exists() else {},
                   json.loads(collect.read_text()), pd.read_parquet(tasks), table,
                   json.loads(selected.read_text()) if selected.exists() else {},
                   json.loads(diagnosis.read_text()) if diagnosis.exists() else {})


def _figures(data: _Inputs, params: Params, fig_dir: Path) -> dict[str, Path]:
    cfg = params.meta_test
    bands = _curve_bands(data.curves, cfg.confidence, max(200, cfg.bootstrap_resamples // 4), cfg.seed)
    return {
        "Learning curves": figure_curves(bands, fig_dir / "learning_curves.png", threshold=cfg.threshold,
                                         confidence=cfg.confidence),
        "Zero-shot return": figure_zero_shot(data.metrics, fig_dir / "zero_shot.png", confidence=cfg.confidence),
        "Per-task comparison": figure_scatter(data.scores, fig_dir / "per_task_scatter.png"),
        "Siamese retrieval": figure_retrieval(data.meta_train, fig_dir / "siamese_retrieval.png"),
        "Expert returns": figure_experts(data.collect, fig_dir / "expert_returns.png",
                                         params.family.family().solved_return),
    }


def _run_info(data: _Inputs, params: Params, methods: list[str]) -> list[tuple[str, Any]]:
    from metadqn.determinism import cpu_setting
    from metadqn.tracking.runs import git_commit

    cfg = params.meta_test
    counts = data.tasks["split"].value_counts().to_dict()
    frozen = [m for m in methods if is_frozen(m)]
    return [
        ("family", params.family.name), ("tasks per split", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))),
        ("methods", ", ".join(m for m in methods if not is_frozen(m))),
        *([("frozen-start controls (no updates)", ", ".join(frozen))] if frozen else []),
        ("seeds per task and method", cfg.seeds),
        ("budget per run", f"{data.metrics.get('budget_steps')} env steps, of which "
                           f"{data.metrics.get('context_steps')} context"),
        ("evaluation", f"every {cfg.eval_interval} steps, {cfg.eval_episodes} greedy episodes"),
        ("threshold", f"{pct(cfg.threshold)} of the expert return ({cfg.threshold:g} x)"),
        ("intervals", f"{pct(cfg.confidence)} stratified-bootstrap CIs ({cfg.bootstrap_resamples} resamples)"),
        ("params digest", params.digest()),
        ("CPU kernels", f"{cpu_setting()} (metadqn.determinism: the same bytes on any x86-64 machine with AVX2)"),
        ("git commit", git_commit()), ("DVC data hash (trajectories)", _data_hash()),
    ]


def diagnosis_section(diagnosis: Mapping[str, Any]) -> list[str]:
    """Per hypernetwork: the measures of :mod:`metadqn.evaluation.diagnosis` by split (Markdown lines)."""
    if not diagnosis:
        return [f"## {DIAGNOSIS_SECTION}", "", "Not run (no `reports/diagnosis/summary.json`: `dvc repro diagnose`).",
                ""]
    md = [f"## {DIAGNOSIS_SECTION}", "",
          "Where each hypernetwork's start falls relative to the training tasks, along its chain (input, encoder "
          "embedding, generated parameters), from one context per task drawn as meta_test draws its first. "
          "If the generator applied to the *nearest training embedding* does much better than on the task's own "
          "embedding, the generator is what leaves its training region; if the expert of the physically nearest "
          "training task does well but that does not, the encoder picked the wrong neighbour. Medians over "
          "tasks; returns and matches are means; returns normalised (0 random, 1 expert). Analysis only: no "
          "stage selects anything from it (metadqn.evaluation.diagnosis).", ""]
    for model, splits in diagnosis.items():
        names = [s for s in ("train", "val", "val_extrap", "interp", "extrap") if s in splits]
        md += [f"**{model}**", "", "| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        md += [f"| {label} | " + " | ".join(_fmt(splits[s].get(key)) for s in names) + " |"
               for key, label in DIAGNOSIS_ROWS]
        md.append("")
    return md


def _headline_section(data: _Inputs, params: Params) -> list[str]:
    """The headline tables per split (Markdown lines)."""
    cfg = params.meta_test
    splits = [s for s in ("interp", "extrap") if s in data.metrics]
    tables = "\n\n".join(f"**{SPLIT_NAMES[s]} tasks**: {headline_caption(data.metrics, s, confidence=cfg.confidence)}"
                         f"\n\n{headline_table(data.metrics, s, threshold=cfg.threshold)}" for s in splits)
    return ["## Headline results", "", tables]


def _verdict_section(data: _Inputs, params: Params) -> list[str]:
    """The plain-language verdict (Markdown lines)."""
    cfg = params.meta_test
    lines = verdict(data.metrics, threshold=cfg.threshold, confidence=cfg.confidence,
                    frozen_diffs=frozen_differences(data.scores, cfg))
    return ["## Verdict", "", *[f"- {line}" for line in lines]]


def _markdown(data: _Inputs, params: Params, figs: Mapping[str, Path], out_dir: Path, headline: list[str],
              verdict_lines: list[str]) -> str:
    cfg = params.meta_test
    methods = ordered_methods(data.scores["method"].astype(str).unique())
    siamese = data.meta_train.get("siamese", {})
    picks = {k.removeprefix("val_picks_"): v for k, v in data.meta_train.get("select", {}).items()
             if k.startswith("val_picks_")}
    picked = ("" if not picks else " select's start came from " + ", ".join(
        f"{name} on {100 * v:.0f}%" for name, v in picks.items()) + " of the validation tasks.")
    text = {
        "Siamese retrieval": (f"Top-1 agreement of the retrieved training task with the best source by "
                              f"cross-evaluation (validation tasks): {_fmt(siamese.get('top1_retrieval'))} vs "
                              f"{_fmt(siamese.get('random_top1'))} for a random neighbour.{picked}"),
        "Expert returns": (f"{100 * data.collect['fraction_solved']:.0f}% of experts reach "
                           f"{params.family.family().solved_return:g} (greedy, fresh start states). Every return "
                           "in this report is normalised per task as (R - R_random) / (R_ref - R_random): 0 is "
                           "the uniform-random policy (mean return "
                           f"{_fmt(data.collect.get('mean_random_return'))} over tasks), 1 the task's expert, "
                           "or the solved return where the expert fell short of it (metadqn.data.normalise)."),
        "Learning curves": (f"IQM per evaluation with a shaded {pct(cfg.confidence)} CI per method; "
                            + ("dashed, in the same colour: the method's frozen start (no updates); "
                               if any(is_frozen(m) for m in methods) else "")
                            + f"dotted: the {pct(cfg.threshold)} threshold."),
    }
    md = [f"# {params.report.title}", "", "## What was run", "",
          *[f"- {k}: {v}" for k, v in _run_info(data, params, methods)], "", *headline, ""]
    for name, fig in figs.items():
        md += [f"## {name}", "", *([text[name], ""] if name in text else []),
               f"![{name}]({fig.relative_to(out_dir).as_posix()})", ""]
    if data.search is not None:
        md += [f"## {SEARCH_SECTION}", "", search_text(cfg.confidence), "", search_table(data.search), ""]
        chosen = selected_lines(data.selected)
        if chosen:
            md += ["Selected configurations:", "", *[f"- {line}" for line in chosen], ""]
    md += diagnosis_section(data.diagnosis)
    md += [*verdict_lines, "", "## Replicates", "",
           "This report is one run; its intervals resample its tasks and seeds, not the training of its experts "
           "and meta-models. How far the headline figures move across independent runs (other training seeds, "
           "same tasks): `replicates.md` beside this report, from `metadqn replicate --n 3`.", ""]
    return "\n".join(md)


def build_report(
    params: Params,
    out_dir: Path = Path("reports"),
    *,
    metrics_path: Path = paths.METRICS,
    curves_path: Path = paths.META_TEST_CURVES_PARQUET,
    scores_path: Path = paths.META_TEST_SCORES,
    meta_train_path: Path = paths.META_TRAIN_METRICS,
    collect_path: Path = paths.COLLECT_METRICS,
    tasks_path: Path = paths.TASKS,
    search_path: Path = paths.FINETUNE_SEARCH,
    selected_path: Path = paths.FINETUNE_SELECTED,
    diagnosis_path: Path = paths.DIAGNOSIS_SUMMARY,
) -> ReportResult:
    """Writes ``out_dir/report.md`` (the one rendering), ``out_dir/report.html`` (rendered from it, figures
    embedded), ``out_dir/summary.md`` (headline tables and verdict) and ``out_dir/figures/``.

    ``meta_train_path``, ``search_path``, ``selected_path`` and ``diagnosis_path`` are optional inputs (left
    out when absent).
    """
    from metadqn.tracking.runs import stage_run

    data = _Inputs.read(Path(metrics_path), Path(curves_path), Path(scores_path), Path(meta_train_path),
                        Path(collect_path), Path(tasks_path), Path(search_path), Path(selected_path),
                        Path(diagnosis_path))
    figs = _figures(data, params, out_dir / "figures")
    headline, verdict_lines = _headline_section(data, params), _verdict_section(data, params)
    summary = "\n".join([*headline, "", *verdict_lines, ""])  # summary.md: the pipeline's Prefect artifact
    markdown = _markdown(data, params, figs, out_dir, headline, verdict_lines)
    md_path, html_path, summary_path = out_dir / "report.md", out_dir / "report.html", out_dir / "summary.md"
    write_text(md_path, markdown)
    write_text(summary_path, summary)
    write_text(html_path, render_html(markdown, params.report.title, out_dir))

    with stage_run("report", params.family.name, params.flat(), params.digest(), params.tracking.enabled) as run:
        if run is not None:
            import mlflow

            for path in (summary_path, html_path, md_path):
                mlflow.log_artifact(str(path))
            for fig in figs.values():
                mlflow.log_artifact(str(fig), "figures")
    return ReportResult(html_path, md_path, summary_path, summary, list(figs.values()))
