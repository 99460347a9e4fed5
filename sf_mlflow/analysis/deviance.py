"""Poisson deviance of counts against fitted rates.

    dev = 2 * sum_ij [ y_ij log(y_ij / mu_ij) - y_ij + mu_ij ],   with y log y = 0 at y = 0.

The rate may be a dense matrix or low-rank, ``mu = factors @ loadings.T``. In the low-rank
form nothing of size N x D is ever formed: ``sum_ij mu_ij = factors.sum(0) @ loadings.sum(0)``
and the log term only needs mu at the non-zeros of y, evaluated a block of rows at a time.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp

from sf_mlflow.data.blocks import nonzero_rows, row_blocks
from sf_mlflow.errors import DataError

__all__ = ["poisson_deviance", "poisson_deviance_per_spot"]

#: Entries of y (non-zeros when sparse, all entries when dense) handled per block, so
#: temporary arrays stay near 64 MB even for 41,786 x 4,000 data.
_BLOCK_ENTRIES = 2_000_000


def _row_blocks(n_rows: int, per_row: float):
    return row_blocks(n_rows, per_row, _BLOCK_ENTRIES)


def _xlogy_ratio(y: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """y log(y / mu) elementwise, 0 where y == 0 (even if mu == 0)."""
    out = np.zeros(np.broadcast(y, mu).shape)
    pos = y > 0
    with np.errstate(divide="ignore"):
        out[pos] = y[pos] * (np.log(y[pos]) - np.log(mu[pos]))
    return out


def poisson_deviance(y, mu: Optional[np.ndarray] = None, *, factors: Optional[np.ndarray] = None,
                     loadings: Optional[np.ndarray] = None) -> dict[str, float]:
    """Poisson deviance of counts against rates.

    Parameters
    ----------
    y : ndarray or scipy.sparse matrix, (N, D)
        Observed counts.
    mu : ndarray, (N, D), or tuple (factors, loadings), optional
        Dense rates, or the low-rank form as a pair.
    factors : ndarray, (N, L), optional
        Non-negative factors; with ``loadings`` the rate is ``factors @ loadings.T``.
    loadings : ndarray, (D, L), optional
        Non-negative loadings.

    Returns
    -------
    dict
        ``total``: the summed deviance; ``mean``: total / (N D), the mean per entry
        (equals ``sklearn.metrics.mean_poisson_deviance`` of the flattened arrays);
        ``nsf``: per gene the mean over spots, then the mean over genes (the summary the
        NSF benchmarks report; for a complete N x D matrix it equals ``mean``). Infinite
        when some mu is 0 where y > 0.
    """
    if isinstance(mu, tuple):
        factors, loadings = mu
        mu = None
    low_rank = factors is not None or loadings is not None
    if (mu is None) == (not low_rank) or (low_rank and (factors is None or loadings is None)):
        raise DataError("poisson_deviance needs either mu (N, D) or both factors (N, L) "
                        "and loadings (D, L)")
    n, d = y.shape
    if low_rank:
        F = np.asarray(factors, dtype=np.float64)
        W = np.asarray(loadings, dtype=np.float64)
        if F.ndim != 2 or W.ndim != 2 or F.shape[0] != n or W.shape[0] != d or F.shape[1] != W.shape[1]:
            raise DataError(f"factors {F.shape} and loadings {W.shape} do not match counts "
                            f"({n}, {d}); expected (N, L) and (D, L)")
        per_gene = _low_rank_per_gene(y, F, W)
    else:
        M = np.asarray(mu, dtype=np.float64)
        if M.shape != (n, d):
            raise DataError(f"mu has shape {M.shape}, counts have {(n, d)}; they must match")
        per_gene = _dense_per_gene(y, M)
    total = float(per_gene.sum())
    return {"total": total, "mean": total / (n * d), "nsf": float(np.mean(per_gene / n))}


def poisson_deviance_per_spot(y, factors: np.ndarray, loadings: np.ndarray) -> np.ndarray:
    """Summed Poisson deviance of each spot (row) against rates ``factors @ loadings.T``.

    y : (N, D) counts, dense or sparse; factors : (N, L); loadings : (D, L).
    Returns (N,); its sum is :func:`poisson_deviance`'s ``total``. Paired comparisons of two
    models on the same held-out spots (the report's bootstrap intervals) resample these.
    """
    F = np.asarray(factors, dtype=np.float64)
    W = np.asarray(loadings, dtype=np.float64)
    n, d = y.shape
    if F.shape[0] != n or W.shape[0] != d or F.shape[1] != W.shape[1]:
        raise DataError(f"factors {F.shape} and loadings {W.shape} do not match counts "
                        f"({n}, {d}); expected (N, L) and (D, L)")
    out = F @ W.sum(axis=0)                     # sum_j mu_ij
    if sp.issparse(y):
        Y = sp.csr_matrix(y)
        out -= np.asarray(Y.sum(axis=1), dtype=np.float64).ravel()
        for rows in _row_blocks(n, Y.nnz / max(n, 1) * F.shape[1]):
            block = Y[rows]
            r = nonzero_rows(block)
            mu_nz = np.einsum("kl,kl->k", F[rows][r], W[block.indices])
            val = _xlogy_ratio(block.data.astype(np.float64), mu_nz)
            out[rows] += np.bincount(r, weights=val, minlength=block.shape[0])
    else:
        Y = np.asarray(y, dtype=np.float64)
        for rows in _row_blocks(n, d):
            out[rows] += (_xlogy_ratio(Y[rows], F[rows] @ W.T) - Y[rows]).sum(axis=1)
    return 2.0 * out


def _dense_per_gene(y, M: np.ndarray) -> np.ndarray:
    """Summed deviance per gene, (D,), against dense rates M (N, D)."""
    n, d = M.shape
    out = np.zeros(d)
    if sp.issparse(y):
        Y = sp.csr_matrix(y)
        # sum_i (mu - y) over all entries plus y log(y / mu) over the non-zeros
        out += M.sum(axis=0) - np.asarray(Y.sum(axis=0), dtype=np.float64).ravel()
        for rows in _row_blocks(n, Y.nnz / max(n, 1)):
            block = Y[rows]
            r = nonzero_rows(block)
            c = block.indices
            val = _xlogy_ratio(block.data.astype(np.float64), M[rows][r, c])
            out += np.bincount(c, weights=val, minlength=d)
    else:
        Y = np.asarray(y, dtype=np.float64)
        for rows in _row_blocks(n, d):
            yb, mb = Y[rows], M[rows]
            out += (_xlogy_ratio(yb, mb) - yb + mb).sum(axis=0)
    return 2.0 * out


def _low_rank_per_gene(y, F: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Summed deviance per gene, (D,), against rates F W^T without forming them densely."""
    n, d = y.shape
    mu_sum = W @ F.sum(axis=0)  # (D,) = sum over spots of mu_ij
    out = np.zeros(d)
    if sp.issparse(y):
        Y = sp.csr_matrix(y)
        out += mu_sum - np.asarray(Y.sum(axis=0), dtype=np.float64).ravel()
        for rows in _row_blocks(n, Y.nnz / max(n, 1) * F.shape[1]):
            block = Y[rows]
            r = nonzero_rows(block)
            c = block.indices
            mu_nz = np.einsum("kl,kl->k", F[rows][r], W[c])  # rate at the non-zeros only
            val = _xlogy_ratio(block.data.astype(np.float64), mu_nz)
            out += np.bincount(c, weights=val, minlength=d)
    else:
        Y = np.asarray(y, dtype=np.float64)
        for rows in _row_blocks(n, d):
            yb = Y[rows]
            mb = F[rows] @ W.T
            out += (_xlogy_ratio(yb, mb) - yb + mb).sum(axis=0)
    return 2.0 * out
