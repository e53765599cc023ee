from __future__ import annotations

import numpy as np
import torch

from metadqn.config import DQNConfig
from metadqn.dqn import BatchedQNetwork, QNetwork, init_state_dict, train_dqn
from metadqn.dqn.rollout import GreedyEvaluator
from metadqn.dqn.trainer import clip_grad_norm_per_slot
from metadqn.envs import get_family

CARTPOLE = get_family("cartpole")
DEFAULT_TASK = np.array([[10.0, 0.5, 0.1, 1.0, 9.8]])

# A budget small enough for a unit test that still learns on CartPole (SB3/RL-Zoo-style bursts).
TINY = DQNConfig(
    total_steps=12_000, envs_per_task=4, buffer_size=12_000, batch_size=64, learning_rate=2.3e-3,
    learning_starts=500, train_frequency=64, gradient_steps=32, target_update_interval=32,
    exploration_fraction=0.3, eval_interval=3_000, eval_episodes=5, hidden_sizes=[64, 64],
)


def test_batched_network_slots_are_plain_qnetworks():
    sds = [init_state_dict(4, 2, [32, 16], seed) for seed in range(3)]
    batched = BatchedQNetwork(3, 4, 2, [32, 16])
    batched.load_slots(sds)
    obs = torch.randn(3, 7, 4)
    q = batched(obs)
    for k, sd in enumerate(sds):
        net = QNetwork(4, 2, [32, 16])
        net.load_state_dict(sd)
        torch.testing.assert_close(net(obs[k]), q[k])
        torch.testing.assert_close(batched.slot_state_dict(k), sd)


def test_per_slot_clip_matches_a_lone_clip():
    torch.manual_seed(0)
    batched = BatchedQNetwork(2, 4, 2, [8])
    for p in batched.parameters():
        p.grad = torch.randn_like(p) * torch.tensor([10.0, 0.01]).view(-1, *([1] * (p.dim() - 1)))
    grads = [p.grad.clone() for p in batched.parameters()]
    clip_grad_norm_per_slot(list(batched.parameters()), 1.0)
    for k in range(2):
        lone = [torch.nn.Parameter(torch.zeros_like(g[k])) for g in grads]
        for p, g in zip(lone, grads, strict=True):
            p.grad = g[k].clone()
        torch.nn.utils.clip_grad_norm_(lone, 1.0)
        for p, b in zip(lone, batched.parameters(), strict=True):
            torch.testing.assert_close(p.grad, b.grad[k])


def _random_return(tasks: np.ndarray, seed: int) -> float:
    rng = torch.Generator().manual_seed(seed)

    def random_policy(o: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, 2, o.shape[:2], generator=rng)

    return float(GreedyEvaluator(CARTPOLE, tasks, 20, seed)(random_policy).mean())


def test_trainer_learns_on_a_tiny_budget():
    result = train_dqn(CARTPOLE, DEFAULT_TASK, TINY, seed=0)
    random_return = _random_return(DEFAULT_TASK, 0)
    assert random_return < 40
    assert result.best_return[0] > 4 * random_return, result.curves
    # the kept checkpoint really is that good on fresh start states
    net = QNetwork(4, 2, TINY.hidden_sizes)
    net.load_state_dict(result.best_params[0])
    fresh = GreedyEvaluator(CARTPOLE, DEFAULT_TASK, 10, seed=123)(lambda o: net(o).argmax(-1))
    assert fresh[0] > 3 * random_return


def test_same_seed_same_numbers_and_batch_equals_slots():
    cfg = TINY.model_copy(update={"total_steps": 2_000, "learning_starts": 200, "eval_interval": 1_000})
    tasks = np.repeat(DEFAULT_TASK, 2, axis=0)
    a = train_dqn(CARTPOLE, tasks, cfg, seed=3)
    b = train_dqn(CARTPOLE, tasks, cfg, seed=3)
    assert a.curves.equals(b.curves)
    for sa, sb in zip(a.final_params, b.final_params, strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key])
    c = train_dqn(CARTPOLE, tasks, cfg, seed=4)
    assert not torch.equal(a.final_params[0]["layers.0.weight"], c.final_params[0]["layers.0.weight"])


def test_a_slot_does_not_depend_on_its_neighbours():
    """Slot 0's whole run (curve and trained weights) is the same whichever network slot 1 starts from, so
    runs of two methods on the same (task, seed), each in its own batched run, share their random draws
    (meta-test's pairing): slot 1's other episode ends must not move slot 0's resets or anything else."""
    cfg = TINY.model_copy(update={"total_steps": 3_000, "learning_starts": 200, "eval_interval": 1_000})
    tasks = np.repeat(DEFAULT_TASK, 2, axis=0)
    start = init_state_dict(4, 2, cfg.hidden_sizes, 1)
    runs = [train_dqn(CARTPOLE, tasks, cfg, seed=7, init=[start, init_state_dict(4, 2, cfg.hidden_sizes, s)])
            for s in (2, 3)]
    slot0 = [r.curves[r.curves.slot == 0].reset_index(drop=True) for r in runs]
    slot1 = [r.curves[r.curves.slot == 1].reset_index(drop=True) for r in runs]
    assert not slot1[0].equals(slot1[1])  # the neighbours did differ
    assert slot0[0].equals(slot0[1])
    for key in start:
        assert torch.equal(runs[0].final_params[0][key], runs[1].final_params[0][key])


def test_initial_parameters_go_in_and_trained_ones_load_into_qnetwork():
    sd = init_state_dict(4, 2, [64, 64], seed=11)
    cfg = TINY.model_copy(update={"total_steps": 400, "learning_starts": 10_000})  # no gradient step
    result = train_dqn(CARTPOLE, DEFAULT_TASK, cfg, seed=0, init=[sd])
    for key in sd:
        torch.testing.assert_close(result.final_params[0][key], sd[key])
    cfg = TINY.model_copy(update={"total_steps": 1_000, "learning_starts": 100})
    result = train_dqn(CARTPOLE, DEFAULT_TASK, cfg, seed=0, init=[sd])
    net = QNetwork(4, 2, [64, 64])
    net.load_state_dict(result.final_params[0])
    assert not torch.equal(net.layers[0].weight, sd["layers.0.weight"])
    obs = torch.randn(5, 4)
    batched = BatchedQNetwork(1, 4, 2, [64, 64])
    batched.load_slots(result.final_params)
    torch.testing.assert_close(net(obs), batched(obs[None])[0])


def test_replay_export_has_real_transitions_only():
    cfg = TINY.model_copy(update={"total_steps": 800, "learning_starts": 10_000})
    result = train_dqn(CARTPOLE, DEFAULT_TASK, cfg, seed=0, keep_replay=300)
    rep = result.replay[0]
    assert len(rep["obs"]) == 300
    # consecutive steps of one episode chain obs -> next_obs
    for ep in np.unique(rep["episode"])[:3]:
        idx = np.where(rep["episode"] == ep)[0]
        order = idx[np.argsort(rep["step"][idx])]
        np.testing.assert_array_equal(rep["next_obs"][order[:-1]], rep["obs"][order[1:]])
        assert (np.diff(rep["step"][order]) == 1).all()


def test_prefilled_transitions_are_in_the_replay_and_count_for_learning_starts():
    from metadqn.dqn.rollout import collect_transitions

    context = collect_transitions(CARTPOLE, DEFAULT_TASK, 37, 1, seed=0)
    n = len(context[0]["action"])
    cfg = TINY.model_copy(update={"total_steps": 8, "learning_starts": n, "envs_per_task": 4,
                                  "train_frequency": 4, "gradient_steps": 1})
    sd = init_state_dict(4, 2, cfg.hidden_sizes, seed=1)
    result = train_dqn(CARTPOLE, DEFAULT_TASK, cfg, seed=0, init=[sd], prefill=context, keep_replay=1000)
    rep = result.replay[0]
    assert len(rep["obs"]) >= n
    np.testing.assert_array_equal(rep["obs"][:n], context[0]["obs"])
    np.testing.assert_array_equal(rep["action"][:n], context[0]["action"])
    # the context filled learning_starts, so learning started at once; without it, no update happens
    assert not torch.equal(result.final_params[0]["layers.0.weight"], sd["layers.0.weight"])
    idle = train_dqn(CARTPOLE, DEFAULT_TASK, cfg, seed=0, init=[sd])
    assert torch.equal(idle.final_params[0]["layers.0.weight"], sd["layers.0.weight"])
