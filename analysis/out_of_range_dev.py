"""Analysis only (read by nothing in the pipeline): how a hypernet setting does on tasks drawn apart from
the project's, so that a default can be chosen without reading the test tasks.

Run in a project directory whose collect outputs exist (``data/``, ``models/experts``, ``reports/``; a
replicate clone works too)::

    .venv/bin/python analysis/out_of_range_dev.py --teacher local --action-effect hypernet --out dev.json
    .venv/bin/python analysis/out_of_range_dev.py --teachers-only

It draws ``--n`` interpolation and ``--n`` extrapolation tasks with task seed ``--task-seed`` (999: never
the project's 0), and reports normalised greedy returns, (R - R_random) / (solved - R_random):

* ``--teachers-only``: the training experts on the extrapolation tasks, and for each teacher rule the
  teacher set and the mean score of each teacher on the tasks of its own push direction (cheap: no
  training);
* otherwise: trains the hypernet's seeds with the given teacher rule and encoder features (params.yaml
  otherwise), and scores each seed's kept checkpoint and the selected model zero-shot from 3 contexts
  per task. This is what README "Teachers, again, and the action effect" reports.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from metadqn.config import Params, load_params
from metadqn.data.store import TaskStore
from metadqn.dqn.rollout import GreedyEvaluator, uniform_policy
from metadqn.envs.sampling import sample_tasks, task_matrix
from metadqn.evaluation.protocol import contexts
from metadqn.meta import hypernet as H
from metadqn.meta.context import build_encoder, features_from_arrays
from metadqn.meta.dataset import greedy_returns, load_meta_data
from metadqn.meta.siamese import cross_evaluation, normalised_scores
from metadqn.seeding import Salt, derive_seed
from metadqn.stages.meta_train import cross_eval_columns


def _params(teacher: str, effect: list[str]) -> Params:
    params = load_params("params.yaml")
    hp = params.meta_train.hypernet.model_copy(update={"teacher": teacher})
    mt = params.meta_train.model_copy(update={"hypernet": hp, "action_effect": effect})
    return params.model_copy(update={"meta_train": mt})


def _seed_job(args: tuple[str, list[str], int, list[int]]) -> H.SeedFit:
    teacher, effect, seed, teachers = args
    params = _params(teacher, effect)
    return H.fit_hypernet_seed(load_meta_data(TaskStore(), params), params, False, seed, teachers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="local", choices=["own", "robust", "local"])
    ap.add_argument("--action-effect", nargs="*", default=["hypernet"], choices=["hypernet", "siamese"])
    ap.add_argument("--n", type=int, default=24, help="tasks per split")
    ap.add_argument("--task-seed", type=int, default=999)
    ap.add_argument("--teachers-only", action="store_true")
    ap.add_argument("--out", default=None, help="a JSON file for the figures")
    args = ap.parse_args()

    params = _params(args.teacher, args.action_effect)
    data = load_meta_data(TaskStore(), params)
    fam, hidden = data.family, params.dqn.hidden_sizes
    tasks, scale, splits = cross_eval_columns(data)
    scores = normalised_scores(cross_evaluation(fam, data.experts, tasks, hidden, params.meta_train.eval_episodes,
                                                derive_seed(params.meta_train.seed, Salt.CROSS_EVAL)), scale)
    dev = sample_tasks(fam, {"interp": args.n, "extrap": args.n}, args.task_seed)
    mat, split = task_matrix(dev, fam), dev["split"].to_numpy()
    rnd = GreedyEvaluator(fam, mat, 10, 5)(uniform_policy(fam.n_actions, 5))

    def norm(returns: np.ndarray) -> np.ndarray:
        return (returns - rnd) / (fam.solved_return - rnd)

    report: dict[str, Any] = {"teacher": args.teacher, "action_effect": args.action_effect}
    if args.teachers_only:
        extrap = split == "extrap"
        z = norm(cross_evaluation(fam, data.experts, mat, hidden, 10, 5))[:, extrap]  # [experts, extrap tasks]
        kind = "force_sign" if "force_sign" in dev else None
        own_kind = data.train.tasks[kind].to_numpy() if kind else np.zeros(len(data.experts))
        dev_kind = dev.loc[extrap, kind].to_numpy() if kind else np.zeros(z.shape[1])
        report["best_expert_mean"] = float(z.max(0).mean())
        for rule in ("robust", "local"):
            t = H.teacher_indices(params.meta_train.hypernet.model_copy(update={"teacher": rule}), scores, splits)
            report[rule] = {str(i): {"teaches": t.count(i),
                                     "same_kind_mean": float(z[i, dev_kind == own_kind[i]].mean())}
                            for i in sorted(set(t))}
    else:
        teachers = H.teacher_indices(params.meta_train.hypernet, scores, splits)
        jobs = [(args.teacher, args.action_effect, s, teachers) for s in range(params.meta_train.hypernet.n_seeds)]
        # spawn: a forked worker can deadlock on torch's threads
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
            fits = list(ex.map(_seed_job, jobs))
        selected = H.combine_seeds(data, params, False, fits, teachers)
        mt = params.meta_train
        models: list[tuple[str, H.HyperQ]] = []
        for f in fits:
            enc = build_encoder(mt.encoder, fam, mt.encoder_hidden, mt.embed_dim, "hypernet" in mt.action_effect)
            m = H.HyperQ(enc, mt.embed_dim, mt.hypernet.hidden, fam.obs_dim, fam.n_actions, hidden, 0)
            assert f.state is not None, f"seed {f.seed} kept no checkpoint"
            m.load_state_dict(f.state)
            models.append((f"seed{f.seed}", m.eval()))
        assert isinstance(selected.model, H.HyperQ)
        models.append(("selected", selected.model))
        report |= {"distinct_teachers": len(set(teachers)), "val_score": selected.val_score,
                   "seed_val": [f.score for f in fits]}
        for c in range(3):
            ctx = contexts(fam, mat, mt.context_size, 1000 + c)
            feats = torch.as_tensor(np.stack([features_from_arrays(tr, fam) for tr in ctx]))
            for name, model in models:
                z = norm(greedy_returns(fam, mat, model.generate(feats), hidden, 10, 77 + c))
                for sp in ("interp", "extrap"):
                    report.setdefault(f"{name}.{sp}", []).append(round(float(np.mean(z[split == sp])), 3))
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
