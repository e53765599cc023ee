from __future__ import annotations

import json

import pandas as pd
import torch

from metadqn.data import trajectories as traj
from metadqn.data.io import load_state_dict
from metadqn.dqn import QNetwork
from metadqn.envs import SPLITS
from metadqn.stages.collect import CollectOutputs, plan_groups, run_collect


def _outputs(root) -> CollectOutputs:
    return CollectOutputs(tasks=root / "data" / "tasks.parquet", trajectories=root / "data" / "trajectories",
                          experts=root / "models" / "experts", metrics=root / "reports" / "metrics.json",
                          curves=root / "reports" / "curves.csv")


def _untracked(params):
    return params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})


def test_collect_writes_every_output_and_is_deterministic(tmp_path, tiny_params):
    params = _untracked(tiny_params)
    family = params.family.family()
    assert len(plan_groups(pd.DataFrame({"task_id": range(6)}), params.collect.group_size)) == 2
    out_a, out_b = _outputs(tmp_path / "a"), _outputs(tmp_path / "b")
    metrics = run_collect(params, out_a)
    run_collect(params, out_b)

    tasks = pd.read_parquet(out_a.tasks)
    assert list(tasks.columns) == ["task_id", "split", "family", *family.param_names]
    assert set(tasks["split"]) == set(SPLITS)
    assert set(metrics["tasks"]) == set(tasks["task_id"])
    assert set(metrics) >= {"fraction_solved", "tasks", "wall_s"}
    assert json.loads(out_a.metrics.read_text())["tasks"] == metrics["tasks"]
    for tid, m in metrics["tasks"].items():
        assert set(m) >= {"split", "return", "steps"}
        frame = traj.read_task(out_a.trajectories / f"{tid}.parquet", family.obs_dim)
        assert set(frame["source"]) == {"exploration", "expert", "replay"}
        assert (frame["task_id"] == tid).all()
        sd = load_state_dict(out_a.experts / f"{tid}.pt")
        net = QNetwork(family.obs_dim, family.n_actions, params.dqn.hidden_sizes)
        net.load_state_dict(sd)
        # same params, same numbers
        other = load_state_dict(out_b.experts / f"{tid}.pt")
        assert all(torch.equal(sd[k], other[k]) for k in sd)
    metrics_b = json.loads(out_b.metrics.read_text())
    assert metrics_b["tasks"] == metrics["tasks"]
    curves = pd.read_csv(out_a.curves)
    assert set(curves.columns) == {"task_id", "split", "step", "eval_return"}
    assert curves.groupby("task_id")["step"].min().eq(0).all()
