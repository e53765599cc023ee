"""Analysis only (read by nothing in the pipeline): a paired comparison of two methods' zero-shot return
per (task, seed) from meta-test's scores, the way the protocol pairs runs (common random numbers).

    .venv/bin/python analysis/paired_zero_shot.py reports/meta_test/scores.csv [more scores.csv ...] \
        --a select --b siamese --split extrap

Prints, per file: the IQM of a - b over (task, seed) with its task-stratified bootstrap 95% interval (the
report's own ``stratified_iqm_ci``), the plain mean of a - b, and each task's mean zero-shot of a and b.
README "Replicates" quotes it.
"""

from __future__ import annotations

import argparse

import pandas as pd

from metadqn.evaluation.metrics import stratified_iqm_ci


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scores", nargs="+", help="reports/meta_test/scores.csv of one or more runs")
    ap.add_argument("--a", default="select")
    ap.add_argument("--b", default="siamese")
    ap.add_argument("--split", default="extrap")
    ap.add_argument("--resamples", type=int, default=2000)
    args = ap.parse_args()
    for path in args.scores:
        d = pd.read_csv(path)
        wide = d[d["split"] == args.split].pivot_table(index=["task_id", "seed"], columns="method",
                                                       values="zero_shot")
        diff = wide[args.a] - wide[args.b]
        point, lo, hi = stratified_iqm_ci(diff.to_numpy(), diff.index.get_level_values(0).to_numpy(),
                                          n_resamples=args.resamples)
        print(f"{path}: {args.a} - {args.b} zero-shot, {args.split}: IQM {point:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}], mean {diff.mean():+.3f}")
        print(wide.groupby(level=0)[[args.a, args.b]].mean().round(2).to_string())


if __name__ == "__main__":
    main()
