"""What the CPU pin costs: the same workloads with the pin (metadqn's default) and without (METADQN_NATIVE_CPU=1).

The pin (``metadqn.determinism``) keeps torch, MKL, oneDNN, numpy and OpenBLAS on their AVX2 kernels so that
any x86-64 machine gives the same bytes. On an AVX-512 machine that gives up the wider kernels; this script
measures by how much. Each workload runs in a fresh process of one torch thread (the environment variables
act when the libraries load), pinned and native alternating, ``--rounds`` times each, nothing else running;
we report the median seconds of each and the ratio pinned / native (above 1: the pin is slower).

Workloads:

* dqn: metadqn's batched trainer, 8 cartpole-mirrored tasks, MLP 64-64, 128 gradient steps per 256 env
  steps per task (the default params' DQN);
* hypernet: meta_train's hypernetwork fit on the tiny params' data shapes, scaled up (the default params'
  hidden 256, batch 128): matmuls with larger inner dimensions, where MKL's kernels matter most;
* acrobot-env: the numpy vector environment of acrobot (sin, cos, RK4), 64 environments, random actions.

    python bench/determinism_cost.py             # the full run (a few minutes on 2 cores)
    python bench/determinism_cost.py --quick     # a smoke test of the script

Writes ``reports/bench/determinism_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = ("dqn", "hypernet", "acrobot-env")


def _dqn(scale: float) -> None:
    from metadqn.config import DQNConfig
    from metadqn.dqn import train_dqn
    from metadqn.envs import get_family, sample_tasks, task_matrix

    family = get_family("cartpole-mirrored")
    tasks = task_matrix(sample_tasks(family, {"train": 8}, seed=0), family)
    cfg = DQNConfig(hidden_sizes=[64, 64], total_steps=int(6000 * scale), envs_per_task=8, buffer_size=50_000,
                    batch_size=64, learning_starts=1000, train_frequency=256, gradient_steps=128,
                    target_update_interval=128)
    train_dqn(family, tasks, cfg, seed=0, evaluate=False)


def _hypernet(scale: float) -> None:
    import torch

    torch.manual_seed(0)
    # a context encoder and a hypernetwork head of the default sizes: 128 states x 64 transitions
    enc = torch.nn.Sequential(torch.nn.Linear(10, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    out = 4 * 64 + 64 * 64 + 64 * 2  # a 64-64 Q-network's parameters
    head = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, out))
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-3)
    x = torch.randn(32, 64, 10)
    for _ in range(int(300 * scale)):
        z = enc(x).mean(1)
        loss = head(z).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _acrobot_env(scale: float) -> None:
    import numpy as np

    from metadqn.envs import get_family, sample_tasks, task_matrix

    family = get_family("acrobot")
    tasks = task_matrix(sample_tasks(family, {"train": 16}, seed=0), family)
    env = family.vector_env(tasks, envs_per_task=4)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(int(2000 * scale)):
        env.step(rng.integers(0, 3, size=env.num_envs))


def child(workload: str, scale: float) -> None:
    """One timed workload in this process; prints a JSON line with seconds and the kernels in use."""
    import metadqn  # noqa: F401, I001  (first, so that its pin acts before torch loads)
    import torch

    torch.set_num_threads(1)
    fn = {"dqn": _dqn, "hypernet": _hypernet, "acrobot-env": _acrobot_env}[workload]
    start = time.perf_counter()
    fn(scale)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "torch_capability": torch.backends.cpu.get_cpu_capability()}))


def _time(workload: str, scale: float, native: bool) -> dict:
    env = dict(os.environ)
    env.pop("METADQN_NATIVE_CPU", None)
    if native:
        env["METADQN_NATIVE_CPU"] = "1"
    proc = subprocess.run([sys.executable, __file__, "--child", workload, "--scale", str(scale)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny workloads, one round (a smoke test)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--out", type=Path, default=Path("reports/bench/determinism_cost.json"))
    ap.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.scale)
        return
    scale, rounds = (0.05, 1) if args.quick else (1.0, args.rounds)
    results = []
    print("| workload | pinned s (torch kernels) | native s (torch kernels) | pinned / native |")
    print("|---|---|---|---|")
    for workload in args.workloads:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(rounds):  # alternate, so a slow spell of the machine hits both
            for native in (False, True):
                runs[native].append(_time(workload, scale, native))
        med = {n: statistics.median(r["seconds"] for r in runs[n]) for n in runs}
        row = {"workload": workload, "rounds": rounds, "pinned_s": med[False], "native_s": med[True],
               "pinned_capability": runs[False][0]["torch_capability"],
               "native_capability": runs[True][0]["torch_capability"], "ratio": med[False] / med[True]}
        results.append(row)
        print(f"| {workload} | {row['pinned_s']:.2f} ({row['pinned_capability']}) | {row['native_s']:.2f} "
              f"({row['native_capability']}) | {row['ratio']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"quick": args.quick, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
