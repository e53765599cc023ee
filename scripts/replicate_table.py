"""Headline figures of several pipeline runs side by side (the committed run and its replicates).

Usage: python scripts/replicate_table.py reports/metrics.json /tmp/metadqn-replicates/r1/reports/metrics.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIGURES = [("interp", m, k) for m in ("hypernet", "siamese") for k in ("auc_iqm", "final_iqm", "min_curve_iqm")] + [
    ("extrap", "siamese", "auc_iqm"), ("extrap", "hypernet", "zero_shot_iqm"),
    *[(s, m, "auc_iqm") for s in ("interp", "extrap") for m in ("reptile", "multitask", "scratch")],
    *[(s, m, "auc_diff_vs_scratch_ci_low") for s in ("interp", "extrap") for m in ("reptile", "multitask")],
    *[("extrap", m, "final_iqm")
      for m in ("scratch", "hypernet", "hypernet-oracle", "siamese", "reptile", "multitask")],
]


def main(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    print("| figure | " + " | ".join(f"run {i}" for i in range(len(runs))) + " | min | max |")
    print("|---|" + "---|" * (len(runs) + 2))
    for split, method, key in FIGURES:
        vals = [r.get(split, {}).get(method, {}).get(key) for r in runs]
        cells = ["n/a" if v is None else f"{v:.2f}" for v in vals]
        known = [v for v in vals if v is not None]
        lo, hi = (f"{min(known):.2f}", f"{max(known):.2f}") if known else ("n/a", "n/a")
        print(f"| {split} {method} {key} | " + " | ".join(cells) + f" | {lo} | {hi} |")


if __name__ == "__main__":
    main(sys.argv[1:])
