"""FactorPredictor: the registered model's prediction, without MLflow.

Raw positions are scaled by the preprocess transform, group names become codes, and the
factors are exactly ``PNMF.predict_at`` at the scaled positions (and groups).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sf_mlflow.analysis.predictor import FactorPredictor, prediction_info, with_train_coordinates
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import DataError, ModelError
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.settings import SVGP

REPO = Path(__file__).resolve().parents[2]
CENTER, SCALE = np.array([0.5, 0.25]), 20.0


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_spots=300, n_genes=20, n_components=2, n_groups=2, seed=4)
    d.coordinates = (d.coordinates - CENTER) * SCALE          # scaled, as preprocess leaves them
    return d


@pytest.fixture(scope="module")
def models(data):
    common = dict(max_iter=15, tol=0, random_state=0)
    return {
        "pnmf": PNMF(2, prior="gaussian", **common).fit(data.counts, coordinates=data.coordinates),
        "svgp": PNMF(2, prior=SVGP(num_inducing=30), **common).fit(
            data.counts, coordinates=data.coordinates, groups=data.groups),
    }


def predictor(model, data, train_coordinates=None, neighbours=4):
    meta = {"gene_names": list(data.gene_names), "group_names": list(data.group_names),
            "coordinate_transform": {"center": CENTER.tolist(), "scale": SCALE}}
    info = prediction_info(model, meta, model_kind="x", neighbours=neighbours)
    return FactorPredictor(model, info, train_coordinates)


def queries(data, n=25, seed=1):
    """Raw positions near the training spots, group names and the scaled positions and codes."""
    rng = np.random.default_rng(seed)
    X = data.coordinates[rng.choice(data.n_spots, n, replace=False)] + rng.normal(0, 0.3, (n, 2))
    codes = rng.integers(0, data.n_groups, n)
    raw = X / SCALE + CENTER
    frame = pd.DataFrame({"x": raw[:, 0], "y": raw[:, 1],
                          "group": [data.group_names[c] for c in codes]})
    return frame, (frame[["x", "y"]].to_numpy() - CENTER) * SCALE, codes


def test_predictor_module_does_not_import_mlflow():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys, sf_mlflow.analysis.predictor; "
            "bad = sorted(m for m in sys.modules if m == 'mlflow' or m.startswith('mlflow.')); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("kind", ["pnmf", "svgp"])
@pytest.mark.parametrize("exp_mean", [False, True])
def test_factors_and_expected_counts_are_predict_at(data, models, kind, exp_mean):
    model = models[kind]
    p = predictor(model, data)
    frame, X, codes = queries(data)
    groups = codes if kind == "svgp" else None
    want = model.predict_at(X, groups=groups, neighbours=3, exp_mean=exp_mean)
    got = p.predict(frame, {"neighbours": 3, "exp_mean": exp_mean})
    assert list(got.columns) == ["factor_0", "factor_1"]
    np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-12)
    genes = [str(data.gene_names[5]), str(data.gene_names[2])]
    counts = p.predict(frame, {"neighbours": 3, "exp_mean": exp_mean,
                               "output": "expected_counts", "genes": genes})
    np.testing.assert_allclose(counts.to_numpy(), want @ model.loadings_[[5, 2]].T, rtol=1e-10)
    # default k: the model's own (prediction_info's neighbours)
    np.testing.assert_allclose(p.predict(frame).to_numpy(),
                               model.predict_at(X, groups=groups, neighbours=4), rtol=1e-12)


def test_example_frame_is_training_spots_in_raw_units(data, models):
    p = predictor(models["svgp"], data)
    ex = p.example_frame(5)
    np.testing.assert_allclose(ex[["x", "y"]].to_numpy(), data.coordinates[:5] / SCALE + CENTER)
    assert list(ex["group"]) == [data.group_names[g] for g in data.groups[:5]]
    np.testing.assert_allclose(p.positions(ex), data.coordinates[:5], rtol=1e-12, atol=1e-12)


def test_stored_train_coordinates(data, models):
    model = models["pnmf"]
    frame, X, _ = queries(data)
    assert with_train_coordinates(model, data.coordinates.copy()) is model
    assert with_train_coordinates(model, None) is model
    with pytest.raises(DataError, match="differ from the coordinates"):
        with_train_coordinates(model, data.coordinates[::-1])
    with pytest.raises(DataError, match="differ from the coordinates"):
        with_train_coordinates(model, data.coordinates[:-1])
    # a model file that kept them in float32: the stored float64 ones are used, on a copy
    rounded = PNMF(2, prior="gaussian", max_iter=15, tol=0, random_state=0).fit(
        data.counts, coordinates=data.coordinates.astype(np.float32))
    fixed = with_train_coordinates(rounded, data.coordinates)
    assert fixed is not rounded and fixed.train_coordinates_ is not rounded.train_coordinates_
    np.testing.assert_array_equal(fixed.train_coordinates_, data.coordinates)
    assert rounded.train_coordinates_.dtype == np.float64
    assert not np.array_equal(rounded.train_coordinates_, data.coordinates)


def test_model_fitted_without_coordinates(data, models):
    bare = PNMF(2, prior="gaussian", max_iter=15, tol=0, random_state=0).fit(data.counts)
    frame, X, _ = queries(data)
    with pytest.raises(ModelError, match="training coordinates"):
        predictor(bare, data).predict(frame)
    # the fallback: coordinates stored beside the model
    got = predictor(bare, data, train_coordinates=data.coordinates).predict(frame)
    np.testing.assert_allclose(got.to_numpy(), models["pnmf"].predict_at(X, neighbours=4),
                               rtol=1e-12)
    assert bare.train_coordinates_ is None


def test_bad_params_and_inputs(data, models):
    p = predictor(models["pnmf"], data)
    frame, _, _ = queries(data)
    with pytest.raises(DataError, match="param neighbours = 0"):
        p.predict(frame, {"neighbours": 0})
    with pytest.raises(DataError, match="param output"):
        p.predict(frame, {"output": "rates"})
    with pytest.raises(DataError, match="no_such_gene"):
        p.predict(frame, {"output": "expected_counts", "genes": ["no_such_gene"]})
    with pytest.raises(DataError, match="lacks column"):
        p.predict(frame[["x"]])
    assert p.predict(frame.iloc[:0]).shape == (0, 2)
    with pytest.raises(DataError, match="unknown group"):
        predictor(models["svgp"], data).predict(frame.assign(group="nope"))
