"""The hybrid model (NSFH): K spatial factors beside L - K non-spatial ones, fitted jointly."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment

from sf_mlflow.analysis.moran import morans_i
from sf_mlflow.config import config_from_dict
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import ConfigError
from sf_mlflow.models.hybrid import HybridPrior
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.priors import GaussianPrior
from sf_mlflow.models.settings import SVGP
from sf_mlflow.models.svgp import SVGPPrior
from sf_mlflow.stages._common import model_kind, run_name, stage_hash
from sf_mlflow.stages.train import build_model

# many small torch ops: one thread (see tests/conftest.py, one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

L = 3


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_spots=120, n_genes=30, n_components=L, n_groups=2, seed=0)
    return d.counts, d.coordinates * 20.0, d.groups


def small(**kwargs) -> dict:
    return {**dict(n_components=L, max_iter=8, dtype="float64", device="cpu", random_state=3,
                   tol=0.0), **kwargs}


SPATIAL = SVGP(num_inducing=20, lengthscale=4.0)


def assert_same_fit(a: PNMF, b: PNMF) -> None:
    np.testing.assert_allclose(a.elbo_history_, b.elbo_history_, rtol=1e-10, atol=0)
    np.testing.assert_allclose(a.loadings_, b.loadings_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.get_factors(exp_mean=True), b.get_factors(exp_mean=True),
                               rtol=1e-9, atol=1e-12)


# ---- (a), (b): the hybrid's edge cases are the plain models ------------------------------------

@pytest.mark.parametrize("optimizer", ["auto", "Adam"])
def test_all_factors_spatial_is_the_spatial_model(data, optimizer):
    Y, X, g = data
    hybrid = PNMF(prior=SPATIAL, spatial_components=L, optimizer=optimizer,
                  **small()).fit(Y, X, g)
    spatial = PNMF(prior=SPATIAL, optimizer=optimizer, **small()).fit(Y, X, g)
    assert isinstance(hybrid.prior_, HybridPrior) and hybrid.prior_.gaussian is None
    assert_same_fit(hybrid, spatial)
    assert hybrid.spatial_factors_.tolist() == [True] * L
    np.testing.assert_allclose(hybrid.predict_at(X[:7], g[:7]), spatial.predict_at(X[:7], g[:7]),
                               rtol=1e-9)


@pytest.mark.parametrize("batch_size", [None, 50])
def test_no_spatial_factor_is_pnmf(data, batch_size):
    Y, X, g = data
    hybrid = PNMF(prior=SPATIAL, spatial_components=0, batch_size=batch_size,
                  **small()).fit(Y, X, g)
    pnmf = PNMF(prior="gaussian", batch_size=batch_size, **small()).fit(Y, X, g)
    assert isinstance(hybrid.prior_, HybridPrior) and hybrid.prior_.spatial is None
    assert not hybrid.uses_groups_     # no GP, so the groups play no role
    assert_same_fit(hybrid, pnmf)
    assert hybrid.spatial_factors_.tolist() == [False] * L
    np.testing.assert_allclose(hybrid.predict_at(X[:7]), pnmf.predict_at(X[:7]), rtol=1e-9)


def test_the_hybrid_prior_stacks_its_parts_and_sums_their_kl(data):
    Y, X, g = data
    model = PNMF(prior=SPATIAL, spatial_components=2, **small(max_iter=3)).fit(Y, X, g)
    prior = model.prior_
    assert isinstance(prior.spatial, SVGPPrior) and isinstance(prior.gaussian, GaussianPrior)
    assert (prior.spatial.n_components, prior.gaussian.n_components, prior.n_components) == (2, 1, 3)
    idx = torch.arange(10)
    c, gg = model._coordinates[idx], model._groups[idx]
    with torch.no_grad():
        mean, var = prior.marginals(idx, c, gg)
        ms, vs = prior.spatial.marginals(idx, c, gg)
        torch.testing.assert_close(mean, torch.cat([ms, prior.gaussian.mu[:, idx]]))
        torch.testing.assert_close(var, torch.cat([vs, prior.gaussian.marginals(idx)[1]]))
        torch.testing.assert_close(prior.means(idx, c, gg), mean)
        torch.testing.assert_close(prior.kl(idx), prior.spatial.kl(idx) + prior.gaussian.kl(idx))
    assert model.num_inducing_ == 20 and model.inducing_points_.shape == (20, 2)
    assert not model.is_spatial and model.spatial_factors_.tolist() == [True, True, False]


def test_a_hybrid_natural_step_moves_both_parts_and_raises_the_elbo(data):
    Y, X, g = data
    model = PNMF(prior=SPATIAL, spatial_components=2, **small(max_iter=40)).fit(Y, X, g)
    history = model.elbo_history_
    assert np.all(np.isfinite(history)) and history[-1] > history[0]
    start = PNMF(prior=SPATIAL, spatial_components=2, **small(max_iter=1)).fit(Y, X, g)
    for part in ("spatial", "gaussian"):
        moved = [not torch.equal(a, b) for a, b in zip(getattr(model.prior_, part).state_dict().values(),
                                                         getattr(start.prior_, part).state_dict().values())
                 if a.is_floating_point()]
        assert any(moved), part


# ---- (c): the spatial factors take the smooth fields, the others the rest -------------------

def planted_data(seed: int = 0):
    """Counts from 2 smooth spatial log-factor fields and 1 i.i.d. log-factor, each driving
    its own block of genes."""
    rng = np.random.default_rng(seed)
    n, genes_per = 400, 20
    X = rng.random((n, 2)) * 20.0
    fields = np.column_stack([np.sin(X[:, 0] / 3.0) + 0.3 * np.cos(X[:, 1] / 4.0),
                              np.cos((X[:, 0] + X[:, 1]) / 4.0)])
    noise = rng.normal(0.0, 0.8, size=n)
    log_f = np.column_stack([fields, noise])                                  # (n, 3)
    W = np.zeros((3 * genes_per, 3))
    for l in range(3):
        W[l * genes_per:(l + 1) * genes_per, l] = rng.uniform(1.0, 3.0, genes_per)
    W += 0.02
    Y = rng.poisson(np.exp(log_f) @ W.T)
    return sp.csr_matrix(Y), X, log_f


def correlations(estimated_log: np.ndarray, truth_log: np.ndarray) -> np.ndarray:
    k = truth_log.shape[1]
    return np.corrcoef(estimated_log.T, truth_log.T)[:estimated_log.shape[1], -k:]


def test_the_spatial_factors_recover_the_planted_fields_and_the_rest_the_noise():
    Y, X, truth = planted_data()
    model = PNMF(n_components=3, prior=SVGP(num_inducing=60, lengthscale=4.0, groups=False),
                 spatial_components=2, max_iter=150, tol=0.0, random_state=0, dtype="float64",
                 device="cpu").fit(Y, X)
    est = np.log(model.get_factors())
    C = correlations(est[:, :2], truth[:, :2])
    rows, cols = linear_sum_assignment(-C)
    assert C[rows, cols].min() > 0.9, C          # each spatial factor is one planted field
    assert np.corrcoef(est[:, 2], truth[:, 2])[0, 1] > 0.8   # the non-spatial one the noise
    # and the non-spatial factor is the one without spatial structure
    moran = morans_i(model.get_factors(), X, k=6)
    assert moran[2] < 0.2 < 0.5 < moran[:2].min(), moran


# ---- (d): persistence and prediction ----------------------------------------------------------

@pytest.mark.parametrize("K", [0, 2, L])
def test_save_load_round_trip_and_predict_at(data, tmp_path, K):
    Y, X, g = data
    model = PNMF(prior=SPATIAL, spatial_components=K, **small(max_iter=3)).fit(Y, X, g)
    model.save(tmp_path / "model.pth")
    back = PNMF.load(tmp_path / "model.pth")
    assert back.spatial_components == K and isinstance(back.prior_, HybridPrior)
    assert back.spatial_factors_.tolist() == model.spatial_factors_.tolist()
    np.testing.assert_array_equal(back.loadings_, model.loadings_)
    np.testing.assert_allclose(back.get_factors(exp_mean=True), model.get_factors(exp_mean=True),
                               rtol=1e-12)
    groups = g[:9] if K else None
    f = back.predict_at(X[:9] + 0.3, groups)
    assert f.shape == (9, L) and np.all(f > 0)
    np.testing.assert_allclose(f, model.predict_at(X[:9] + 0.3, groups), rtol=1e-12)
    f2, std = back.predict_at(X[:9] + 0.3, groups, return_std=True)
    np.testing.assert_allclose(f2, f, rtol=1e-12)
    assert std.shape == (9, L)
    assert np.isnan(std[:, K:]).all() and (std[:, :K] > 0).all()   # NaN: the neighbour rule has none


def test_a_stopped_hybrid_fit_resumes_to_the_uninterrupted_result(data):
    Y, X, g = data
    full = PNMF(prior=SPATIAL, spatial_components=2, **small(max_iter=10)).fit(Y, X, g)
    stopped = PNMF(prior=SPATIAL, spatial_components=2, **small(max_iter=10))
    stopped.fit(Y, X, g, callback=lambda state: state.iteration == 4)
    assert stopped.n_iter_ == 4
    resumed = PNMF(prior=SPATIAL, spatial_components=2, **small(max_iter=10))
    resumed.fit(Y, X, g, resume=stopped.checkpoint())
    assert_same_fit(resumed, full)


# ---- (e): validation and the config -----------------------------------------------------------

def test_the_estimator_checks_spatial_components(data):
    Y, X, g = data
    with pytest.raises(ConfigError, match=r"PNMF: spatial_components = 4 is out of range: "
                                          r"expected 0 <= spatial_components <= n_components = 3"):
        PNMF(prior=SPATIAL, spatial_components=4, **small()).fit(Y, X, g)
    with pytest.raises(ConfigError, match=r"spatial_components = -1 is out of range"):
        PNMF(prior=SPATIAL, spatial_components=-1, **small()).fit(Y, X, g)
    with pytest.raises(ConfigError, match=r"spatial_components = 2 needs the SVGP prior"):
        PNMF(prior="gaussian", spatial_components=2, **small()).fit(Y, X, g)
    with pytest.raises(ConfigError, match="optimizer = 'natural' needs"):
        PNMF(prior=SPATIAL, spatial_components=0, optimizer="natural", **small()).fit(Y, X, g)


@pytest.mark.parametrize("K", [0, 2])
def test_validation_scores_a_hybrid_by_its_predict_at_and_stops_it_early(data, K):
    """The trainer's held-out check is the deviance of the rates predict_at gives (GP
    predictive for the spatial factors, nearest training spots for the others), so a
    check at the last iteration equals that deviance of the fitted model."""
    from sf_mlflow.models.likelihood import CountBatch, poisson_deviance

    Y, X, g = data
    train, val = np.arange(100), np.arange(100, 120)
    Yv, Xv, gv = Y[val], X[val], g[val]
    with pytest.warns(UserWarning, match="did not converge"):
        model = PNMF(prior=SPATIAL, spatial_components=K, validation_every=4, patience=50,
                     **small()).fit(Y[train], X[train], g[train], validation=(Yv, Xv, gv))
    assert model.validation_history_[:, 0].tolist() == [0, 4, 8]    # 0: the start
    F = np.log(model.predict_at(Xv, gv if model.uses_groups_ else None))
    expected = poisson_deviance(CountBatch.from_scipy(sp.csr_matrix(Yv), dtype=torch.float64),
                                torch.as_tensor(F.T), torch.as_tensor(model.loadings_))
    assert model.validation_history_[-1, 1] == pytest.approx(expected, rel=1e-9)
    # patience 1: the first check that does not improve the held-out deviance stops the fit
    stopped = PNMF(prior=SPATIAL, spatial_components=K, validation_every=1, patience=1,
                   **small(max_iter=80)).fit(Y[train], X[train], g[train], validation=(Yv, Xv, gv))
    assert stopped.stop_reason_ == "validation" and stopped.converged_
    dev = stopped.validation_history_[:, 1]
    assert stopped.n_iter_ < 80 and dev[-1] >= dev[:-1].min() * (1 - 1e-4)


def test_the_config_checks_spatial_components_naming_key_value_and_range():
    with pytest.raises(ConfigError, match=r"run\.yaml: model\.spatial_components = 11 is out of "
                                          r"range: expected 0 <= spatial_components <= "
                                          r"n_components = 10"):
        config_from_dict({"model": {"spatial_components": 11}}, "run.yaml")
    with pytest.raises(ConfigError, match=r"model\.spatial_components = -2 is out of range"):
        config_from_dict({}, "run.yaml", overrides=["model.spatial_components=-2"])
    with pytest.raises(ConfigError, match=r"model\.spatial_components = 1 needs the SVGP prior"):
        config_from_dict({"model": {"prior": "Gaussian", "spatial_components": 1}}, "run.yaml")
    with pytest.raises(ConfigError, match=r"models\.small\.model\.spatial_components = 4 is out"):
        config_from_dict({"model": {"spatial_components": 4}, "models": {
            "big": {"model": {"n_components": 6}}, "small": {"model": {"n_components": 3}}}},
            "run.yaml")


def test_an_unset_spatial_components_leaves_hashes_and_params_as_they_were():
    base = config_from_dict({"model": {"n_components": 4}})
    hybrid = config_from_dict({"model": {"n_components": 4, "spatial_components": 2}})
    assert "model.spatial_components" not in base.flat()
    assert hybrid.flat()["model.spatial_components"] == 2
    assert stage_hash(base, "train") != stage_hash(hybrid, "train")
    assert base.to_dict()["model"]["spatial_components"] is None     # still written to YAML
    assert (model_kind(base), model_kind(hybrid)) == ("mggp", "hybrid")   # groups by default
    no_groups = config_from_dict({"model": {"n_components": 4, "groups": False}})
    assert model_kind(no_groups) == "svgp"
    assert run_name(hybrid).startswith("train/hybrid/L4/K2/M")
    model = build_model(hybrid)
    assert model.spatial_components == 2 and isinstance(model.prior, SVGP)
    assert build_model(base).spatial_components is None


# ---- the train stage ------------------------------------------------------------------------------

def test_the_train_stage_fits_and_tags_a_hybrid(mlflow_store):
    from mlflow.tracking import MlflowClient

    from sf_mlflow.stages.preprocess import run_preprocess
    from sf_mlflow.stages.train import run_train

    cfg = config_from_dict({
        "name": "hybrid_stage", "seed": 3, "dataset": "synthetic",
        "data": {"synthetic": {"n_spots": 200, "n_genes": 40, "n_components": 3, "n_groups": 2,
                               "mean_counts": 200}},
        "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1,
                          "spatial_scale": 10.0},
        "model": {"n_components": 3, "spatial_components": 2, "num_inducing": 20},
        "training": {"max_iter": 5, "device": "cpu", "tol": 0.0}}, "hybrid.yaml")
    train_id = run_train(cfg, run_preprocess(cfg))
    run = MlflowClient().get_run(train_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train/hybrid/L3/K2/M20/lauto"
    assert run.data.tags["sf.model"] == "hybrid" and run.data.tags["sf.spatial_components"] == "2"
    assert run.data.params["model.spatial_components"] == "2"
    assert run.data.metrics["n_iter"] == 5
    model = PNMF.load(f"{cfg.output_dir}/train/{train_id}/model.pth")
    assert model.spatial_factors_.tolist() == [True, True, False] and model.uses_groups_
