"""Analysis only (read by nothing in the pipeline): how select's scores choose among its candidates on tasks
drawn apart from the project's, so that its default score is chosen without reading the test tasks.

Run in a project directory whose meta-models exist (``models/meta/select``; a replicate clone works too)::

    .venv/bin/python analysis/select_dev.py --out select_dev.json

It draws ``--n`` interpolation and ``--n`` extrapolation tasks with task seed ``--task-seed`` (999: never
the project's 0), takes 3 random-policy contexts per task, and reports the mean normalised greedy return,
(R - R_random) / (solved - R_random), of: the hypernet's start alone, the TD-error choice (``squared``, at
``--td-margin``, the margin the runs kept), the model choice (``model``, margin 1), and the best candidate
per (task, context), the ceiling of any chooser; and siamese's own start, the nearest expert, beside the
select.k (or ``--k``) nearest experts re-ranked by the model score (``siamese.rerank``). This is what README
"A start chosen from the context" and "Siamese out of range" report. In a replicate clone whose params.yaml
predates a key, pass ``--params`` of a current one (only the context size and network shape are read).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from metadqn.config import load_params
from metadqn.dqn.qnetwork import unflatten_state_dict
from metadqn.dqn.rollout import GreedyEvaluator, uniform_policy
from metadqn.envs.sampling import sample_tasks, task_matrix
from metadqn.evaluation.protocol import contexts
from metadqn.meta.context import features_from_arrays
from metadqn.meta.dataset import greedy_returns
from metadqn.meta.model import MetaModel
from metadqn.meta.select import SelectQ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="tasks per split")
    ap.add_argument("--task-seed", type=int, default=999)
    ap.add_argument("--td-margin", type=float, default=1000.0)
    ap.add_argument("--out", default=None, help="a JSON file for the figures")
    ap.add_argument("--k", type=int, default=None, help="nearest experts among select's candidates (default: its own)")
    ap.add_argument("--params", default="params.yaml", help="context size and network shape come from here")
    args = ap.parse_args()

    params = load_params(args.params)
    model = MetaModel.load("models/meta/select")
    select, fam = model.module, model.family
    assert isinstance(select, SelectQ)
    if args.k:
        select.k = args.k
    hidden = params.dqn.hidden_sizes
    dev = sample_tasks(fam, {"interp": args.n, "extrap": args.n}, args.task_seed)
    mat, split = task_matrix(dev, fam), dev["split"].to_numpy()
    rnd = GreedyEvaluator(fam, mat, 10, 5)(uniform_policy(fam.n_actions, 5))
    rows: dict[str, list[np.ndarray]] = {}
    for c in range(3):
        ctx = contexts(fam, mat, params.meta_train.context_size, 1000 + c)
        feats = torch.as_tensor(np.stack([features_from_arrays(tr, fam) for tr in ctx]))
        flat = select.candidates(feats)  # [T, M, P]
        t, m, _ = flat.shape
        sds = [unflatten_state_dict(flat[i, j], select.shapes) for j in range(m) for i in range(t)]
        ret = greedy_returns(fam, np.tile(mat, (m, 1)), sds, hidden, 10, 77 + c).reshape(m, t).T
        z = (ret - rnd[:, None]) / (fam.solved_return - rnd[:, None])  # [T, M]
        rows.setdefault("hypernet", []).append(z[:, 0])
        rows.setdefault("best candidate", []).append(z.max(1))
        # siamese's own start (its nearest expert) and the nearest experts re-ranked by the model score
        near = [j for j, src in enumerate(select.sources()) if src.startswith("siamese-")]
        rows.setdefault("siamese nearest", []).append(z[:, near[0]])
        select.score = "model"
        err = select.choose(feats)[2].numpy()[:, near]
        rows.setdefault(f"siamese re-ranked by model ({len(near)} nearest)", []).append(
            z[np.arange(t), np.array(near)[err.argmin(1)]])
        for score, margin in (("squared", args.td_margin), ("model", 1.0)):
            select.score = score
            select.set_margin(margin)
            pick = select.choose(feats)[1].numpy()
            rows.setdefault(f"{score} (margin {margin:g})", []).append(z[np.arange(t), pick])
    report = {f"{name}.{sp}": round(float(np.mean([r[split == sp] for r in got])), 3)
              for name, got in rows.items() for sp in ("interp", "extrap")}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
