"""A replay buffer per task, all tasks' buffers stored as one set of [K, N, ...] tensors."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class ReplayBatch(NamedTuple):
    """One sampled batch for every slot: tensors shaped [K, B, ...]."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    terminated: Tensor
    weights: Tensor
    """1 for real transitions, 0 for the autoreset step after an episode end (masked out of the loss)."""


class BatchedReplayBuffer:
    """Circular buffers of ``capacity`` transitions for each of K slots, filled in lockstep.

    All slots step together, so they share one write position; E transitions per slot arrive per vector
    step and the capacity is rounded up to a multiple of E. Autoreset steps (gymnasium's NEXT_STEP mode)
    are stored with weight 0 rather than skipped, which keeps the lockstep layout and costs <1% of the
    capacity at CartPole's episode lengths.
    """

    def __init__(self, n_slots: int, capacity: int, obs_dim: int, envs_per_slot: int, device: torch.device):
        e = envs_per_slot
        self.capacity = ((capacity + e - 1) // e) * e
        self.n_slots, self.envs_per_slot, self.obs_dim, self.device = n_slots, e, obs_dim, device
        k, n, d = n_slots, self.capacity, obs_dim
        # Everything a TD update reads is packed in one float tensor, so sampling is one gather:
        # [obs (d) | next_obs (d) | action | reward | terminated | weight]. Actions are small integers,
        # exact in float32.
        self.data = torch.zeros(k, n, 2 * d + 4, device=device)
        self.truncated = torch.zeros(k, n, dtype=torch.bool, device=device)
        self.episode = torch.zeros(k, n, dtype=torch.int64, device=device)
        self.step = torch.zeros(k, n, dtype=torch.int64, device=device)
        self.pos = 0
        self.size = 0
        self._slot_index = torch.arange(k, device=device).unsqueeze(1)

    def add(self, obs: Tensor, actions: Tensor, rewards: Tensor, next_obs: Tensor, terminated: Tensor,
            truncated: Tensor, valid: Tensor, episode: Tensor, step: Tensor) -> None:
        """Each argument shaped [K, E, ...] (one vector-env step)."""
        sl = slice(self.pos, self.pos + self.envs_per_slot)
        scalars = torch.stack([actions.float(), rewards.float(), terminated.float(), valid.float()], dim=-1)
        self.data[:, sl] = torch.cat([obs, next_obs, scalars], dim=-1)
        self.truncated[:, sl] = truncated.bool()
        self.episode[:, sl] = episode
        self.step[:, sl] = step
        self.pos = (self.pos + self.envs_per_slot) % self.capacity
        self.size = min(self.size + self.envs_per_slot, self.capacity)

    def extend(self, transitions: list[dict[str, np.ndarray]]) -> None:
        """Writes the same number n of transitions into every slot (e.g. a task's context before fine-tuning).

        Arrays are per slot: obs [n, d], action, reward, next_obs, terminated, truncated, episode, step.
        n is padded with weight-0 rows to a multiple of E, so later vector steps stay aligned.
        """
        n = len(transitions[0]["action"])
        if any(len(t["action"]) != n for t in transitions) or len(transitions) != self.n_slots:
            raise ValueError("extend() needs one transition set per slot, all of the same length")
        e = self.envs_per_slot
        padded = -(-n // e) * e
        if padded > self.capacity:
            raise ValueError(f"{n} transitions do not fit a replay of capacity {self.capacity}")

        def stack(key: str, dtype: torch.dtype) -> Tensor:
            arr = torch.stack([torch.as_tensor(np.asarray(t[key])) for t in transitions]).to(dtype)
            pad = torch.zeros(self.n_slots, padded - n, *arr.shape[2:], dtype=dtype)
            return torch.cat([arr, pad], 1).view(self.n_slots, padded // e, e, *arr.shape[2:]).to(self.device)

        obs, nxt = stack("obs", torch.float32), stack("next_obs", torch.float32)
        cols = [stack(k, torch.float32) for k in ("action", "reward", "terminated", "truncated")]
        ep, st = stack("episode", torch.int64), stack("step", torch.int64)
        valid = torch.cat([torch.ones(self.n_slots, n), torch.zeros(self.n_slots, padded - n)], 1)
        valid = valid.view(self.n_slots, padded // e, e).to(self.device)
        for i in range(padded // e):
            self.add(obs[:, i], cols[0][:, i], cols[1][:, i], nxt[:, i], cols[2][:, i], cols[3][:, i], valid[:, i],
                     ep[:, i], st[:, i])

    def _unpack(self, rows: Tensor) -> ReplayBatch:
        d = self.obs_dim
        return ReplayBatch(rows[..., :d].contiguous(), rows[..., 2 * d].long(), rows[..., 2 * d + 1],
                           rows[..., d:2 * d].contiguous(),
                           rows[..., 2 * d + 2], rows[..., 2 * d + 3])

    def sample(self, batch_size: int, generator: torch.Generator) -> ReplayBatch:
        idx = torch.randint(0, self.size, (self.n_slots, batch_size), generator=generator, device=self.device)
        return self._unpack(self.data[self._slot_index, idx])

    def latest(self, slot: int, n: int) -> dict[str, np.ndarray]:
        """Up to ``n`` most recent real transitions of one slot, oldest first, as numpy arrays."""
        order = (torch.arange(self.size, device=self.device) + (self.pos - self.size)) % self.capacity
        batch = self._unpack(self.data[slot])
        order = order[batch.weights[order] > 0][-n:] if n > 0 else order[:0]
        return {
            "obs": batch.obs[order].cpu().numpy(),
            "action": batch.actions[order].cpu().numpy(),
            "reward": batch.rewards[order].cpu().numpy(),
            "next_obs": batch.next_obs[order].cpu().numpy(),
            "terminated": batch.terminated[order].cpu().numpy().astype(bool),
            "truncated": self.truncated[slot, order].cpu().numpy(),
            "episode": self.episode[slot, order].cpu().numpy(),
            "step": self.step[slot, order].cpu().numpy(),
        }
