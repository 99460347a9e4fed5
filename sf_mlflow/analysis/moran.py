"""Moran's I spatial autocorrelation on a k-nearest-neighbour graph.

For values x (N,) and weights w_ij with total S0 = sum_ij w_ij,

    I = (N / S0) * sum_ij w_ij z_i z_j / sum_i z_i^2,    z = x - mean(x).

I is near 1 for smooth fields, near -1 / (N - 1) (its expectation under random
permutation) for spatially random values. Everything is sparse, O(N k) per column.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from sf_mlflow.errors import DataError

__all__ = ["knn_weights", "morans_i"]


def knn_weights(coordinates: np.ndarray, k: int = 6) -> sp.csr_matrix:
    """Row-normalised binary k-nearest-neighbour weights.

    Parameters
    ----------
    coordinates : ndarray, (N, 2)
        Spot positions (any number of columns works).
    k : int
        Neighbours per spot, self excluded; needs ``1 <= k < N``.

    Returns
    -------
    scipy.sparse.csr_matrix, (N, N) float64
        ``W[i, j] = 1 / k`` if j is one of the k nearest neighbours of i, else 0; rows sum
        to 1. Not symmetric in general.
    """
    X = np.asarray(coordinates, dtype=np.float64)
    if X.ndim != 2:
        raise DataError(f"coordinates must be a 2-D array (N, 2), got shape {X.shape}")
    n = X.shape[0]
    if not 1 <= k < n:
        raise DataError(f"k = {k} neighbours needs 1 <= k < N = {n} spots; choose a smaller k")
    if not np.isfinite(X).all():
        raise DataError("coordinates contain NaN or infinite values; remove those spots first")
    _, idx = cKDTree(X).query(X, k=k + 1)  # (N, k+1), usually self first
    # with duplicate positions self may not come first (or at all); dropping the self entry
    # where present, else the farthest, keeps exactly k true neighbours per row
    is_self = idx == np.arange(n)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    nbrs = np.take_along_axis(idx, order, axis=1)[:, :k]
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    W = sp.csr_matrix((np.full(n * k, 1.0 / k), nbrs.ravel(), indptr), shape=(n, n))
    W.sort_indices()
    return W


def morans_i(values: np.ndarray, coordinates: Optional[np.ndarray] = None, k: int = 6,
             weights: Optional[sp.spmatrix] = None) -> float | np.ndarray:
    """Moran's I of one or several spatial variables.

    Parameters
    ----------
    values : ndarray, (N,) or (N, L)
        One variable, or L variables in columns (e.g. factors).
    coordinates : ndarray, (N, 2), optional
        Used to build :func:`knn_weights` with ``k`` when ``weights`` is None.
    k : int
        Neighbours for the kNN graph.
    weights : scipy.sparse matrix, (N, N), optional
        Spatial weights used as given (no re-normalisation).

    Returns
    -------
    float or ndarray, (L,)
        Moran's I per column; NaN for a constant column.
    """
    x = np.asarray(values, dtype=np.float64)
    single = x.ndim == 1
    if single:
        x = x[:, None]
    if x.ndim != 2:
        raise DataError(f"values must have shape (N,) or (N, L), got {np.shape(values)}")
    n = x.shape[0]
    if weights is None:
        if coordinates is None:
            raise DataError("morans_i needs coordinates (N, 2) or a weights matrix (N, N)")
        W = knn_weights(coordinates, k)
    else:
        W = sp.csr_matrix(weights, dtype=np.float64)
    if W.shape != (n, n):
        raise DataError(f"weights have shape {W.shape} but values have {n} rows; "
                        f"expected ({n}, {n})")
    z = x - x.mean(axis=0)
    s0 = W.sum()
    num = np.einsum("nl,nl->l", z, W @ z)
    den = np.einsum("nl,nl->l", z, z)
    # test constancy on x itself: z of a constant column is rounding noise, not zero
    ok = (np.ptp(x, axis=0) > 0) & (den > 0)
    out = np.full(x.shape[1], np.nan)
    out[ok] = (n / s0) * num[ok] / den[ok]
    return float(out[0]) if single else out
