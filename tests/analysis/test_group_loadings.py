"""Group-specific loadings: recovery of planted group W, monotone loss, sparse blocking."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import sf_mlflow.analysis.group_loadings as gl_module
from sf_mlflow.analysis.group_loadings import group_loadings, refit_loadings
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import DataError


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def planted():
    """Smooth true factors, two interleaved groups whose loadings differ, Poisson counts."""
    d = make_synthetic(n_spots=1200, n_genes=120, n_components=4, n_groups=1,
                       mean_counts=200.0, seed=3)
    H, W0 = d.truth["factors"], d.truth["loadings"]
    rng = np.random.default_rng(7)
    # group 1 re-weights every loading by a log-normal factor: same genes, different use
    W1 = W0 * rng.lognormal(0.0, 0.8, size=W0.shape)
    groups = rng.integers(0, 2, size=H.shape[0])
    rate = np.where(groups[:, None] == 0, H @ W0.T, H @ W1.T)
    Y = sp.csr_matrix(rng.poisson(rate).astype(np.float64))
    # the "global" loadings: the Poisson fit on all spots together, as a model would give
    W_global = refit_loadings(Y, H, np.ones_like(W0), n_iter=400, tol=1e-9)
    return Y, H, groups, (W0, W1), W_global


def test_recovers_planted_group_loadings(planted):
    Y, H, groups, truths, W_global = planted
    out = group_loadings(Y, H, W_global, groups)
    assert out.shape == (2,) + W_global.shape
    assert (out >= 0).all()
    for g, W_true in enumerate(truths):
        r_group, r_global = _corr(out[g], W_true), _corr(W_global, W_true)
        assert r_group > 0.95, (g, r_group)
        assert r_group > r_global, (g, r_group, r_global)
        # on the log scale too, for the genes a factor really uses (top 25% of entries)
        big = W_true > np.quantile(W_true, 0.75)
        assert _corr(np.log(out[g][big]), np.log(W_true[big])) > 0.9


def test_loss_never_increases(planted):
    Y, H, groups, _, W_global = planted
    for g in (0, 1):
        idx = groups == g
        _, losses = refit_loadings(Y[idx], H[idx], W_global, n_iter=150, tol=0.0,
                                   return_loss=True)
        assert losses.size == 151
        steps = np.diff(losses)
        assert (steps <= 1e-10 * np.abs(losses[1:])).all(), steps.max()
        assert losses[-1] < losses[0]


def test_loss_is_the_poisson_negative_log_likelihood():
    rng = np.random.default_rng(0)
    H = rng.gamma(2.0, 1.0, size=(50, 3))
    W = rng.gamma(2.0, 1.0, size=(20, 3))
    Y = rng.poisson(H @ W.T).astype(float)
    _, losses = refit_loadings(sp.csr_matrix(Y), H, W, n_iter=1, return_loss=True)
    R = H @ W.T
    expected = R.sum() - (Y[Y > 0] * np.log(R[Y > 0])).sum()
    np.testing.assert_allclose(losses[0], expected, rtol=1e-10)


def _dense_reference(Y, H, W, n_iter):
    for _ in range(n_iter):
        R = H @ W.T + 1e-10
        W = W * ((Y / R).T @ H) / H.sum(axis=0)
    return W


def test_matches_dense_updates_and_blocking_changes_nothing(monkeypatch):
    rng = np.random.default_rng(1)
    H = rng.gamma(2.0, 1.0, size=(80, 3))
    W = rng.gamma(2.0, 0.5, size=(30, 3))
    Y = rng.poisson(H @ W.T * rng.lognormal(0, 0.3, size=(80, 30)))
    Ys = sp.csr_matrix(Y.astype(float))
    ref = _dense_reference(Y.astype(float), H, W, 25)
    one_block = refit_loadings(Ys, H, W, n_iter=25, tol=0.0)
    monkeypatch.setattr(gl_module, "_BLOCK_ENTRIES", 40)  # a few rows per block
    many_blocks = refit_loadings(Ys, H, W, n_iter=25, tol=0.0)
    np.testing.assert_allclose(one_block, ref, rtol=1e-9)
    np.testing.assert_allclose(many_blocks, ref, rtol=1e-9)


def test_small_and_empty_groups_keep_global_loadings_and_zero_genes():
    rng = np.random.default_rng(2)
    N, D, L = 60, 10, 3
    H = rng.gamma(2.0, 1.0, size=(N, L))
    W = rng.gamma(2.0, 1.0, size=(D, L))
    Y = rng.poisson(H @ W.T).astype(float)
    groups = np.zeros(N, dtype=int)
    groups[:2] = 1  # 2 spots < L = 3 factors
    Y[groups == 0, 4] = 0  # gene 4 silent in group 0
    out = group_loadings(sp.csr_matrix(Y), H, W, groups, n_groups=3, n_iter=30)
    assert out.shape == (3, D, L)
    np.testing.assert_array_equal(out[1], W)  # too few spots
    np.testing.assert_array_equal(out[2], W)  # no spots at all
    assert (out[0][4] == 0).all()  # maximum likelihood of a silent gene
    assert not np.allclose(out[0], W)


def test_factor_zero_on_a_group_keeps_its_column():
    rng = np.random.default_rng(3)
    H = rng.gamma(2.0, 1.0, size=(40, 2))
    H[:, 1] = 0.0
    W = rng.gamma(2.0, 1.0, size=(5, 2))
    Y = sp.csr_matrix(rng.poisson(H @ W.T).astype(float))
    out = refit_loadings(Y, H, W, n_iter=10)
    np.testing.assert_array_equal(out[:, 1], W[:, 1])
    assert np.isfinite(out).all()


def test_errors_name_the_argument():
    rng = np.random.default_rng(4)
    H = rng.random((10, 2)) + 0.1
    W = rng.random((4, 2))
    Y = sp.csr_matrix(rng.poisson(1.0, size=(10, 4)).astype(float))
    g = np.zeros(10, dtype=int)
    with pytest.raises(DataError, match="counts must be a scipy sparse"):
        group_loadings(Y.toarray(), H, W, g)
    with pytest.raises(DataError, match=r"factors have shape \(9, 2\)"):
        group_loadings(Y, H[:9], W, g)
    with pytest.raises(DataError, match=r"loadings have shape \(4, 3\)"):
        group_loadings(Y, H, np.ones((4, 3)), g)
    with pytest.raises(DataError, match="factors must be finite and non-negative"):
        group_loadings(Y, -H, W, g)
    with pytest.raises(DataError, match=r"groups have shape \(9,\)"):
        group_loadings(Y, H, W, g[:9])
    with pytest.raises(DataError, match="negative code -1"):
        group_loadings(Y, H, W, g - 1)
    with pytest.raises(DataError, match="n_groups = 1 but groups contain the code 2"):
        group_loadings(Y, H, W, g + 2, n_groups=1)
