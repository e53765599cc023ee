"""Baseline: one DQN trained online on every training task at once, with no task information.

Domain randomisation: a single Q-network steps one environment per training task (each with its own
physics) through the same batched trainer, with the ``dqn`` hyperparameters and
``meta_train.multitask.total_steps`` environment steps in all. It is the honest bar meta-learning must
clear; on ``cartpole-mirrored`` it cannot (no single policy serves both push directions).
"""

from __future__ import annotations

from metadqn.dqn.qnetwork import StateDict
from metadqn.dqn.trainer import train_dqn
from metadqn.seeding import Salt, derive_seed


def fit_multitask(data, params) -> tuple[StateDict, list[tuple[str, int, float]]]:
    cfg = params.dqn.model_copy(update={"total_steps": params.meta_train.multitask.total_steps})
    seed = derive_seed(params.meta_train.seed, Salt.MULTITASK)
    result = train_dqn(data.family, data.train.matrix[None], cfg, seed, evaluate=False)
    return result.final_params[0], []
