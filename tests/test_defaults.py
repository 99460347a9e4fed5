"""A default is a promise: the defaults and the shipped configs train to a finite, converged
fit on every real data set in ../shared/data, as shipped (no MLflow: the library path the
train stage runs)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from sf_mlflow.config import config_from_dict
from sf_mlflow.data.io import PreprocessedData
from sf_mlflow.data.preprocess import preprocess
from sf_mlflow.data.sources import load_dataset
from sf_mlflow.stages.train import build_model, training_inputs, validation_inputs

from conftest import REPO_ROOT

#: file -> its group column (None: the file has no cell-type labels).
DATASETS = {
    "osmfish_sscortex.h5ad": "cluster",
    "st_mouse_olfactory_bulb.h5ad": "layer",
    "slideseqv2_hippocampus_window.h5ad": None,
}


def _fit(raw: dict, source: str):
    cfg = config_from_dict(raw, source)
    res = preprocess(load_dataset(cfg), cfg.preprocessing, seed=cfg.seed)
    pre = PreprocessedData(data=res.data, heldout=res.heldout, metadata={})
    data, groups = training_inputs(cfg, pre)
    model = build_model(cfg)
    model.verbose = False
    model.fit(data.counts, coordinates=data.coordinates, groups=groups,
              validation=validation_inputs(cfg, pre, model))
    return cfg, model


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_default_spatial_model_converges_on_every_shared_data_set(name, shared_file):
    key = DATASETS[name]
    raw = {"name": "defaults", "dataset": "h5ad",
           "data": {"path": str(shared_file(name)), "group_key": key},
           "model": {"groups": key is not None}}
    cfg, model = _fit(raw, f"defaults for {name}")
    assert cfg.training.optimizer == "auto" and cfg.model.num_inducing == "auto"
    assert cfg.preprocessing.holdout_fraction == 0.05
    assert np.isfinite(model.elbo_history_).all()
    assert model.converged_, (model.stop_reason_, model.n_iter_)
    assert model.stop_reason_ in ("tol", "validation")
    assert np.isfinite(model.get_factors()).all() and np.isfinite(model.loadings_).all()


@pytest.mark.parametrize("config", ["osmfish/svgp.yaml", "osmfish/pnmf.yaml",
                                    "slideseq/window_pnmf.yaml", "slideseq/window_hybrid.yaml"])
def test_shipped_configs_converge_on_their_data_at_their_own_settings(config, shared_file):
    raw = yaml.safe_load((REPO_ROOT / "configs" / config).read_text())
    raw["data"]["path"] = str(shared_file(raw["data"]["path"].rsplit("/", 1)[-1]))
    _, model = _fit(raw, config)
    assert np.isfinite(model.elbo_history_).all()
    assert model.converged_, (model.stop_reason_, model.n_iter_)
