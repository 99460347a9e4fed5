"""Moran's I on kNN weights, checked against squidpy and against its null expectation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist

from sf_mlflow.analysis.moran import knn_weights, morans_i
from sf_mlflow.errors import DataError


@pytest.fixture(scope="module")
def coords():
    return np.random.default_rng(0).random((600, 2))


def test_knn_weights_are_the_k_nearest_row_normalised(coords):
    W = knn_weights(coords, k=6)
    assert W.shape == (600, 600) and sp.isspmatrix_csr(W)
    np.testing.assert_allclose(np.asarray(W.sum(axis=1)).ravel(), 1.0)
    assert W.diagonal().sum() == 0
    assert np.allclose(W.data, 1 / 6)
    D = cdist(coords, coords)
    np.fill_diagonal(D, np.inf)
    brute = np.sort(np.argsort(D, axis=1)[:, :6], axis=1)
    np.testing.assert_array_equal(W.indices.reshape(600, 6), brute)


def test_knn_weights_with_duplicate_positions():
    X = np.array([[0, 0], [0, 0], [0, 0], [1, 0], [2, 0], [3, 0]], dtype=float)
    W = knn_weights(X, k=2)
    assert W.diagonal().sum() == 0
    assert (np.diff(W.indptr) == 2).all()
    assert set(W[0].indices) == {1, 2}
    with pytest.raises(DataError, match="k = 6 neighbours needs 1 <= k < N = 6"):
        knn_weights(X, k=6)


def test_matches_squidpy_on_the_same_weights(coords):
    import squidpy as sq

    rng = np.random.default_rng(1)
    x, y = coords.T
    vals = np.column_stack([
        np.sin(4 * x) + np.cos(3 * y),            # smooth
        rng.normal(size=600),                      # noise
        np.sin(6 * x) + rng.normal(scale=0.5, size=600),
        (x > 0.5).astype(float) + rng.normal(scale=0.1, size=600),
    ])
    W = knn_weights(coords, k=6)
    ours = morans_i(vals, weights=W)
    adata = ad.AnnData(X=vals, var={"name": ["a", "b", "c", "d"]})
    adata.var_names = ["a", "b", "c", "d"]
    adata.obsp["knn"] = W
    res = sq.gr.spatial_autocorr(adata, connectivity_key="knn", mode="moran",
                                 transformation=False, copy=True, show_progress_bar=False)
    np.testing.assert_allclose(ours, res.loc[["a", "b", "c", "d"], "I"].to_numpy(), atol=1e-6)
    # squidpy's own row normalisation of the binary graph gives our weights
    adata.obsp["binary"] = (W > 0).astype(np.float64)
    res = sq.gr.spatial_autocorr(adata, connectivity_key="binary", mode="moran",
                                 transformation=True, copy=True, show_progress_bar=False)
    np.testing.assert_allclose(ours, res.loc[["a", "b", "c", "d"], "I"].to_numpy(), atol=1e-6)
    # and the coordinates form builds the same graph
    np.testing.assert_allclose(morans_i(vals, coords, k=6), ours, rtol=1e-12)


def test_smooth_field_is_near_one_and_noise_near_zero(coords):
    x, y = coords.T
    smooth = np.sin(2 * np.pi * x) + np.cos(2 * np.pi * y)
    i = morans_i(smooth, coords)
    assert isinstance(i, float) and i > 0.95
    noise = np.random.default_rng(5).normal(size=600)
    assert abs(morans_i(noise, coords)) < 0.05


def test_mean_over_shuffles_is_minus_one_over_n_minus_one():
    n = 100
    X = np.random.default_rng(2).random((n, 2))
    base = np.sin(5 * X[:, 0]) + X[:, 1]
    rng = np.random.default_rng(3)
    shuffles = np.column_stack([rng.permutation(base) for _ in range(4000)])  # (N, 4000)
    vals = morans_i(shuffles, X, k=6)
    assert vals.shape == (4000,)
    se = vals.std() / np.sqrt(vals.size)
    expected = -1 / (n - 1)
    assert abs(vals.mean() - expected) < 4 * se
    assert abs(expected) > 4 * se  # the check can tell -1/(N-1) from 0
    assert morans_i(base, X, k=6) > 0.5  # unshuffled, the pattern shows


def test_constant_column_and_bad_inputs(coords):
    out = morans_i(np.column_stack([np.full(600, 0.1), coords[:, 0]]), coords)
    assert np.isnan(out[0]) and out[1] > 0.9
    with pytest.raises(DataError, match="needs coordinates"):
        morans_i(coords[:, 0])
    with pytest.raises(DataError, match=r"weights have shape \(10, 10\) but values have 600 rows"):
        morans_i(coords[:, 0], weights=sp.eye(10))
