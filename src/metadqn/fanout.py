"""The fan-out contract between a stage and whatever runs its groups.

A stage that trains several independent groups (collect: groups of tasks' experts; finetune_search and
meta_test: batched fine-tuning runs) builds ``fn``, a picklable callable of one group (a
``functools.partial`` of a module-level function, never a closure), and hands ``fn`` and the groups to a
:data:`GroupMapper`. The mapper returns ``[fn(g) for g in groups]``, in order, computed wherever it likes:
:func:`run_in_process` here (library calls and tests), or the flows' Prefect mapper (``flows.runners``),
which runs ``fn`` as one Prefect task per group in the stage process, in a pool of single-thread worker
processes, or on a Dask cluster. A mapper only decides *where* ``fn`` runs, never *what* it computes, so
every runner gives the same bytes: each group's seed derives from its contents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

G = TypeVar("G")
R = TypeVar("R")

GroupMapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]
"""``(fn, groups) -> [fn(g) for g in groups]``, in order, computed wherever the mapper runs things."""


def run_in_process(fn: Callable[[G], R], groups: Sequence[G]) -> list[R]:
    """The reference mapper: every group in this process, one after another."""
    return [fn(g) for g in groups]


def group_label(group: object, index: int) -> str:
    """A short name for a group in logs and the Prefect UI: its ``label`` if it has one, else its index."""
    label = getattr(group, "label", None)
    return label if isinstance(label, str) and label else f"group-{index}"


def init_worker(threads: int) -> None:
    """Run once in each worker process before its first group: torch gets ``threads`` intra-op threads.

    One thread per process is the default (``runner.threads``): the groups of a stage run in parallel as
    processes, and a process of one thread keeps its speed when another process is busy on the machine,
    where a process of two OpenMP threads stalls each time one of them is descheduled (see ``bench/``).
    Thread counts never change a result here: the networks are small enough that torch computes every
    reduction on one thread either way (checked by ``tests/test_fanout.py``).
    """
    import torch

    torch.set_num_threads(threads)
