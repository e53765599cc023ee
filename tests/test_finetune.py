"""The fine-tuning levers of the DQN trainer (FinetuneConfig) and the frozen-start control they are read
against. Small CartPole runs; every test compares a lever with the same run without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metadqn.config import DQNConfig, FinetuneConfig
from metadqn.dqn import BatchedQNetwork, init_state_dict, train_dqn
from metadqn.dqn.levers import SlotLevers
from metadqn.dqn.replay import BatchedReplayBuffer
from metadqn.envs import get_family

CARTPOLE = get_family("cartpole")
TASKS = np.array([[10.0, 0.5, 0.1, 1.0, 9.8], [12.0, 0.6, 0.12, 1.0, 9.8]])
CFG = DQNConfig(total_steps=1_600, envs_per_task=4, buffer_size=4_000, batch_size=32, learning_rate=1e-2,
                learning_starts=200, train_frequency=64, gradient_steps=32, target_update_interval=32,
                exploration_fraction=0.5, eval_interval=800, eval_episodes=3, hidden_sizes=[32, 32])


def _starts(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [init_state_dict(4, 2, CFG.hidden_sizes, seed=100 + i) for i in range(n)]


def _greedy_agreement(a: list[dict], b: list[dict]) -> float:
    obs = torch.randn(len(a), 2_000, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    na, nb = BatchedQNetwork(len(a), 4, 2, CFG.hidden_sizes), BatchedQNetwork(len(b), 4, 2, CFG.hidden_sizes)
    na.load_slots(a)
    nb.load_slots(b)
    return float((na(obs).argmax(-1) == nb(obs).argmax(-1)).float().mean())


CPU = torch.device("cpu")


def _levers(*configs: FinetuneConfig) -> SlotLevers:
    return SlotLevers.build(list(configs), len(configs), CPU)


def test_schedules_per_slot():
    ft = FinetuneConfig(anchor="kl", anchor_weight=2.0, anchor_floor=0.5, anchor_decay_steps=100, lr_warmup_steps=50)
    no_anchor = ft.model_copy(update={"anchor": "none"})
    lv = _levers(ft, no_anchor)
    assert lv.anchor_weights(0).tolist() == [2.0, 0.0]
    assert lv.anchor_weights(50).tolist() == pytest.approx([1.25, 0.0])
    assert lv.anchor_weights(1_000).tolist() == [0.5, 0.0]  # never below the floor
    const = _levers(FinetuneConfig(anchor="kl", anchor_weight=3.0))
    assert const.anchor_weights(10_000).tolist() == [3.0]  # no decay: constant
    assert lv.warmup(0) == 0.0
    assert lv.warmup(25) == pytest.approx(0.5)
    assert lv.warmup(500) == 1.0
    assert _levers(FinetuneConfig()).warmup(0) == 1.0
    eps = _levers(FinetuneConfig(start_epsilon=0.05), FinetuneConfig()).epsilon(0.7, envs_per_slot=2)
    np.testing.assert_allclose(eps, [0.05, 0.05, 0.7, 0.7])
    assert _levers(FinetuneConfig(), FinetuneConfig()).epsilon(0.7, 2) == 0.7  # plain DQN: the schedule


def test_slots_of_one_run_may_differ_only_in_per_slot_levers():
    damped = FinetuneConfig(dqn={"learning_rate": 1e-4})
    with pytest.raises(ValueError, match="may differ only in"):
        _levers(damped, FinetuneConfig())
    with pytest.raises(ValueError, match="share one anchor"):
        _levers(FinetuneConfig(anchor="kl"), FinetuneConfig(anchor="l2"))
    lv = _levers(FinetuneConfig(anchor="kl", protected_steps=10, protected_fraction=0.5), FinetuneConfig(shrink=0.5))
    assert lv.anchor == "kl" and lv.protected_steps == 10
    assert lv.protected_slots.tolist() == [True, False] and lv.shrink.tolist() == [1.0, 0.5]


def test_protected_share_of_each_batch_for_the_slots_that_have_one():
    main = BatchedReplayBuffer(2, 100, 4, 1, CPU)
    prot = BatchedReplayBuffer(2, 100, 4, 1, CPU)
    for i in range(50):
        o = torch.full((2, 1, 4), float(i))
        for buf, r in ((main, 0.0), (prot, 1.0)):
            buf.add(o, torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), r), o, torch.zeros(2, 1),
                    torch.zeros(2, 1), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long),
                    torch.zeros(2, 1, dtype=torch.long))
    lv = _levers(FinetuneConfig(protected_steps=50, protected_fraction=0.25), FinetuneConfig())
    batch = lv.sample(main, prot, 40, torch.Generator().manual_seed(0))
    assert batch.rewards.shape == (2, 40)
    assert batch.rewards.sum(1).tolist() == [10.0, 0.0]  # the protected rows carry reward 1
    empty = BatchedReplayBuffer(2, 100, 4, 1, CPU)
    assert float(lv.sample(main, empty, 40, torch.Generator()).rewards.sum()) == 0.0


def test_start_epsilon_acts_with_the_start_policy_from_step_zero():
    starts = _starts()
    # no update, and a schedule that would explore uniformly throughout: start_epsilon overrides it
    cfg = CFG.model_copy(update={"learning_starts": 10_000, "epsilon_start": 1.0, "epsilon_end": 1.0})
    net = BatchedQNetwork(2, 4, 2, CFG.hidden_sizes)
    net.load_slots(starts)
    for ft, agree in ((FinetuneConfig(start_epsilon=0.0), lambda a: a == 1.0), (None, lambda a: 0.3 < a < 0.7)):
        res = train_dqn(CARTPOLE, TASKS, cfg, seed=0, init=starts, keep_replay=400, finetune=ft)
        for k in range(2):
            rep = res.replay[k]
            greedy = net(torch.as_tensor(rep["obs"])[None].expand(2, -1, -1))[k].argmax(-1).numpy()
            assert agree(float((greedy == rep["action"]).mean()))


def test_kl_anchor_holds_the_start_policy_and_l2_the_start_weights():
    starts = _starts()
    plain = train_dqn(CARTPOLE, TASKS, CFG, seed=0, init=starts)
    kl = train_dqn(CARTPOLE, TASKS, CFG, seed=0, init=starts,
                   finetune=FinetuneConfig(anchor="kl", anchor_weight=100.0, anchor_temperature=0.1))
    # the random starts have near-zero action gaps, so the last bits of the CPU kernels move the anchored
    # agreement (1.00 with torch's AVX-512 kernels, 0.86 with the pinned AVX2 ones, same seed); plain DQN
    # stays at chance (0.48) either way: the margin asserted is far above that noise
    assert _greedy_agreement(kl.final_params, starts) > 0.8
    assert _greedy_agreement(kl.final_params, starts) > _greedy_agreement(plain.final_params, starts) + 0.25

    def dist(final: list[dict]) -> float:
        return sum(float(((f[k] - s[k]) ** 2).sum()) for f, s in zip(final, starts, strict=True) for k in s)

    l2 = train_dqn(CARTPOLE, TASKS, CFG, seed=0, init=starts, finetune=FinetuneConfig(anchor="l2", anchor_weight=10.0))
    assert dist(l2.final_params) < 0.5 * dist(plain.final_params)
    # per slot: slot 0 anchored, slot 1 plain, in one run
    mixed = train_dqn(CARTPOLE, TASKS, CFG, seed=0, init=starts,
                      finetune=[FinetuneConfig(anchor="kl", anchor_weight=100.0, anchor_temperature=0.1),
                                FinetuneConfig()])
    assert _greedy_agreement(mixed.final_params[:1], starts[:1]) > 0.97
    assert _greedy_agreement(mixed.final_params[1:], starts[1:]) < _greedy_agreement(mixed.final_params[:1],
                                                                                      starts[:1]) - 0.05


def test_shrink_zero_is_scratch_and_one_keeps_the_start():
    starts = _starts()
    cfg = CFG.model_copy(update={"total_steps": 400})
    scratch = train_dqn(CARTPOLE, TASKS, cfg, seed=0)
    shrunk = train_dqn(CARTPOLE, TASKS, cfg, seed=0, init=starts, finetune=FinetuneConfig(shrink=0.0))
    for a, b in zip(scratch.final_params, shrunk.final_params, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # the frozen control is still the start's value, not the shrunk network's
    idle = cfg.model_copy(update={"learning_starts": 10_000})
    start_only = train_dqn(CARTPOLE, TASKS, idle, seed=0, init=starts)
    np.testing.assert_array_equal(shrunk.start_return, start_only.start_return)


def test_frozen_control_is_the_start_evaluated_at_every_point():
    """An unchanged network scores its first evaluation at every evaluation (fixed start states), which is
    what lets the protocol report the frozen control from the step-0 evaluation alone."""
    starts = _starts()
    idle = CFG.model_copy(update={"learning_starts": 10_000})
    res = train_dqn(CARTPOLE, TASKS, idle, seed=0, init=starts)
    per_slot = res.curves.groupby("slot")["eval_return"]
    assert (per_slot.nunique() == 1).all()
    np.testing.assert_array_equal(per_slot.first().to_numpy(), res.start_return)
    trained = train_dqn(CARTPOLE, TASKS, CFG, seed=0, init=starts)
    np.testing.assert_array_equal(trained.start_return, res.start_return)


def test_levers_are_validated_at_load_time():
    with pytest.raises(ValueError, match="protected_steps and protected_fraction"):
        FinetuneConfig(protected_steps=100)
    with pytest.raises(ValueError, match="learning_rate"):
        FinetuneConfig(dqn={"learning_rate": -1})
    with pytest.raises(ValueError, match="unknown dqn key"):
        FinetuneConfig(dqn={"lr": 0.1})
    with pytest.raises(ValueError, match="total_steps"):
        FinetuneConfig(dqn={"total_steps": 5})
    with pytest.raises(ValueError):
        FinetuneConfig(anchor_weight=float("inf"))
