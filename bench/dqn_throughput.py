"""DQN training throughput: metadqn's batched multi-task trainer vs Stable-Baselines3 DQN, same run.

Two settings, each with the same update-to-data ratio for both systems:

* light: MLP 64-64, batch 32, one gradient step per 4 env steps (SB3's DQN defaults);
* heavy: MLP 256-256, batch 64, 128 gradient steps per 256 env steps (RL-Zoo's tuned CartPole DQN).

SB3 runs CartPole-v1 (one env, as its defaults) in one process with torch's default threads, and in two
processes of one torch thread each on different seeds (the best use of two cores we found); its best is
the reference. metadqn trains K tasks of ``cartpole-mirrored`` at once (8 envs per task, same gradient
steps per env step), in one process and in two processes of K/2 tasks and one thread each; we report both.
Throughput is aggregate environment steps per second over the whole ``learn`` call, learning_starts=256
for everyone, evaluation off. Prints a table and writes ``reports/bench/dqn_throughput.json``.

    python bench/dqn_throughput.py            # the full run (a few minutes on 2 cores)
    python bench/dqn_throughput.py --quick    # a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

SETTINGS = {
    "light": {"hidden": [64, 64], "batch": 32, "train_freq": 4, "gradient_steps": 1},
    "heavy": {"hidden": [256, 256], "batch": 64, "train_freq": 256, "gradient_steps": 128},
}
LEARNING_STARTS = 256


def _sb3_worker(setting: str, steps: int, seed: int, threads: int | None, barrier, out) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from stable_baselines3 import DQN

    s = SETTINGS[setting]
    model = DQN("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": s["hidden"]}, batch_size=s["batch"],
                train_freq=s["train_freq"], gradient_steps=s["gradient_steps"], learning_starts=LEARNING_STARTS,
                buffer_size=50_000, seed=seed, device="cpu", verbose=0)
    barrier.wait()
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    out.put((steps, time.perf_counter() - start))


def _metadqn_worker(setting: str, steps: int, k: int, seed: int, threads: int | None, device: str,
                    barrier, out) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from metadqn.config import DQNConfig
    from metadqn.dqn import train_dqn
    from metadqn.envs import get_family, sample_tasks, task_matrix

    s = SETTINGS[setting]
    family = get_family("cartpole-mirrored")
    tasks = task_matrix(sample_tasks(family, {"train": k}, seed=seed), family)
    cfg = DQNConfig(hidden_sizes=s["hidden"], batch_size=s["batch"], train_frequency=s["train_freq"],
                    gradient_steps=s["gradient_steps"], learning_starts=LEARNING_STARTS, total_steps=steps,
                    buffer_size=50_000, envs_per_task=8, target_update_interval=max(s["gradient_steps"], 10),
                    device=device)
    barrier.wait()
    start = time.perf_counter()
    result = train_dqn(family, tasks, cfg, seed=seed, evaluate=False)
    out.put((k * result.env_steps, time.perf_counter() - start))


def _run(target, args_list: list[tuple]) -> float:
    """Runs one process per args tuple, started together; aggregate env-steps/s over the slowest."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(args_list)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, barrier, out)) for a in args_list]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"benchmark worker failed with exit code {p.exitcode}")
    return sum(r[0] for r in results) / max(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/dqn_throughput.json"))
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32, 128])
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    # env steps per task for each setting, sized so every measurement runs several seconds here
    sb3_steps = {"light": 20_000, "heavy": 6_000} if not args.quick else {"light": 600, "heavy": 600}

    def metadqn_steps(setting: str, k: int) -> int:
        if args.quick:
            return 600
        work = 160_000 if setting == "light" else 24_000  # aggregate env steps per measurement
        return max(2_048, work // k)

    results = []
    for setting in SETTINGS:
        sb3 = {
            "1 process": _run(_sb3_worker, [(setting, sb3_steps[setting], 0, None)]),
            "2 processes x 1 thread": _run(_sb3_worker, [(setting, sb3_steps[setting], s, 1) for s in (0, 1)]),
        }
        best_sb3 = max(sb3.values())
        for how, rate in sb3.items():
            results.append({"setting": setting, "system": "sb3", "K": 1, "device": "cpu", "how": how,
                            "env_steps_per_s": round(rate, 1), "ratio_vs_sb3": round(rate / best_sb3, 3)})
        for device in devices:
            for k in args.ks:
                steps = metadqn_steps(setting, k)
                runs = {"1 process": [(setting, steps, k, 0, None, device)]}
                if device == "cpu" and k >= 2:
                    runs["2 processes x 1 thread"] = [(setting, steps, k // 2, s, 1, device) for s in (0, 1)]
                for how, arglist in runs.items():
                    rate = _run(_metadqn_worker, arglist)
                    results.append({"setting": setting, "system": "metadqn", "K": k, "device": device, "how": how,
                                    "env_steps_per_s": round(rate, 1), "ratio_vs_sb3": round(rate / best_sb3, 3)})
                print(f"  {setting} metadqn K={k} {device}: done", file=sys.stderr, flush=True)

    print(f"\n{'setting':8} {'system':8} {'K':>4} {'device':6} {'how':24} {'env-steps/s':>12} {'x SB3 best':>10}")
    for r in results:
        print(f"{r['setting']:8} {r['system']:8} {r['K']:>4} {r['device']:6} {r['how']:24} "
              f"{r['env_steps_per_s']:>12,.0f} {r['ratio_vs_sb3']:>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"quick": args.quick, "torch": torch.__version__, "cpus": os.cpu_count(),
            "learning_starts": LEARNING_STARTS, "settings": SETTINGS}
    args.out.write_text(json.dumps({"results": results, "meta": meta}, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
