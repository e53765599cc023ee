"""Analysis only (read by nothing in the pipeline): how well the model score's *absolute* verdict on a start
(the fraction of the family's best return its greedy policy gets in the linear model fitted to the
context) tells a start that is good on the task from one that is not, on tasks drawn apart from the
project's, so that a start check (fall back to a fresh network when the start looks bad) can be judged
without reading the test tasks.

Run in a project directory whose meta-models exist (``models/meta``; a replicate clone works too)::

    .venv/bin/python analysis/start_check_dev.py --out start_check_dev.json

It draws ``--n`` interpolation and ``--n`` extrapolation tasks with task seed ``--task-seed`` (999: never the
project's 0), takes 3 random-policy contexts per task and, per method, reports for each (task, context)
the start's normalised greedy zero-shot return z = (R - R_random) / (solved - R_random) and its model
fraction m = 1 - shortfall / (H |r|) (1: lasts the whole simulated episode). For thresholds q it reports
how many starts the check ``m < q`` would drop, their mean z, and the mean z of those it keeps.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from metadqn.config import load_params
from metadqn.dqn.qnetwork import flatten_state_dict
from metadqn.dqn.rollout import GreedyEvaluator, uniform_policy
from metadqn.envs.sampling import sample_tasks, task_matrix
from metadqn.evaluation.protocol import contexts
from metadqn.meta.context import features_from_arrays
from metadqn.meta.dataset import greedy_returns
from metadqn.meta.dynamics import ModelScore
from metadqn.meta.model import MetaModel

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="tasks per split")
    ap.add_argument("--task-seed", type=int, default=999)
    ap.add_argument("--methods", default="hypernet,siamese,select")
    ap.add_argument("--out", default=None, help="a JSON file for the figures")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    params = load_params(args.params)
    models = {m: MetaModel.load(f"models/meta/{m}") for m in args.methods.split(",")}
    fam = next(iter(models.values())).family
    hidden = params.dqn.hidden_sizes
    shapes = next(iter(models.values())).shapes
    ms = params.meta_train.model_score
    score = ModelScore(fam, shapes, ms.starts, ms.ridge)
    dev = sample_tasks(fam, {"interp": args.n, "extrap": args.n}, args.task_seed)
    mat, split = task_matrix(dev, fam), dev["split"].to_numpy()
    rnd = GreedyEvaluator(fam, mat, 10, 5)(uniform_policy(fam.n_actions, 5))
    rows: dict[str, dict[str, list[np.ndarray]]] = {m: {"z": [], "m": [], "split": []} for m in models}
    for c in range(3):
        ctx = contexts(fam, mat, params.meta_train.context_size, 1000 + c)
        feats = torch.as_tensor(np.stack([features_from_arrays(tr, fam) for tr in ctx]))
        for name, model in models.items():
            sds = model.initial_params(context=feats)
            ret = greedy_returns(fam, mat, sds, hidden, 10, 77 + c)
            z = (ret - rnd) / (fam.solved_return - rnd)
            flat = torch.stack([flatten_state_dict(sd, shapes) for sd in sds]).unsqueeze(1)
            frac = score.fraction(flat, feats)[:, 0].numpy()
            rows[name]["z"].append(z)
            rows[name]["m"].append(frac)
            rows[name]["split"].append(split)
    report: dict[str, object] = {}
    for name, got in rows.items():
        z, m, sp = (np.concatenate(got[k]) for k in ("z", "m", "split"))
        for s in ("interp", "extrap"):
            sel = sp == s
            zs, mss = z[sel], m[sel]
            report[f"{name}.{s}.zero_shot"] = round(float(zs.mean()), 3)
            report[f"{name}.{s}.bad(z<0.5)"] = int((zs < 0.5).sum())
            report[f"{name}.{s}.n"] = int(sel.sum())
            for q in THRESHOLDS:
                drop = mss < q
                report[f"{name}.{s}.q{q}"] = {
                    "dropped": int(drop.sum()), "dropped_bad": int((drop & (zs < 0.5)).sum()),
                    "dropped_mean_z": round(float(zs[drop].mean()), 3) if drop.any() else None,
                    "kept_mean_z": round(float(zs[~drop].mean()), 3) if (~drop).any() else None}
        report[f"{name}.pairs"] = [[round(float(a), 3), round(float(b), 3)] for a, b in zip(z, m, strict=True)]
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("pairs")}, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
