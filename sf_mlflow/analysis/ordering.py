"""Ordering factors by a score (e.g. Moran's I) while keeping track of their original index.

Fitted factors come in an arbitrary order. Reports and figures show them sorted, most
spatially structured first, and label each with its original index so that the arrays
saved by the training stage (whose columns are in the original order) can still be found::

    I = morans_i(factors, coordinates)          # (L,)
    perm = order_by(I)                          # (L,) original indices, best first
    titles = factor_titles(I, perm)             # "factor 1 (orig 7)\\nMoran's I 0.84", ...
    factors_sorted = factors[:, perm]

Factors of two models fitted to the same spots come in unrelated orders; :func:`match_factors`
pairs them by maximum total correlation (the Hungarian algorithm)::

    assign, r = match_factors(F_svgp, F_pnmf)   # PNMF factor assign[k] goes with SVGP k
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from sf_mlflow.errors import DataError

__all__ = ["order_by", "factor_titles", "factor_correlation", "match_factors"]


def order_by(values, descending: bool = True) -> np.ndarray:
    """Permutation that sorts factors by a score.

    Parameters
    ----------
    values : array_like, (L,)
        One score per factor, e.g. Moran's I. NaN (e.g. Moran's I of a constant factor)
        sorts last either way.
    descending : bool
        Largest score first (the default) or smallest first.

    Returns
    -------
    ndarray of int64, (L,)
        ``perm`` such that ``values[perm]`` is sorted; ``perm[k]`` is the original index of
        the factor shown k-th. Ties keep their original order (stable sort).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise DataError(f"values must be a 1-D array (L,), one score per factor; got shape {v.shape}")
    nan = np.isnan(v)
    key = np.where(nan, np.inf, -v if descending else v)
    return np.lexsort((key, nan)).astype(np.int64)  # NaN last, then by key, stable


def factor_titles(values, order: Optional[Sequence[int]] = None, name: str = "Moran's I",
                  label: str = "factor", one_line: bool = False) -> list[str]:
    """Panel titles for factors shown in a given order.

    Parameters
    ----------
    values : array_like, (L,)
        Score per factor in the original order (e.g. Moran's I).
    order : sequence of int, (L,), optional
        Original indices in display order, e.g. from :func:`order_by`; defaults to
        ``order_by(values)``.
    name : str
        Name of the score in the title.
    label : str
        Word for a factor.
    one_line : bool
        ``"factor 1 (orig 7), Moran's I 0.84"`` instead of the default two lines, which fit
        narrow panels.

    Returns
    -------
    list of str, (L,)
        Title of the k-th displayed factor, numbered from 1 in display order.
    """
    v = np.asarray(values, dtype=np.float64)
    perm = order_by(v) if order is None else np.asarray(order, dtype=np.int64)
    if perm.shape != v.shape or sorted(perm.tolist()) != list(range(v.size)):
        raise DataError(f"order = {list(perm)} must be a permutation of 0..{v.size - 1}, "
                        "one entry per factor")
    sep = ", " if one_line else "\n"
    out = []
    for k, orig in enumerate(perm):
        score = "n/a" if np.isnan(v[orig]) else f"{v[orig]:.2f}"
        out.append(f"{label} {k + 1} (orig {orig}){sep}{name} {score}")
    return out


def factor_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``a`` with every column of ``b``.

    Parameters
    ----------
    a : ndarray, (N, L1)
    b : ndarray, (N, L2)
        Factors of the same N spots. Spots with a non-finite value in any column of
        either are left out; a constant column correlates 0 with everything.

    Returns
    -------
    ndarray, (L1, L2)
    """
    A = np.asarray(a, dtype=np.float64)
    B = np.asarray(b, dtype=np.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise DataError(f"factors have shapes {A.shape} and {B.shape}; expected (N, L1) and "
                        "(N, L2) over the same N spots")
    ok = np.isfinite(A).all(axis=1) & np.isfinite(B).all(axis=1)
    if ok.sum() < 2:
        raise DataError("fewer than 2 spots have finite factors in both models; "
                        "cannot correlate them")
    A, B = A[ok] - A[ok].mean(axis=0), B[ok] - B[ok].mean(axis=0)
    na, nb = np.linalg.norm(A, axis=0), np.linalg.norm(B, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        C = (A.T @ B) / np.outer(na, nb)
    return np.clip(np.nan_to_num(C, nan=0.0), -1.0, 1.0)


def match_factors(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair the factors of ``other`` with those of ``reference`` by correlation.

    The pairing maximises the summed Pearson correlation over the shared spots
    (:func:`scipy.optimize.linear_sum_assignment` on :func:`factor_correlation`), so
    each factor is used at most once; with different numbers of factors some stay unpaired.

    Parameters
    ----------
    reference : ndarray, (N, L1)
    other : ndarray, (N, L2)
        Factors of two models over the same spots (e.g. exp(F), columns in any order).

    Returns
    -------
    assign : ndarray of int64, (L1,)
        Column of ``other`` paired with each reference column, -1 where none is left.
    corr : ndarray, (L1,)
        The pair's correlation, NaN where unpaired.
    """
    C = factor_correlation(reference, other)
    rows, cols = linear_sum_assignment(C, maximize=True)
    assign = np.full(C.shape[0], -1, dtype=np.int64)
    corr = np.full(C.shape[0], np.nan)
    assign[rows] = cols
    corr[rows] = C[rows, cols]
    return assign, corr
