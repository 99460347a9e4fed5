"""Poisson deviance against sklearn, and the low-rank chunked form against the dense one."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import mean_poisson_deviance

import sf_mlflow.analysis.deviance as deviance_module
from sf_mlflow.analysis.deviance import poisson_deviance
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import DataError


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_spots=400, n_genes=60, n_components=4, mean_counts=60.0, seed=0)
    F, W = d.truth["factors"], d.truth["loadings"]
    # a rate that is not the truth, so every term of the deviance matters
    rng = np.random.default_rng(1)
    F2 = F * rng.lognormal(0, 0.3, size=F.shape)
    return d.counts, F2, W


def test_dense_matches_sklearn(data):
    Y, F, W = data
    mu = F @ W.T
    y = Y.toarray()
    assert (y == 0).mean() > 0.2  # zeros are exercised
    ref = mean_poisson_deviance(y.ravel(), mu.ravel())
    for yy in (y, Y):
        out = poisson_deviance(yy, mu)
        assert out["total"] == pytest.approx(ref * y.size, rel=1e-10)
        assert out["mean"] == pytest.approx(ref, rel=1e-10)


def test_nsf_summary_is_mean_over_spots_then_genes(data):
    Y, F, W = data
    mu = F @ W.T
    y = Y.toarray()
    per_gene = [mean_poisson_deviance(y[:, j], mu[:, j]) for j in range(y.shape[1])]
    assert poisson_deviance(Y, mu)["nsf"] == pytest.approx(np.mean(per_gene), rel=1e-10)


def test_low_rank_chunked_equals_dense(data, monkeypatch):
    Y, F, W = data
    dense = poisson_deviance(Y, F @ W.T)
    # tiny blocks so the row chunking really splits the data into many pieces
    monkeypatch.setattr(deviance_module, "_BLOCK_ENTRIES", 500)
    for y in (Y, Y.toarray()):
        for out in (poisson_deviance(y, factors=F, loadings=W), poisson_deviance(y, (F, W))):
            for key in ("total", "mean", "nsf"):
                assert out[key] == pytest.approx(dense[key], rel=1e-10)


def test_special_values():
    y = np.array([[0.0, 2.0], [3.0, 0.0]])
    # y == 0 contributes 2 mu; a perfect fit elsewhere contributes 0
    out = poisson_deviance(y, np.array([[0.5, 2.0], [3.0, 1.5]]))
    assert out["total"] == pytest.approx(2 * (0.5 + 1.5))
    # mu == 0 where y == 0 is fine; where y > 0 the deviance is infinite
    assert poisson_deviance(y, np.array([[0.0, 2.0], [3.0, 0.0]]))["total"] == 0.0
    assert poisson_deviance(sp.csr_matrix(y), np.array([[1.0, 0.0], [3.0, 1.0]]))["total"] == np.inf


def test_shape_errors(data):
    Y, F, W = data
    with pytest.raises(DataError, match="either mu"):
        poisson_deviance(Y)
    with pytest.raises(DataError, match=r"mu has shape \(3, 3\)"):
        poisson_deviance(Y, np.ones((3, 3)))
    with pytest.raises(DataError, match="do not match counts"):
        poisson_deviance(Y, factors=F, loadings=W[:10])
