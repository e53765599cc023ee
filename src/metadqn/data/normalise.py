"""How every return in metadqn is normalised: 0 is the uniform-random policy, 1 is the task's expert.

A return R on task t is reported as ``(R - R_random[t]) / (R_ref[t] - R_random[t])``, the scale of the
Atari human-normalised score. ``R_random`` is the uniform-random policy's mean return on the task and
``R_ref`` its reference return, both measured in collect on start states no selection saw. The reference
is the task's expert return, or the family's solved return where the expert did not reach it: an expert
that failed its task (MountainCar's sparse reward can leave one at the random policy's -200) would
otherwise make the scale zero or tiny and every figure on that task meaningless. So 1 means "as good as a
solving expert", and a failed expert's task is scored against the level that counts as solved.

The older ``R / R_expert`` inverts for families whose returns are negative (Acrobot, MountainCar: a
failing -200 over an expert's -100 gave 2.0) and was not 0 for a random policy on CartPole (about 0.04).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from metadqn.errors import UserError


def _scaled(returns: np.ndarray, random: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The one formula: random maps to 0, reference to 1 (elementwise, broadcast)."""
    return (np.asarray(returns, dtype=np.float64) - random) / (reference - random)


class ScaleError(UserError, ValueError):
    """A task's random and reference returns cannot normalise (one-line message)."""


def reference_return(expert_return: float, solved_return: float) -> float:
    """The return that normalises to 1: the expert's, or the solved level where the expert fell short."""
    return max(float(expert_return), float(solved_return))


@dataclass(frozen=True)
class ReturnScale:
    """Per task (in ``task_ids`` order): the random policy's return (0) and the reference return (1)."""

    task_ids: tuple[str, ...]
    random: np.ndarray
    reference: np.ndarray

    @classmethod
    def build(cls, task_ids: Iterable[str], random: Mapping[str, float], reference: Mapping[str, float],
              source: str = "collect metrics") -> ReturnScale:
        ids = tuple(task_ids)
        lo = np.array([float(random[t]) for t in ids], dtype=np.float64)
        hi = np.array([float(reference[t]) for t in ids], dtype=np.float64)
        for tid, a, b in zip(ids, lo, hi, strict=True):
            if not (math.isfinite(a) and math.isfinite(b)) or b - a <= 1e-9:
                raise ScaleError(f"{source}: task {tid}'s reference return ({b}) is not above its random policy's "
                                 f"({a}), so its returns cannot be normalised; rerun `dvc repro collect` (or drop "
                                 "the task)")
        return cls(ids, lo, hi)

    @classmethod
    def concat(cls, *scales: ReturnScale) -> ReturnScale:
        """One scale over the tasks of several, in order."""
        return cls(tuple(t for s in scales for t in s.task_ids), np.concatenate([s.random for s in scales]),
                   np.concatenate([s.reference for s in scales]))

    def __call__(self, returns: np.ndarray) -> np.ndarray:
        """Normalises returns whose last axis is the task axis (in ``task_ids`` order)."""
        return _scaled(returns, self.random, self.reference)

    def column(self, returns: pd.Series, task_ids: pd.Series) -> pd.Series:
        """Normalises a column of returns, each row's task named in ``task_ids``."""
        index = {t: i for i, t in enumerate(self.task_ids)}
        pos = task_ids.map(index)
        if pos.isna().any():
            raise KeyError(f"no return scale for task(s) {sorted(set(task_ids[pos.isna()]))}")
        i = pos.to_numpy(dtype=np.int64)
        return pd.Series(_scaled(returns.to_numpy(), self.random[i], self.reference[i]), index=returns.index,
                         name=returns.name)
