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

    from metadqn.determinism import check_pinned
    from metadqn.errors import quiet_user_errors

    check_pinned()  # inherited from the stage process, which checked it too: cheap insurance
    torch.set_num_threads(threads)
    quiet_user_errors()  # a bad input ends the stage in its one line, not in a worker's traceback too
    _exit_with_parent()


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """A worker ends itself when the stage process that started it dies (a kill -9 of the stage would
    otherwise leave the pool's workers running, holding the stage's output pipes open). A watcher thread
    rather than a parent-death signal: that signal fires when the *thread* that forked the worker ends, and
    the pool starts workers from whichever thread submits first."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="metadqn-exit-with-parent", daemon=True).start()
