"""The Quickstart's main job compares PNMF, SVGP and MGGP-SVGP on generated data with groups,
and each of its models trains, as shipped, to a finite, converged fit (no MLflow: the library
path the train stage runs; the shipped-config rule of test_defaults.py)."""

from __future__ import annotations

import numpy as np
import pytest

from sf_mlflow.config import load_config
from sf_mlflow.data.io import PreprocessedData
from sf_mlflow.data.preprocess import preprocess
from sf_mlflow.data.sources import load_dataset
from sf_mlflow.stages.train import build_model, training_inputs, validation_inputs

from conftest import REPO_ROOT

QUICKSTART = REPO_ROOT / "configs" / "quickstart.yaml"


def test_quickstart_compares_the_three_models_on_data_with_groups():
    cfg = load_config(QUICKSTART)
    models = cfg.model_configs()
    assert list(models) == ["pnmf", "svgp", "mggp"]
    assert [(m.model.prior, m.model.groups) for m in models.values()] == [
        ("Gaussian", True), ("SVGP", False), ("SVGP", True)]
    assert cfg.dataset == "synthetic" and cfg.data.synthetic.n_groups > 1


@pytest.fixture(scope="module")
def preprocessed():
    cfg = load_config(QUICKSTART)
    res = preprocess(load_dataset(cfg), cfg.preprocessing, seed=cfg.seed)
    return PreprocessedData(data=res.data, heldout=res.heldout, metadata={})


@pytest.mark.parametrize("name", ["pnmf", "svgp", "mggp"])
def test_every_quickstart_model_converges_as_shipped(name, preprocessed):
    cfg = load_config(QUICKSTART).model_configs()[name]
    data, groups = training_inputs(cfg, preprocessed)
    assert (groups is not None) == (name == "mggp")
    model = build_model(cfg)
    model.verbose = False
    model.fit(data.counts, coordinates=data.coordinates, groups=groups,
              validation=validation_inputs(cfg, preprocessed, model))
    assert np.isfinite(model.elbo_history_).all()
    assert model.converged_ and model.stop_reason_ in ("tol", "validation"), (
        model.stop_reason_, model.n_iter_)
    assert model.n_iter_ < cfg.training.max_iter / 2      # converged with room to spare
    assert np.isfinite(model.get_factors()).all() and np.isfinite(model.loadings_).all()
