"""The evaluation report: ``reports/report.html`` (self-contained: figures embedded as base64 PNGs, no
scripts, renders offline) and ``reports/report.md`` (figures under ``reports/figures/``).

Sections: what was run (family, splits, task counts, seeds, budgets, params digest, git commit, DVC data
hash), headline table per split, learning curves (IQM with shaded 95% CI per method, a panel per
split), zero-shot bars with CIs, per-task scatter of each method against scratch, siamese retrieval
quality, expert returns, and a plain-language verdict stating which differences are significant
(non-overlapping 95% CIs).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml

from metadqn import paths
from metadqn.config import Params
from metadqn.data.io import atomic_path, dvc_md5, write_text
from metadqn.evaluation.metrics import stratified_iqm_ci

SECTIONS = ("What was run", "Headline results", "Learning curves", "Zero-shot return", "Per-task comparison",
            "Siamese retrieval", "Expert returns", "Verdict")
SPLIT_NAMES = {"interp": "interpolation", "extrap": "extrapolation"}
COLORS = {"hypernet": "#1f77b4", "hypernet-oracle": "#aec7e8", "siamese": "#2ca02c", "reptile": "#9467bd",
          "multitask": "#ff7f0e", "scratch": "#7f7f7f"}


@dataclass
class ReportResult:
    html: Path
    markdown: Path
    summary_markdown: str
    figures: list[Path]


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(m: dict[str, Any], key: str, digits: int = 2) -> str:
    return f"{_fmt(m[f'{key}_iqm'], digits)} [{_fmt(m[f'{key}_ci_low'], digits)}, {_fmt(m[f'{key}_ci_high'], digits)}]"


def headline_table(metrics: dict[str, Any], split: str) -> str:
    """A markdown table: one row per method."""
    rows = ["| method | zero-shot IQM [95% CI] | AUC IQM [95% CI] | steps to 90% IQM [95% CI] | censored | "
            "steps ratio vs scratch | P(AUC > scratch) |", "|---|---|---|---|---|---|---|"]
    for method, m in metrics.get(split, {}).items():
        rows.append(f"| {method} | {_ci(m, 'zero_shot')} | {_ci(m, 'auc')} | {_ci(m, 'steps_to_threshold', 0)} | "
                    f"{100 * m['censored_fraction']:.0f}% | {_fmt(m['steps_ratio_vs_scratch'])} | "
                    f"{_fmt(m['prob_improvement_vs_scratch'])} |")
    return "\n".join(rows)


def _compare(a: dict[str, Any], b: dict[str, Any], key: str) -> int:
    """0: a's 95% CI lies above b's, 1: below, 2: they overlap (not significant)."""
    if a[f"{key}_ci_low"] > b[f"{key}_ci_high"]:
        return 0
    if a[f"{key}_ci_high"] < b[f"{key}_ci_low"]:
        return 1
    return 2


def verdict(metrics: dict[str, Any]) -> list[str]:
    """Plain-language statements; a difference counts as significant when the 95% CIs do not overlap."""
    lines = []
    for split in ("interp", "extrap"):
        ms = metrics.get(split, {})
        if "scratch" not in ms:
            continue
        name = SPLIT_NAMES[split]
        s = ms["scratch"]
        for method, m in ms.items():
            if method == "scratch":
                continue
            zs = ("significantly better than scratch", "significantly worse than scratch",
                  "not significantly different from scratch")[_compare(m, s, "zero_shot")]
            auc = ("learns significantly faster (AUC)", "learns significantly slower (AUC)",
                   "is not significantly different in AUC")[_compare(m, s, "auc")]
            ratio = m["steps_ratio_vs_scratch"]
            ratio_txt = ""
            if ratio:
                ratio_txt = f"; it reaches 90% of the expert in {1 / ratio:.2g}x scratch's steps"
            lines.append(f"On {name} tasks, **{method}** starts at {_fmt(m['zero_shot_iqm'])} of the expert's "
                         f"return (IQM), {zs}, and {auc}{ratio_txt}.")
        for a, b in (("hypernet", "multitask"), ("hypernet", "siamese")):
            if a in ms and b in ms:
                ma, mb = ms[a], ms[b]
                sig = _compare(ma, mb, "zero_shot") != 2
                lines.append(f"On {name} tasks, {a} vs {b} zero-shot: {_fmt(ma['zero_shot_iqm'])} vs "
                             f"{_fmt(mb['zero_shot_iqm'])}, {'a' if sig else 'not a'} significant difference.")
    lines.append("Steps to threshold of runs that never reached 90% are counted at the budget (censored), so "
                 "ratios against a mostly censored scratch are lower bounds.")
    return lines


def _curve_bands(curves: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    rows = []
    for (split, method, step), g in curves.groupby(["split", "method", "step"], sort=True):
        point, lo, hi = stratified_iqm_ci(g["normalised_return"].to_numpy(float), g["task_id"].to_numpy(), 0.95,
                                          resamples, seed)
        rows.append({"split": split, "method": method, "step": step, "iqm": point, "low": lo, "high": hi})
    return pd.DataFrame(rows)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def figure_curves(bands: pd.DataFrame, path: Path) -> Path:
    splits = [s for s in ("interp", "extrap") if s in set(bands["split"])]
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits, strict=True):
        for method, g in bands[bands["split"] == split].groupby("method"):
            c = COLORS.get(method)
            ax.plot(g["step"], g["iqm"], label=method, color=c)
            ax.fill_between(g["step"], g["low"], g["high"], alpha=0.2, color=c)
        ax.axhline(0.9, ls="--", lw=0.8, color="k")
        ax.set_title(f"{SPLIT_NAMES[split]} tasks")
        ax.set_xlabel("environment steps (context included)")
        ax.set_ylabel("normalised return (IQM, 95% CI)")
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def figure_zero_shot(metrics: dict[str, Any], path: Path) -> Path:
    splits = [s for s in ("interp", "extrap") if s in metrics]
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 3.5), squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits, strict=True):
        names = list(metrics[split])
        iqm = [metrics[split][n]["zero_shot_iqm"] for n in names]
        lo = [iqm[i] - metrics[split][n]["zero_shot_ci_low"] for i, n in enumerate(names)]
        hi = [metrics[split][n]["zero_shot_ci_high"] - iqm[i] for i, n in enumerate(names)]
        ax.bar(names, iqm, yerr=[lo, hi], capsize=4, color=[COLORS.get(n, "#333") for n in names])
        ax.set_title(f"zero-shot, {SPLIT_NAMES[split]} tasks")
        ax.set_ylabel("normalised return (IQM, 95% CI)")
        ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def figure_scatter(scores: pd.DataFrame, path: Path) -> Path:
    per_task = scores.groupby(["split", "method", "task_id"])["auc"].mean().reset_index()
    splits = [s for s in ("interp", "extrap") if s in set(per_task["split"])]
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        d = per_task[per_task["split"] == split]
        base = d[d["method"] == "scratch"].set_index("task_id")["auc"]
        for method, g in d[d["method"] != "scratch"].groupby("method"):
            g = g.set_index("task_id")
            ax.scatter(base.reindex(g.index), g["auc"], label=method, s=18, color=COLORS.get(method))
        lim = [0, max(1.05, float(d["auc"].max()) + 0.05)]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.set_xlabel("scratch: normalised AUC (mean over seeds)")
        ax.set_ylabel("method: normalised AUC")
        ax.set_title(f"per task, {SPLIT_NAMES[split]}")
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def figure_retrieval(meta_train: dict[str, Any], path: Path) -> Path:
    s = meta_train.get("siamese", {})
    fig, ax = plt.subplots(figsize=(4, 3))
    vals = [s.get("top1_retrieval", np.nan), s.get("random_top1", np.nan)]
    ax.bar(["siamese top-1", "random neighbour"], vals, color=["#2ca02c", "#7f7f7f"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("retrieved task is a best source")
    ax.set_title("siamese retrieval (validation tasks)")
    return _save(fig, path)


def figure_experts(collect: dict[str, Any], path: Path, solved: float) -> Path:
    frame = pd.DataFrame([{"task_id": k, **v} for k, v in collect["tasks"].items()])
    fig, ax = plt.subplots(figsize=(8, 3))
    order = ["train", "val", "interp", "extrap"]
    colors = {"train": "#1f77b4", "val": "#2ca02c", "interp": "#ff7f0e", "extrap": "#d62728"}
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
    lock = Path("dvc.lock")
    if lock.exists():
        for stage in yaml.safe_load(lock.read_text()).get("stages", {}).values():
            for out in stage.get("outs", []):
                if out.get("path") == str(paths.TRAJECTORIES):
                    return out["md5"]
    return dvc_md5(paths.TRAJECTORIES) if paths.TRAJECTORIES.exists() else "unknown"


def build_report(params: Params, out_dir: Path = Path("reports")) -> ReportResult:
    from metadqn.tracking.runs import git_commit, stage_run

    metrics = json.loads(paths.METRICS.read_text())
    curves = pd.read_parquet(paths.META_TEST_CURVES_PARQUET)
    scores = pd.read_csv(paths.META_TEST_SCORES)
    meta_train = json.loads(paths.META_TRAIN_METRICS.read_text()) if paths.META_TRAIN_METRICS.exists() else {}
    collect = json.loads(paths.COLLECT_METRICS.read_text())
    tasks = pd.read_parquet(paths.TASKS)
    family = params.family.family()
    fig_dir = out_dir / "figures"
    bands = _curve_bands(curves, max(200, params.meta_test.bootstrap_resamples // 4), params.meta_test.seed)
    figs = {
        "Learning curves": figure_curves(bands, fig_dir / "learning_curves.png"),
        "Zero-shot return": figure_zero_shot(metrics, fig_dir / "zero_shot.png"),
        "Per-task comparison": figure_scatter(scores, fig_dir / "per_task_scatter.png"),
        "Siamese retrieval": figure_retrieval(meta_train, fig_dir / "siamese_retrieval.png"),
        "Expert returns": figure_experts(collect, fig_dir / "expert_returns.png", family.solved_return),
    }
    counts = tasks["split"].value_counts().to_dict()
    run_info = [
        ("family", family.name), ("tasks per split", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))),
        ("methods", ", ".join(sorted(scores["method"].unique()))),
        ("seeds per task and method", params.meta_test.seeds),
        ("budget per run", f"{metrics.get('budget_steps')} env steps, of which {metrics.get('context_steps')} context"),
        ("evaluation", f"every {params.meta_test.eval_interval} steps, "
                       f"{params.meta_test.eval_episodes} greedy episodes"),
        ("threshold", f"{params.meta_test.threshold:g} x expert return"), ("params digest", params.digest()),
        ("git commit", git_commit()), ("DVC data hash (trajectories)", _data_hash()),
    ]
    summary = "\n\n".join(f"**{SPLIT_NAMES[s]} tasks**\n\n{headline_table(metrics, s)}"
                          for s in ("interp", "extrap") if s in metrics)
    verdict_lines = verdict(metrics)
    retrieval = (f"Top-1 agreement of the retrieved training task with the best source by cross-evaluation "
                 f"(validation tasks): {_fmt(meta_train.get('siamese', {}).get('top1_retrieval'))} vs "
                 f"{_fmt(meta_train.get('siamese', {}).get('random_top1'))} for a random neighbour.")
    experts_txt = (f"{100 * collect['fraction_solved']:.0f}% of experts reach {family.solved_return:g} "
                   f"(greedy, fresh start states); they normalise every return in this report.")

    md = [f"# {params.report.title}", "", "## What was run", "",
          *[f"- {k}: {v}" for k, v in run_info], "", "## Headline results", "", summary, ""]
    text = {"Siamese retrieval": retrieval, "Expert returns": experts_txt}
    for name, fig in figs.items():
        md += [f"## {name}", "", *([text[name], ""] if name in text else []),
               f"![{name}]({fig.relative_to(out_dir).as_posix()})", ""]
    md += ["## Verdict", "", *[f"- {line}" for line in verdict_lines], ""]
    md_path = out_dir / "report.md"
    write_text(md_path, "\n".join(md))

    def img(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'

    def md_table_to_html(table: str) -> str:
        lines = [r.strip("|").split("|") for r in table.splitlines() if not r.startswith("|---")]
        head, *body = lines
        return ("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>" +
                "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body) +
                "</table>")

    parts = [f"<h1>{html.escape(params.report.title)}</h1>", "<h2>What was run</h2><ul>",
             *[f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in run_info], "</ul>",
             "<h2>Headline results</h2>"]
    for s in ("interp", "extrap"):
        if s in metrics:
            parts += [f"<h3>{SPLIT_NAMES[s]} tasks</h3>", md_table_to_html(headline_table(metrics, s))]
    for name, fig in figs.items():
        parts += [f"<h2>{name}</h2>", *([f"<p>{html.escape(text[name])}</p>"] if name in text else []), img(fig)]
    parts += ["<h2>Verdict</h2><ul>",
              *[f"<li>{html.escape(v).replace('**', '')}</li>" for v in verdict_lines], "</ul>"]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;font-size:90%}"
             "img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(params.report.title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    html_path = out_dir / "report.html"
    write_text(html_path, page)

    with stage_run("report", family.name, params.flat(), params.digest(), params.tracking.enabled) as run:
        if run is not None:
            import mlflow

            mlflow.log_text(summary, "summary.md")
            mlflow.log_artifact(str(html_path))
            mlflow.log_artifact(str(md_path))
            for fig in figs.values():
                mlflow.log_artifact(str(fig), "figures")
    return ReportResult(html_path, md_path, summary, list(figs.values()))
