from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from metadqn.data.store import LeakageError, TaskStore
from metadqn.dqn import QNetwork, init_state_dict
from metadqn.dqn.qnetwork import flatten_state_dict, param_shapes
from metadqn.envs import get_family
from metadqn.meta.context import ContextEncoder, feature_dim
from metadqn.meta.hypernet import HyperQ
from metadqn.meta.model import MetaModel
from metadqn.meta.siamese import SiameseIndex, top1_agreement

FAMILY = get_family("cartpole-mirrored")
F_DIM = feature_dim(FAMILY)


def _hyper(seed: int = 0) -> HyperQ:
    torch.manual_seed(seed)
    enc = ContextEncoder("deepset", F_DIM, 32, 8)
    return HyperQ(enc, 8, 32, FAMILY.obs_dim, FAMILY.n_actions, [16, 16], base_seed=5)


def test_bias_hyperinit_generates_the_base_network_for_every_context():
    model = _hyper()
    base = init_state_dict(FAMILY.obs_dim, FAMILY.n_actions, [16, 16], seed=5)
    contexts = torch.randn(6, 10, F_DIM) * 3
    for sd in model.generate(contexts):
        for key in base:
            torch.testing.assert_close(sd[key], base[key])


def test_generated_parameters_load_into_qnetwork_and_reproduce_the_hypernetwork():
    model = _hyper()
    torch.nn.init.normal_(model.head.weight, std=0.05)  # as if trained: contexts now matter
    contexts = torch.randn(3, 10, F_DIM)
    flat = model(contexts)
    obs = torch.randn(3, 7, FAMILY.obs_dim)
    q_hyper = model.q_values(flat, obs)
    sds = model.generate(contexts)
    assert not torch.equal(sds[0]["layers.0.weight"], sds[1]["layers.0.weight"])
    for t, sd in enumerate(sds):
        net = QNetwork(FAMILY.obs_dim, FAMILY.n_actions, [16, 16])
        net.load_state_dict(sd)
        torch.testing.assert_close(net(obs[t]), q_hyper[t].detach())


def test_the_gate_hands_an_out_of_range_task_the_nearest_training_embedding_and_survives_a_save(tmp_path):
    from metadqn.meta.model import MetaModelConfig

    model = _hyper()
    torch.nn.init.normal_(model.head.weight, std=0.05)
    train = torch.randn(5, 10, F_DIM)
    far = train[2:3] * 40.0  # the same transitions, scaled far out of the training region
    near = train[0:1] + 1e-3 * torch.randn_like(train[0:1])  # a new task, but inside the training region
    with torch.no_grad():
        points = model.encoder(train)
        ungated = model(torch.cat([train, far]))
        model.set_gate(points)
        emb, gated = model.embed(torch.cat([train, far]))
        flat = model(torch.cat([train, far]))
        near_gated = model.embed(near)[1]
    assert gated.tolist() == [False] * 5 + [True]  # never on a training task
    assert not near_gated.any()  # only beyond the radius: a new task close to a training one keeps its own
    # the radius: the farthest any training task is from its nearest other one
    apart = [min(float((points[i] - points[j]).norm()) for j in range(5) if j != i) for i in range(5)]
    assert abs(float(model.gate_radius) - max(apart)) < 1e-5
    nearest = torch.cdist(model.encoder(far), points).argmin().item()
    torch.testing.assert_close(emb[5], points[nearest])
    torch.testing.assert_close(flat[5], flat[nearest])  # the far task gets that training task's network
    torch.testing.assert_close(flat[:5], ungated[:5])
    assert not torch.allclose(flat[5], ungated[5])

    cfg = MetaModelConfig(learner="hypernet", family=FAMILY.name, q_hidden=[16, 16], context_size=10, embed_dim=8,
                          encoder_hidden=32, hidden=32)
    MetaModel(cfg, module=model.eval()).save(tmp_path / "h")
    loaded = MetaModel.load(tmp_path / "h").module
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.cat([train, far])), flat)
    model.gate_off()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.cat([train, far])), ungated)


def _pushes(n_tasks: int, force: float, sign: float, seed: int) -> torch.Tensor:
    """Contexts [T, 64, F] of a toy task: action 1 pushes the first state variable by +sign * force, action 0
    by -sign * force, on top of state-dependent noise of a fixed size."""
    from metadqn.meta.context import features_from_arrays

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_tasks):
        obs = rng.normal(size=(64, FAMILY.obs_dim)).astype(np.float32)
        action = rng.integers(0, 2, 64)
        nxt = obs + 0.05 * rng.normal(size=obs.shape).astype(np.float32)
        nxt[:, 0] += sign * force * (2 * action - 1)
        out.append(features_from_arrays({"obs": obs, "next_obs": nxt, "action": action, "reward": np.ones(64),
                                         "terminated": np.zeros(64)}, FAMILY))
    return torch.as_tensor(np.stack(out))


def test_action_effect_reads_which_way_an_action_pushes_also_out_of_range_and_survives_a_save(tmp_path):
    from metadqn.meta.context import ContextSampler, build_encoder
    from metadqn.meta.model import MetaModelConfig

    torch.manual_seed(0)
    train = torch.cat([_pushes(4, 1.0, 1.0, 0), _pushes(4, 1.0, -1.0, 1)])
    enc = build_encoder("deepset", FAMILY, 16, 4, action_effect=True).fit(ContextSampler(list(train), 64))
    assert enc.effect is not None and float(enc.effect.lo) < float(enc.effect.hi)
    with torch.no_grad():
        for force in (1.0, 0.02, 30.0):  # in range, a far weaker push, a far stronger one
            for sign in (1.0, -1.0):
                ctx = _pushes(3, force, sign, 7)
                effect = enc.effect(ctx, enc.scale(ctx))
                # [action 0's effect on the 4 state variables, action 1's, clipped log-size]
                assert torch.all(torch.sign(effect[:, 4]) == sign) and torch.all(torch.sign(effect[:, 0]) == -sign)
                assert torch.all(effect[:, -1] >= enc.effect.lo) and torch.all(effect[:, -1] <= enc.effect.hi)
                mirrored = ctx.clone()
                mirrored[..., 4:6] = ctx[..., [5, 4]]  # the same transitions with the actions swapped
                torch.testing.assert_close(enc.effect(mirrored, enc.scale(mirrored))[:, :-1], -effect[:, :-1])
        model = HyperQ(enc, 4, 16, FAMILY.obs_dim, FAMILY.n_actions, [16, 16], base_seed=5)
        torch.nn.init.normal_(model.head.weight, std=0.05)
        flat = model(train)
    cfg = MetaModelConfig(learner="hypernet", family=FAMILY.name, q_hidden=[16, 16], context_size=64, embed_dim=4,
                          encoder_hidden=16, hidden=16)
    MetaModel(cfg, module=model.eval()).save(tmp_path / "h")
    loaded = MetaModel.load(tmp_path / "h").module
    with torch.no_grad():
        torch.testing.assert_close(loaded(train), flat)


def test_siamese_distance_is_symmetric_and_zero_on_identical_contexts():
    torch.manual_seed(0)
    enc = ContextEncoder("deepset", F_DIM, 32, 8)
    shapes = param_shapes(FAMILY.obs_dim, FAMILY.n_actions, [16, 16])
    experts = torch.stack([flatten_state_dict(init_state_dict(4, 2, [16, 16], s), shapes) for s in range(4)])
    index = SiameseIndex(enc, torch.randn(4, 8), experts, [f"t{i}" for i in range(4)], k=2)
    a, b = torch.randn(5, 10, F_DIM), torch.randn(5, 10, F_DIM)
    with torch.no_grad():
        torch.testing.assert_close(index.distance(a, b), index.distance(b, a))
        assert torch.all(index.distance(a, a) == 0)
        assert torch.all(index.distance(a, b) > 0)


def test_siamese_init_is_nearest_expert_or_weighted_average():
    torch.manual_seed(0)
    enc = ContextEncoder("deepset", F_DIM, 16, 4)
    ctx = torch.randn(1, 10, F_DIM)
    with torch.no_grad():
        e = enc(ctx)[0]
    emb = torch.stack([e, e + 1.0, e + 3.0])
    experts = torch.arange(3, dtype=torch.float32).unsqueeze(1).repeat(1, 5)
    near = SiameseIndex(enc, emb, experts, ["a", "b", "c"], k=1)
    torch.testing.assert_close(near.init_flat(ctx), experts[:1])
    two = SiameseIndex(enc, emb, experts, ["a", "b", "c"], k=2)
    assert two.init_flat(ctx)[0, 0] < 0.01  # dominated by the nearly identical first expert


def test_top1_agreement_counts_ties_and_its_random_control():
    scores = np.array([[1.0, 0.2], [1.0, 0.9], [0.5, 0.1]])
    hit, control = top1_agreement(np.array([1, 0]), scores)
    assert hit == 0.5
    assert control == pytest.approx((2 / 3 + 1 / 3) / 2)


# ------------------------------------------------------------------------------------ end to end (tiny)
@pytest.mark.slow
def test_tiny_meta_train_completes_and_imitates_the_experts_better_than_a_random_network(tiny_run):
    from metadqn.meta.dataset import expert_q, load_meta_data

    params, store, out, metrics, _ = tiny_run
    assert set(metrics) >= {"hypernet", "hypernet-oracle", "siamese", "reptile", "multitask"}
    assert json.loads(out.metrics.read_text())["hypernet"] == metrics["hypernet"]
    for name in ("hypernet", "siamese", "reptile", "multitask"):
        assert "val_zero_shot_normalized" in metrics[name] and "wall_s" not in metrics[name]
        assert (out.models / name / "model.pt").exists()
    assert 0.0 <= metrics["siamese"]["top1_retrieval"] <= 1.0

    # the tiny experts are too weak for returns to tell a learned network from a random one; what the
    # hypernet must have learned is to act like each training task's expert on that task's states
    data = load_meta_data(store, params)
    model = MetaModel.load(out.models / "hypernet")
    init = model.initial_params(context=data.train.contexts.first())
    hidden = params.dqn.hidden_sizes
    random_nets = [init_state_dict(4, 2, hidden, seed=100 + i) for i in range(len(init))]
    expert = expert_q(data.family, data.experts, hidden, data.states)
    generated = expert_q(data.family, init, hidden, data.states)
    random = expert_q(data.family, random_nets, hidden, data.states)

    def agreement(qs):
        return np.mean([np.mean(q.argmax(-1) == e.argmax(-1)) for q, e in zip(qs, expert, strict=True)])

    # greedy-action agreement with each task's expert: well above a coin (0.5) and 0.3 above random networks
    # (0.65 against 0.12 since every env resets from its own stream; the tiny experts are drawn anew with it)
    assert agreement(generated) > max(0.5, agreement(random) + 0.3), (agreement(generated), agreement(random))


@pytest.mark.slow
def test_meta_training_store_refuses_test_tasks(tiny_run):
    from metadqn.meta.dataset import load_meta_data

    params, store, _, _, col = tiny_run
    tasks = pd.read_parquet(col.tasks)
    test_id = tasks.loc[tasks["split"] == "interp", "task_id"].iloc[0]
    with pytest.raises(LeakageError):
        store.transitions([test_id], 4)
    with pytest.raises(LeakageError):
        store.expert(test_id)
    with pytest.raises(LeakageError):
        store.tasks("extrap")
    with pytest.raises(LeakageError):
        load_meta_data(TaskStore(col.tasks, col.trajectories, col.experts, col.metrics,
                                 allowed=frozenset({"train", "val", "interp"})), params)


@pytest.mark.slow
def test_meta_model_loads_from_mlflow_in_a_fresh_process(tiny_run, tmp_path):
    import mlflow

    from metadqn.tracking.models import example_input, log_meta_model, predict_actions

    params, _, out, _, _ = tiny_run
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = log_meta_model(out.models / "hypernet", params.family.name)
    frame = example_input(params.family.name, params.meta_train.context_size, n_obs=6, seed=3)
    frame.to_parquet(tmp_path / "input.parquet")
    local = predict_actions(MetaModel.load(out.models / "hypernet"), frame)
    code = (
        "import mlflow, pandas as pd, sys;"
        f"mlflow.set_tracking_uri('sqlite:///{tmp_path / 'mlflow.db'}');"
        f"m = mlflow.pyfunc.load_model('{info.model_uri}');"
        f"print(m.predict(pd.read_parquet('{tmp_path / 'input.parquet'}')).to_json())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    remote = pd.read_json(__import__("io").StringIO(proc.stdout.strip().splitlines()[-1]))
    assert remote["action"].tolist() == local["action"].tolist()
    np.testing.assert_allclose(remote["q_0"].to_numpy(), local["q_0"].to_numpy(), rtol=1e-5)


def test_value_offset_calibration_keeps_the_policy_and_matches_the_expert_level():
    from metadqn.meta.hypernet import calibrate_value_offset

    model = _hyper()
    torch.nn.init.normal_(model.head.weight, std=0.05)
    contexts = torch.randn(3, 10, F_DIM)
    obs = torch.randn(3, 20, FAMILY.obs_dim)
    q_before = model.q_values(model(contexts), obs).detach()
    q_expert = q_before + 80.0 + 0.01 * torch.randn_like(q_before)
    offset = calibrate_value_offset(model, contexts, obs, q_expert)
    assert offset == pytest.approx(80.0, abs=0.05)
    for t, sd in enumerate(model.generate(contexts)):
        net = QNetwork(FAMILY.obs_dim, FAMILY.n_actions, [16, 16])
        net.load_state_dict(sd)
        q = net(obs[t]).detach()
        assert torch.equal(q.argmax(-1), q_before[t].argmax(-1))
        assert q.mean().item() == pytest.approx(q_expert[t].mean().item(), abs=0.5)


def test_meta_train_jobs_give_the_in_order_result_in_any_order_and_thread_count(tiny_run):
    """The stage trains each hypernet seed as its own job, in worker processes of one thread; the seeds
    in reverse order, from a process of another thread count, must give exactly what training them in
    order gives."""
    from metadqn.meta.dataset import load_meta_data
    from metadqn.meta.hypernet import combine_seeds, fit_hypernet, teacher_indices
    from metadqn.stages.meta_train import FitJob, fit_job, learner_names, plan_jobs

    params, store, *_ = tiny_run
    mt = params.meta_train
    hn = mt.hypernet.model_copy(update={"n_seeds": 2, "iterations": 60, "eval_interval": 30})
    params = params.model_copy(update={"meta_train": mt.model_copy(update={"hypernet": hn})})
    jobs = plan_jobs(params, learner_names(params))
    assert jobs[:3] == [FitJob("hypernet", 0), FitJob("hypernet", 1), FitJob("hypernet-oracle", 0)]
    assert {j.learner for j in jobs[3:]} == {"siamese", "reptile", "multitask"} and "select" not in jobs

    data = load_meta_data(store, params)
    splits = ["train"] * len(data.train.matrix) + list(data.val.tasks["split"])
    scores = np.random.default_rng(0).uniform(size=(len(data.train.matrix), len(splits)))
    teachers = teacher_indices(params.meta_train.hypernet, scores, splits)
    torch.set_num_threads(1)
    reference = fit_hypernet(data, params, teachers=teachers)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fits = [fit_job(data, params, scores, FitJob("hypernet", s)) for s in (1, 0)]
        assert torch.get_num_threads() == 2  # the job's one thread is given back
    finally:
        torch.set_num_threads(threads)
    got = combine_seeds(data, params, False, fits, teachers)
    assert got.val_score == reference.val_score and got.seed_scores == reference.seed_scores
    assert got.curves == reference.curves
    want = reference.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in got.model.state_dict().items())


def test_validation_splits_weigh_the_same_in_every_selection(tiny_run):
    from metadqn.meta.dataset import SplitData, load_meta_data

    params, store, out, metrics, _ = tiny_run
    data = load_meta_data(store, params)
    assert list(dict.fromkeys(data.val.tasks["split"])) == ["val", "val_extrap"]  # the tiny params have both
    assert "val_extrap_zero_shot" in metrics["hypernet"] and "val_extrap_zero_shot" in metrics["siamese"]
    # the validated gate: kept only where it raised the validation zero-shot
    for name in ("hypernet", "hypernet-oracle"):
        m = metrics[name]
        assert m["gate"] == float(m["gate_val_with"] > m["gate_val_without"])
        assert (MetaModel.load(out.models / name).module._buffers.get("gate_points") is not None) == bool(m["gate"])

    three = pd.DataFrame({"split": ["val", "val", "val", "val_extrap"]})
    split = SplitData.__new__(SplitData)
    split.tasks = three
    assert split.balanced_mean(np.array([1.0, 1.0, 1.0, 0.0])) == 0.5  # not the pooled 0.75
    split.tasks = three.assign(split="val")
    assert split.balanced_mean(np.array([1.0, 1.0, 1.0, 0.0])) == 0.75


def test_robust_teacher_is_the_broadest_expert_that_solves_the_task():
    """``hypernet.teacher: robust``: each training task is taught by the expert that does best over all
    tasks (each split weighing the same) among those within the tolerance of the task's best score;
    ``own`` keeps every task's expert."""
    from metadqn.config import HypernetConfig
    from metadqn.meta.hypernet import teacher_indices

    s = np.array([  # expert i (row) on task j (column): four training tasks, then an out-of-range validation task
        [1.00, 0.00, 0.00, 0.00, 0.0],
        [0.00, 1.00, 0.00, 0.97, 0.9],  # solves tasks 1 and 3, and the out-of-range one
        [0.98, 0.00, 1.00, 0.96, 0.1],  # solves tasks 0, 2 and 3: the broadest on the training tasks alone
        [0.00, 0.00, 0.00, 1.00, 0.0],
    ])
    splits = ["train"] * 4 + ["val_extrap"]
    robust = HypernetConfig(teacher="robust", teacher_tolerance=0.05)
    assert teacher_indices(robust, s, splits) == [2, 1, 2, 1]
    assert teacher_indices(robust, s[:, :4], splits[:4]) == [2, 1, 2, 2]  # without the validation task
    # a stricter tolerance leaves tasks 0 and 3 to their own experts
    assert teacher_indices(robust.model_copy(update={"teacher_tolerance": 0.01}), s, splits) == [0, 1, 2, 3]
    # equal breadth: the task's own expert wins the tie
    assert teacher_indices(robust, np.ones((2, 2)), ["train", "train"]) == [0, 1]
    assert teacher_indices(HypernetConfig(), s, splits) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cross-evaluation"):
        teacher_indices(robust, None, splits)
    with pytest.raises(ValueError, match="training tasks first"):
        teacher_indices(robust, s, ["val_extrap", *splits[1:]])


def test_local_teacher_is_broad_among_the_tasks_like_its_student():
    """``hypernet.teacher: local``: breadth weighs each task by how well the student task's own expert does
    on it, so an expert that half-solves the other kind of task does not win for that reason."""
    from metadqn.config import HypernetConfig
    from metadqn.meta.hypernet import teacher_indices

    s = np.array([  # tasks 0, 1 and validation task 4 are of kind A; 2, 3 and 5 of kind B
        [1.00, 1.00, 0.00, 0.00, 1.00, 0.00],
        [1.00, 1.00, 0.60, 0.60, 0.50, 0.90],  # solves kind A in range only, half of kind B: broadest overall
        [0.00, 0.00, 1.00, 1.00, 0.00, 1.00],
        [0.00, 0.00, 1.00, 1.00, 0.00, 0.20],
    ])
    splits = ["train"] * 4 + ["val_extrap"] * 2
    robust = HypernetConfig(teacher="robust", teacher_tolerance=0.05)
    assert teacher_indices(robust, s, splits) == [1, 1, 2, 2]
    local = robust.model_copy(update={"teacher": "local"})
    # task 0: weighed by expert 0's scores, only kind A counts, where expert 0 is perfect and expert 1 fails
    # the validation task; task 1's own expert is expert 1, whose scores weigh kind B too, so it stays
    assert teacher_indices(local, s, splits) == [0, 1, 2, 2]
    # an expert that fails even its own task weighs nothing: unweighted breadth, and the tie goes to it
    assert teacher_indices(local, np.zeros((2, 3)), ["train", "train", "val"]) == [0, 1]


def test_distillation_targets_come_from_each_tasks_teacher(tiny_run):
    """The hypernet imitates the teacher's Q-values on the task's own states (and its DAgger labels)."""
    from metadqn.meta.dataset import expert_q, load_meta_data
    from metadqn.meta.hypernet import _base_pool

    params, store, *_ = tiny_run
    data = load_meta_data(store, params)
    hidden = params.dqn.hidden_sizes
    n = len(data.experts)
    teachers = [n - 1 - j for j in range(n)]
    pool = _base_pool(data, hidden, teachers)
    own = _base_pool(data, hidden, None)
    for j in range(n):
        want = expert_q(data.family, [data.experts[teachers[j]]], hidden, [data.states[j]])[0]
        k = min(len(want), int(pool.count[j]))
        assert torch.allclose(pool.q[j, :k], torch.as_tensor(want[-k:]), atol=1e-5)
        assert torch.equal(pool.obs[j], own.obs[j])
    assert not torch.equal(pool.q, own.q)
