"""Optimisation-based meta-learner: Reptile (Nichol et al. 2018) over DQN, batched over tasks.

Inner loop: offline DQN on each training task's stored transitions (the expert's rollouts and the end
of its replay buffer), ``inner_steps`` Adam steps of the Huber TD loss with targets from the current
initialisation; every training task runs at once as one slot of the batched Q-network. Outer step:
``theta <- theta + eps * (mean_t theta_t - theta)``, eps decaying linearly to 0. Offline rather than online
inner loops: the stored data already covers each task, and the whole meta-training stays within minutes.
"""

from __future__ import annotations

import numpy as np
import torch

from metadqn.dqn.qnetwork import BatchedQNetwork, StateDict, init_state_dict
from metadqn.dqn.replay import ReplayBatch
from metadqn.dqn.trainer import td_loss


def fit_reptile(data, params) -> tuple[StateDict, list[tuple[str, int, float]]]:
    cfg, dqn, family = params.meta_train.reptile, params.dqn, data.family
    hidden = dqn.hidden_sizes
    seed = int(np.random.SeedSequence([params.meta_train.seed, 7]).generate_state(1)[0])
    gen = torch.Generator().manual_seed(seed)
    theta = init_state_dict(family.obs_dim, family.n_actions, hidden, seed)
    t = data.transitions.actions.shape[0]
    net = BatchedQNetwork(t, family.obs_dim, family.n_actions, hidden)
    target = BatchedQNetwork(t, family.obs_dim, family.n_actions, hidden)
    curves = []
    for it in range(cfg.meta_iterations):
        net.load_slots([theta] * t)
        target.load_slots([theta] * t)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.inner_learning_rate)
        for _ in range(cfg.inner_steps):
            obs, actions, rewards, next_obs, terminated = data.transitions.sample(cfg.batch_size, gen)
            batch = ReplayBatch(obs, actions, rewards, next_obs, terminated, torch.ones_like(rewards))
            loss = td_loss(net, target, batch, dqn.gamma, dqn.double_dqn).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        eps = cfg.outer_step * (1.0 - it / cfg.meta_iterations)
        adapted = net.state_dicts()
        theta = {k: v + eps * (torch.stack([a[k] for a in adapted]).mean(0) - v) for k, v in theta.items()}
        if (it + 1) % 10 == 0:
            curves.append(("reptile/inner_td", it + 1, loss.item()))
    return theta, curves

