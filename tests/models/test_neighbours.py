"""Nearest-neighbour held-out log-factors for the non-spatial model."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from sf_mlflow.models.neighbours import nearest_neighbour_log_factors
from sf_mlflow.errors import DataError


@pytest.fixture(scope="module")
def field():
    rng = np.random.default_rng(0)
    X = rng.random((1500, 2))
    F = np.column_stack([np.sin(5 * X[:, 0]), np.cos(4 * X[:, 1]), X.sum(1)])
    return X, F


def test_matches_brute_force(field):
    X, F = field
    rng = np.random.default_rng(1)
    train, query = X[:1200], rng.random((50, 2))
    pred = nearest_neighbour_log_factors(train, F[:1200], query, k=5)
    assert pred.shape == (50, 3)
    nn = np.argsort(cdist(query, train), axis=1)[:, :5]
    np.testing.assert_allclose(pred, F[:1200][nn].mean(axis=1))


def test_interpolates_a_smooth_field(field):
    X, F = field
    pred = nearest_neighbour_log_factors(X[:1200], F[:1200], X[1200:], k=6)
    for l in range(3):
        assert np.corrcoef(pred[:, l], F[1200:, l])[0, 1] > 0.98
    assert np.abs(pred - F[1200:]).max() < 0.3


def test_k1_at_training_positions_returns_training_values(field):
    X, F = field
    np.testing.assert_array_equal(nearest_neighbour_log_factors(X, F, X[:20], k=1), F[:20])


def test_empty_query_and_errors(field):
    X, F = field
    assert nearest_neighbour_log_factors(X, F, np.empty((0, 2))).shape == (0, 3)
    with pytest.raises(DataError, match=r"k = 0 neighbours needs 1 <= k <= Nt = 1500"):
        nearest_neighbour_log_factors(X, F, X[:3], k=0)
    with pytest.raises(DataError, match=r"train_log_factors have shape \(10, 3\)"):
        nearest_neighbour_log_factors(X, F[:10], X[:3])
    with pytest.raises(DataError, match=r"query_coordinates have shape \(3, 3\)"):
        nearest_neighbour_log_factors(X, F, np.ones((3, 3)))
    bad = F.copy()
    bad[0, 0] = np.inf
    with pytest.raises(DataError, match="train_log_factors contain NaN or infinite"):
        nearest_neighbour_log_factors(X, bad, X[:3])
