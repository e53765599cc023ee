"""DQN: the Q-network, per-task replay, and the batched multi-task trainer."""

from metadqn.dqn.qnetwork import BatchedQNetwork, QNetwork, StateDict, init_state_dict
from metadqn.dqn.replay import BatchedReplayBuffer, ReplayBatch
from metadqn.dqn.rollout import GreedyEvaluator, collect_transitions
from metadqn.dqn.trainer import TrainResult, train_dqn

__all__ = [
    "BatchedQNetwork", "BatchedReplayBuffer", "GreedyEvaluator", "QNetwork", "ReplayBatch", "StateDict",
    "TrainResult", "collect_transitions", "init_state_dict", "train_dqn",
]
