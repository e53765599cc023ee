"""The (double-)DQN TD target and loss of ``metadqn.dqn.trainer.td_loss``, on hand-computed tabular examples.

The target ``y = r + gamma * (1 - terminated) * Q_target(s', a*)`` is computed inside ``td_loss`` (by
``bellman_target``, tested alone at the end), so it is checked through the loss: with one transition per
slot, slot k's loss is exactly ``huber(Q_online(s_k, a_k) - y_k)``. The networks are linear with no hidden
layer and one-hot observations, so each one is a Q-table that the test writes by hand.

Truncation has no field of its own in a ``ReplayBatch``: a time-limit truncation is stored with
``terminated = 0`` (the trainer writes the env's ``terminated`` flag only), so it bootstraps like a
non-terminal step; the autoreset step that follows it carries weight 0.
"""

from __future__ import annotations

import pytest
import torch

from metadqn.dqn import BatchedQNetwork
from metadqn.dqn.replay import ReplayBatch
from metadqn.dqn.trainer import td_loss

S, A = 3, 3  # states s0 (where the transitions start), s1, s2 (next states); actions 0..2
GAMMA = 0.5

ONLINE = [[0.0, 2.5, 0.0],   # s0: Q(s0, 1) = 2.5 is the prediction every transition below is scored on
          [1.0, 5.0, 2.0],   # s1: the online argmax is action 1 ...
          [7.0, 0.0, 1.0]]   # s2: ... and action 0 here
TARGET = [[0.0, 0.0, 0.0],
          [10.0, 2.0, 4.0],  # s1: Q_target(s1, 1) = 2, but max_a Q_target(s1, a) = 10
          [3.0, 9.0, -1.0]]  # s2: Q_target(s2, 0) = 3, but the max is 9

# (name, reward, next state, terminated) per slot; every transition is (s0, action 1) -> q = 2.5
CASES = [("non-terminal", 1.0, 1, 0.0), ("terminal", 1.0, 1, 1.0), ("truncated", 0.5, 2, 0.0)]
# by hand, double DQN (action from the online net, value from the target net):
#   non-terminal: 1 + 0.5 * Q_target(s1, argmax_a Q_online(s1, a) = 1) = 1 + 0.5 * 2 = 2
#   terminal:     1                                                      (no bootstrap)
#   truncated:    0.5 + 0.5 * Q_target(s2, argmax_a Q_online(s2, a) = 0) = 0.5 + 0.5 * 3 = 2
DOUBLE_Y = [2.0, 1.0, 2.0]
# plain DQN (max of the target net): 1 + 0.5 * 10 = 6; 1; 0.5 + 0.5 * 9 = 5
PLAIN_Y = [6.0, 1.0, 5.0]


def _huber(d: float) -> float:
    """smooth L1 with beta 1: 0.5 d^2 inside [-1, 1], |d| - 0.5 outside."""
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def _table_net(table: list[list[float]], k: int) -> BatchedQNetwork:
    net = BatchedQNetwork(k, S, A, [])
    with torch.no_grad():
        net.weights[0].copy_(torch.tensor(table).expand(k, S, A))
        net.biases[0].zero_()
    return net


def _one_hot(states: list[list[int]]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(states), S).float()


def _batch(rows: list[list[tuple[float, int, float, float]]]) -> ReplayBatch:
    """rows[k] = [(reward, next state, terminated, weight), ...]; every transition is (s0, action 1)."""
    col = [[[r[i] for r in slot] for slot in rows] for i in range(4)]
    return ReplayBatch(obs=_one_hot([[0] * len(slot) for slot in rows]),
                       actions=torch.ones(len(rows), len(rows[0]), dtype=torch.long),
                       rewards=torch.tensor(col[0]), next_obs=_one_hot([[int(s) for s in c] for c in col[1]]),
                       terminated=torch.tensor(col[2]), weights=torch.tensor(col[3]))


@pytest.mark.parametrize(("double_dqn", "targets"), [(True, DOUBLE_Y), (False, PLAIN_Y)])
def test_td_target_terminal_truncated_and_non_terminal(double_dqn, targets):
    k = len(CASES)
    online, target = _table_net(ONLINE, k), _table_net(TARGET, k)
    batch = _batch([[(r, s, term, 1.0)] for _, r, s, term in CASES])
    loss = td_loss(online, target, batch, GAMMA, double_dqn)
    expected = [_huber(2.5 - y) for y in targets]
    assert loss.tolist() == pytest.approx(expected), [c[0] for c in CASES]
    # the caller may pass online(obs) in (the kl anchor needs it): same loss
    assert td_loss(online, target, batch, GAMMA, double_dqn, online(batch.obs)).tolist() == pytest.approx(expected)


def test_gradient_flows_into_the_online_prediction_only():
    """The target is a constant: no gradient into the target net, none through the online net's argmax at s'."""
    online, target = _table_net(ONLINE, 1), _table_net(TARGET, 1)
    batch = _batch([[(1.0, 1, 0.0, 1.0)]])  # y = 2, q = 2.5: d loss / d q = q - y = 0.5
    td_loss(online, target, batch, GAMMA, True).sum().backward()
    grad = online.weights[0].grad[0]
    expected = torch.zeros(S, A)
    expected[0, 1] = 0.5
    torch.testing.assert_close(grad, expected)
    assert all(p.grad is None for p in target.parameters())


def test_weight_zero_transitions_do_not_count():
    """Slot 0: one real transition and an autoreset row with a huge error; slot 1: two real ones (a mean)."""
    online, target = _table_net(ONLINE, 2), _table_net(TARGET, 2)
    batch = _batch([[(1.0, 1, 0.0, 1.0), (-100.0, 2, 0.0, 0.0)],
                    [(1.0, 1, 0.0, 1.0), (1.0, 1, 1.0, 1.0)]])
    loss = td_loss(online, target, batch, GAMMA, True)
    assert loss.tolist() == pytest.approx([_huber(2.5 - 2.0), (_huber(2.5 - 2.0) + _huber(2.5 - 1.0)) / 2])
    empty = _batch([[(1.0, 1, 0.0, 0.0)]])  # all masked (e.g. only autoreset rows drawn): zero, not NaN
    assert td_loss(_table_net(ONLINE, 1), _table_net(TARGET, 1), empty, GAMMA, True).tolist() == [0.0]


def test_the_trainer_stores_time_limit_truncations_as_non_terminal():
    """What makes the truncated case above bootstrap: train_dqn writes the env's ``terminated`` flag only."""
    import numpy as np

    from metadqn.config import DQNConfig
    from metadqn.dqn import train_dqn
    from metadqn.envs import get_family

    family = get_family("mountaincar")  # a random policy never reaches the flag: every episode is truncated
    limit = family.max_episode_steps
    cfg = DQNConfig(total_steps=2 * (2 * limit + 10), envs_per_task=2, buffer_size=1000, learning_starts=10_000,
                    hidden_sizes=[8], eval_interval=10_000, eval_episodes=1)
    result = train_dqn(family, np.array([[0.001, 0.0025]]), cfg, seed=0, keep_replay=1000, evaluate=False)
    rep = result.replay[0]
    assert rep["truncated"].sum() == 2 * 2  # 2 envs, 2 time limits each
    assert not rep["terminated"].any()
    assert (rep["step"][rep["truncated"]] == limit - 1).all()
    assert len(rep["obs"]) == cfg.total_steps - 2 * 2  # the 4 autoreset steps (weight 0) are not exported


def test_bellman_target_bootstraps_unless_terminated():
    from metadqn.dqn.trainer import bellman_target

    y = bellman_target(torch.tensor([1.0, 1.0, -2.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([4.0, 4.0, 6.0]),
                       GAMMA)
    torch.testing.assert_close(y, torch.tensor([1.0 + GAMMA * 4.0, 1.0, -2.0 + GAMMA * 6.0]))
