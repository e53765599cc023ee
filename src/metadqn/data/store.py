"""Split-checked access to the collected tasks, trajectories and experts.

Meta-training must never read a held-out test task. Rather than trusting every caller, all reads go
through a :class:`TaskStore` opened with the splits its caller may see; a read of any other split's
trajectories or expert raises :class:`LeakageError`. Meta-training and the fine-tuning search open
``{"train", "val", "val_extrap"}`` (the validation splits only for model selection); meta-test opens every
split.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from metadqn import paths
from metadqn.data import trajectories as traj
from metadqn.data.io import CorruptDataError, load_state_dict
from metadqn.data.normalise import ReturnScale
from metadqn.dqn.qnetwork import StateDict
from metadqn.errors import UserError

VALIDATION_SPLITS = ("val", "val_extrap")
"""In range and out of range (see ``collect.n_val_extrap_tasks``); selections weigh them equally."""
TRAINING_SPLITS = frozenset({"train", *VALIDATION_SPLITS})


class LeakageError(RuntimeError):
    """Code tried to read data of a split it must not see."""


class MissingInputError(UserError, FileNotFoundError):
    """An input of a stage is missing (one-line message naming the command that makes it)."""


@dataclass(frozen=True)
class TaskStore:
    tasks_path: Path = paths.TASKS
    trajectories: Path = paths.TRAJECTORIES
    experts: Path = paths.EXPERTS
    collect_metrics: Path = paths.COLLECT_METRICS
    allowed: frozenset[str] = TRAINING_SPLITS

    def _tasks(self) -> pd.DataFrame:
        if not self.tasks_path.exists():
            raise MissingInputError(f"{self.tasks_path}: not found; run `dvc repro collect` (or `dvc pull`) first")
        return pd.read_parquet(self.tasks_path)

    def tasks(self, split: str) -> pd.DataFrame:
        """The tasks of one split (refused unless the split is allowed)."""
        self._check_split(split)
        t = self._tasks()
        return t[t["split"] == split].reset_index(drop=True)

    def tasks_of(self, splits: Iterable[str]) -> pd.DataFrame:
        """The tasks of several splits, in that order (a split with no task adds nothing)."""
        frames = [self.tasks(s) for s in splits]
        return pd.concat([f for f in frames if len(f)] or frames[:1], ignore_index=True)

    def _check_split(self, split: str) -> None:
        if split not in self.allowed:
            raise LeakageError(f"split {split!r} is not readable here (allowed: {sorted(self.allowed)})")

    def _check_ids(self, task_ids: Iterable[str]) -> list[str]:
        ids = list(task_ids)
        split = dict(zip(*(self._tasks()[c] for c in ("task_id", "split")), strict=True))
        for tid in ids:
            if tid not in split:
                raise KeyError(f"unknown task {tid!r} (not in {self.tasks_path})")
            if split[tid] not in self.allowed:
                raise LeakageError(f"task {tid!r} is in split {split[tid]!r}, not readable here "
                                   f"(allowed: {sorted(self.allowed)})")
        return ids

    def transitions(self, task_ids: Iterable[str], obs_dim: int,
                    sources: Iterable[str] = traj.SOURCES) -> pd.DataFrame:
        return traj.read_tasks(self.trajectories, self._check_ids(task_ids), obs_dim, sources)

    def expert(self, task_id: str) -> StateDict:
        (tid,) = self._check_ids([task_id])
        path = self.experts / f"{tid}.pt"
        if not path.exists():
            raise MissingInputError(f"{path}: not found; run `dvc repro collect` (or `dvc pull`) first")
        return load_state_dict(path)

    def return_scale(self, task_ids: Iterable[str]) -> ReturnScale:
        """Each task's random-policy and reference returns from collect: what normalises its returns
        (:mod:`metadqn.data.normalise`). A scale that cannot normalise is refused in one line."""
        ids = self._check_ids(task_ids)
        if not self.collect_metrics.exists():
            raise MissingInputError(f"{self.collect_metrics}: not found; run `dvc repro collect` first")
        try:
            per_task = json.loads(self.collect_metrics.read_text())["tasks"]
            random = {tid: float(per_task[tid]["random_return"]) for tid in ids}
            reference = {tid: float(per_task[tid]["reference_return"]) for tid in ids}
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptDataError(f"{self.collect_metrics}: no usable return scale ({type(exc).__name__}: {exc}); "
                                   "rerun `dvc repro collect`") from None
        return ReturnScale.build(ids, random, reference, str(self.collect_metrics))
