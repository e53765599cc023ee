"""A task's dynamics fitted to its context and a policy simulated in it (metadqn.meta.dynamics), and the
``model`` score built on them: select's chooser and siamese's re-ranking of its nearest experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metadqn.dqn.qnetwork import n_params, param_shapes
from metadqn.envs import get_family
from metadqn.evaluation.protocol import contexts
from metadqn.meta.context import features_from_arrays
from metadqn.meta.dynamics import ModelScore, fit_linear, model_shortfall, simulated_steps, start_states, termination
from metadqn.meta.model import MetaModel, MetaModelConfig
from metadqn.meta.select import SelectQ
from metadqn.meta.siamese import SiameseIndex

FAMILY = get_family("cartpole-mirrored")
HIDDEN = [8, 8]
SHAPES = param_shapes(FAMILY.obs_dim, FAMILY.n_actions, HIDDEN)


def _lean_controller(sign: float) -> torch.Tensor:
    """A Q-network whose greedy action pushes toward theta + 0.5 theta_dot (the one-line balancer) when
    sign is +1, and the other way when it is -1: Q(s, 1) = sign z, Q(s, 0) = -sign z."""
    flat = torch.zeros(n_params(FAMILY.obs_dim, FAMILY.n_actions, HIDDEN))
    (w1, b1, w2, b2, w3, b3) = (torch.zeros(s) for _, s in SHAPES)
    w1[0, 2], w1[0, 3], w1[1, 2], w1[1, 3] = 1.0, 0.5, -1.0, -0.5  # h = relu(z), relu(-z)
    w2[0, 0], w2[1, 1] = 1.0, 1.0
    w3[1, 0], w3[1, 1], w3[0, 0], w3[0, 1] = sign, -sign, -sign, sign
    flat.copy_(torch.cat([t.flatten() for t in (w1, b1, w2, b2, w3, b3)]))
    return flat


def _context(tasks: np.ndarray, seed: int = 3) -> torch.Tensor:
    ctx = contexts(FAMILY, tasks, 64, seed)
    return torch.as_tensor(np.stack([features_from_arrays(tr, FAMILY) for tr in ctx]))


def _task(force_sign: float, force: float = 10.0, length: float = 0.5) -> list[float]:
    return [force, length, 0.1, 1.0, 9.8, force_sign]  # the family's parameter order


def test_fit_linear_recovers_a_linear_system_exactly():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4 + 2, 4, generator=gen) * 0.1
    obs = torch.randn(1, 40, 4, generator=gen)
    action = torch.randint(0, 2, (1, 40), generator=gen)
    x = torch.cat([obs, torch.nn.functional.one_hot(action, 2).float()], -1)
    torch.testing.assert_close(fit_linear(obs, action, obs + x @ w, 2, ridge=1e-9), w, atol=1e-4, rtol=0)


def test_cartpole_termination_uses_gymnasium_thresholds():
    done = termination(FAMILY)
    s = torch.tensor([[0.0, 0, 0.2, 0], [0.0, 0, 0.21, 0], [-2.41, 0, 0, 0], [2.39, 5, -0.2, -5]])
    assert done(s).tolist() == [False, True, True, False]
    starts = start_states(FAMILY, 8)
    assert starts.shape == (8, 4) and starts.abs().max() <= 0.05 and not done(starts).any()


def test_the_right_balancer_outlasts_the_wrong_one_in_each_push_direction():
    tasks = np.array([_task(1.0), _task(-1.0), _task(-1.0, force=1.5, length=0.9)])
    ctx = _context(tasks)
    flat = torch.stack([_lean_controller(1.0), _lean_controller(-1.0)]).expand(3, 2, -1)
    short = model_shortfall(flat, ctx, FAMILY, SHAPES, n_starts=8, ridge=1e-3)
    # sign +1 task: the balancer lasts the whole episode in the model, its mirror falls within ~a second
    assert short[0, 0] < 10 and short[0, 1] > 400
    # mirrored tasks (also a weak motor with a long pole, outside the training ranges): the other way round
    assert short[1, 1] < 10 and short[1, 0] > 400
    # the weak motor: in the environment the balancer lasts 500 steps and its mirror 26; the linear model
    # is less sure of the balancer (it lasted ~280 of 500 there with one context draw, ~200 with today's, since
    # every env resets from its own stream) but ranks the two the same way, by over a hundred steps
    assert short[2, 1] < short[2, 0] - 100


def test_simulated_steps_stop_at_the_horizon_and_at_termination():
    # a model where nothing moves: every policy lasts the horizon; one where theta grows fast: it falls
    still = torch.zeros(1, 6, 4)
    falling = torch.zeros(1, 6, 4)
    falling[0, 4, 2] = falling[0, 5, 2] = 0.05  # each step adds 0.05 rad, whatever the action
    flat = _lean_controller(1.0).expand(1, 1, -1)
    starts = torch.zeros(2, 4)
    assert simulated_steps(flat, still, starts, SHAPES, 2, termination(FAMILY), 37).item() == 37
    assert simulated_steps(flat, falling, starts, SHAPES, 2, termination(FAMILY), 500).item() == 5  # 0.25 > 0.2095


@pytest.mark.parametrize("score", ["model", "squared"])
def test_select_with_the_model_score_picks_the_right_push_direction(score):
    """Over several context draws, the model score always starts each task from the balancer that pushes
    its way; the TD error does not (these hand-made networks' values are not Bellman-consistent anywhere,
    so what it picks depends on the draw)."""
    tasks = np.array([_task(1.0), _task(-1.0)])
    fixed = torch.stack([_lean_controller(-1.0), _lean_controller(1.0)])
    select = SelectQ(FAMILY, HIDDEN, None, None, fixed, 1, 0.99, ["a", "b"], score)
    picks = [select.choose(_context(tasks, seed))[1].tolist() for seed in range(1, 7)]
    if score == "model":
        assert all(pick == [1, 0] for pick in picks)
    else:
        assert not all(pick == [1, 0] for pick in picks), picks


class _ConstantEncoder(torch.nn.Module):
    """Embeds every context at the origin: the index's nearest expert is then fixed by its embeddings."""

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ctx.shape[0], 1)


def _mirrored_first_index(rerank: int) -> SiameseIndex:
    """Two experts, the mirror-pushing one nearest to every task, the other at twice its distance."""
    experts = torch.stack([_lean_controller(-1.0), _lean_controller(1.0)])
    return SiameseIndex(_ConstantEncoder(), torch.tensor([[1.0], [2.0]]), experts, ["mirror", "right"], 1,  # type: ignore[arg-type]
                        rerank, ModelScore(FAMILY, SHAPES))


def test_siamese_rerank_starts_from_the_expert_that_lasts_in_the_context_model():
    tasks = np.array([_task(1.0), _task(1.0, force=6.0, length=0.8)])  # the second is out of range
    ctx = _context(tasks)
    mirror, right = _lean_controller(-1.0), _lean_controller(1.0)
    nearest = _mirrored_first_index(0).init_flat(ctx)
    assert all(torch.equal(row, mirror) for row in nearest)
    reranked = _mirrored_first_index(2).init_flat(ctx)
    assert all(torch.equal(row, right) for row in reranked)


def test_siamese_rerank_survives_saving_and_a_legacy_config_loads(tmp_path):
    from metadqn.meta.context import build_encoder

    experts = torch.stack([_lean_controller(-1.0), _lean_controller(1.0)])
    index = SiameseIndex(build_encoder("deepset", FAMILY, 16, 4, False), torch.zeros(2, 4), experts, ["a", "b"], 1,
                         2, ModelScore(FAMILY, SHAPES, starts=5))
    cfg = MetaModelConfig("siamese", FAMILY.name, HIDDEN, 64, embed_dim=4, encoder_hidden=16, task_ids=["a", "b"],
                          rerank=2, model_starts=5)
    MetaModel(cfg, module=index).save(tmp_path / "m")
    loaded = MetaModel.load(tmp_path / "m").module
    assert isinstance(loaded, SiameseIndex) and loaded.rerank == 2
    assert loaded.score is not None and loaded.score.starts == 5
    # a config.json written before the model score was shared names its settings select_model_*
    raw = (tmp_path / "m" / "config.json").read_text().replace('"model_starts"', '"select_model_starts"')
    (tmp_path / "m" / "config.json").write_text(raw)
    assert MetaModel.load(tmp_path / "m").config.model_starts == 5
