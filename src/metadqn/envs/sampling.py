"""Seeded sampling of disjoint task sets per split, written as ``data/tasks.parquet``."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from metadqn.envs.families import Family, Interval, ParamSpec

SPLITS = ("train", "val", "interp", "extrap", "val_extrap")
"""train and val tasks (and interpolation-test tasks) come from R; extrapolation-test tasks and the
out-of-range validation tasks (``val_extrap``) from E. Appended last: each split's stream is its index's
child of the seed, so adding a split changed no other split's tasks."""
EXTRAP_SPLITS = frozenset({"extrap", "val_extrap"})
"""The splits drawn from the ranges E."""


def _sample_union(rng: np.random.Generator, intervals: tuple[Interval, ...], n: int) -> np.ndarray:
    """Uniform over a union of disjoint intervals (each chosen in proportion to its width)."""
    widths = np.array([hi - lo for lo, hi in intervals], dtype=np.float64)
    if widths.sum() == 0.0:
        return np.full(n, intervals[0][0])
    which = rng.choice(len(intervals), size=n, p=widths / widths.sum())
    lo = np.array([iv[0] for iv in intervals])[which]
    return lo + rng.random(n) * widths[which]


def sample_param(rng: np.random.Generator, spec: ParamSpec, split: str, n: int) -> np.ndarray:
    if spec.discrete is not None:
        return rng.choice(np.asarray(spec.discrete, dtype=np.float64), size=n)
    return _sample_union(rng, spec.extrap if split in EXTRAP_SPLITS else spec.train, n)


def sample_tasks(family: Family, counts: Mapping[str, int], seed: int) -> pd.DataFrame:
    """Draws ``counts[split]`` tasks per split; one row per task, one column per physics parameter.

    Every split has its own child stream of ``seed``, so growing one split's count never changes the
    tasks of another. Task ids are ``<split>-<index>``.
    """
    rows = []
    children = np.random.SeedSequence(seed).spawn(len(SPLITS))
    for split, child in zip(SPLITS, children, strict=True):
        n = int(counts.get(split, 0))
        if n == 0:
            continue
        rng = np.random.default_rng(child)
        values = {spec.name: sample_param(rng, spec, split, n) for spec in family.params}
        for i in range(n):
            rows.append({"task_id": f"{split}-{i:03d}", "split": split, "family": family.name,
                         **{k: float(v[i]) for k, v in values.items()}})
    frame = pd.DataFrame(rows, columns=["task_id", "split", "family", *family.param_names])
    check_disjoint(frame, family)
    return frame


def check_disjoint(tasks: pd.DataFrame, family: Family) -> None:
    """Raises if two tasks share a parameter vector (so no test task is also a training task)."""
    dup = tasks.duplicated(subset=family.param_names, keep=False)
    if dup.any():
        raise ValueError(f"tasks share a parameter vector: {sorted(tasks.loc[dup, 'task_id'])}")


def task_matrix(tasks: pd.DataFrame, family: Family) -> np.ndarray:
    """[n_tasks, n_params] float64 matrix in the family's parameter order."""
    return tasks[family.param_names].to_numpy(dtype=np.float64)
