"""Predictions outside the training extent warn (the GP there returns its prior: factors 1.0)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from sf_mlflow.analysis.predictor import ExtrapolationWarning, FactorPredictor, prediction_info
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.settings import SVGP

CENTER, SCALE = np.array([0.5, 0.25]), 20.0


@pytest.fixture(scope="module")
def fitted():
    d = make_synthetic(n_spots=200, n_genes=15, n_components=2, n_groups=2, seed=3)
    X = (d.coordinates - CENTER) * SCALE
    model = PNMF(2, prior=SVGP(num_inducing=20), max_iter=10, tol=0, random_state=0).fit(
        d.counts, coordinates=X, groups=d.groups)
    meta = {"gene_names": list(d.gene_names), "group_names": list(d.group_names),
            "coordinate_transform": {"center": CENTER.tolist(), "scale": SCALE}}
    info = prediction_info(model, meta, model_kind="svgp", neighbours=4)
    return FactorPredictor(model, info), X, list(d.group_names)


def test_far_positions_warn_with_count_and_extent(fitted):
    pred, X, groups = fitted
    raw = X / SCALE + CENTER
    far = raw.max(axis=0) + 1e4                      # far beyond every training spot
    frame = pd.DataFrame({"x": [raw[0, 0], far[0], far[0]], "y": [raw[0, 1], far[1], -far[1]],
                          "group": [groups[0]] * 3})
    with pytest.warns(ExtrapolationWarning) as rec:
        out = pred.predict(frame)
    msg = str(rec[0].message)
    assert "2 of 3 position(s) lie outside the training extent" in msg
    lo, hi = raw.min(axis=0), raw.max(axis=0)
    assert f"x in [{lo[0] - 0.05 * (hi - lo).max():.6g}" in msg and "raw units" in msg
    # what the warning is about: the prior, every factor exactly 1.0
    np.testing.assert_allclose(out.to_numpy()[1:], 1.0, rtol=0, atol=1e-6)


def test_training_spots_do_not_warn(fitted):
    pred, X, groups = fitted
    frame = pred.example_frame(50)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExtrapolationWarning)
        pred.predict(frame)
