"""The ``select`` learner: the context's TD error chooses among other learners' starts (metadqn.meta.select)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metadqn.config import ParamsError, load_params
from metadqn.dqn import QNetwork, init_state_dict
from metadqn.dqn.qnetwork import flatten_state_dict, n_params, param_shapes, unflatten_state_dict
from metadqn.envs import get_family
from metadqn.meta.context import ContextEncoder, feature_dim, features_from_arrays, transitions_from_features
from metadqn.meta.hypernet import HyperQ
from metadqn.meta.model import MetaModel, MetaModelConfig
from metadqn.meta.select import SelectQ, td_errors
from metadqn.meta.siamese import SiameseIndex
from tests.conftest import ROOT

FAMILY = get_family("cartpole-mirrored")
HIDDEN = [16, 16]
SHAPES = param_shapes(FAMILY.obs_dim, FAMILY.n_actions, HIDDEN)
P = n_params(FAMILY.obs_dim, FAMILY.n_actions, HIDDEN)


def _transitions(n: int, seed: int, reward: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, FAMILY.obs_dim)).astype(np.float32)
    return {"obs": obs, "next_obs": obs + rng.normal(scale=0.1, size=obs.shape).astype(np.float32),
            "action": rng.integers(0, FAMILY.n_actions, n), "reward": np.full(n, reward, np.float32),
            "terminated": (rng.random(n) < 0.2).astype(np.float32)}


def _context(tasks: int, n: int = 12, reward: float = 1.0) -> torch.Tensor:
    return torch.as_tensor(np.stack([features_from_arrays(_transitions(n, s, reward), FAMILY) for s in range(tasks)]))


def _constant(value: float) -> torch.Tensor:
    """A network whose every Q-value is ``value`` (zero weights, output bias ``value``)."""
    flat = torch.zeros(P)
    flat[-FAMILY.n_actions:] = value
    return flat


def test_transitions_from_features_inverts_the_features():
    tr = _transitions(9, 0)
    back = transitions_from_features(torch.as_tensor(features_from_arrays(tr, FAMILY)).unsqueeze(0), FAMILY)
    for key in ("obs", "reward", "terminated"):
        np.testing.assert_array_equal(back[key][0].numpy(), tr[key])
    np.testing.assert_array_equal(back["action"][0].numpy(), tr["action"])
    np.testing.assert_allclose(back["next_obs"][0].numpy(), tr["next_obs"], atol=1e-6)


def test_td_errors_are_the_one_step_bellman_residual_of_each_network():
    ctx = _context(2)
    flats = torch.stack([torch.stack([flatten_state_dict(init_state_dict(4, 2, HIDDEN, 10 * t + m), SHAPES)
                                      for m in range(3)]) for t in range(2)])
    got = td_errors(flats, ctx, FAMILY, SHAPES, gamma=0.9)
    for t in range(2):
        tr = transitions_from_features(ctx[t:t + 1], FAMILY)
        for m in range(3):
            net = QNetwork(FAMILY.obs_dim, FAMILY.n_actions, HIDDEN)
            net.load_state_dict(unflatten_state_dict(flats[t, m], SHAPES))
            with torch.no_grad():
                q = net(tr["obs"][0]).gather(1, tr["action"][0].unsqueeze(1)).squeeze(1)
                y = tr["reward"][0] + 0.9 * (1 - tr["terminated"][0]) * net(tr["next_obs"][0]).max(1).values
            torch.testing.assert_close(got[t, m], ((q - y) ** 2).mean())


def test_select_picks_the_bellman_consistent_candidate_wherever_it_stands():
    # reward 1 every step and no termination: Q = 1 / (1 - gamma) = 10 is the fixed point, TD error 0
    ctx = _context(3, reward=1.0)
    assert transitions_from_features(ctx, FAMILY)["terminated"].sum() > 0  # so the edit below matters
    ctx[..., -1] = 0.0  # no termination
    for column in range(3):
        values = [5.0, 20.0, 7.0]
        values.insert(column, 10.0)
        select = SelectQ(FAMILY, HIDDEN, None, None, torch.stack([_constant(v) for v in values]), k=1, gamma=0.9)
        chosen, pick, err = select.choose(ctx)
        assert pick.tolist() == [column] * 3
        torch.testing.assert_close(chosen, _constant(10.0).expand(3, P))
        assert torch.all(err[:, column] < 1e-10)


def test_the_relative_score_does_not_favour_a_network_for_its_small_values():
    # gamma 0.9, reward 1, no termination: a constant-Q network c has TD error 0.1 c - 1 at every step;
    # c = 1 is off by 0.9 (squared 0.81, 81% of its value squared), c = 30 by 2 (squared 4, 0.4% of it)
    ctx = _context(2, reward=1.0)
    ctx[..., -1] = 0.0
    nets = torch.stack([_constant(1.0), _constant(30.0)])
    squared = SelectQ(FAMILY, HIDDEN, None, None, nets, k=1, gamma=0.9)
    relative = SelectQ(FAMILY, HIDDEN, None, None, nets, k=1, gamma=0.9, score="relative")
    assert squared.choose(ctx)[1].tolist() == [0, 0] and relative.choose(ctx)[1].tolist() == [1, 1]
    torch.testing.assert_close(relative.choose(ctx)[2], torch.tensor([[0.81, 4.0 / 900]]).expand(2, 2))
    with pytest.raises(ValueError, match="unknown select score"):
        SelectQ(FAMILY, HIDDEN, None, None, nets, k=1, gamma=0.9, score="absolute")


def test_equal_td_errors_go_to_the_first_candidate():
    select = SelectQ(FAMILY, HIDDEN, None, None, torch.stack([_constant(3.0), _constant(3.0)]), k=1, gamma=0.9)
    assert select.choose(_context(2))[1].tolist() == [0, 0]


def _select(k: int = 2, fixed_names: tuple[str, ...] = ()) -> SelectQ:
    torch.manual_seed(0)
    hyper = HyperQ(ContextEncoder("deepset", feature_dim(FAMILY), 16, 4), 4, 16, FAMILY.obs_dim, FAMILY.n_actions,
                   HIDDEN, base_seed=3)
    torch.nn.init.normal_(hyper.head.weight, std=0.05)  # as if trained: contexts matter
    experts = torch.stack([flatten_state_dict(init_state_dict(4, 2, HIDDEN, s), SHAPES) for s in range(5)])
    index = SiameseIndex(ContextEncoder("deepset", feature_dim(FAMILY), 16, 4), torch.randn(5, 4), experts,
                         [f"train-{i:03d}" for i in range(5)], k=1)
    return SelectQ(FAMILY, HIDDEN, hyper, index, _constant(2.0).unsqueeze(0), k=k, gamma=0.99, fixed_names=fixed_names)


def test_candidates_are_the_generated_network_the_k_nearest_experts_and_the_fixed_ones():
    select, ctx = _select(k=2), _context(4)
    flat = select.candidates(ctx)
    assert select.sources() == ["hypernet", "siamese-0", "siamese-1", "fixed-0"]
    named = _select(k=2, fixed_names=("multitask",))
    assert named.sources() == ["hypernet", "siamese-0", "siamese-1", "multitask"]
    assert named.source_learners() == ["hypernet", "siamese", "siamese", "multitask"]
    with pytest.raises(ValueError, match="2 names for 1 fixed"):
        _select(fixed_names=("multitask", "reptile"))
    assert flat.shape == (4, 4, P)
    with torch.no_grad():
        torch.testing.assert_close(flat[:, 0], select.hypernet(ctx))
        _, idx = select.index.neighbours(ctx, 2)
    torch.testing.assert_close(flat[:, 1:3], select.index.expert_flat[idx])
    torch.testing.assert_close(flat[:, 3], _constant(2.0).expand(4, P))


def test_a_saved_select_model_loads_and_chooses_the_same_starts(tmp_path):
    select, ctx = _select(fixed_names=("reptile",)), _context(4)
    select.score = "relative"  # saved in the config, as train_select does
    cfg = MetaModelConfig(learner="select", family=FAMILY.name, q_hidden=HIDDEN, context_size=12, embed_dim=4,
                          encoder_hidden=16, hidden=16, k=2, task_ids=select.index.task_ids, fixed_names=["reptile"],
                          select_score="relative")
    MetaModel(cfg, module=select.eval()).save(tmp_path / "select")
    loaded = MetaModel.load(tmp_path / "select")
    assert isinstance(loaded.module, SelectQ) and loaded.module.sources() == select.sources()
    assert loaded.module.score == "relative"
    want = select.init_flat(ctx)
    got = loaded.initial_params(context=ctx)
    for t, sd in enumerate(got):
        torch.testing.assert_close(flatten_state_dict(sd, SHAPES), want[t])
    with pytest.raises(ValueError, match="select needs a context input"):
        loaded.initial_params(n_tasks=1)


def test_params_refuse_a_candidate_that_is_not_trained(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("meta_train:\n  learners: [hypernet, siamese, select]\n")
    with pytest.raises(ParamsError, match=r"select\.candidates lists multitask, which meta_train\.learners"):
        load_params(ROOT / "params.yaml", overlay)
    overlay.write_text("meta_train:\n  select: {candidates: [siamese, siamese]}\n")
    with pytest.raises(ParamsError, match=r"meta_train\.select\.candidates.*twice"):
        load_params(ROOT / "params.yaml", overlay)


def test_the_margin_favours_the_first_candidate_by_that_factor_and_survives_a_save(tmp_path):
    # reward 1, no termination, gamma 0.9: constant c has TD error (0.1 c - 1)^2; c = 5: 0.25, c = 8: 0.04
    ctx = _context(2, reward=1.0)
    ctx[..., -1] = 0.0
    nets = torch.stack([_constant(5.0), _constant(8.0)])
    select = SelectQ(FAMILY, HIDDEN, None, None, nets, k=1, gamma=0.9)
    assert select.first_margin == 1.0 and "margin" not in select.state_dict()  # old models load unchanged
    picks = {}
    for margin in (1.0, 6.0, 6.5, 1e6):  # 0.25 / 6 = 0.042 > 0.04; 0.25 / 6.5 = 0.038 < 0.04
        select.set_margin(margin)
        picks[margin] = select.choose(ctx)[1].tolist()
    assert picks == {1.0: [1, 1], 6.0: [1, 1], 6.5: [0, 0], 1e6: [0, 0]}
    with pytest.raises(ValueError, match="margin"):
        select.set_margin(0.5)
    select.set_margin(6.5)
    cfg = MetaModelConfig(learner="select", family=FAMILY.name, q_hidden=HIDDEN, context_size=12, embed_dim=4,
                          encoder_hidden=16, hidden=16, k=1, fixed_names=["multitask", "reptile"])
    MetaModel(cfg, module=select.eval()).save(tmp_path / "select")
    loaded = MetaModel.load(tmp_path / "select").module
    assert isinstance(loaded, SelectQ) and loaded.first_margin == 6.5
    assert loaded.choose(ctx)[1].tolist() == [0, 0]
    overlay = tmp_path / "o.yaml"
    overlay.write_text("meta_train:\n  select: {margins: [1.0, 0.5]}\n")
    with pytest.raises(ParamsError, match=r"meta_train\.select\.margins"):
        load_params(ROOT / "params.yaml", overlay)
