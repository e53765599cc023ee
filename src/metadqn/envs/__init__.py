"""Task families, their vector environments and the per-split task sampler."""

from metadqn.envs.families import FAMILIES, Family, ParamSpec, get_family
from metadqn.envs.sampling import SPLITS, sample_tasks, task_matrix

__all__ = ["FAMILIES", "SPLITS", "Family", "ParamSpec", "get_family", "sample_tasks", "task_matrix"]
