"""The meta_train stage: every learner listed in ``meta_train.learners`` on the training tasks.

Reads only train and validation data, through a split-checked :class:`~metadqn.data.store.TaskStore`
(validation only selects checkpoints and reports). Computes the cross-evaluation matrix (each training
expert's greedy return on each training and validation task), trains the learners as independent jobs
(:func:`plan_jobs`: one per learner, one per hypernet seed) wherever ``map_groups`` runs them (the flow:
the runner's worker processes; every job seeds torch itself, so the runner never changes a result), builds
the learners made from the others' models (``select``) in the stage process, and writes per learner
``models/meta/<learner>/`` plus ``reports/meta_train/metrics.json``:
``{"<learner>": {"val_zero_shot_normalized": float, ...}}``, where the zero-shot figure
is the mean over validation tasks of return / the task's expert return, measured on contexts and start
states that no selection has seen.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from metadqn import paths
from metadqn.config import Params
from metadqn.data.io import atomic_path, require_finite, write_json
from metadqn.data.normalise import ReturnScale
from metadqn.data.store import TaskStore
from metadqn.dqn.qnetwork import flatten_state_dict, n_params, param_shapes
from metadqn.fanout import GroupMapper, run_in_process
from metadqn.learners import get_learner
from metadqn.meta.context import build_encoder
from metadqn.meta.dataset import MetaData, greedy_returns, load_meta_data
from metadqn.meta.dynamics import ModelScore
from metadqn.meta.model import MetaModel, MetaModelConfig
from metadqn.seeding import Salt, derive_seed

log = logging.getLogger("metadqn.meta_train")


@dataclass(frozen=True)
class MetaTrainOutputs:
    models: Path = paths.META_MODELS
    metrics: Path = paths.META_TRAIN_METRICS
    cross_eval: Path = paths.META_TRAIN_CROSS_EVAL
    curves: Path = paths.META_TRAIN_CURVES


@dataclass
class LearnerResult:
    name: str
    model: MetaModel
    metrics: dict[str, float]
    curves: list[tuple[str, int, float]] = field(default_factory=list)
    val_zero_shot: np.ndarray | None = None
    """The model's :func:`val_zero_shot`, when its trainer already measured it (select, for its margin)."""


def _model_config(params: Params, learner: str, data: MetaData, **extra: Any) -> MetaModelConfig:
    mt = params.meta_train
    fields: dict[str, Any] = {"encoder": mt.encoder, "model_starts": mt.model_score.starts,
                              "model_ridge": mt.model_score.ridge, **extra}
    return MetaModelConfig(learner=learner, family=params.family.name, q_hidden=list(params.dqn.hidden_sizes),
                           context_size=mt.context_size, embed_dim=mt.embed_dim, encoder_hidden=mt.encoder_hidden,
                           hidden=mt.hypernet.hidden, n_physics=int(data.train.physics.shape[1]), **fields)


def val_zero_shot(model: MetaModel, data: MetaData, params: Params) -> np.ndarray:
    """Normalised zero-shot return per validation task, from fresh contexts (the second window of each
    task's exploration data) and fresh start states."""
    ctx = data.val.contexts.window(1) if model.config.uses_context else None
    init = model.initial_params(context=ctx, physics=data.val.physics, n_tasks=len(data.val.matrix))
    returns = greedy_returns(data.family, data.val.matrix, init, params.dqn.hidden_sizes,
                             params.meta_train.eval_episodes, derive_seed(params.meta_train.seed, Salt.VAL_ZERO_SHOT))
    return data.val.scale(returns)


# Trainers: one per entry of metadqn.learners.LEARNERS, each (data, params, scores) -> LearnerResult, where
# scores is the normalised cross-evaluation matrix (expert i's return on task j, on task j's scale).

def train_hypernet(data: MetaData, params: Params, scores: np.ndarray | None = None,
                   oracle: bool = False) -> LearnerResult:
    """Every seed one after another (the stage trains them as separate jobs: :func:`plan_jobs`)."""
    from metadqn.meta.hypernet import fit_hypernet

    teachers = _teacher_indices(data, params, scores)
    fit = fit_hypernet(data, params, oracle=oracle, teachers=teachers)
    return _hypernet_result(data, params, fit, oracle, teachers)


def train_hypernet_oracle(data: MetaData, params: Params, scores: np.ndarray | None = None) -> LearnerResult:
    return train_hypernet(data, params, scores, oracle=True)


def cross_eval_columns(data: MetaData) -> tuple[np.ndarray, ReturnScale, list[str]]:
    """The cross-evaluation's tasks (its columns; its rows are the training tasks' experts): the training
    tasks, then the validation tasks; with their return scale and split."""
    splits = ["train"] * len(data.train.matrix) + list(data.val.tasks["split"])
    return (np.concatenate([data.train.matrix, data.val.matrix]), ReturnScale.concat(data.train.scale, data.val.scale),
            splits)


def _teacher_indices(data: MetaData, params: Params, scores: np.ndarray | None) -> list[int]:
    from metadqn.meta.hypernet import teacher_indices

    return teacher_indices(params.meta_train.hypernet, scores, cross_eval_columns(data)[2])


def _hypernet_result(data: MetaData, params: Params, fit: Any, oracle: bool, teachers: list[int]) -> LearnerResult:
    from metadqn.meta.hypernet import hypernet_name

    name = hypernet_name(oracle)
    model = MetaModel(_model_config(params, name, data, encoder="oracle" if oracle else params.meta_train.encoder),
                      module=fit.model)
    return LearnerResult(name, model, {"val_selection_score": fit.val_score,
                                       **{f"seed{i}_val_score": s for i, s in enumerate(fit.seed_scores)},
                                       "distinct_teachers": float(len(set(teachers))),
                                       **fit.gate}, fit.curves)


def train_siamese(data: MetaData, params: Params, scores: np.ndarray) -> LearnerResult:
    from metadqn.meta.siamese import SiameseIndex, fit_siamese, index_embeddings, top1_agreement

    mt, cfg, family = params.meta_train, params.meta_train.siamese, data.family
    n_train = len(data.train.matrix)
    if cfg.target == "cross_eval":
        s = scores[:, :n_train]
        target = 1.0 - (s + s.T) / 2.0
    else:
        p = data.train.physics
        target = (torch.cdist(p, p) / p.shape[1] ** 0.5).numpy()
    torch.manual_seed(derive_seed(params.meta_train.seed, Salt.SIAMESE_INIT))
    encoder = build_encoder(mt.encoder, family, mt.encoder_hidden, mt.embed_dim, "siamese" in mt.action_effect).fit(
        data.train.contexts)
    fit = fit_siamese(encoder, data.train.contexts, target, cfg.iterations, cfg.learning_rate,
                       derive_seed(mt.seed, Salt.SIAMESE_FIT))
    emb = index_embeddings(fit.encoder, data.train.contexts, cfg.index_contexts,
                              derive_seed(mt.seed, Salt.SIAMESE_INDEX))
    shapes = param_shapes(family.obs_dim, family.n_actions, params.dqn.hidden_sizes)
    experts = torch.stack([flatten_state_dict(sd, shapes) for sd in data.experts])
    ids = list(data.train.tasks["task_id"])
    index = SiameseIndex(fit.encoder, emb, experts, ids, cfg.k, cfg.rerank, ModelScore.from_params(params, family))
    _, nearest = index.neighbours(data.val.contexts.first())
    top1, random_top1 = top1_agreement(nearest[:, 0].numpy(), scores[:, n_train:])
    model = MetaModel(_model_config(params, "siamese", data, k=cfg.k, task_ids=ids, rerank=cfg.rerank),
                      module=index.eval())
    metrics = {"top1_retrieval": top1, "random_top1": random_top1}
    if cfg.rerank:  # what the re-ranking changes on validation (the nearest expert's zero-shot beside it)
        index.rerank = 0
        try:
            metrics["val_zero_shot_nearest"] = data.val.balanced_mean(val_zero_shot(model, data, params))
        finally:
            index.rerank = cfg.rerank
    return LearnerResult("siamese", model, metrics, fit.curves)


def train_reptile(data: MetaData, params: Params, scores: np.ndarray | None = None) -> LearnerResult:
    from metadqn.meta.reptile import fit_reptile

    theta, curves = fit_reptile(data, params)
    return LearnerResult("reptile", MetaModel(_model_config(params, "reptile", data), theta=theta), {}, curves)


def train_multitask(data: MetaData, params: Params, scores: np.ndarray | None = None) -> LearnerResult:
    from metadqn.meta.multitask import fit_multitask

    theta, curves = fit_multitask(data, params)
    return LearnerResult("multitask", MetaModel(_model_config(params, "multitask", data), theta=theta), {}, curves)


def train_select(data: MetaData, params: Params, scores: np.ndarray | None,
                 built: dict[str, MetaModel]) -> LearnerResult:
    """Nothing to fit: the chooser (``select.score``) over the starts of ``meta_train.select.candidates`` (trained
    just before). Its metrics say how often each source was chosen on the validation tasks."""
    from metadqn.meta.hypernet import HyperQ
    from metadqn.meta.select import SelectQ
    from metadqn.meta.siamese import SiameseIndex

    cfg = params.meta_train.select
    hyper = built["hypernet"].module if "hypernet" in cfg.candidates else None
    index = built["siamese"].module if "siamese" in cfg.candidates else None
    assert hyper is None or isinstance(hyper, HyperQ)
    assert index is None or isinstance(index, SiameseIndex)
    shapes = param_shapes(data.family.obs_dim, data.family.n_actions, params.dqn.hidden_sizes)
    fixed_names = [name for name in cfg.candidates if name not in ("hypernet", "siamese")]
    fixed = torch.zeros(len(fixed_names), n_params(data.family.obs_dim, data.family.n_actions, params.dqn.hidden_sizes))
    for row, name in zip(fixed, fixed_names, strict=True):
        row.copy_(flatten_state_dict(built[name].initial_params(n_tasks=1)[0], shapes))
    module = SelectQ(data.family, params.dqn.hidden_sizes, hyper, index, fixed, cfg.k, params.dqn.gamma, fixed_names,
                     cfg.score, model_score=ModelScore.from_params(params, data.family))
    ids = list(data.train.tasks["task_id"]) if index is not None else []
    model = MetaModel(_model_config(params, "select", data, k=cfg.k, task_ids=ids, fixed_names=fixed_names,
                                    select_score=cfg.score), module=module.eval())
    # the margin in favour of the first candidate: the best on validation (ties: the earlier one). The scores
    # do not depend on the margin, so margins that pick the same starts share one evaluation.
    _, _, err = module.choose(data.val.contexts.window(1))  # the contexts val_zero_shot scores
    zs, val, by_picks = {}, {}, {}
    for margin in cfg.margins:
        module.set_margin(margin)
        picks = tuple(module.pick(err).tolist())
        if picks not in by_picks:
            by_picks[picks] = val_zero_shot(model, data, params)
        zs[margin] = by_picks[picks]
        val[margin] = data.val.balanced_mean(zs[margin])
    margin = max(cfg.margins, key=lambda m: val[m])
    module.set_margin(margin)
    log.info("select: margin %g kept (validation zero-shot %s)", margin,
             ", ".join(f"{m:g}: {v:.3f}" for m, v in val.items()))
    # which learner each validation task's start comes from
    labels = module.source_learners()
    picked = [labels[i] for i in module.pick(err).tolist()]
    return LearnerResult("select", model, {"margin": margin,
                                           **{f"val_picks_{name}": picked.count(name) / len(picked)
                                              for name in cfg.candidates}}, val_zero_shot=zs[margin])


def learner_names(params: Params) -> list[str]:
    """The learners this run trains, in order: those listed, each followed by its variants (the oracle
    hypernet when ``hypernet.oracle``); ``features: oracle`` trains the oracle in the hypernet's place."""
    names = list(params.meta_train.learners)
    if "hypernet" in names and params.meta_train.hypernet.oracle:
        names.insert(names.index("hypernet") + 1, "hypernet-oracle")
    if params.meta_train.features == "oracle" and "hypernet" in names:
        names.remove("hypernet")
        if "hypernet-oracle" not in names:
            names.append("hypernet-oracle")
    return names


def train_one(name: str, data: MetaData, params: Params, scores: np.ndarray,
              built: dict[str, MetaModel] | None = None) -> LearnerResult:
    """Trains one learner (its trainer from :data:`metadqn.learners.LEARNERS`) and measures it on the
    validation tasks. ``built``: the models already trained, for a learner built from others."""
    start = time.perf_counter()
    learner = get_learner(name)
    result = (learner.train()(data, params, scores, built) if learner.needs else
              learner.train()(data, params, scores))
    return _measured(result, data, params, time.perf_counter() - start)


def _measured(result: LearnerResult, data: MetaData, params: Params, wall_s: float) -> LearnerResult:
    """Adds the validation zero-shot figures (and the training time, which goes to MLflow only)."""
    zs = result.val_zero_shot if result.val_zero_shot is not None else val_zero_shot(result.model, data, params)
    out_of_range = (data.val.tasks["split"] == "val_extrap").to_numpy()
    per_split = {"val_extrap_zero_shot": float(zs[out_of_range].mean())} if out_of_range.any() else {}
    result.metrics = {"val_zero_shot_normalized": data.val.balanced_mean(zs), "val_zero_shot_min": float(zs.min()),
                      **per_split, **result.metrics, "wall_s": round(wall_s, 2)}
    log.info("%s: validation zero-shot %.3f (normalised; splits weigh equally), %.0f s", result.name,
             result.metrics["val_zero_shot_normalized"], wall_s)
    return result


HYPERNETS = {"hypernet": False, "hypernet-oracle": True}
"""The learners whose seeds train as separate jobs (name -> oracle)."""


@dataclass(frozen=True)
class FitJob:
    """One independent piece of meta-training: a learner, or one seed of a hypernet (its seeds are
    independent, each from its own torch seed: :func:`metadqn.meta.hypernet.fit_hypernet_seed`)."""

    learner: str
    seed: int | None = None

    @property
    def label(self) -> str:
        """Its name in logs and the Prefect UI."""
        return self.learner if self.seed is None else f"{self.learner} seed {self.seed}"

    @property
    def cost(self) -> float:
        """A rough estimate of its wall time, only for ordering jobs (the flow's mapper submits the longest
        first, ``flows.runners.submission_order``): :data:`JOB_SECONDS`."""
        return JOB_SECONDS.get(self.learner, 0.0)


JOB_SECONDS = {"hypernet": 100.0, "reptile": 86.0, "hypernet-oracle": 72.0, "siamese": 33.0, "multitask": 30.0}
"""Wall seconds of one job of each learner at default params on one worker of a 2-core machine (a fresh
clone of ``7be2332``, 2026-11-29: per hypernet seed 93-111 s, reptile's online inner loops 86 s). Only the
order of the jobs reads them, never a result: in plan order reptile started last, after siamese, and ran
alone for 45 s at the end (meta_train 297 s); longest first, two workers finish within a few seconds of
each other."""


def plan_jobs(params: Params, names: list[str]) -> list[FitJob]:
    """The jobs of the learners that fit something (not those built from others), hypernet seeds first (the
    order of the stage's results; the flow runs them longest first, :attr:`FitJob.cost`)."""
    from metadqn.meta.hypernet import n_seeds

    seeds = [FitJob(n, s) for n in names if n in HYPERNETS
             for s in range(n_seeds(params.meta_train.hypernet, HYPERNETS[n]))]
    return seeds + [FitJob(n) for n in names if n not in HYPERNETS and not get_learner(n).needs]


def fit_job(data: MetaData, params: Params, scores: np.ndarray, job: FitJob) -> Any:
    """One job, wherever the runner puts it: a hypernet seed's :class:`~metadqn.meta.hypernet.SeedFit`, or
    a whole learner's measured :class:`LearnerResult`. Every learner seeds torch itself, so a job's result
    does not depend on which jobs ran before it in the same process."""
    if job.seed is not None:
        from metadqn.meta.hypernet import fit_hypernet_seed

        return fit_hypernet_seed(data, params, HYPERNETS[job.learner], job.seed,
                                 _teacher_indices(data, params, scores))
    return train_one(job.learner, data, params, scores)


def assemble(names: list[str], jobs: list[FitJob], outputs: list[Any], data: MetaData, params: Params,
             scores: np.ndarray) -> list[LearnerResult]:
    """Every learner's result in ``names`` order: hypernets from their seeds' fits, learners built from
    others last (in this process: they fit nothing), the rest as their job returned them."""
    from metadqn.meta.hypernet import combine_seeds

    done = dict(zip(jobs, outputs, strict=True))
    results: dict[str, LearnerResult] = {}
    teachers = _teacher_indices(data, params, scores) if any(n in HYPERNETS for n in names) else []
    for name in names:
        if name in HYPERNETS:
            start = time.perf_counter()
            fits = [out for job, out in done.items() if job.learner == name]
            fit = combine_seeds(data, params, HYPERNETS[name], fits, teachers)
            wall_s = sum(f.wall_s for f in fits) + time.perf_counter() - start
            result = _hypernet_result(data, params, fit, HYPERNETS[name], teachers)
            results[name] = _measured(result, data, params, wall_s)
        elif not get_learner(name).needs:
            results[name] = done[FitJob(name)]
    built = {n: r.model for n, r in results.items()}
    for name in names:
        if get_learner(name).needs:
            results[name] = train_one(name, data, params, scores, built)
    return [results[n] for n in names]


def run_meta_train(params: Params, store: TaskStore = TaskStore(), out: MetaTrainOutputs = MetaTrainOutputs(),
                   map_groups: GroupMapper = run_in_process,
                   tags: dict[str, str] | None = None) -> dict[str, Any]:
    from metadqn.meta.siamese import cross_evaluation, normalised_scores
    from metadqn.tracking.runs import stage_run

    start = time.perf_counter()
    data = load_meta_data(store, params)
    family = data.family
    tasks, scale, _ = cross_eval_columns(data)
    t0 = time.perf_counter()
    returns = cross_evaluation(family, data.experts, tasks, params.dqn.hidden_sizes,
                               params.meta_train.eval_episodes, derive_seed(params.meta_train.seed, Salt.CROSS_EVAL))
    scores = normalised_scores(returns, scale)
    cross_eval_s = time.perf_counter() - t0
    log.info("cross-evaluation: %d experts x %d tasks in %.1f s", *returns.shape, cross_eval_s)

    names = learner_names(params)
    jobs = plan_jobs(params, names)
    log.info("meta-train: %d learner(s) as %d job(s): %s", len(names), len(jobs), ", ".join(j.label for j in jobs))
    outputs = map_groups(functools.partial(fit_job, data, params, scores), jobs)
    results = assemble(names, jobs, outputs, data, params, scores)

    for r in results:
        r.model.save(out.models / r.name)
    ids = list(data.train.tasks["task_id"]) + list(data.val.tasks["task_id"])
    cross = pd.DataFrame([
        {"expert_task": data.train.tasks["task_id"][i], "task_id": ids[j], "return": float(returns[i, j]),
         "score": float(scores[i, j])}
        for i in range(returns.shape[0]) for j in range(returns.shape[1])
    ])
    with atomic_path(out.cross_eval) as tmp:
        require_finite(cross, out.cross_eval).to_csv(tmp, index=False)
    curves = pd.DataFrame([(r.name, m, s, v) for r in results for (m, s, v) in r.curves],
                          columns=["learner", "metric", "step", "value"])
    with atomic_path(out.curves) as tmp:
        require_finite(curves, out.curves).to_csv(tmp, index=False)
    # wall-clock times go to MLflow only: the metrics file must be the same in every reproduction
    metrics: dict[str, Any] = {r.name: {k: v for k, v in r.metrics.items() if k != "wall_s"} for r in results}
    write_json(out.metrics, metrics)
    timings = {"cross_eval_wall_s": cross_eval_s, "wall_s": time.perf_counter() - start}

    with stage_run("meta_train", family.name, params.flat(), params.digest(), params.tracking.enabled, tags) as run:
        if run is not None:
            _track(run, results, out, family.name)
            import mlflow

            mlflow.log_metrics(timings)
    return metrics


def _track(run: Any, results: list[LearnerResult], out: MetaTrainOutputs, family: str) -> None:
    import mlflow

    from metadqn.tracking.models import log_meta_model

    client = mlflow.MlflowClient()
    for r in results:
        with mlflow.start_run(run_name=r.name, nested=True, tags={"learner": r.name, "stage": "meta_train"}):
            mlflow.log_metrics({k: float(v) for k, v in r.metrics.items()})
            child = mlflow.active_run()
            assert child is not None  # inside start_run
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            metrics = [Metric(m.split("/", 1)[-1], v, ts, s) for (m, s, v) in r.curves]
            for i in range(0, len(metrics), 1000):
                client.log_batch(child.info.run_id, metrics=metrics[i:i + 1000])
            log_meta_model(out.models / r.name, family)
    mlflow.log_artifact(str(out.metrics))
