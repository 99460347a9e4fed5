"""Checks of the estimator's data arguments: counts, coordinates, groups, dtype.

Every message names the argument, the value's shape or content, and what is expected.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import scipy.sparse as sp
import torch

from sf_mlflow.errors import ConfigError, DataError

__all__ = ["check_counts", "check_coordinates", "check_groups", "check_validation", "validated_dtype",
           "DTYPES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_counts(Y: Any, name: str = "Y") -> sp.csr_matrix:
    """Non-negative integer counts (N, D) as CSR float64 without explicit zeros."""
    if sp.issparse(Y):
        if Y.ndim != 2:
            raise DataError(f"{name} must be 2-D (n_spots, n_genes), got shape {Y.shape}")
        X = sp.csr_matrix(Y, dtype=np.float64, copy=True)
    else:
        try:
            arr = np.asarray(Y, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{name} must be a numeric array or scipy sparse matrix of counts, "
                            f"got {type(Y).__name__}") from None
        if arr.ndim != 2:
            raise DataError(f"{name} must be 2-D (n_spots, n_genes), got an array of shape {arr.shape}")
        X = sp.csr_matrix(arr)
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise DataError(f"{name} is empty: shape {X.shape}, expected at least one spot and one gene")
    X.sum_duplicates()
    vals = X.data
    if vals.size:
        if not np.isfinite(vals).all():
            raise DataError(f"{name} contains NaN or infinite values; expected raw non-negative integer counts")
        if vals.min() < 0:
            raise DataError(f"{name} contains negative values (minimum {vals.min():g}); "
                            "expected raw non-negative integer counts")
        frac = vals != np.round(vals)
        if frac.any():
            raise DataError(f"{name} contains {int(frac.sum())} non-integer values (e.g. "
                            f"{vals[frac][0]:g}); expected raw integer counts, not normalised data")
    X.eliminate_zeros()
    X.sort_indices()
    return X


def check_coordinates(coordinates: Any, n: Optional[int], name: str = "coordinates") -> Optional[np.ndarray]:
    """Coordinates as float64 (n, 2); ``n = None`` accepts any number of rows."""
    if coordinates is None:
        return None
    X = np.asarray(coordinates, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 2 or (n is not None and X.shape[0] != n):
        rows = "n_spots" if n is None else f"(n_spots, 2) = ({n}"
        want = "(n_spots, 2)" if n is None else f"{rows}, 2)"
        raise DataError(f"{name} must have shape {want}, got {X.shape}")
    if not np.isfinite(X).all():
        raise DataError(f"{name} contain NaN or infinite values")
    return X


def check_groups(groups: Any, n: int, name: str = "groups") -> Optional[np.ndarray]:
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.shape != (n,):
        raise DataError(f"{name} must have shape (n_spots,) = ({n},), got {g.shape}")
    if g.size and not (np.issubdtype(g.dtype, np.integer)
                       or (np.issubdtype(g.dtype, np.floating) and np.all(g == np.round(g)))):
        raise DataError(f"{name} must be integer group codes 0..G-1, got dtype {g.dtype}")
    g = g.astype(np.int64)
    if g.size and g.min() < 0:
        raise DataError(f"{name} must be integer group codes 0..G-1, got a minimum of {g.min()}")
    return g


def validated_dtype(value) -> torch.dtype:
    """``"float32"``/``"float64"`` (any case) or the torch dtype itself, as a torch dtype."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    key = value.lower() if isinstance(value, str) else value
    if key not in DTYPES:
        raise ConfigError(f"dtype = {value!r} is not recognised; expected one of "
                          + ", ".join(repr(a) for a in DTYPES))
    return DTYPES[key]


def check_validation(validation, d: int, needs_groups: bool):
    """Held-out spots ``(Y_val (Nv, D) CSR, coordinates (Nv, 2), groups (Nv,) or None)``, or None.

    ``d`` is the number of genes of Y; ``needs_groups`` that the fit uses groups.
    """
    if validation is None:
        return None
    if not isinstance(validation, (tuple, list)) or len(validation) != 3:
        raise ConfigError("validation must be a tuple (Y_val, coordinates_val, groups_val); "
                          f"got {type(validation).__name__}")
    Yv = check_counts(validation[0], "validation Y_val")
    if Yv.shape[1] != d:
        raise DataError(f"validation Y_val has {Yv.shape[1]} genes, Y has {d}; expected "
                        f"shape (n_val, {d})")
    Xv = check_coordinates(validation[1], Yv.shape[0], "validation coordinates_val")
    gv = check_groups(validation[2], Yv.shape[0], "validation groups_val")
    if needs_groups and gv is None:
        raise DataError("validation groups_val = None, but the model is fitted with groups; "
                        "pass the held-out spots' group codes")
    return Yv, Xv, gv
