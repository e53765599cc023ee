"""Collect's wall time alone and beside a busy process, for each way of running its groups.

The question: on a machine whose cores are shared (a 2-core CI box, a laptop, a scheduled run beside
other jobs), does the pipeline keep its speed? Each measurement runs ``metadqn collect`` (the CLI, as
``dvc repro`` does) on the default params into a scratch folder, with tracking off, either alone or while
one CPU-bound process (a pure-Python busy loop, one thread, normal priority) runs beside it for the whole
measurement. Runners compared (``params.runner``):

* ``local``: the groups one after another in the stage process, torch's default threads (all cores);
* ``processes``: a pool of ``runner.workers`` processes of ``runner.threads`` torch thread each (default
  2 x 1).

The figure of merit is the slowdown, busy time / alone time, per runner; the summary also gives each
runner's time relative to ``local`` alone. ``--scale`` shrinks the expert budget (``dqn.total_steps``,
one round) so the slow cases fit in minutes; ``--scale 1`` is the default run itself.

    python bench/contention.py                       # both runners at --scale 0.25 (about 15 min)
    python bench/contention.py --scale 1 --runners processes   # the default collect, alone and busy
    python bench/contention.py --scale 1 --alone-only          # both runners alone, the default collect
    python bench/contention.py --quick               # a smoke test of the script (tiny params)

Writes ``reports/bench/contention-<scale|quick>[-alone].json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUSY = "while True:\n    pass\n"


def _overlay(runner: str, scale: float, quick: bool) -> dict:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    over: dict = yaml.safe_load((ROOT / "tests" / "params.tiny.yaml").read_text()) if quick else {}
    over.setdefault("tracking", {})["enabled"] = False
    over["runner"] = {"kind": runner}
    if scale != 1 and not quick:
        steps = int(base["dqn"]["total_steps"] * scale)
        over["dqn"] = {"total_steps": steps, "eval_interval": max(1000, steps // 10)}
        over["collect"] = {"max_rounds": 1}
    return over


def _collect(runner: str, busy: bool, scale: float, quick: bool, work: Path) -> float:
    """Seconds of one ``metadqn collect`` run in a fresh folder (with a busy neighbour if ``busy``)."""
    run = work / f"{runner}-{'busy' if busy else 'alone'}"
    run.mkdir(parents=True)
    (run / "overlay.yaml").write_text(yaml.safe_dump(_overlay(runner, scale, quick)))
    env = {**os.environ, "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "PREFECT_HOME": str(run / "prefect")}
    env.pop("METADQN_PARAMS", None)
    env.pop("OMP_NUM_THREADS", None)  # each runner decides its threads, as in a real run
    cli = [sys.executable, "-m", "metadqn.cli"]
    common = ["--base-params", str(ROOT / "params.yaml"), "--params", str(run / "overlay.yaml")]
    subprocess.run([*cli, "init-pool", *common, "--pool", str(run / "pool.csv")], check=True, env=env,
                   capture_output=True, cwd=ROOT)
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        start = time.perf_counter()
        proc = subprocess.run(
            [*cli, "collect", *common, "--pool", str(run / "pool.csv"), "--tasks", str(run / "tasks.parquet"),
             "--trajectories", str(run / "traj"), "--experts", str(run / "experts"),
             "--metrics", str(run / "metrics.json"), "--curves", str(run / "curves.csv")],
            env=env, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if proc.returncode != 0:
        raise SystemExit(f"collect failed ({runner}, busy={busy}): {proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runners", nargs="+", default=["local", "processes"], choices=["local", "processes"])
    parser.add_argument("--scale", type=float, default=0.25, help="fraction of dqn.total_steps (1: the default)")
    parser.add_argument("--alone-only", action="store_true",
                        help="skip the busy runs (local beside a busy process takes ~25x its time alone)")
    parser.add_argument("--quick", action="store_true", help="tiny params: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tag = ("quick" if args.quick else f"scale{args.scale:g}") + ("-alone" if args.alone_only else "")
    out = args.out or ROOT / "reports" / "bench" / f"contention-{tag}.json"

    results = []
    with tempfile.TemporaryDirectory(prefix="metadqn-contention-") as tmp:
        for runner in args.runners:
            alone = _collect(runner, False, args.scale, args.quick, Path(tmp))
            busy = None if args.alone_only else _collect(runner, True, args.scale, args.quick, Path(tmp))
            results.append({"runner": runner, "alone_s": round(alone, 1),
                            "busy_s": None if busy is None else round(busy, 1),
                            "slowdown": None if busy is None else round(busy / alone, 2)})
            print(f"  {runner}: alone {alone:.0f} s, busy {busy or float('nan'):.0f} s", file=sys.stderr, flush=True)
    ref = next((r["alone_s"] for r in results if r["runner"] == "local"), None)
    for r in results:
        r["alone_vs_local_alone"] = round(r["alone_s"] / ref, 2) if ref else None

    print(f"\n{'runner':10} {'alone s':>8} {'busy s':>8} {'busy/alone':>10} {'alone/local':>11}")
    for r in results:
        def cell(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        print(f"{r['runner']:10} {r['alone_s']:>8.0f} {cell(r['busy_s'], '>8.0f'):>8} {cell(r['slowdown'], '.2f'):>10} "
              f"{cell(r['alone_vs_local_alone'], '.2f'):>11}")
    meta = {"scale": args.scale, "quick": args.quick, "cpus": os.cpu_count(),
            "neighbour": "one pure-Python busy loop, normal priority"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "meta": meta}, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
