"""Metric-based meta-learner: a Siamese context encoder whose distance predicts how well experts transfer.

Both tasks' contexts go through one shared encoder; the distance is the Euclidean distance of the two
embeddings (symmetric, and zero for identical contexts, by construction). It is trained by regression:
``||e(ctx_i) - e(ctx_j)||`` towards ``1 - (S_ij + S_ji) / 2``, where ``S_ij`` is expert i's greedy return
on task j normalised by task j's expert return (clipped to [0, 1]) from the cross-evaluation matrix this
stage computes. We regress rather than use a contrastive or triplet loss because meta-test needs the
distances' values, not only their order: the k nearest experts are averaged with weights 1/distance.
(``siamese.target: physics`` regresses on the distance of the scaled physics parameters instead.)
Each pair is embedded from two independent context draws, so two contexts of one task learn distance ~0.

The stage writes a task index: every training task's embedding (mean over several contexts) and its
expert's parameters. A new task's Q-network starts from its nearest expert (k=1) or a distance-weighted
average of the k nearest experts' parameters; or, with ``siamese.rerank: n``, from whichever of its n nearest
experts does best in a model of the task's dynamics fitted to the same context (select's ``model`` score,
:class:`metadqn.meta.dynamics.ModelScore`). Why re-rank: out of the training ranges the embedding's nearest
expert is often one that pushes the wrong way or too weakly, while a better one is among the next few; the
distance narrows the choice to experts of similar tasks, the context's own transitions pick among them
(README, "Siamese out of range").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from metadqn.data.normalise import ReturnScale
from metadqn.dqn.qnetwork import StateDict
from metadqn.envs.families import Family
from metadqn.meta.context import ContextEncoder
from metadqn.meta.dynamics import ModelScore

log = logging.getLogger("metadqn.meta.siamese")


def cross_evaluation(family: Family, experts: list[StateDict], tasks: np.ndarray, hidden: list[int],
                     episodes: int, seed: int) -> np.ndarray:
    """[n_experts, n_tasks] mean greedy return of every expert on every task, all in one batch."""
    from metadqn.meta.dataset import greedy_returns

    n_e, n_t = len(experts), tasks.shape[0]
    params = [experts[i] for i in range(n_e) for _ in range(n_t)]
    pair_tasks = np.tile(tasks, (n_e, 1))
    return greedy_returns(family, pair_tasks, params, hidden, episodes, seed).reshape(n_e, n_t)


def normalised_scores(returns: np.ndarray, scale: ReturnScale) -> np.ndarray:
    """S_ij = return of expert i on task j on task j's scale (0 random, 1 expert), clipped to [0, 1]."""
    return np.clip(scale(returns), 0.0, 1.0)


class SiameseIndex(nn.Module):
    """The trained encoder plus the index of training tasks (embeddings and expert parameters)."""

    embeddings: Tensor  # buffers (register_buffer), declared for the type checker
    expert_flat: Tensor

    def __init__(self, encoder: ContextEncoder, embeddings: Tensor, expert_flat: Tensor, task_ids: list[str], k: int,
                 rerank: int = 0, score: ModelScore | None = None):
        super().__init__()
        if rerank > 1 and score is None:
            raise ValueError("re-ranking the nearest experts needs a model score")
        self.encoder = encoder
        self.register_buffer("embeddings", embeddings)
        self.register_buffer("expert_flat", expert_flat)
        self.task_ids = task_ids
        self.k = k
        self.rerank = rerank
        """``siamese.rerank``: 0 (off) or how many nearest experts the model score chooses among."""
        self.score = score

    def distance(self, ctx_a: Tensor, ctx_b: Tensor) -> Tensor:
        """Distance between the tasks of two batches of contexts [T, C, F] -> [T]."""
        return torch.linalg.vector_norm(self.encoder(ctx_a) - self.encoder(ctx_b), dim=-1)

    @torch.no_grad()
    def neighbours(self, ctx: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """(distances [T, k], indices [T, k]) of the k (default: the index's own k) nearest training tasks to
        each context, nearest first."""
        d = torch.cdist(self.encoder(ctx), self.embeddings)
        return d.topk(min(k or self.k, d.shape[1]), largest=False)

    @torch.no_grad()
    def init_flat(self, ctx: Tensor) -> Tensor:
        """[T, P]: nearest expert (k=1) or the 1/distance-weighted average of the k nearest experts; with
        ``rerank`` n > 1, the one of the n nearest experts with the lowest model score (ties: the nearer)."""
        if self.rerank > 1:
            assert self.score is not None
            _, idx = self.neighbours(ctx, self.rerank)
            flat = self.expert_flat[idx]  # [T, n, P]
            return flat[torch.arange(flat.shape[0]), self.score(flat, ctx).argmin(1)]
        dist, idx = self.neighbours(ctx)
        w = 1.0 / (dist + 1e-6)
        w = w / w.sum(1, keepdim=True)
        return (w.unsqueeze(-1) * self.expert_flat[idx]).sum(1)


@dataclass
class SiameseFit:
    encoder: ContextEncoder
    curves: list[tuple[str, int, float]]


def fit_siamese(encoder: ContextEncoder, sampler, target: np.ndarray, iterations: int, lr: float,
                seed: int) -> SiameseFit:
    """Regresses embedding distances of two independent context draws on ``target`` [T, T]."""
    from metadqn.dqn.trainer import configure_torch, make_optimizer

    configure_torch()  # as every other trainer (the same bytes whichever job ran in this process before)
    gen = torch.Generator().manual_seed(seed)
    goal = torch.as_tensor(target, dtype=torch.float32)
    # the fused Adam, not torch's default: the default takes the sqrt of its second moment from MKL's VML,
    # whose pinned kernel starts from the approximate rsqrtps instruction, which Intel and AMD CPUs round
    # differently (this encoder came out different on the two, 2026-11-29); the fused kernel's sqrt is exact
    opt = make_optimizer(list(encoder.parameters()), lr)
    curves = []
    for it in range(1, iterations + 1):
        ea, eb = encoder(sampler.sample(gen)), encoder(sampler.sample(gen))
        dist = torch.linalg.vector_norm(ea.unsqueeze(1) - eb.unsqueeze(0) + 1e-9, dim=-1)
        loss = ((dist - goal) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 50 == 0:
            curves.append(("siamese/loss", it, loss.item()))
    return SiameseFit(encoder.eval(), curves)


@torch.no_grad()
def index_embeddings(encoder: ContextEncoder, sampler, n_contexts: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([encoder(sampler.sample(gen)) for _ in range(n_contexts)]).mean(0)


def top1_agreement(retrieved: np.ndarray, scores: np.ndarray, tol: float = 1e-6) -> tuple[float, float]:
    """(how often the retrieved source is a best source, the same for a uniformly random source).

    ``scores`` [n_sources, n_targets]: a source is best for a target if its score is within ``tol`` of the
    column's maximum (ties count: several experts often transfer perfectly).
    """
    best = scores >= scores.max(0, keepdims=True) - tol
    hit = best[retrieved, np.arange(scores.shape[1])]
    return float(hit.mean()), float(best.mean(0).mean())
