"""A default is a promise: the defaults and the shipped configs train to a finite, converged
fit on every real data set in ../shared/data, as shipped (no MLflow: the library path the
train stage runs), and the defaults promise quality, not only convergence.

Quality: on generated data with planted factor fields that differ by cell-type group, the
default spatial model with groups (MGGP) must predict held-out spots better than the
non-spatial baseline (PNMF) and than the spatial model without groups (SVGP), and recover the
planted log-factors. Two cases at settings other than the quickstart's (field lengthscales
0.1 and 0.3 of the square, 3 and 5 groups, depths 200 and 400). Every model is the estimator
at its defaults, apart from the number of factors; ``benchmarks/bench_quality.py`` runs the
same comparison through the console script on many more cases and on the real data sets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import yaml

from sf_mlflow.analysis.deviance import poisson_deviance
from sf_mlflow.analysis.summary import heldout_deviance

from sf_mlflow.config import config_from_dict
from sf_mlflow.data.io import PreprocessedData
from sf_mlflow.data.preprocess import heldout_split, preprocess, rescale_coordinates
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.settings import SVGP
from sf_mlflow.data.sources import load_dataset
from sf_mlflow.stages.train import build_model, training_inputs, validation_inputs

from conftest import REPO_ROOT, SHARED_DATA_ENV, shared_data_dir

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
    return cfg, model, pre


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_default_spatial_model_converges_on_every_shared_data_set_and_beats_pnmf(name, shared_file):
    """The default spatial model (MGGP where the file has groups, else SVGP) trains to a
    converged fit and predicts the held-out spots better than PNMF at its defaults."""
    key = DATASETS[name]
    raw = {"name": "defaults", "dataset": "h5ad",
           "data": {"path": str(shared_file(name)), "group_key": key},
           "model": {"groups": key is not None}}
    cfg, model, pre = _fit(raw, f"defaults for {name}")
    assert cfg.training.optimizer == "auto" and cfg.model.num_inducing == "auto"
    assert cfg.preprocessing.holdout_fraction == 0.05
    assert np.isfinite(model.elbo_history_).all()
    assert model.converged_, (model.stop_reason_, model.n_iter_)
    assert model.stop_reason_ in ("tol", "validation")
    assert np.isfinite(model.get_factors()).all() and np.isfinite(model.loadings_).all()
    _, baseline, _ = _fit({**raw, "model": {"prior": "Gaussian"}}, f"PNMF defaults for {name}")
    train, held = pre.training_spots(), pre.heldout_spots()
    spatial = heldout_deviance(model, train.coordinates, held)["total"]
    pnmf = heldout_deviance(baseline, train.coordinates, held)["total"]
    assert spatial < pnmf, (spatial, pnmf)


#: shipped spatial config -> its non-spatial twin (same data, split and factors)
SHIPPED = {"osmfish/svgp.yaml": "osmfish/pnmf.yaml",
           "slideseq/window_hybrid.yaml": "slideseq/window_pnmf.yaml"}


@pytest.fixture(scope="module")
def shipped_fits():
    """``fit(config) -> (cfg, model, pre)``, each shipped config fitted once per module."""
    fits = {}

    def fit(config: str):
        if config not in fits:
            raw = yaml.safe_load((REPO_ROOT / "configs" / config).read_text())
            path = shared_data_dir() / raw["data"]["path"].rsplit("/", 1)[-1]
            if not path.is_file():
                pytest.skip(f"{path} not found: set {SHARED_DATA_ENV} to the folder holding it")
            raw["data"]["path"] = str(path)
            fits[config] = _fit(raw, config)
        return fits[config]
    return fit


@pytest.mark.parametrize("config", sorted([*SHIPPED, *SHIPPED.values()]))
def test_shipped_configs_converge_on_their_data_at_their_own_settings(config, shipped_fits):
    _, model, _ = shipped_fits(config)
    assert np.isfinite(model.elbo_history_).all()
    assert model.converged_, (model.stop_reason_, model.n_iter_)


@pytest.mark.parametrize("config", sorted(SHIPPED))
def test_shipped_spatial_configs_beat_their_pnmf_twin_on_held_out_spots(config, shipped_fits):
    _, model, pre = shipped_fits(config)
    _, twin, twin_pre = shipped_fits(SHIPPED[config])
    assert np.array_equal(pre.heldout, twin_pre.heldout)
    train, held = pre.training_spots(), pre.heldout_spots()
    spatial = heldout_deviance(model, train.coordinates, held)["total"]
    pnmf = heldout_deviance(twin, train.coordinates, held)["total"]
    assert spatial < pnmf, (spatial, pnmf)


# ---- quality at the defaults ----------------------------------------------------------------

def matched_correlation(estimated: np.ndarray, truth: np.ndarray) -> float:
    """Mean |correlation| of the columns (N, L) after one-to-one Hungarian matching."""
    from scipy.optimize import linear_sum_assignment

    L = truth.shape[1]
    C = np.nan_to_num(np.abs(np.corrcoef(estimated.T, truth.T)[:L, L:]))
    rows, cols = linear_sum_assignment(-C)
    return float(C[rows, cols].mean())


CASES = {
    "short_fields_3_groups": dict(n_spots=1500, n_genes=150, n_components=4, n_groups=3,
                                  lengthscale=0.1, group_effect=0.6, mean_counts=200, seed=11),
    "long_fields_5_groups": dict(n_spots=1500, n_genes=150, n_components=4, n_groups=5,
                                 lengthscale=0.3, group_effect=0.8, mean_counts=400, seed=12),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def fits(request):
    data = make_synthetic(**CASES[request.param])
    X = rescale_coordinates(data.coordinates, 50.0)[0]     # the preprocess stage's default units
    held = heldout_split(data.n_spots, 0.1, 0, data.groups)
    Y, g = data.counts.tocsr(), data.groups
    L = CASES[request.param]["n_components"]
    out = {}
    for name, prior in (("pnmf", "gaussian"), ("svgp", SVGP(groups=False)), ("mggp", SVGP())):
        model = PNMF(L, prior=prior)
        validation = None if prior == "gaussian" else (Y[held], X[held], g[held])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(Y[~held], coordinates=X[~held], groups=g[~held], validation=validation)
        F = model.predict_at(X[held], g[held] if model.uses_groups_ else None)
        out[name] = {"model": model,
                     "deviance": poisson_deviance(Y[held], factors=F, loadings=model.loadings_)["total"],
                     "matched": matched_correlation(np.log(model.get_factors()),
                                                    data.truth["log_factors"][~held])}
    return out


def test_default_mggp_beats_pnmf_and_svgp_on_held_out_spots(fits):
    assert fits["mggp"]["deviance"] < fits["pnmf"]["deviance"]
    assert fits["mggp"]["deviance"] < fits["svgp"]["deviance"]


def test_default_mggp_recovers_the_planted_factors(fits):
    assert fits["mggp"]["matched"] >= 0.95
    assert fits["mggp"]["matched"] > fits["pnmf"]["matched"]


def test_default_spatial_fits_converge_and_start_where_pnmf_ends(fits):
    for name in ("svgp", "mggp"):
        model = fits[name]["model"]
        assert model.converged_ and np.isfinite(model.elbo_history_).all()
        report = model.start_report_
        assert report["pnmf_iterations"] > 0
        start = model.validation_history_[0]
        assert start[0] == 0
        # the spatial start is about as good as the PNMF it came from, or better
        assert start[1] < 1.03 * report["pnmf_heldout_deviance"]
        # kernel hyperparameters chosen per factor, inducing points dense enough for them
        lengthscales = np.atleast_1d(report["lengthscale"])
        assert lengthscales.shape == (model.n_components,) and (lengthscales > 0).all()
        assert model.num_inducing_ == report["num_inducing"]
