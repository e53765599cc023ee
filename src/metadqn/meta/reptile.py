"""Optimisation-based meta-learner: Reptile (Nichol et al. 2018) over DQN, batched over tasks.

Outer step: ``theta <- theta + eps * (mean_t theta_t - theta)``, eps decaying linearly to 0, where theta_t
is theta after the inner loop on training task t. Two inner loops (``meta_train.reptile.inner_loop``):

online (default): a short online DQN run from theta on every training task at once (one batched trainer
run, the dqn section's settings, ``inner_env_steps`` per task), i.e. the very procedure the initialisation
will be fine-tuned with, so the outer step moves theta towards where a few thousand steps of DQN take it.

offline (the first version, kept for comparison): ``inner_steps`` Adam steps of the Huber TD loss on
each training task's stored transitions (the expert's rollouts and the end of its replay buffer), with
targets from the current initialisation. It started at 0.02 of the expert and learned slower than scratch.
"""

from __future__ import annotations

import torch

from metadqn.dqn.qnetwork import BatchedQNetwork, StateDict, init_state_dict
from metadqn.dqn.replay import ReplayBatch
from metadqn.dqn.trainer import make_optimizer, td_loss
from metadqn.seeding import Salt, derive_seed


def fit_reptile(data, params) -> tuple[StateDict, list[tuple[str, int, float]]]:
    if params.meta_train.reptile.inner_loop == "online":
        return fit_reptile_online(data, params)
    return fit_reptile_offline(data, params)


def fit_reptile_online(data, params) -> tuple[StateDict, list[tuple[str, int, float]]]:
    from metadqn.dqn.trainer import train_dqn

    cfg, family = params.meta_train.reptile, data.family
    dqn = params.dqn.model_copy(update={"total_steps": cfg.inner_env_steps})
    seed = derive_seed(params.meta_train.seed, Salt.REPTILE)
    theta = init_state_dict(family.obs_dim, family.n_actions, dqn.hidden_sizes, seed)
    tasks = data.train.matrix
    curves = []
    for it in range(cfg.meta_iterations):
        inner_seed = derive_seed(seed, it)
        adapted = train_dqn(family, tasks, dqn, inner_seed, init=[theta] * len(tasks), evaluate=False).final_params
        eps = cfg.outer_step * (1.0 - it / cfg.meta_iterations)
        mean = {k: torch.stack([a[k] for a in adapted]).mean(0) for k in theta}
        step = sum(float(((mean[k] - v) ** 2).sum()) for k, v in theta.items()) ** 0.5
        theta = {k: v + eps * (mean[k] - v) for k, v in theta.items()}
        curves.append(("reptile/outer_step_norm", it + 1, step))
    return theta, curves


def fit_reptile_offline(data, params) -> tuple[StateDict, list[tuple[str, int, float]]]:
    cfg, dqn, family = params.meta_train.reptile, params.dqn, data.family
    hidden = dqn.hidden_sizes
    seed = derive_seed(params.meta_train.seed, Salt.REPTILE)
    gen = torch.Generator().manual_seed(seed)
    theta = init_state_dict(family.obs_dim, family.n_actions, hidden, seed)
    t = data.transitions.actions.shape[0]
    net = BatchedQNetwork(t, family.obs_dim, family.n_actions, hidden)
    target = BatchedQNetwork(t, family.obs_dim, family.n_actions, hidden)
    curves = []
    for it in range(cfg.meta_iterations):
        net.load_slots([theta] * t)
        target.load_slots([theta] * t)
        opt = make_optimizer(list(net.parameters()), cfg.inner_learning_rate)
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

