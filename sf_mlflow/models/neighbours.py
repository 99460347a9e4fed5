"""Held-out prediction of factors at unseen spots for the non-spatial (PNMF) model.

Scoring a model on held-out spots means predicting their counts from their location
alone, then comparing with the counts that were held out. The spatial model does this
through its GP prior. The non-spatial model cannot: its prior treats spots as independent,
so for an unseen spot the posterior is just the prior, the same for every spot. Fitting
the held-out spot's factors to its own counts (as one would at training time) would use
the very counts being scored, which flatters the model. The honest baseline is spatial
interpolation of the training posterior: the mean of the posterior-mean log-factors of the
k nearest training spots. It uses the same information the GP has (training data and the
query positions) and none of the held-out counts.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from sf_mlflow.errors import DataError

__all__ = ["nearest_neighbour_log_factors"]


def _coords(x, name: str) -> np.ndarray:
    X = np.asarray(x, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 2:
        raise DataError(f"{name} have shape {X.shape}; expected (N, 2)")
    if not np.isfinite(X).all():
        raise DataError(f"{name} contain NaN or infinite values")
    return X


def nearest_neighbour_log_factors(train_coordinates: np.ndarray, train_log_factors: np.ndarray,
                                  query_coordinates: np.ndarray, k: int = 6) -> np.ndarray:
    """Log-factors at query spots as the mean over their k nearest training spots.

    Parameters
    ----------
    train_coordinates : ndarray, (Nt, 2)
        Positions of the training spots.
    train_log_factors : ndarray, (Nt, L)
        Posterior-mean log-factors F of the training spots (log scale, so the average is
        a geometric mean of the factors ``exp(F)``).
    query_coordinates : ndarray, (Nq, 2)
        Positions of the held-out spots. Their counts are not used (see the module
        docstring for why).
    k : int
        Neighbours averaged, ``1 <= k <= Nt``. A query spot that coincides with a training
        spot still averages over k spots.

    Returns
    -------
    ndarray, (Nq, L)
        Predicted log-factors; ``exp`` of it, times the loadings, gives predicted rates.
    """
    Xt = _coords(train_coordinates, "train_coordinates")
    Xq = _coords(query_coordinates, "query_coordinates")
    F = np.asarray(train_log_factors, dtype=np.float64)
    if F.ndim != 2 or F.shape[0] != Xt.shape[0]:
        raise DataError(f"train_log_factors have shape {F.shape}; expected (Nt, L) with "
                        f"Nt = {Xt.shape[0]} rows like train_coordinates")
    if not np.isfinite(F).all():
        raise DataError("train_log_factors contain NaN or infinite values; pass the "
                        "log-factors F, not exp(F) of an overflowed fit")
    k = int(k)
    if not 1 <= k <= Xt.shape[0]:
        raise DataError(f"k = {k} neighbours needs 1 <= k <= Nt = {Xt.shape[0]} training spots")
    if Xq.shape[0] == 0:
        return np.empty((0, F.shape[1]))
    _, idx = cKDTree(Xt).query(Xq, k=k)  # (Nq, k), or (Nq,) when k == 1
    idx = np.asarray(idx).reshape(Xq.shape[0], k)
    return F[idx].mean(axis=1)
