"""Where a generated start leaves the training region: the out-of-range diagnosis (issue #10).

On extrapolation tasks the hypernetwork's start can fail while retrieval (siamese) works. A hypernetwork
is a chain: context features -> (standardiser) -> encoder -> embedding -> generator -> Q-network
parameters. This module measures, per task of every split, where along that chain the task falls
relative to the training tasks, and runs two counterfactuals that say which link breaks:

* ``gen_nn``: the generator applied to the *nearest training embedding* instead of the task's own (the
  training task's generated network). If it does much better than the task's own generated network, the
  embedding carried the right task identity but the generator is unreliable where the embedding lands:
  the generator leaves its training region.
* ``expert_phys_nn``: the expert of the training task nearest in *physics* (what perfect retrieval
  transfers). If that is good but ``gen_nn`` is not, the encoder put the task next to the wrong training
  task: the encoder is at fault.

Measures (per task; the summary gives each split's median, or mean for the scores):

* ``input_outlier_frac``: for a context, the fraction of standardised feature entries with |z| > 3
  (training statistics); for physics input (the oracle), the fraction of scaled parameters outside [0, 1].
* ``embed_nn_ratio``: distance to the nearest training embedding over the training tasks' median
  leave-one-out nearest-neighbour distance (1 is typical of a training task); ``embed_outside_box``: the
  fraction of embedding dimensions outside the training tasks' [min, max].
* ``params_nn_ratio``, ``params_norm_ratio``: the same distance ratio for the generated parameter vector,
  and its norm over the training tasks' median norm.
* ``nn_physics_gap``: scaled-physics distance between the task and the training task nearest in embedding,
  over the distance to the training task nearest in physics (1: the embedding found the physically
  nearest task); ``nn_discrete_match``: whether that training task has the same discrete parameters (e.g.
  CartPole's push direction).
* ``probe_mae``: a ridge probe from embedding to scaled physics, fitted on the training tasks: its mean
  absolute error (does the embedding still encode the physics?).
* on the task expert's own states: ``agreement`` (greedy action equal to the expert's), ``q_scale``
  (mean generated Q over mean expert Q) and ``gap_ratio`` (median action gap, generated over expert).
* normalised greedy returns (0 random, 1 expert) of the generated start (``ret_gen``), ``gen_nn``,
  ``expert_phys_nn`` and ``gen_clip``: the generator fed the task's embedding clipped to the training
  tasks' per-dimension [min, max] (a candidate fix that keeps the generator's input in its region), and
  ``gen_gate``: ``gen_nn`` only where the embedding is farther from the training embeddings than any
  training task is from the others (``embed_nn_ratio`` above the training tasks' largest), else the
  task's own generated start (``gated``: 1 where it switched). The gate has no parameter and reads no test
  outcome: it asks whether the embedding left the training region, which is what the diagnosis blames.

Contexts are drawn as meta_test draws them (:func:`~metadqn.evaluation.protocol.contexts` with seed index
0), one draw for the training splits and one for the test splits, so the test tasks' contexts are exactly
meta_test's first ones. Reading the test splits is analysis, not selection: nothing here feeds training,
checkpoint or configuration choice, and no stage reads this stage's output except the report.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from metadqn.config import Params
from metadqn.data.io import CorruptDataError
from metadqn.data.store import TaskStore
from metadqn.dqn.qnetwork import StateDict
from metadqn.envs.sampling import task_matrix
from metadqn.evaluation.protocol import context_seed, contexts
from metadqn.meta.context import features_from_arrays, oracle_features
from metadqn.meta.dataset import batched, greedy_returns
from metadqn.meta.hypernet import HyperQ
from metadqn.meta.model import MetaModel

MODELS = ("hypernet", "hypernet-oracle")
"""The generated-start learners diagnosed (those present in the models folder)."""
STATE_SAMPLE = 512
"""Expert states per task on which Q-values and actions are compared: the first ones the expert visited, as
many per task (at most this) as the task with the fewest has."""
PROBE_RIDGE = 1e-2
MEAN_COLUMNS = ("agreement", "agreement_gen_nn", "agreement_expert_phys_nn", "nn_discrete_match", "ret_gen",
                "ret_gen_nn", "ret_gen_clip", "ret_gen_gate", "gated", "ret_expert_phys_nn")
"""Summarised by their mean (rates and scores); every other measure by its median."""


def _nn(dist: Tensor, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest training task (a task is never its own neighbour): (index into the training rows, distance)."""
    d = dist.clone()
    rows = np.flatnonzero(train)
    for j, r in enumerate(rows):
        d[r, j] = float("inf")
    val, idx = d.min(1)
    return idx.numpy(), val.numpy()


def _ratio(dist: np.ndarray, train: np.ndarray) -> np.ndarray:
    ref = float(np.median(dist[train]))
    return dist / max(ref, 1e-12)


def _ridge_probe(x: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Per row: mean absolute error of a ridge map x -> y fitted on the training rows."""
    xt = np.concatenate([x, np.ones((len(x), 1))], 1)
    a = xt[train]
    w = np.linalg.solve(a.T @ a + PROBE_RIDGE * np.eye(a.shape[1]), a.T @ y[train])
    return np.abs(xt @ w - y).mean(1)


def _gap(q: Tensor) -> Tensor:
    """Top-1 minus top-2 action value per state."""
    top = q.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def _compare_q(q: Tensor, qe: Tensor) -> dict[str, np.ndarray]:
    """Greedy agreement, value scale and action-gap ratio of Q-values ``q`` against the expert's ``qe``, both
    [T, N, A] on task i's states."""
    agree = (q.argmax(-1) == qe.argmax(-1)).float().mean(1)
    scale = q.mean((1, 2)) / qe.mean((1, 2))
    gap = _gap(q).abs().median(1).values / _gap(qe).abs().median(1).values.clamp(min=1e-9)
    return {"agreement": agree.numpy(), "q_scale": scale.numpy(), "gap_ratio": gap.numpy()}


def diagnose(params: Params, store: TaskStore, models: Path) -> pd.DataFrame:
    """One row per (model, task) with the measures of the module docstring (empty if no model is there)."""
    family = params.family.family()
    hidden = list(params.dqn.hidden_sizes)
    c, mt = params.meta_train.context_size, params.meta_test
    # the selection splits (out-of-range validation last), then the test splits in meta_test's order
    groups = [store.tasks_of(("train", "val", "val_extrap")), store.tasks_of(("interp", "extrap"))]
    tasks = pd.concat(groups, ignore_index=True)
    ids = list(tasks["task_id"])
    train = (tasks["split"] == "train").to_numpy()
    seed = context_seed(mt.seed, 0)
    feats = torch.as_tensor(np.concatenate([
        np.stack([features_from_arrays(tr, family) for tr in contexts(family, task_matrix(g, family), c, seed)])
        for g in groups]))
    physics_np = oracle_features(tasks, family)
    physics = torch.as_tensor(physics_np)
    matrix = task_matrix(tasks, family)
    scale = store.return_scale(ids)
    experts = [store.expert(t) for t in ids]
    frame = store.transitions(ids, family.obs_dim, sources=("expert",))
    cols = [f"obs_{i}" for i in range(family.obs_dim)]
    per_task_states = [frame.loc[frame["task_id"] == t, cols].to_numpy(np.float32) for t in ids]
    n_states = min(STATE_SAMPLE, *(len(s) for s in per_task_states))
    if n_states == 0:
        raise CorruptDataError(f"{store.trajectories}: a task has no expert transitions; rerun `dvc repro collect`")
    states = torch.stack([torch.tensor(s[:n_states]) for s in per_task_states])
    train_rows = np.flatnonzero(train)

    # retrieval done right: the expert of the training task nearest in physics
    phys_d = torch.cdist(physics, physics[train_rows])
    phys_idx, phys_dist = _nn(phys_d, train)
    expert_phys = [experts[train_rows[j]] for j in phys_idx]
    discrete = [i for i, spec in enumerate(family.params) if spec.discrete is not None]

    def ret(nets: Sequence[StateDict]) -> np.ndarray:
        """Normalised greedy return of net i on task i."""
        return scale(greedy_returns(family, matrix, list(nets), hidden, mt.eval_episodes, seed))

    def q_on_states(nets: Sequence[StateDict]) -> Tensor:
        """[T, N, A]: net i's Q-values on task i's expert states."""
        with torch.no_grad():
            return batched(family, list(nets), hidden)(states)

    q_expert = q_on_states(experts)  # the reference every comparison below is against: computed once
    ret_expert_phys = ret(expert_phys)
    cmp_phys = _compare_q(q_on_states(expert_phys), q_expert)

    out = []
    for name in MODELS:
        if not (models / name / "model.pt").exists():
            continue
        model = MetaModel.load(models / name)
        assert isinstance(model.module, HyperQ), f"{name} is not a hypernetwork"
        # the generator as trained: without the gate (meta_train may have switched it on; ``gen_gate``
        # below measures what the gate does, with this stage's own training contexts)
        module = copy.deepcopy(model.module)
        module.gate_off()
        oracle = model.config.uses_physics
        x = physics if oracle else feats
        with torch.no_grad():
            if oracle:
                outlier = ((physics < 0) | (physics > 1)).float().mean(1)
            else:
                outlier = (module.encoder.scale(feats).abs() > 3).float().mean((1, 2))
            emb = module.encoder(x)
            flat = module(x)
        gen = module.generate(x)
        # the same generator fed the embedding clipped to the training tasks' box: a candidate fix, measured
        from_embedding = copy.deepcopy(module)
        from_embedding.encoder = nn.Identity()  # type: ignore[assignment]
        e_idx, e_dist = _nn(torch.cdist(emb, emb[train_rows]), train)
        _, p_dist = _nn(torch.cdist(flat, flat[train_rows]), train)
        lo, hi = emb[train_rows].min(0).values, emb[train_rows].max(0).values
        gen_clip = from_embedding.generate(torch.maximum(torch.minimum(emb, hi), lo))
        norms = flat.norm(dim=1).numpy()
        nn_rows = train_rows[e_idx]
        gap = np.linalg.norm(physics_np - physics_np[nn_rows], axis=1) / np.maximum(phys_dist, 1e-9)
        match = (np.all(physics_np[:, discrete] == physics_np[nn_rows][:, discrete], axis=1) if discrete
                 else np.ones(len(ids), bool))
        gen_nn = [gen[r] for r in nn_rows]
        ratio = _ratio(e_dist, train)
        gating = copy.deepcopy(module)  # the gate's own rule (HyperQ.set_gate), on this stage's contexts
        gating.set_gate(emb[train_rows])
        with torch.no_grad():
            gated = gating.embed(x)[1].numpy()
        gen_gate = [b if g else a for a, b, g in zip(gen, gen_nn, gated, strict=True)]
        cmp = _compare_q(q_on_states(gen), q_expert)
        cmp_nn = _compare_q(q_on_states(gen_nn), q_expert)
        out.append(pd.DataFrame({
            "model": name, "task_id": ids, "split": tasks["split"].to_numpy(),
            "input_outlier_frac": outlier.numpy(),
            "embed_nn_ratio": ratio,
            "embed_outside_box": ((emb < lo) | (emb > hi)).float().mean(1).numpy(),
            "params_nn_ratio": _ratio(p_dist, train),
            "params_norm_ratio": norms / float(np.median(norms[train])),
            "nn_task": [ids[r] for r in nn_rows],
            "nn_physics_gap": gap,
            "nn_discrete_match": match.astype(float),
            "probe_mae": _ridge_probe(emb.numpy().astype(np.float64), physics_np.astype(np.float64), train),
            "agreement": cmp["agreement"], "q_scale": cmp["q_scale"], "gap_ratio": cmp["gap_ratio"],
            "agreement_gen_nn": cmp_nn["agreement"],
            "agreement_expert_phys_nn": cmp_phys["agreement"],
            "ret_gen": ret(gen), "ret_gen_nn": ret(gen_nn), "ret_gen_clip": ret(gen_clip),
            "ret_gen_gate": ret(gen_gate), "gated": gated.astype(float),
            "ret_expert_phys_nn": ret_expert_phys,
        }))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def summarise_diagnosis(per_task: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {split: {measure: value}}}``: the mean of :data:`MEAN_COLUMNS`, the median of the rest."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    if per_task.empty:
        return out
    numeric = [c for c in per_task.columns if c not in ("model", "task_id", "split", "nn_task")]
    for (model, split), rows in per_task.groupby(["model", "split"], sort=False):
        out.setdefault(str(model), {})[str(split)] = {
            c: round(float(rows[c].mean() if c in MEAN_COLUMNS else rows[c].median()), 4) for c in numeric}
    return out
