"""analyze_model end to end: the spatial model predicts held-out spots better than PNMF."""

import numpy as np
import pytest

from sf_mlflow.analysis.summary import analyze_model, heldout_deviance
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.settings import SVGP


@pytest.fixture(scope="module")
def split():
    # smooth fields, one shared pattern for all spots, moderate depth: the regime where
    # a spot's neighbours tell much about it
    data = make_synthetic(n_spots=1200, n_genes=80, n_components=3, n_groups=1,
                          lengthscale=0.2, group_effect=0.0, mean_counts=60, seed=11)
    data.coordinates = data.coordinates * 20.0
    held = np.random.default_rng(0).random(data.n_spots) < 0.15
    return data.subset(spots=np.flatnonzero(~held)), data.subset(spots=np.flatnonzero(held))


@pytest.fixture(scope="module")
def fitted(split):
    train, _ = split
    common = dict(max_iter=100, tol=0, random_state=0)
    pnmf = PNMF(3, prior="gaussian", **common).fit(train.counts)
    svgp = PNMF(3, prior=SVGP(num_inducing=100, lengthscale=4.0), **common).fit(
        train.counts, coordinates=train.coordinates)
    return {"pnmf": pnmf, "svgp": svgp}


def test_spatial_heldout_deviance_beats_non_spatial(split, fitted):
    train, held = split
    results = {k: analyze_model(m, train, held, group_loadings_iter=10)
               for k, m in fitted.items()}
    dev = {k: r.metrics["heldout_deviance"] for k, r in results.items()}
    assert dev["svgp"] < dev["pnmf"], dev
    # ... and the helper used by tuning gives the same number
    for k, m in fitted.items():
        assert heldout_deviance(m, train.coordinates, held)["total"] == pytest.approx(dev[k])
    # training deviance is where PNMF, which fits every spot freely, is at no disadvantage
    assert results["pnmf"].metrics["train_deviance"] < 1.1 * results["svgp"].metrics["train_deviance"]


def test_outputs_are_in_moran_order_with_the_original_index(split, fitted):
    train, held = split
    r = analyze_model(fitted["svgp"], train, held, group_loadings_iter=10)
    assert np.all(np.diff(r.moran) <= 1e-12)
    order = r.arrays["factor_order"]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(r.arrays["factors"], fitted["svgp"].get_factors()[:, order])
    np.testing.assert_allclose(r.arrays["loadings"], fitted["svgp"].loadings_[:, order])
    assert r.arrays["factors"].shape == r.arrays["scales"].shape == (train.n_spots, 3)
    for key in ("lengthscale", "sigma", "num_inducing", "mean_distance_to_inducing",
                "heldout_deviance_nsf", "reconstruction_error", "moran_i_mean"):
        assert np.isfinite(r.metrics[key]), key
    assert r.metrics["num_inducing"] == 100
