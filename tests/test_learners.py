"""The learner registry is the one list: every entry trains, loads and is named consistently."""

from __future__ import annotations

import pytest

from metadqn.config import ParamsError, load_params
from metadqn.learners import LEARNERS, METHODS, SCRATCH, SELECTABLE, get_learner
from tests.conftest import ROOT


def test_every_learner_has_an_importable_trainer_of_the_common_signature():
    import inspect

    for name, entry in LEARNERS.items():
        fn = entry.train()
        assert list(inspect.signature(fn).parameters)[:3] == ["data", "params", "scores"], name


def test_params_accept_the_registry_names_and_refuse_others(tmp_path):
    params = load_params(ROOT / "params.yaml")
    assert set(params.meta_train.learners) <= set(SELECTABLE)
    assert set(params.meta_test.methods) == set(METHODS) and SCRATCH in METHODS
    for section, key, bad in (("meta_train", "learners", "hypernet-oracle"), ("meta_test", "methods", "maml")):
        overlay = tmp_path / f"{key}.yaml"
        overlay.write_text(f"{section}:\n  {key}: [{bad}]\n")
        with pytest.raises(ParamsError, match=f"{section}.{key} unknown .*'{bad}'"):
            load_params(ROOT / "params.yaml", overlay)


def test_unknown_learner_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown learner 'maml'"):
        get_learner("maml")


def test_saved_models_know_their_inputs_from_the_registry(tiny_run):
    from metadqn.meta.model import MetaModel

    _, _, out, _, _ = tiny_run
    saved = sorted(p.name for p in out.models.iterdir())
    assert saved and set(saved) <= set(LEARNERS)
    for name in saved:
        model = MetaModel.load(out.models / name)
        entry = get_learner(name)
        assert model.config.uses_context == (entry.task_input == "context"), name
        assert model.config.uses_physics == (entry.task_input == "physics"), name
        assert (model.theta is not None) == (entry.module == "init"), name


def test_variants_borrow_a_searched_sources_configuration(tmp_path):
    """hypernet-oracle borrows the hypernet's fine-tuning choice; select its first candidate's, if that one is
    searched; a variant whose source is not searched is searched itself."""
    from metadqn.evaluation.search import borrowed

    params = load_params(ROOT / "params.yaml")
    every = ["hypernet", "hypernet-oracle", "siamese", "multitask", "select"]
    assert borrowed(every, params) == {"hypernet-oracle": "hypernet", "select": "hypernet"}
    assert borrowed(["siamese", "hypernet-oracle", "select"], params) == {}
    overlay = tmp_path / "o.yaml"
    overlay.write_text("meta_train:\n  select:\n    candidates: [siamese, hypernet]\n")
    assert borrowed(every, load_params(ROOT / "params.yaml", overlay))["select"] == "siamese"
