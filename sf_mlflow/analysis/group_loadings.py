"""Group-specific loadings: the gene loadings refitted on each group's spots, factors fixed.

With the factors H (N, L) of a fitted model held fixed, the loadings of group g are the
Poisson maximum-likelihood W_g (D, L) >= 0 of

    Y[spots of g] ~ Poisson(H[spots of g] @ W_g.T),

found by the Lee-Seung multiplicative updates for the Poisson (generalised KL) loss,

    W <- W * ((Y / R)^T H) / (1^T H),        R = H W^T,

which never increase the loss. Only the non-zeros of Y enter the numerator, so R is
evaluated at those entries alone, a block of rows at a time: nothing of size N x D is
formed. The factor rows at a group's non-zeros (nnz x L floats, about 90 MB for the largest
Slide-seq cell type) are gathered once and reused by every update.

The global W is the starting point, so the refit only moves as far as the group's data
pull it; comparing W_g with W (see :mod:`sf_mlflow.analysis.enrichment`) shows which genes
a factor uses more, or less, in one cell type than overall.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp

from sf_mlflow.data.blocks import nonzero_rows, row_blocks
from sf_mlflow.errors import DataError

__all__ = ["group_loadings", "refit_loadings"]

#: Non-zeros x factors per row block when evaluating R at the non-zeros (~16 MB float64).
_BLOCK_ENTRIES = 2_000_000

#: Non-zeros x factors of the factor rows gathered once per fit and kept (~256 MB float64);
#: blocks beyond it gather theirs on every update, so memory stays bounded at any N.
_CACHE_ENTRIES = 32_000_000


def _check_inputs(counts, factors, loadings):
    """Validate and convert; returns (Y csr float64, H (N, L), W (D, L))."""
    if not sp.issparse(counts):
        raise DataError(f"counts must be a scipy sparse matrix (N, D), got {type(counts).__name__}; "
                        "wrap dense arrays with scipy.sparse.csr_matrix")
    Y = sp.csr_matrix(counts, dtype=np.float64)
    H = np.asarray(factors, dtype=np.float64)
    W = np.asarray(loadings, dtype=np.float64)
    n, d = Y.shape
    if H.ndim != 2 or H.shape[0] != n:
        raise DataError(f"factors have shape {H.shape}; expected (N, L) with N = {n} rows "
                        "like counts")
    if W.ndim != 2 or W.shape != (d, H.shape[1]):
        raise DataError(f"loadings have shape {W.shape}; expected (D, L) = ({d}, {H.shape[1]}) "
                        "to match counts (N, D) and factors (N, L)")
    if not np.isfinite(H).all() or (H < 0).any():
        raise DataError("factors must be finite and non-negative (pass exp(log-factors), "
                        "not the log-factors)")
    if not np.isfinite(W).all() or (W < 0).any():
        raise DataError("loadings must be finite and non-negative")
    if Y.nnz and (not np.isfinite(Y.data).all() or (Y.data < 0).any()):
        raise DataError("counts must be finite and non-negative")
    return Y, H, W


def _row_blocks(Y: sp.csr_matrix, n_factors: int):
    """Row slices of Y with about _BLOCK_ENTRIES non-zeros x factors each."""
    return row_blocks(Y.shape[0], Y.nnz / max(Y.shape[0], 1) * n_factors, _BLOCK_ENTRIES)


def _split(Y: sp.csr_matrix, H: np.ndarray) -> list[tuple[sp.csr_matrix, np.ndarray, np.ndarray]]:
    """Row blocks ``(Y_b, H_b, H at every non-zero of Y_b)``, fixed across iterations.

    The factor rows at the non-zeros, (nnz_b, L), do not change between updates, so they
    are gathered once here rather than on every update (half of an update's time), up to
    :data:`_CACHE_ENTRIES` in all; later blocks carry None and gather them per update.
    """
    out = []
    cached = 0
    for blk in _row_blocks(Y, H.shape[1]):
        Yb = Y[blk]
        Yb.sort_indices()
        keep = cached + Yb.nnz * H.shape[1] <= _CACHE_ENTRIES
        cached += Yb.nnz * H.shape[1] if keep else 0
        out.append((Yb, H[blk], _rows_at_nonzeros(Yb, H[blk]) if keep else None))
    return out


def _rows_at_nonzeros(Yb: sp.csr_matrix, Hb: np.ndarray) -> np.ndarray:
    """The factor row of every non-zero of ``Yb``, (nnz_b, L)."""
    return Hb[nonzero_rows(Yb)]


def _kl_step(blocks, W: np.ndarray, col_sum_h: np.ndarray,
             eps: float) -> tuple[np.ndarray, float]:
    """One multiplicative update; returns (new W (D, L), Poisson loss at the old W).

    ``blocks`` come from :func:`_split`. The loss is sum(R) - sum_{y > 0} y log R, the
    negative Poisson log-likelihood up to terms that do not depend on W.
    """
    d = W.shape[0]
    num = np.zeros_like(W)
    loglik_nz = 0.0
    for Yb, Hb, H_nz in blocks:
        if H_nz is None:
            H_nz = _rows_at_nonzeros(Yb, Hb)
        c = Yb.indices
        # R at the non-zeros of this block only: (nnz_b,)
        R_nz = np.einsum("kl,kl->k", H_nz, W[c]) + eps
        y = Yb.data
        loglik_nz += float(np.dot(y, np.log(R_nz)))
        Q = sp.csr_matrix((y / R_nz, c, Yb.indptr), shape=(Yb.shape[0], d))
        num += Q.T @ Hb  # (D, L)
    loss = float(col_sum_h @ W.sum(axis=0)) - loglik_nz
    informative = col_sum_h > 0  # a factor that is 0 on every spot carries no information
    W_new = W.copy()
    W_new[:, informative] = W[:, informative] * num[:, informative] / col_sum_h[informative]
    return W_new, loss


def refit_loadings(counts, factors: np.ndarray, loadings: np.ndarray, n_iter: int = 200,
                   tol: float = 1e-6, eps: float = 1e-10,
                   return_loss: bool = False):
    """Refit Poisson loadings with the factors fixed, starting from given loadings.

    Parameters
    ----------
    counts : scipy.sparse matrix, (N, D)
        Counts of the spots to fit on (CSR preferred; other formats are converted).
    factors : ndarray, (N, L)
        Fixed non-negative factors ``exp(F)`` of those spots.
    loadings : ndarray, (D, L)
        Non-negative starting loadings. Entries that are exactly 0 stay 0 (the updates
        are multiplicative).
    n_iter : int
        Maximum number of multiplicative updates.
    tol : float
        Stop when the relative decrease of the Poisson loss over one update falls below
        ``tol``.
    eps : float
        Added to the rate at the non-zeros, so a gene whose rate is 0 where it has counts
        does not divide by zero.
    return_loss : bool
        Also return the loss history.

    Returns
    -------
    W : ndarray, (D, L)
        The refitted loadings. A gene with no counts on these spots gets a row of zeros
        (its maximum-likelihood loading); a factor that is 0 on every spot keeps its
        starting column.
    losses : ndarray, (T,), only if ``return_loss``
        Poisson loss ``sum(H W^T) - sum_{y > 0} y log(H W^T)`` before each update and,
        last, at the returned W; non-increasing up to rounding.
    """
    Y, H, W = _check_inputs(counts, factors, loadings)
    if int(n_iter) < 0:
        raise DataError(f"n_iter = {n_iter!r} must be a non-negative integer")
    if not tol >= 0 or not eps >= 0:
        raise DataError(f"tol = {tol!r} and eps = {eps!r} must both be >= 0")
    blocks = _split(Y, H)
    col_sum_h = H.sum(axis=0)  # (L,) = 1^T H
    losses = []
    W = W.copy()
    for _ in range(int(n_iter)):
        W_new, loss = _kl_step(blocks, W, col_sum_h, eps)
        losses.append(loss)
        W = W_new
        if len(losses) >= 2 and losses[-2] - losses[-1] <= tol * abs(losses[-1]):
            break
    if return_loss:
        # loss at the returned W, so the history ends where the fit does
        _, last = _kl_step(blocks, W, col_sum_h, eps)
        losses.append(last)
        return W, np.asarray(losses)
    return W


def group_loadings(counts, factors: np.ndarray, loadings: np.ndarray, groups: np.ndarray,
                   n_groups: Optional[int] = None, n_iter: int = 200, tol: float = 1e-6,
                   eps: float = 1e-10) -> np.ndarray:
    """Loadings refitted on each group's spots with the factors fixed.

    Parameters
    ----------
    counts : scipy.sparse matrix, (N, D)
        Counts of all spots (CSR preferred).
    factors : ndarray, (N, L)
        Non-negative factors ``exp(F)`` of the fitted model (e.g. the posterior means),
        held fixed.
    loadings : ndarray, (D, L)
        The global non-negative loadings W; the starting point of every group's fit.
    groups : ndarray of int, (N,)
        Group code of every spot, in ``0..G-1``.
    n_groups : int, optional
        G; defaults to ``groups.max() + 1``. Codes that no spot carries give a group with
        no spots.
    n_iter, tol, eps
        Passed to :func:`refit_loadings` for every group.

    Returns
    -------
    ndarray, (G, D, L)
        ``out[g]`` = the Poisson maximum-likelihood loadings of group g's spots given
        their factors, by multiplicative updates from W. A group with fewer spots than
        factors (L) has too little data to determine its loadings and keeps the global W
        unchanged, as does a factor that is 0 on all of a group's spots; a gene with no
        counts in group g gets a zero row in ``out[g]``.
    """
    Y, H, W = _check_inputs(counts, factors, loadings)
    g = np.asarray(groups)
    if g.shape != (Y.shape[0],):
        raise DataError(f"groups have shape {g.shape}; expected ({Y.shape[0]},), one code per spot")
    if g.size and not np.issubdtype(g.dtype, np.integer):
        if not (np.issubdtype(g.dtype, np.floating) and np.all(g == np.round(g))):
            raise DataError(f"groups must hold integer codes 0..G-1, got dtype {g.dtype}")
        g = g.astype(np.int64)
    if g.size and g.min() < 0:
        raise DataError(f"groups contain the negative code {int(g.min())}; expected codes 0..G-1")
    top = int(g.max()) + 1 if g.size else 0
    G = top if n_groups is None else int(n_groups)
    if G < top:
        raise DataError(f"n_groups = {n_groups!r} but groups contain the code {top - 1}; "
                        f"expected n_groups >= {top}")
    L = H.shape[1]
    out = np.repeat(W[None, :, :], G, axis=0)
    for code in range(G):
        idx = np.flatnonzero(g == code)
        if idx.size < L:
            continue  # documented: too few spots to determine L loadings per gene
        out[code] = refit_loadings(Y[idx], H[idx], W, n_iter=n_iter, tol=tol, eps=eps)
    return out
