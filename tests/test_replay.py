"""The per-slot circular replay buffer: capacity, wrap-around, weight-0 (autoreset / padding) rows, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metadqn.dqn.replay import BatchedReplayBuffer

CPU = torch.device("cpu")
D = 3  # obs_dim


def _obs_value(slot: int, t: int) -> float:
    """Every transition is identifiable: obs[0] encodes its slot and its global index t (never 0)."""
    return 1000.0 * slot + t + 1


def _step(buf: BatchedReplayBuffer, first_t: int, valid: np.ndarray | None = None) -> list[int]:
    """Adds one vector step (E transitions per slot) numbered first_t, first_t + 1, ...; returns their t."""
    k, e = buf.n_slots, buf.envs_per_slot
    ts = np.arange(first_t, first_t + e)
    obs = torch.tensor([[[_obs_value(s, t)] * D for t in ts] for s in range(k)], dtype=torch.float32)
    t_grid = torch.as_tensor(np.tile(ts, (k, 1)))
    slot_grid = torch.arange(k).unsqueeze(1).expand(k, e)
    buf.add(obs=obs, actions=t_grid % 3, rewards=t_grid * 0.5 + slot_grid, next_obs=obs + 0.25,
            terminated=(t_grid % 4 == 3), truncated=(t_grid % 5 == 4),
            valid=torch.ones(k, e, dtype=torch.bool) if valid is None else torch.as_tensor(valid).expand(k, e),
            episode=t_grid // 7, step=t_grid % 7 + 10 * slot_grid)
    return list(ts)


def _check_rows(slot: int, got: dict[str, np.ndarray], ts: list[int]) -> None:
    """``got`` (from ``latest``) holds exactly transitions ``ts`` of ``slot``, in that order, every field intact."""
    ts_arr = np.asarray(ts)
    np.testing.assert_array_equal(got["obs"], np.repeat([[_obs_value(slot, t)] for t in ts], D, axis=1).reshape(-1, D))
    np.testing.assert_array_equal(got["next_obs"], got["obs"] + 0.25)
    np.testing.assert_array_equal(got["action"], ts_arr % 3)
    np.testing.assert_array_equal(got["reward"], (ts_arr * 0.5 + slot).astype(np.float32))
    np.testing.assert_array_equal(got["terminated"], ts_arr % 4 == 3)
    np.testing.assert_array_equal(got["truncated"], ts_arr % 5 == 4)
    np.testing.assert_array_equal(got["episode"], ts_arr // 7)
    np.testing.assert_array_equal(got["step"], ts_arr % 7 + 10 * slot)


@pytest.mark.parametrize(("capacity", "e", "expected"), [(10, 1, 10), (10, 3, 12), (10, 5, 10), (1, 4, 4)])
def test_capacity_is_rounded_up_to_a_multiple_of_the_envs_per_slot(capacity, e, expected):
    buf = BatchedReplayBuffer(2, capacity, D, e, CPU)
    assert buf.capacity == expected
    t = 0
    for _ in range(3 * expected // e + 1):  # fills, then wraps: every step must land on whole E-row blocks
        t += len(_step(buf, t))
    assert buf.size == expected
    _check_rows(1, buf.latest(1, expected), list(range(t - expected, t)))


def test_before_wrapping_the_buffer_holds_everything_in_order():
    buf = BatchedReplayBuffer(2, 6, D, 2, CPU)
    ts = _step(buf, 0) + _step(buf, 2)
    assert buf.size == 4 and buf.pos == 4
    for slot in range(2):
        _check_rows(slot, buf.latest(slot, 100), ts)


def test_wrap_around_overwrites_the_oldest_and_keeps_the_latest_capacity_transitions():
    buf = BatchedReplayBuffer(2, 6, D, 2, CPU)
    t = 0
    for _ in range(5):  # 10 transitions per slot into a capacity of 6
        t += len(_step(buf, t))
    assert buf.size == 6 and buf.pos == 10 % 6
    for slot in range(2):
        _check_rows(slot, buf.latest(slot, 100), [4, 5, 6, 7, 8, 9])  # oldest first, 0..3 overwritten
        _check_rows(slot, buf.latest(slot, 3), [7, 8, 9])
        stored = set(buf.data[slot, :, 0].tolist())
        assert stored == {_obs_value(slot, t) for t in range(4, 10)}
    assert buf.latest(0, 0)["obs"].shape == (0, D)


def test_weight_zero_rows_are_kept_in_place_but_are_not_real_transitions():
    buf = BatchedReplayBuffer(1, 8, D, 2, CPU)
    _step(buf, 0)
    _step(buf, 2, valid=np.array([False, True]))  # t=2 is an autoreset step
    _step(buf, 4, valid=np.array([True, False]))  # t=5 too
    assert buf.size == 6  # stored, keeping the lockstep layout ...
    _check_rows(0, buf.latest(0, 100), [0, 1, 3, 4])  # ... but never exported
    _check_rows(0, buf.latest(0, 2), [3, 4])
    gen = torch.Generator().manual_seed(0)
    batch = buf.sample(512, gen)
    t_of = batch.obs[0, :, 0].long() - 1
    np.testing.assert_array_equal(batch.weights[0].numpy(), (~np.isin(t_of.numpy(), [2, 5])).astype(np.float32))


def test_sampling_draws_only_stored_rows_of_each_slot_with_consistent_fields():
    buf = BatchedReplayBuffer(3, 12, D, 2, CPU)
    t = 0
    for _ in range(3):  # 6 of 12 rows filled: the empty (all-zero) half must never be drawn
        t += len(_step(buf, t))
    gen = torch.Generator().manual_seed(1)
    for filled in (range(0, 6), None):
        batch = buf.sample(400, gen)
        assert batch.obs.shape == (3, 400, D) and batch.actions.dtype == torch.int64
        for slot in range(3):
            t_of = (batch.obs[slot, :, 0] - 1000.0 * slot - 1).long().numpy()
            allowed = set(filled) if filled is not None else set(range(t - 12, t))
            assert set(t_of) == allowed  # all of them drawn (400 draws of <= 12 rows), nothing else
            np.testing.assert_array_equal(batch.obs[slot].numpy(), np.repeat(batch.obs[slot, :, :1].numpy(), D, 1))
            np.testing.assert_array_equal(batch.next_obs[slot].numpy(), batch.obs[slot].numpy() + 0.25)
            np.testing.assert_array_equal(batch.actions[slot].numpy(), t_of % 3)
            np.testing.assert_array_equal(batch.rewards[slot].numpy(), (t_of * 0.5 + slot).astype(np.float32))
            np.testing.assert_array_equal(batch.terminated[slot].numpy(), (t_of % 4 == 3).astype(np.float32))
            assert (batch.weights[slot] == 1).all()
        for _ in range(6):  # now wrap: 12 more transitions, the first 6 are gone
            t += len(_step(buf, t))


def _transitions(n: int, slot: int) -> dict[str, np.ndarray]:
    t = np.arange(n)
    obs = np.repeat([[_obs_value(slot, i)] for i in t], D, axis=1).astype(np.float32)
    return {"obs": obs, "next_obs": obs + 0.25, "action": t % 3, "reward": t * 0.5 + slot,
            "terminated": t % 4 == 3, "truncated": t % 5 == 4, "episode": t // 7, "step": t % 7 + 10 * slot}


def test_extend_pads_with_weight_zero_rows_so_later_steps_stay_aligned():
    buf = BatchedReplayBuffer(2, 16, D, 4, CPU)
    buf.extend([_transitions(5, 0), _transitions(5, 1)])
    assert buf.size == 8 and buf.pos == 8  # 5 rounded up to 2 vector steps of E=4
    np.testing.assert_array_equal(buf.data[:, :8, -1].numpy(), [[1] * 5 + [0] * 3] * 2)
    for slot in range(2):
        _check_rows(slot, buf.latest(slot, 100), list(range(5)))
    _step(buf, 100)  # the next vector step fills rows 8..11, one whole block
    assert buf.pos == 12 and buf.size == 12
    for slot in range(2):
        got = buf.latest(slot, 100)
        expected_t = [0, 1, 2, 3, 4, 100, 101, 102, 103]
        np.testing.assert_array_equal(got["obs"][:, 0], [_obs_value(slot, t) for t in expected_t])


def test_extend_refuses_what_does_not_fit():
    buf = BatchedReplayBuffer(2, 8, D, 4, CPU)
    with pytest.raises(ValueError, match="one transition set per slot"):
        buf.extend([_transitions(4, 0)])  # one slot missing
    with pytest.raises(ValueError, match="one transition set per slot"):
        buf.extend([_transitions(4, 0), _transitions(3, 1)])  # lengths differ
    with pytest.raises(ValueError, match="do not fit a replay of capacity 8"):
        buf.extend([_transitions(9, 0), _transitions(9, 1)])
    assert buf.size == 0 and buf.pos == 0  # nothing half-written
    buf.extend([_transitions(8, 0), _transitions(8, 1)])  # exactly full is fine
    assert buf.size == 8
