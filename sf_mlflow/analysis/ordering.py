"""Ordering factors by a score (e.g. Moran's I) while keeping track of their original index.

Fitted factors come in an arbitrary order. Reports and figures show them sorted, most
spatially structured first, and label each with its original index so that the arrays
saved by the training stage (whose columns are in the original order) can still be found::

    I = morans_i(factors, coordinates)          # (L,)
    perm = order_by(I)                          # (L,) original indices, best first
    titles = factor_titles(I, perm)             # "factor 1 (orig 7)\\nMoran's I 0.84", ...
    factors_sorted = factors[:, perm]
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from sf_mlflow.errors import DataError

__all__ = ["order_by", "factor_titles"]


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
