"""A trained meta-model on disk and in memory: whatever the learner, it turns a new task's context into
the initial parameters of an ordinary ``QNetwork``.

Layout of ``models/meta/<name>/``: ``config.json`` (architecture, family, context size, learner) and
``model.pt`` (a state_dict, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from metadqn.data.io import atomic_path, load_state_dict, save_state_dict
from metadqn.dqn.qnetwork import StateDict, param_shapes, unflatten_state_dict
from metadqn.envs.families import get_family
from metadqn.learners import get_learner
from metadqn.meta.context import build_encoder


@dataclass
class MetaModelConfig:
    learner: str
    family: str
    q_hidden: list[int]
    context_size: int
    encoder: str = "deepset"
    embed_dim: int = 32
    encoder_hidden: int = 128
    hidden: int = 256
    k: int = 1
    task_ids: list[str] = field(default_factory=list)
    n_physics: int = 0
    fixed_names: list[str] = field(default_factory=list)
    """select: the learner of each fixed candidate network (the rows of SelectQ.fixed)."""
    select_score: str = "squared"
    """select: how it scores the candidates on the context (``meta_train.select.score``)."""
    model_starts: int = 8
    """select and siamese's re-ranking: the model score's start states (``meta_train.model_score.starts``)."""
    model_ridge: float = 1e-3
    """select and siamese's re-ranking: the model score's ridge term (``meta_train.model_score.ridge``)."""
    rerank: int = 0
    """siamese: how many nearest experts the model score chooses among, 0 for off (``siamese.rerank``)."""

    @property
    def uses_context(self) -> bool:
        return get_learner(self.learner).task_input == "context"

    @property
    def uses_physics(self) -> bool:
        return get_learner(self.learner).task_input == "physics"


class MetaModel:
    """Initial Q-network parameters for new tasks, from their contexts (or physics, for the oracle)."""

    def __init__(self, config: MetaModelConfig, module: nn.Module | None = None, theta: StateDict | None = None):
        self.config, self.module, self.theta = config, module, theta
        family = get_family(config.family)
        self.family = family
        self.shapes = param_shapes(family.obs_dim, family.n_actions, config.q_hidden)

    @torch.no_grad()
    def initial_params(self, context: Tensor | None = None, physics: Tensor | None = None,
                       n_tasks: int | None = None) -> list[StateDict]:
        """One QNetwork state_dict per task: context [T, C, F] (hypernet, siamese), physics [T, P] (oracle)."""
        from metadqn.meta.hypernet import HyperQ
        from metadqn.meta.select import SelectQ
        from metadqn.meta.siamese import SiameseIndex

        if isinstance(self.module, HyperQ):
            x = physics if self.config.uses_physics else context
            if x is None:
                need = "physics" if self.config.uses_physics else "context"
                raise ValueError(f"{self.config.learner} needs a {need} input")
            return self.module.generate(x)
        if isinstance(self.module, (SiameseIndex, SelectQ)):
            if context is None:
                raise ValueError(f"{self.config.learner} needs a context input")
            flat = self.module.init_flat(context)
            return [{k: v.clone() for k, v in unflatten_state_dict(row, self.shapes).items()} for row in flat]
        assert self.theta is not None, "a MetaModel holds a module or theta"
        n = n_tasks or (context.shape[0] if context is not None else physics.shape[0] if physics is not None else 1)
        return [{k: v.clone() for k, v in self.theta.items()} for _ in range(n)]

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "config.json") as tmp:
            tmp.write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        sd = self.theta if self.module is None else self.module.state_dict()
        assert sd is not None, "a MetaModel holds a module or theta"
        save_state_dict(folder / "model.pt", sd)

    @classmethod
    def load(cls, folder: Path | str) -> MetaModel:
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder}: no meta-model here (run `dvc repro meta_train`)")
        raw = json.loads((folder / "config.json").read_text())
        for legacy, key in _RENAMED.items():  # models saved before the model score was shared
            if legacy in raw:
                raw[key] = raw.pop(legacy)
        cfg = MetaModelConfig(**raw)
        sd = load_state_dict(folder / "model.pt")
        kind = get_learner(cfg.learner).module
        if kind == "init":
            return cls(cfg, theta=sd)
        module = _build(kind, cfg, sd)
        module.load_state_dict(sd)
        return cls(cfg, module=module.eval())


_RENAMED = {"select_model_starts": "model_starts", "select_model_ridge": "model_ridge"}
"""config.json keys of older saved models -> today's names."""


def _build(kind: str, cfg: MetaModelConfig, sd: StateDict) -> nn.Module:
    """An untrained module of ``kind`` shaped to hold ``sd`` (a saved state_dict)."""
    from metadqn.meta.dynamics import ModelScore
    from metadqn.meta.hypernet import HyperQ
    from metadqn.meta.select import SelectQ
    from metadqn.meta.siamese import SiameseIndex

    family = get_family(cfg.family)
    score = ModelScore(family, param_shapes(family.obs_dim, family.n_actions, cfg.q_hidden), cfg.model_starts,
                       cfg.model_ridge)
    if kind == "select":
        # its parts, under the prefixes SelectQ gives them
        def part(prefix: str) -> StateDict:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

        hyper, index = part("hypernet."), part("index.")
        return SelectQ(family, cfg.q_hidden, _build("hypernet", cfg, hyper) if hyper else None,  # type: ignore[arg-type]
                       _build("index", cfg, index) if index else None,  # type: ignore[arg-type]
                       torch.zeros_like(sd["fixed"]), cfg.k, float(sd["gamma"]), cfg.fixed_names, cfg.select_score,
                       float(sd["margin"]) if "margin" in sd else 1.0, score)
    # the action effect's buffers exist only where the encoder reads it (meta_train.action_effect)
    encoder = build_encoder("oracle" if cfg.uses_physics else cfg.encoder, family, cfg.encoder_hidden,
                            cfg.embed_dim, "encoder.effect.lo" in sd, cfg.n_physics)
    if kind == "hypernet":
        net = HyperQ(encoder, cfg.embed_dim, cfg.hidden, family.obs_dim, family.n_actions, cfg.q_hidden, base_seed=0)
        if "gate_points" in sd:  # the gate's buffers exist only when it is on; shaped like the saved ones
            net.set_gate(torch.zeros_like(sd["gate_points"]))
        return net
    n, p = sd["expert_flat"].shape
    return SiameseIndex(encoder, torch.zeros(n, cfg.embed_dim), torch.zeros(n, p), cfg.task_ids, cfg.k, cfg.rerank,
                        score)
