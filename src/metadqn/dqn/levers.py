"""Fine-tuning levers for starting DQN from a given network (see :class:`metadqn.config.FinetuneConfig`),
applied per slot of the batched trainer.

A batched run may give its slots different levers (the fine-tuning search trains several candidate
configurations in one run): the *per-slot* levers are start_epsilon, anchor_weight, anchor_floor,
protected_fraction and shrink; everything else (the dqn overrides, lr warm-up, the anchor's kind,
temperature and decay, the protected partition's size) changes the optimisation itself and must be the
same for every slot of a run. A slot without an anchor is a slot with anchor weight 0, a slot without
protected replay one with protected fraction 0. Slot k's updates are exactly those of a lone run with its
own levers, since every loss term is per slot. The start check (``start_check``) is no lever of the trainer:
the protocol applies it before and after a run (:func:`metadqn.evaluation.protocol.failed_start_check`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metadqn.config import FinetuneConfig
from metadqn.dqn.qnetwork import BatchedQNetwork
from metadqn.dqn.replay import BatchedReplayBuffer, ReplayBatch

PER_SLOT = ("start_epsilon", "anchor_weight", "anchor_floor", "protected_fraction", "shrink")
"""Levers that may differ between the slots of one batched run."""


def shared_part(ft: FinetuneConfig) -> FinetuneConfig:
    """What must be equal across the slots of one run: the config with its per-slot levers, and the settings
    of its anchor and protected partition (checked separately among the slots that use them), neutral."""
    return ft.model_copy(update={"start_epsilon": None, "anchor_weight": 0.0, "anchor_floor": 0.0,
                                 "protected_fraction": 0.0, "shrink": 1.0, "anchor": "none",
                                 "anchor_temperature": 0.01, "anchor_decay_steps": 0, "protected_steps": 0,
                                 "start_check": None})


def _has_anchor(ft: FinetuneConfig) -> bool:
    return ft.anchor != "none" and (ft.anchor_weight > 0 or ft.anchor_floor > 0)


@dataclass
class SlotLevers:
    """The levers of a batched run: the shared settings and one value per slot of each per-slot lever."""

    shared: FinetuneConfig
    anchor: str
    """kl, l2 or none (shared by every slot that has an anchor)."""
    anchor_temperature: float
    anchor_decay_steps: int
    start_epsilon: np.ndarray
    """[K]; NaN: the dqn epsilon schedule."""
    anchor_weight: Tensor
    anchor_floor: Tensor
    protected_steps: int
    protected_fraction: float
    """Of every batch, for the slots in ``protected_slots`` (one fraction per run)."""
    protected_slots: Tensor
    """[K] bool."""
    shrink: Tensor

    @classmethod
    def build(cls, finetune: FinetuneConfig | Sequence[FinetuneConfig] | None, k: int,
              device: torch.device) -> SlotLevers:
        configs = [finetune or FinetuneConfig()] * k if not isinstance(finetune, Sequence) else list(finetune)
        if len(configs) != k:
            raise ValueError(f"got {len(configs)} fine-tuning configs for {k} slots")
        if len({shared_part(c).model_dump_json() for c in configs}) > 1:
            raise ValueError("slots of one batched run may differ only in " + ", ".join(PER_SLOT))
        anchored = [_has_anchor(c) for c in configs]
        anchors = {(c.anchor, c.anchor_temperature, c.anchor_decay_steps) for c, a in zip(configs, anchored,
                                                                                           strict=True) if a}
        protected = {(c.protected_steps, c.protected_fraction) for c in configs if c.protected_fraction > 0}
        if len(anchors) > 1 or len(protected) > 1:
            raise ValueError("slots of one batched run must share one anchor (kind, temperature, decay) and one "
                             "protected partition (steps, fraction), or have none")
        kind, temperature, decay = anchors.pop() if anchors else ("none", 0.01, 0)
        steps, fraction = protected.pop() if protected else (0, 0.0)

        def vec(name: str, off: float, use: Sequence[bool]) -> Tensor:
            vals = [getattr(c, name) if u else off for c, u in zip(configs, use, strict=True)]
            return torch.tensor(vals, dtype=torch.float32, device=device)

        return cls(
            shared=shared_part(configs[0]), anchor=kind, anchor_temperature=temperature, anchor_decay_steps=decay,
            start_epsilon=np.array([np.nan if c.start_epsilon is None else c.start_epsilon for c in configs]),
            anchor_weight=vec("anchor_weight", 0.0, anchored), anchor_floor=vec("anchor_floor", 0.0, anchored),
            protected_steps=steps, protected_fraction=fraction,
            protected_slots=torch.tensor([c.protected_fraction > 0 for c in configs], device=device),
            shrink=vec("shrink", 1.0, [True] * k),
        )

    def epsilon(self, schedule: float, envs_per_slot: int) -> np.ndarray | float:
        """Each environment's exploration rate: the slot's start_epsilon, else the dqn schedule's value."""
        if np.isnan(self.start_epsilon).all():
            return schedule
        return np.repeat(np.where(np.isnan(self.start_epsilon), schedule, self.start_epsilon), envs_per_slot)

    def anchor_weights(self, step: int) -> Tensor:
        """[K]: linear decay from each slot's anchor_weight to its anchor_floor over anchor_decay_steps."""
        if self.anchor_decay_steps <= 0:
            return self.anchor_weight
        frac = min(step / self.anchor_decay_steps, 1.0)
        return self.anchor_weight + frac * (self.anchor_floor - self.anchor_weight)

    def warmup(self, trained_steps: int) -> float:
        """Learning-rate warm-up: rises linearly from 0 over lr_warmup_steps env steps of training."""
        if self.shared.lr_warmup_steps <= 0:
            return 1.0
        return min(max(trained_steps, 0) / self.shared.lr_warmup_steps, 1.0)

    @torch.no_grad()
    def shrink_towards(self, online: BatchedQNetwork, fresh: BatchedQNetwork) -> None:
        """Shrink-and-perturb: online <- shrink * online + (1 - shrink) * fresh, per slot."""
        for o, n in zip(online.parameters(), fresh.parameters(), strict=True):
            s = self.shrink.view(-1, *([1] * (o.dim() - 1)))
            o.copy_(s * o + (1.0 - s) * n)

    def sample(self, replay: BatchedReplayBuffer, protected: BatchedReplayBuffer | None, batch_size: int,
               gen: torch.Generator) -> ReplayBatch:
        """A batch whose last ``protected_fraction`` of rows come from the protected partition, for the slots
        that have one (once it holds data)."""
        n_protected = round(batch_size * self.protected_fraction) if protected is not None and protected.size else 0
        batch = replay.sample(batch_size, gen)
        if n_protected == 0:
            return batch
        assert protected is not None  # n_protected > 0 only with a protected buffer
        prot = protected.sample(n_protected, gen)
        mask = self.protected_slots

        def mix(a: Tensor, p: Tensor) -> Tensor:
            tail = torch.where(mask.view(-1, *([1] * (p.dim() - 1))), p, a[:, batch_size - n_protected:])
            return torch.cat([a[:, :batch_size - n_protected], tail], 1)

        return ReplayBatch(*(mix(a, p) for a, p in zip(batch, prot, strict=True)))

    def anchor_loss(self, online: BatchedQNetwork, start: BatchedQNetwork, batch: ReplayBatch, q_all: Tensor
                    ) -> Tensor:
        """Per-slot distance of the online network to its frozen start, [K].

        kl: KL(softmax(Q_start/T) || softmax(Q/T)) on the batch's states (policy distillation from the start,
        which holds the greedy action without pinning the values TD must move); l2: squared parameter distance.
        """
        if self.anchor == "kl":
            t = self.anchor_temperature
            with torch.no_grad():
                teacher = F.log_softmax(start(batch.obs) / t, -1)
            student = F.log_softmax(q_all / t, -1)
            per = (teacher.exp() * (teacher - student)).sum(-1) * batch.weights
            return per.sum(1) / batch.weights.sum(1).clamp(min=1.0)
        # sum() starts from the int 0, so its type is Tensor | Literal[0]; a network has parameters: a Tensor
        return cast(Tensor, sum(((p - p0) ** 2).flatten(1).sum(1)
                                for p, p0 in zip(online.parameters(), start.parameters(), strict=True)))
