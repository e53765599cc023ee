"""The one list of meta-learners: what each is called, how it is trained, what it reads from a new task.

Everything that names learners reads this module: params validation (``meta_train.learners``,
``meta_test.methods``), the meta_train stage (which trainer to call), a saved meta-model (which inputs it
needs), the MLflow registry (which models to register and promote) and the report (order and colours).

Adding a learner = one :class:`Learner` entry here plus its module: a trainer
``train_<name>(data, params, scores) -> LearnerResult`` (see :mod:`metadqn.stages.meta_train`) that returns
a :class:`~metadqn.meta.model.MetaModel` of one of the existing kinds (``module`` below) or of a new kind
that ``MetaModel`` learns to build. This module imports nothing of metadqn, so config can read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

TaskInput = Literal["context", "physics", "none"]
ModuleKind = Literal["hypernet", "index", "init", "select"]


@dataclass(frozen=True)
class Learner:
    name: str
    """Its name in params, ``models/meta/<name>/``, the registry (``metadqn-<family>-<name>``), reports."""
    trainer: str
    """``module:function`` of its trainer, imported only when it trains (heavy imports stay lazy)."""
    task_input: TaskInput
    """What it reads from a new task: its context transitions, its true physics, or nothing."""
    module: ModuleKind
    """What the saved model holds: a hypernetwork (HyperQ), a retrieval index (SiameseIndex), one
    initialisation (a Q-network state_dict), or a chooser among other learners' starts (SelectQ)."""
    color: str
    """Its colour in the report's figures."""
    selectable: bool = True
    """Whether ``meta_train.learners`` may list it (False: a variant that another learner's settings switch
    on, as ``meta_train.hypernet.oracle`` does ``hypernet-oracle``; see ``stages.meta_train.learner_names``)."""

    finetunes_as: str | None = None
    """A variant that fine-tunes with the configuration the search chose for this other learner, when that
    learner is searched too, rather than being searched itself: ``hypernet-oracle`` is the hypernet's control
    (the same generator told the true physics), so the pair then differs in the start only, and the search
    saves a sixth of its runs."""

    needs: tuple[str, ...] = ()
    """Learners whose trained models it may be built from (trained before it, in the same stage run; for
    ``select``, ``meta_train.select.candidates`` says which). Its trainer then takes them as a fourth
    argument: ``(data, params, scores, built: dict[str, MetaModel])``."""

    def train(self) -> Callable[..., Any]:
        module, function = self.trainer.split(":")
        return getattr(importlib.import_module(module), function)


_TRAINERS = "metadqn.stages.meta_train"
LEARNERS: dict[str, Learner] = {entry.name: entry for entry in (
    Learner("hypernet", f"{_TRAINERS}:train_hypernet", "context", "hypernet", "#1f77b4"),
    Learner("hypernet-oracle", f"{_TRAINERS}:train_hypernet_oracle", "physics", "hypernet", "#aec7e8",
            selectable=False, finetunes_as="hypernet"),
    Learner("siamese", f"{_TRAINERS}:train_siamese", "context", "index", "#2ca02c"),
    Learner("reptile", f"{_TRAINERS}:train_reptile", "none", "init", "#9467bd"),
    Learner("multitask", f"{_TRAINERS}:train_multitask", "none", "init", "#ff7f0e"),
    Learner("select", f"{_TRAINERS}:train_select", "context", "select", "#d62728",
            needs=("hypernet", "siamese", "reptile", "multitask")),
)}
"""Every meta-learner, in the order stages run them and reports show them."""

SCRATCH = "scratch"
"""The no-meta-learning baseline: DQN from a fresh network (a method of meta_test, not a learner)."""
SCRATCH_COLOR = "#7f7f7f"
SELECTABLE = tuple(name for name, entry in LEARNERS.items() if entry.selectable)
"""What ``meta_train.learners`` may list."""
METHODS = (*LEARNERS, SCRATCH)
"""What ``meta_test.methods`` may list: every learner and scratch."""


def get_learner(name: str) -> Learner:
    try:
        return LEARNERS[name]
    except KeyError:
        raise ValueError(f"unknown learner {name!r} (one of: {', '.join(LEARNERS)})") from None
