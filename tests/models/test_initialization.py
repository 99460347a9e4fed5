"""Where a fit starts (:mod:`sf_mlflow.models.initialization`): the randomised SVD and the
NNDSVDa start, and what the start does to a PNMF fit with weak factors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import ConfigError
from sf_mlflow.models.initialization import _top_singular, initial_state, nndsvda
from sf_mlflow.models.likelihood import CountBatch
from sf_mlflow.models.pnmf import PNMF


def _batch(Y) -> CountBatch:
    return CountBatch.from_scipy(sp.csr_matrix(Y), dtype=torch.float64)


def test_the_randomised_svd_finds_the_leading_singular_triplets():
    Y = make_synthetic(n_spots=400, n_genes=60, n_components=4, seed=3).counts
    U, S, V = _top_singular(_batch(Y), 5, torch.Generator().manual_seed(0))
    dense = np.asarray(sp.csr_matrix(Y).todense())
    expected = np.linalg.svd(dense, compute_uv=False)[:5]
    np.testing.assert_allclose(S.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose((U * S) @ V.T, dense, atol=0.6 * expected[5 - 1])
    np.testing.assert_allclose(U.T @ U, np.eye(5), atol=1e-10)


def test_the_nndsvda_start_is_positive_and_nearer_a_nonnegative_low_rank_matrix_than_random():
    rng = np.random.default_rng(0)
    H0, W0 = rng.gamma(2.0, 1.0, (300, 3)), rng.gamma(2.0, 1.0, (40, 3))
    X = H0 @ W0.T
    H, W = nndsvda(_batch(X), 3, torch.Generator().manual_seed(0))
    assert H.shape == (300, 3) and W.shape == (40, 3)
    assert bool((H > 0).all() and (W > 0).all())

    def error(init: str) -> float:      # after the start's KL-NMF iterations
        W, mu = initial_state(_batch(X), 3, torch.Generator().manual_seed(0), init=init)
        return np.linalg.norm(torch.exp(mu).T.numpy() @ W.numpy().T - X) / np.linalg.norm(X)

    ours, random = error("nndsvda"), error("random")
    assert ours < 0.1 and ours < 0.7 * random, (ours, random)


def test_more_factors_than_the_counts_rank_start_finite_and_distinct():
    Y = np.array([[3, 0, 1, 2], [0, 4, 1, 0], [2, 2, 0, 5], [1, 0, 3, 1], [0, 1, 1, 1]])
    W, mu = initial_state(_batch(Y), 6, torch.Generator().manual_seed(0))
    assert W.shape == (4, 6) and mu.shape == (6, 5)
    assert bool(torch.isfinite(W).all() and torch.isfinite(mu).all() and (W > 0).all())
    assert torch.unique(mu.round(decimals=6), dim=0).shape[0] == 6
    m = PNMF(6, max_iter=30).fit(Y)
    assert np.isfinite(m.elbo_history_).all()


def test_an_unknown_start_is_named():
    with pytest.raises(ConfigError, match=r"init = 'svd' .*'nndsvda', 'random'"):
        PNMF(2, init="svd").fit(np.ones((5, 4)))


def _smallest_share(model: PNMF) -> float:
    """The smallest factor's share of the expected counts."""
    share = model.loadings_.sum(0) * model.get_factors().mean(0)
    return float(share.min() / share.sum())


def test_no_factor_dies_from_the_nndsvda_start_where_random_starts_lose_one():
    # 10 factors, 14 groups, 100 counts a spot: from random_state 0 and 1 the random start
    # lets one factor be absorbed by two others (its share of the counts -> ~0) and ends at
    # a lower ELBO than NNDSVDa, which keeps every factor (6 % of the counts or more).
    data = make_synthetic(n_spots=2000, n_genes=300, n_components=10, n_groups=14,
                          mean_counts=100, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = PNMF(10).fit(data.counts)
        randoms = [PNMF(10, init="random", random_state=s).fit(data.counts) for s in (0, 1)]
    assert _smallest_share(ours) > 0.03
    for r in randoms:
        assert _smallest_share(r) < 0.01
        assert r.elbo_history_[-1] < ours.elbo_history_[-1]
    truth = np.asarray(data.truth["log_factors"])
    corr = np.abs(np.corrcoef(np.log(ours.get_factors()).T, truth.T)[:10, 10:])
    assert corr.max(axis=0).min() > 0.5, corr.max(axis=0)      # every planted factor found
