from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd
import torch

from metadqn.data import trajectories as traj
from metadqn.data.io import file_md5, load_state_dict
from metadqn.data.pool import ensure_pool
from metadqn.dqn import QNetwork
from metadqn.envs import SPLITS
from metadqn.stages.collect import CollectOutputs, grow_pool, plan_groups, run_collect


def _outputs(root, params) -> CollectOutputs:
    out = CollectOutputs(pool=root / "data" / "task_pool.csv", tasks=root / "data" / "tasks.parquet",
                         trajectories=root / "data" / "trajectories", experts=root / "models" / "experts",
                         metrics=root / "reports" / "metrics.json", curves=root / "reports" / "curves.csv")
    out.pool.parent.mkdir(parents=True, exist_ok=True)
    ensure_pool(out.pool, params.family.family(), params.collect.n_train_tasks, params.collect.task_seed)
    return out


def _untracked(params):
    return params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})


def test_collect_writes_every_output_and_is_deterministic(tmp_path, tiny_params):
    params = _untracked(tiny_params)
    family = params.family.family()
    assert len(plan_groups(pd.DataFrame({"task_id": range(6)}), params.collect.group_size)) == 2
    out_a, out_b = _outputs(tmp_path / "a", params), _outputs(tmp_path / "b", params)
    metrics = run_collect(params, out_a)
    run_collect(params, out_b)

    tasks = pd.read_parquet(out_a.tasks)
    assert list(tasks.columns) == ["task_id", "split", "family", *family.param_names]
    assert set(tasks["split"]) == set(SPLITS)
    assert set(metrics["tasks"]) == set(tasks["task_id"])
    assert set(metrics) >= {"fraction_solved", "tasks"}
    assert "wall_s" not in json.loads(out_a.metrics.read_text())  # the file is exactly reproducible
    assert json.loads(out_a.metrics.read_text())["tasks"] == metrics["tasks"]
    for tid, m in metrics["tasks"].items():
        assert set(m) >= {"split", "return", "steps", "random_return", "reference_return"}
        # the scale's two ends (metadqn.data.normalise): a random CartPole policy falls within ~20 steps
        assert 8 < m["random_return"] < 60
        assert m["reference_return"] == max(m["return"], family.solved_return)
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


def _files(out: CollectOutputs) -> dict[str, str]:
    return {p.name: file_md5(p) for folder in (out.experts, out.trajectories) for p in sorted(folder.iterdir())}


def test_a_grown_pool_trains_only_its_new_tasks_and_equals_a_run_from_scratch(tmp_path, tiny_params):
    params = _untracked(tiny_params)
    inc = _outputs(tmp_path / "inc", params)
    first = run_collect(params, inc)
    n_tasks = len(first["tasks"])
    assert first["trained_tasks"] == n_tasks
    before = _files(inc)

    added = grow_pool(params, 2, datetime(2026, 11, 27, 3, tzinfo=UTC), inc.pool)
    assert list(added["task_id"]) == ["train-003", "train-004"]
    assert grow_pool(params, 2, datetime(2026, 11, 27, 3, tzinfo=UTC), inc.pool).empty  # once per time
    second = run_collect(params, inc)
    assert second["trained_tasks"] == 2 and len(second["tasks"]) == n_tasks + 2
    after = _files(inc)
    assert {k: after[k] for k in before} == before  # the old experts were not touched

    again = run_collect(params, inc)  # nothing new: nothing trained
    assert again["trained_tasks"] == 0 and _files(inc) == after

    scratch = _outputs(tmp_path / "scratch", params)
    scratch.pool.write_bytes(inc.pool.read_bytes())
    full = run_collect(params, scratch)
    assert full["trained_tasks"] == n_tasks + 2
    assert _files(scratch) == after  # incremental == from scratch, byte for byte
    assert scratch.metrics.read_bytes() == inc.metrics.read_bytes()
    assert scratch.curves.read_bytes() == inc.curves.read_bytes()

    changed = params.model_copy(update={"collect": params.collect.model_copy(update={"expert_epsilon": 0.1})})
    assert run_collect(changed, inc)["trained_tasks"] == n_tasks + 2  # other params: every expert again
