"""Independent replicates of the whole pipeline, and the table of how far their headline figures move.

The confidence intervals of one run resample its tasks and fine-tuning seeds; they say nothing about the
variance of expert training and meta-training. A replicate is the whole pipeline again with every training
seed changed (:data:`SEED_KEYS`; ``collect.task_seed`` stays, so every replicate faces the same tasks) at the
same commit and params otherwise. ``metadqn replicate --n N`` drives them:

- replicate 0 is the workspace's own run (its outputs must be up to date: ``dvc status`` clean);
- replicate r >= 1 runs in its own clone of HEAD (``<workdir>/r<r>``) with ``dvc repro``, each seed + r; a
  clone whose run already finished at the same commit and seeds is reused, so an interrupted call resumes;
  one that finished at another commit with the same seeds is moved to HEAD in place (:func:`_move_clone`):
  its own outputs and ``dvc.lock`` kept, ``dvc repro`` reruns only the stages whose code, params or inputs
  changed since its own run (DVC's rule, the same as in the workspace), so a change to the search reruns the
  search and what follows it, not collect;
- the clones' stage commands run the installed ``metadqn`` (this workspace's, editable): the refusal of
  uncommitted changes is what makes it HEAD's code, so do not edit ``src/`` while replicates run;
- each replicate's stage runs go to the workspace's MLflow store as children of one parent run;
- the headline figures of every replicate are aggregated (:func:`aggregate`): per figure the values, their
  mean, min, max and a Student-t interval of the mean across replicates (``meta_test.confidence``), written
  as a DVC metrics file (``reports/replicates.json``, listed in ``dvc.yaml``'s top-level ``metrics``) and a
  Markdown page (``reports/replicates.md``).

Decision: the table is a page beside the run's report, not a section of it. The report stage is a pure
function of one run's outputs; the replicates are other runs, made outside ``dvc repro`` (a DVC stage cannot
clone and run the pipeline it belongs to), so the report links to the page instead of embedding it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metadqn.errors import UserError
from metadqn.tracking.runs import PARENT_RUN_ENV, REPLICATE_ENV

SEED_KEYS: tuple[tuple[str, ...], ...] = (
    ("collect", "seed"), ("meta_train", "seed"), ("meta_test", "seed"), ("meta_test", "search", "seed"))
"""The params a replicate changes (each + r): every seed of training and evaluation, not the tasks'."""

FIGURE_KEYS = ("zero_shot_iqm", "auc_iqm", "final_iqm", "min_curve_iqm", "auc_diff_vs_scratch",
               "auc_diff_vs_scratch_ci_low", "final_diff_vs_scratch", "final_diff_vs_scratch_ci_low")
"""The per-(split, method) figures of ``reports/metrics.json`` the table follows (the headline table's)."""



class ReplicateError(UserError):
    """A replicate cannot start or did not finish; one line, ready to print."""


@dataclass(frozen=True)
class Replicate:
    index: int
    project: Path
    seeds: dict[str, int]


def replicate_seeds(params: Mapping[str, Any], r: int) -> dict[str, int]:
    """The seeds of replicate ``r``: each of :data:`SEED_KEYS` of ``params`` (a params.yaml mapping) + r."""
    out = {}
    for path in SEED_KEYS:
        node: Any = params
        for key in path:
            node = node[key]
        out[".".join(path)] = int(node) + r
    return out


def with_seeds(params: dict[str, Any], seeds: Mapping[str, int]) -> dict[str, Any]:
    """``params`` with the dotted keys of ``seeds`` set (a new mapping; the input is not changed)."""
    out = json.loads(json.dumps(params))
    for dotted, value in seeds.items():
        *parents, last = dotted.split(".")
        node = out
        for key in parents:
            node = node[key]
        node[last] = value
    return out


def figures(metrics: Mapping[str, Any], splits: Sequence[str] = ("interp", "extrap")) -> dict[str, float]:
    """The headline figures of one run's ``reports/metrics.json``, as ``<split>.<method>.<key>``."""
    out: dict[str, float] = {}
    for split in splits:
        for method, values in metrics.get(split, {}).items():
            for key in FIGURE_KEYS:
                v = values.get(key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    out[f"{split}.{method}.{key}"] = float(v)
    return out


def aggregate(runs: Sequence[Mapping[str, float]], confidence: float) -> dict[str, dict[str, Any]]:
    """Per figure present in every run: its values (replicate order), mean, min, max and the Student-t
    ``confidence`` interval of the mean across replicates (``None`` with fewer than two)."""
    from scipy import stats

    common = set(runs[0]).intersection(*runs[1:]) if runs else set()
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(common):
        values = [runs[i][name] for i in range(len(runs))]
        n = len(values)
        mean = sum(values) / n
        lo = hi = None
        if n >= 2:
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
            lo, hi = mean - half, mean + half
        out[name] = {"values": values, "mean": mean, "min": min(values), "max": max(values),
                     "ci_low": lo, "ci_high": hi}
    return out


def markdown(table: Mapping[str, Mapping[str, Any]], n: int, confidence: float, commit: str,
             seeds: Sequence[Mapping[str, int]]) -> str:
    """The replicate table as a Markdown page."""
    head = "| figure | " + " | ".join(f"rep {i}" for i in range(n)) + \
        f" | mean [{confidence:.0%} CI] | min | max |"
    lines = [
        "# Replicates",
        "",
        f"{n} independent runs of the whole pipeline at commit `{commit}`: the same params and tasks, every "
        "training seed changed (replicate r: each seed + r; replicate 0 is the committed run). The interval "
        "is a Student-t interval of the mean across replicates, so it covers the variance of expert training "
        "and meta-training that a single run's bootstrap CIs do not.",
        "",
        "Seeds: " + "; ".join(f"rep {i}: " + ", ".join(f"{k}={v}" for k, v in s.items())
                              for i, s in enumerate(seeds)),
        "",
        head,
        "|---|" + "---|" * (n + 3),
    ]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    for name, row in table.items():
        ci = "" if row["ci_low"] is None else f" [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in row["values"])
                     + f" | {fmt(row['mean'])}{ci} | {fmt(row['min'])} | {fmt(row['max'])} |")
    lines.append("")
    return "\n".join(lines)


def _git(project: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True).stdout.strip()


def _env(project: Path, parent_run: str | None, r: int, tracking_uri: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("METADQN_PARAMS", None)
    env["PREFECT_HOME"] = str(project / ".prefect")
    env[REPLICATE_ENV] = str(r)
    if parent_run and tracking_uri:
        env[PARENT_RUN_ENV] = parent_run
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    else:
        env.pop(PARENT_RUN_ENV, None)
    return env


def check_workspace(root: Path) -> str:
    """HEAD's commit, when the workspace can be replicate 0: tracked files committed and its run up to
    date. Refuses in one line otherwise."""
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        raise ReplicateError(f"{root} is not a git checkout: replicates clone the committed code") from None
    if dirty:
        raise ReplicateError("tracked files differ from HEAD: commit them first (a replicate clones HEAD, and "
                             "replicate 0 must be HEAD's run)")
    status = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--quiet"], cwd=root,
                            capture_output=True, text=True)
    if status.returncode != 0:
        raise ReplicateError("the workspace's outputs are not up to date with its params and code (dvc status): "
                             "run `make pipeline` first; it is replicate 0")
    return commit


def _done_marker(project: Path) -> Path:
    return project / ".metadqn-replicate.json"


def run_replicate(root: Path, workdir: Path, r: int, commit: str, seeds: Mapping[str, int],
                  parent_run: str | None, tracking_uri: str | None, log: Path) -> Path:
    """Replicate ``r`` (>= 1) in ``workdir/r<r>``: a clone of ``commit`` with ``seeds`` set, ``metadqn
    init-pool``, ``dvc repro``. Reuses a finished clone of the same commit and seeds. Returns the clone."""
    project = workdir / f"r{r}"
    marker = _done_marker(project)
    want = {"commit": commit, "seeds": dict(seeds)}
    done = json.loads(marker.read_text()) if marker.is_file() else None
    if done == want:
        return project
    if done is not None and done.get("seeds") == want["seeds"]:
        marker.unlink()  # an interrupted move must not pass for a finished run
        _move_clone(project, commit)
    else:
        if project.exists():
            shutil.rmtree(project)
        project.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(root), str(project)], check=True)
        subprocess.run(["git", "checkout", "-q", commit], cwd=project, check=True)
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params_file.write_text(yaml.safe_dump(with_seeds(params, seeds), sort_keys=False))
    env = _env(project, parent_run, r, tracking_uri)
    with log.open("w") as out:
        for cmd in (["metadqn", "init-pool"], ["dvc", "repro"]):
            proc = subprocess.run(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise ReplicateError(f"replicate {r}: `{' '.join(cmd)}` failed (exit {proc.returncode}); its log "
                                     f"is {log}")
    marker.write_text(json.dumps(want, sort_keys=True) + "\n")
    return project


def _move_clone(project: Path, commit: str) -> None:
    """Checks ``commit`` out in a finished replicate clone, keeping what its own run wrote.

    The tracked files that differ from the clone's commit are its run's (its ``dvc.lock`` and the outputs
    that git tracks, e.g. metrics files; its code is never edited) plus its seeded ``params.yaml``; the
    checkout would replace them with replicate 0's, so they are put back after it (``params.yaml`` is
    rewritten with the seeds by the caller). Untracked outputs (models, trajectories) stay as they are."""
    changed = [name for name in _git(project, "diff", "--name-only", "HEAD").splitlines()
               if name and name != "params.yaml"]
    own = {name: (project / name).read_bytes() for name in changed if (project / name).is_file()}
    _git(project, "fetch", "-q", "origin")
    _git(project, "checkout", "-q", "-f", commit)
    for name, data in own.items():
        (project / name).write_bytes(data)


def run_replicates(root: Path, n: int, workdir: Path, out_json: Path, out_md: Path, confidence: float,
                   family: str, tracking: bool, progress: Any = print) -> dict[str, dict[str, Any]]:
    """Replicate 0 (the workspace) and replicates 1..n-1 (clones), aggregated into ``out_json`` and
    ``out_md``. Tracked as one parent MLflow run with every replicate's stage runs as children."""
    if n < 2:
        raise ReplicateError(f"--n must be at least 2 (got {n}): one run has no spread to report")
    commit = check_workspace(root)
    base = yaml.safe_load((root / "params.yaml").read_text())
    seeds = [replicate_seeds(base, r) for r in range(n)]
    parent = uri = None
    if tracking:
        from metadqn.tracking.runs import start_parent_run

        parent, uri = start_parent_run(f"replicates-{n}", family, {"stage": "replicates", "git_commit": commit},
                                       {"n": n})
    status = "FAILED"
    table: dict[str, dict[str, Any]] = {}
    try:
        projects = [root]
        for r in range(1, n):
            progress(f"replicate {r}/{n - 1}: {workdir / f'r{r}'} (seeds " +
                     ", ".join(f"{k}={v}" for k, v in seeds[r].items()) + ")")
            projects.append(run_replicate(root, workdir, r, commit, seeds[r], parent, uri,
                                          workdir / f"r{r}.log"))
        runs = []
        for r, project in enumerate(projects):
            metrics_file = project / "reports" / "metrics.json"
            if not metrics_file.is_file():
                raise ReplicateError(f"replicate {r}: {metrics_file} is missing")
            runs.append(figures(json.loads(metrics_file.read_text())))
        table = aggregate(runs, confidence)
        from metadqn.data.io import write_json, write_text

        write_json(out_json, {"commit": commit, "n": n, "confidence": confidence,
                              "seeds": seeds, "figures": table})
        write_text(out_md, markdown(table, n, confidence, commit, seeds))
        status = "FINISHED"
    finally:
        if parent is not None:
            from metadqn.tracking.runs import finish_parent_run

            summary = {f"{name}.{stat}": float(row[stat]) for name, row in table.items()
                       for stat in ("mean", "min", "max")}
            finish_parent_run(parent, summary, out_md, status)
    return table
