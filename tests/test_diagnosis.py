"""The out-of-range diagnosis's pieces (metadqn.evaluation.diagnosis); the whole stage runs in
tests/test_pipeline_dvc.py on the tiny pipeline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from metadqn.evaluation.diagnosis import MEAN_COLUMNS, _nn, _ratio, _ridge_probe, summarise_diagnosis


def test_nearest_training_task_is_never_the_task_itself():
    points = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    train = np.array([True, True, True, False])
    idx, dist = _nn(torch.cdist(points, points[train]), train)
    # training rows 0, 1, 2 find another training row; the held-out row 3 finds the nearest one (row 2)
    assert idx.tolist() == [1, 0, 1, 2]
    assert dist.tolist() == pytest.approx([1.0, 1.0, 2.0, 7.0])
    ratio = _ratio(dist, train)
    assert np.median(ratio[train]) == pytest.approx(1.0) and ratio[3] == pytest.approx(7.0)


def test_physics_probe_extrapolates_a_linear_code_and_not_a_folded_one():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (60, 3))
    train = np.abs(x[:, 0]) < 0.5  # held-out rows lie outside the training range of the first coordinate
    linear = x @ np.array([[1.0], [2.0], [-1.0]])
    assert _ridge_probe(x, linear, train)[~train].max() < 0.05
    folded = np.abs(x[:, :1])  # the code folds: linear inside the training range, wrong outside it
    err = _ridge_probe(x, folded, train)
    assert err[~train].mean() > 5 * err[train].mean()


def test_summary_takes_means_of_scores_and_medians_of_distances():
    frame = pd.DataFrame({"model": "hypernet", "task_id": ["a", "b", "c"], "split": "extrap", "nn_task": "t",
                          "ret_gen": [0.0, 0.0, 0.9], "embed_nn_ratio": [1.0, 2.0, 30.0]})
    got = summarise_diagnosis(frame)["hypernet"]["extrap"]
    assert "ret_gen" in MEAN_COLUMNS
    assert got == {"ret_gen": pytest.approx(0.3), "embed_nn_ratio": 2.0}
    assert summarise_diagnosis(pd.DataFrame()) == {}
