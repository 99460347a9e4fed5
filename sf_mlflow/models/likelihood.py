"""Poisson likelihood terms of the factor model, computed on sparse counts.

The model is ``Y_nd ~ Poisson(R_nd)`` with ``R_nd = sum_l W_dl exp(F_ln)``. Given
Gaussian marginals ``q(F_ln) = N(m_ln, v_ln)`` the expected log-likelihood splits
into three parts:

* ``sum_nd Y_nd E[log R_nd]`` needs ``R`` only where ``Y`` is non-zero: it is a
  sampled dense-dense product (SDDMM) over the non-zeros, cost ``nnz x L``;
* ``sum_nd E[R_nd] = sum_l (sum_d W_dl)(sum_n E[exp F_ln])`` factorises, cost
  ``L (B + D)``, so no dense ``(B, D)`` rate matrix is ever built;
* ``sum_nd lgamma(Y_nd + 1)`` is a constant of the data.

``R`` at the non-zeros is evaluated in a rescaled form,
``R_nd = Wmax_d exp(M_n) * sum_l (W_dl / Wmax_d) exp(F_ln - M_n)`` with
``M_n = max_l F_ln`` and ``Wmax_d = max_l W_dl``, so that ``exp`` never overflows
and the inner sum is a product of two bounded matrices handled by
``torch.sparse.sampled_addmm``. Its gradients are two sparse-dense products
(:class:`_SumYLogRate`), so the backward pass stores only ``nnz`` numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import gammaln
from torch import Tensor

__all__ = ["CountBatch", "expected_log_likelihood", "multiplicative_update", "likelihood_and_update",
           "poisson_deviance", "MODES"]

#: ELBO modes accepted by :func:`expected_log_likelihood`.
MODES = ("lower-bound", "expanded", "simple")


@dataclass
class CountBatch:
    """Sparse counts of a block of B spots x Db genes, in coordinate form.

    Attributes
    ----------
    rows : LongTensor, (nnz,)
        Spot position of each stored count within the block, ``0..B-1``.
    cols : LongTensor, (nnz,)
        Gene position of each stored count within the block, ``0..Db-1``.
    values : Tensor, (nnz,)
        The counts (float dtype of the model).
    n_spots : int
        B.
    n_genes : int
        Db.
    lgamma_sum : float
        ``sum lgamma(y + 1)`` over the block, the constant of the Poisson log-pmf.

    Entries are kept in row-major order (sorted at construction when needed);
    duplicates are allowed and act as their sum. The CSR forms of the block and of
    its transpose are built once, on first use, and cached.
    """

    rows: Tensor
    cols: Tensor
    values: Tensor
    n_spots: int
    n_genes: int
    lgamma_sum: float
    _csr: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)
    _csr_t: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)
    _margins: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.values.shape[0]
        if self.rows.shape != (n,) or self.cols.shape != (n,):
            raise ValueError(f"CountBatch: rows {tuple(self.rows.shape)}, cols {tuple(self.cols.shape)} "
                             f"and values {tuple(self.values.shape)} must all have shape (nnz,)")
        self.rows = self.rows.long()
        self.cols = self.cols.long()
        if n:
            key = self.rows * self.n_genes + self.cols
            # Row-major order is what the CSR form needs; sort only if the caller did not.
            if bool((key[1:] < key[:-1]).any()):
                order = torch.argsort(key, stable=True)
                self.rows, self.cols, self.values = self.rows[order], self.cols[order], self.values[order]

    @classmethod
    def from_scipy(cls, Y_block, device=None, dtype: torch.dtype = torch.float32) -> "CountBatch":
        """Build from a scipy sparse matrix or a dense array of shape (B, Db).

        Explicit zeros are dropped and duplicate entries summed; ``lgamma_sum`` is
        computed in float64.
        """
        Y = sp.csr_matrix(Y_block, dtype=np.float64, copy=True)
        Y.sum_duplicates()
        Y.eliminate_zeros()
        Y.sort_indices()
        rows = np.repeat(np.arange(Y.shape[0], dtype=np.int64), np.diff(Y.indptr))
        return cls(
            rows=torch.from_numpy(rows).to(device),
            cols=torch.from_numpy(Y.indices.astype(np.int64)).to(device),
            values=torch.from_numpy(Y.data).to(device=device, dtype=dtype),
            n_spots=int(Y.shape[0]),
            n_genes=int(Y.shape[1]),
            lgamma_sum=float(gammaln(Y.data + 1.0).sum()),
        )

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @property
    def device(self) -> torch.device:
        return self.values.device

    def csr_structure(self) -> tuple[Tensor, Tensor]:
        """(crow_indices (B+1,), col_indices (nnz,)) of the block in CSR form."""
        if self._csr is None:
            idx_dtype = torch.int32 if self.nnz < 2**31 - 1 else torch.int64
            counts = torch.bincount(self.rows, minlength=self.n_spots)
            crow = torch.zeros(self.n_spots + 1, dtype=torch.int64, device=self.device)
            crow[1:] = torch.cumsum(counts, 0)
            self._csr = (crow.to(idx_dtype), self.cols.to(idx_dtype))
        return self._csr

    def csr_t_structure(self) -> tuple[Tensor, Tensor, Tensor]:
        """(crow (Db+1,), col (nnz,), perm (nnz,)) of the transposed block in CSR form.

        ``values[perm]`` are the stored values in the transpose's order.
        """
        if self._csr_t is None:
            idx_dtype = torch.int32 if self.nnz < 2**31 - 1 else torch.int64
            if self.device.type == "cpu":
                # scipy's CSR -> CSC conversion is a linear-time counting sort; carrying
                # 0..nnz-1 as data yields the permutation (argsort would be ~5x slower).
                crow, _ = self.csr_structure()
                tagged = sp.csr_matrix((np.arange(self.nnz, dtype=np.int64), self.cols.numpy(),
                                        crow.numpy()), shape=(self.n_spots, self.n_genes)).tocsc()
                tagged.has_sorted_indices = False
                tagged.sort_indices()   # row order within a gene, so duplicates stay stable
                perm = torch.from_numpy(tagged.data)
                crow_t = torch.from_numpy(tagged.indptr.astype(np.int64))
                col_t = torch.from_numpy(tagged.indices.astype(np.int64))
            else:
                perm = torch.argsort(self.cols * self.n_spots + self.rows, stable=True)
                counts = torch.bincount(self.cols, minlength=self.n_genes)
                crow_t = torch.zeros(self.n_genes + 1, dtype=torch.int64, device=self.device)
                crow_t[1:] = torch.cumsum(counts, 0)
                col_t = self.rows[perm]
            self._csr_t = (crow_t.to(idx_dtype), col_t.to(idx_dtype), perm)
        return self._csr_t

    def margins(self) -> tuple[Tensor, Tensor]:
        """Total counts per spot (B,) and per gene (Db,)."""
        if self._margins is None:
            v = self.values
            per_spot = torch.zeros(self.n_spots, dtype=v.dtype, device=v.device).index_add_(0, self.rows, v)
            per_gene = torch.zeros(self.n_genes, dtype=v.dtype, device=v.device).index_add_(0, self.cols, v)
            self._margins = (per_spot, per_gene)
        return self._margins

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "CountBatch":
        """A copy on another device and/or with another float dtype for the values."""
        return CountBatch(self.rows.to(device), self.cols.to(device),
                          self.values.to(device=device, dtype=dtype or self.values.dtype),
                          self.n_spots, self.n_genes, self.lgamma_sum)


# ---- sparse kernels --------------------------------------------------------------------------

def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        # torch warns once that CSR support is "beta"; the few ops used here are stable.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _sparse(batch: CountBatch, values: Tensor) -> Tensor:
    """The block's sparsity pattern with the given values, (B, Db) CSR."""
    crow, col = batch.csr_structure()
    return _csr(crow, col, values, (batch.n_spots, batch.n_genes))


def _sparse_t(batch: CountBatch, values: Tensor) -> Tensor:
    """The transposed pattern with the given (row-major ordered) values, (Db, B) CSR."""
    crow, col, perm = batch.csr_t_structure()
    # index_select is several times faster than values[perm] for a long random permutation
    return _csr(crow, col, torch.index_select(values, 0, perm), (batch.n_genes, batch.n_spots))


def _scaled_factors(F: Tensor) -> tuple[Tensor, Tensor]:
    """For F (L, B): exp(F - M) as (B, L) and the per-spot shift M (B,)."""
    M = F.detach().amax(dim=0)
    return torch.exp(F.detach() - M).T.contiguous(), M


def _scaled_loadings(W: Tensor) -> tuple[Tensor, Tensor]:
    """For W (Db, L): W / Wmax (Db, L) and log Wmax (Db,), Wmax floored to stay positive."""
    W = W.detach()
    wmax = W.amax(dim=1).clamp_min(torch.finfo(W.dtype).tiny)
    return W / wmax[:, None], torch.log(wmax)


def _inner_rate(batch: CountBatch, Fe: Tensor, Wn: Tensor, floor: float) -> Tensor:
    """sum_l Wn[d, l] Fe[n, l] at the non-zeros, (nnz,), floored at ``floor``."""
    pattern = _sparse(batch, batch.values)
    inner = torch.sparse.sampled_addmm(pattern, Fe, Wn.T, beta=0.0).values()
    return inner.clamp_min(floor)


@dataclass
class _RateAtCounts:
    """R = W exp(F) at a block's non-zeros for one draw of F, in rescaled form.

    ``R = exp(log_wmax[cols] + shift[rows]) * inner`` with ``Fe = exp(F - shift)``
    (B, L), ``Wn = W / exp(log_wmax)`` (Db, L) and ``inner`` (nnz,).
    """

    Fe: Tensor
    shift: Tensor
    Wn: Tensor
    log_wmax: Tensor
    inner: Tensor

    @classmethod
    def compute(cls, batch: CountBatch, F: Tensor, W: Tensor, floor: Optional[float] = None):
        """F: (L, B) one draw of the log-factors; W: (Db, L)."""
        with torch.no_grad():
            Fe, shift = _scaled_factors(F)
            Wn, log_wmax = _scaled_loadings(W)
            inner = _inner_rate(batch, Fe, Wn, torch.finfo(F.dtype).tiny if floor is None else floor)
        return cls(Fe, shift, Wn, log_wmax, inner)

    def sum_y_log_rate(self, batch: CountBatch) -> Tensor:
        """sum over non-zeros of y log R, a scalar."""
        y_spot, y_gene = batch.margins()
        return ((batch.values * torch.log(self.inner)).sum() + (y_spot * self.shift).sum()
                + (y_gene * self.log_wmax).sum())

    def mm_numerator(self, batch: CountBatch) -> Tensor:
        """sum_n (y_dn / R_dn) exp(F_ln), (Db, L): also the gradient of sum y log R in W."""
        # The exp(shift) factors of R and of exp(F) cancel; Wmax does not.
        return (_sparse_t(batch, batch.values / self.inner) @ self.Fe) * torch.exp(-self.log_wmax)[:, None]

    def grad_log_factors(self, batch: CountBatch) -> Tensor:
        """d (sum y log R) / dF, (L, B): exp(F_ln) sum_d (y / R) W_dl."""
        return (self.Fe * (_sparse(batch, batch.values / self.inner) @ self.Wn)).T


class _SumYLogRate(torch.autograd.Function):
    """sum over non-zeros of ``y log R`` with ``R = W exp(F)``, averaged over draws.

    Inputs: F (E, L, B) draws of the log-factors, W (Db, L) loadings, the batch and
    the E precomputed :class:`_RateAtCounts` (so a caller that also needs R, like
    the fused loadings update, computes it once). Output: a scalar. The backward
    pass is exact, two sparse-dense products per draw; it stores ``nnz`` numbers
    per draw rather than ``nnz x L`` intermediates. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, F: Tensor, W: Tensor, batch: CountBatch, parts: list) -> Tensor:  # type: ignore[override]
        ctx.batch, ctx.parts = batch, parts
        return sum(p.sum_y_log_rate(batch) for p in parts) / len(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        batch, parts = ctx.batch, ctx.parts
        g = grad / len(parts)
        gF = gW = None
        if ctx.needs_input_grad[0]:
            gF = torch.stack([p.grad_log_factors(batch) for p in parts]) * g
        if ctx.needs_input_grad[1]:
            gW = sum(p.mm_numerator(batch) for p in parts) * g
        return gF, gW, None, None


# ---- public API ------------------------------------------------------------------------------

def _sum_y_log_rate(batch: CountBatch, F: Tensor, loadings: Tensor,
                    parts: Optional[list] = None) -> Tensor:
    """Mean over draws of ``sum y log R``; F: (E, L, B), loadings: (Db, L)."""
    if batch.nnz == 0:
        return (F.sum() + loadings.sum()) * 0.0
    if parts is None:
        parts = [_RateAtCounts.compute(batch, f, loadings) for f in F]
    return _SumYLogRate.apply(F, loadings, batch, parts)


def _check_shapes(batch: CountBatch, mean: Tensor, var: Tensor, loadings: Tensor) -> None:
    L, B = mean.shape
    if var.shape != mean.shape:
        raise ValueError(f"var has shape {tuple(var.shape)}, expected mean's shape {(L, B)}")
    if B != batch.n_spots:
        raise ValueError(f"mean has {B} spots (shape {(L, B)}), the count batch has {batch.n_spots}")
    if loadings.shape != (batch.n_genes, L):
        raise ValueError(f"loadings have shape {tuple(loadings.shape)}, expected "
                         f"(n_genes={batch.n_genes}, n_components={L})")


def _samples(mean: Tensor, var: Tensor, num_samples: int,
             generator: Optional[torch.Generator]) -> Tensor:
    """Reparametrised draws F = m + sqrt(v) eps, (E, L, B).

    A ``generator`` with a ``draw(shape, device, dtype)`` method supplies eps itself (a
    data-parallel rank's columns of the whole batch's draw, :mod:`sf_mlflow.models.distributed`).
    """
    shape = (num_samples, *mean.shape)
    if hasattr(generator, "draw"):
        eps = generator.draw(shape, mean.device, mean.dtype)
    else:
        eps = torch.randn(shape, generator=generator, device=mean.device, dtype=mean.dtype)
    # The floor keeps sqrt's gradient finite where a variance is exactly zero.
    std = torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny))
    return mean + std * eps


def expected_log_likelihood(batch: CountBatch, mean: Tensor, var: Tensor, loadings: Tensor,
                            mode: str = "lower-bound", num_samples: int = 8,
                            generator: Optional[torch.Generator] = None) -> Tensor:
    """``E_q[log p(Y | F, W)]`` of a block, or a bound or estimate of it.

    Parameters
    ----------
    batch : CountBatch
        Counts of B spots x Db genes.
    mean, var : Tensor, (L, B)
        Marginal means and variances of q(F) at the block's spots.
    loadings : Tensor, (Db, L), non-negative
        The block's rows of W.
    mode : {"lower-bound", "expanded", "simple"}
        ``"lower-bound"``: analytic and deterministic; ``E[log R]`` is replaced by
        ``log sum_l W exp(E F)`` (Jensen, log-sum-exp is convex), so the result is
        a lower bound of the expected log-likelihood. ``"expanded"``: ``E[log R]``
        by Monte Carlo with ``num_samples`` draws at the non-zeros only, the rate
        term analytic with ``E[exp F] = exp(m + v/2)``; unbiased. ``"simple"``:
        both terms by Monte Carlo from the same draws; unbiased, noisier.
    num_samples : int
        Draws for the Monte Carlo modes.
    generator : torch.Generator, optional
        Source of the draws; ``None`` uses torch's global generator.

    Returns
    -------
    Tensor, () scalar
        The unscaled sum over the block, including ``-sum lgamma(y + 1)``.
        Differentiable in ``mean``, ``var`` and ``loadings``.
    """
    ll, _, _ = _evaluate(batch, mean, var, loadings, mode, num_samples, generator)
    return ll


def _evaluate(batch: CountBatch, mean: Tensor, var: Tensor, loadings: Tensor, mode: str,
              num_samples: int, generator: Optional[torch.Generator]):
    """The likelihood of a block with what a loadings update needs.

    Returns ``(ll, parts, spot_sums)``: the scalar of :func:`expected_log_likelihood`,
    R at the non-zeros for each draw (:class:`_RateAtCounts`, one for the mean in
    lower-bound mode) and the rate term's ``sum_n E[exp F_ln]`` (L,) as estimated by
    the mode, so that ``rate = sum_l (sum_d W_dl) spot_sums_l``.
    """
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r} is not one of {', '.join(MODES)}")
    _check_shapes(batch, mean, var, loadings)
    if mode == "lower-bound":
        F = mean.unsqueeze(0)
    else:
        if num_samples < 1:
            raise ValueError(f"num_samples = {num_samples!r} must be a positive integer")
        F = _samples(mean, var, num_samples, generator)
    if mode == "simple":
        spot_sums = torch.exp(F).sum(dim=2).mean(dim=0)
    else:
        spot_sums = torch.exp(mean + 0.5 * var).sum(dim=1)
    parts = [_RateAtCounts.compute(batch, f, loadings) for f in F] if batch.nnz else []
    y_log_rate = _sum_y_log_rate(batch, F, loadings, parts)
    ll = y_log_rate - loadings.sum(dim=0) @ spot_sums - batch.lgamma_sum
    return ll, parts, spot_sums


@torch.no_grad()
def multiplicative_update(batch: CountBatch, mean: Tensor, var: Tensor, loadings: Tensor,
                          eps: float = 1e-10) -> Tensor:
    """One minorise-maximise step for the loadings of a block, factors fixed.

    ``W_dl <- W_dl [sum_n (Y_dn / R_dn) exp(m_ln)] / [sum_n exp(m_ln + v_ln / 2)]``
    with ``R = W exp(m)``. This is the exact maximiser over W of the Jensen minorant
    of the lower-bound objective at the current W, so it never decreases
    ``expected_log_likelihood(..., mode="lower-bound")`` for fixed ``mean``, ``var``.
    Every row of W is updated from this block's spots only.

    Parameters
    ----------
    batch : CountBatch, B spots x Db genes
    mean, var : Tensor, (L, B)
    loadings : Tensor, (Db, L), non-negative
    eps : float
        Floor on ``R``, relative to its scale ``max_l W_dl * max_l exp(m_ln)``, so a
        gene whose loadings all vanished cannot divide by zero.

    Returns
    -------
    Tensor, (Db, L)
        The new loadings (a new tensor; ``loadings`` is not modified).
    """
    _check_shapes(batch, mean, var, loadings)
    if batch.nnz == 0:
        return torch.zeros_like(loadings)
    rate = _RateAtCounts.compute(batch, mean, loadings, floor=eps)
    denom = torch.exp(mean + 0.5 * var).sum(dim=1)                        # (L,)
    return _mm_ratio(loadings.detach(), rate.mm_numerator(batch), denom)


def _mm_ratio(W: Tensor, numer: Tensor, denom: Tensor) -> Tensor:
    """W * numer / denom for W, numer (Db, L) and denom (L,)."""
    new = W * numer / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    # A zero loading stays zero; the where() also stops 0 * inf = NaN for a gene whose
    # loadings all vanished (its R is only the floor, so its ratios are huge).
    return torch.where(W > 0, new, torch.zeros_like(new))


def likelihood_and_update(batch: CountBatch, mean: Tensor, var: Tensor, loadings: Tensor,
                          mode: str = "lower-bound", num_samples: int = 8,
                          generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """:func:`expected_log_likelihood` and a multiplicative loadings step, fused.

    The step is the exact maximiser over W of the Jensen minorant of the returned
    estimate, at the current W and from the same R (computed once, which saves a
    sampled product per training step):
    ``W_dl <- W_dl * mean_e[sum_n (Y_dn / R^e_dn) exp(F^e_ln)] / S_l`` with ``S_l``
    the estimate of ``sum_n E[exp F_ln]`` the mode uses in its rate term. In
    lower-bound mode (a single "draw" F = mean, ``S_l = sum_n exp(m + v/2)``) this
    is :func:`multiplicative_update`; in the Monte Carlo modes the loadings step
    maximises the same estimate the factors' gradient step follows.

    Returns
    -------
    ll : Tensor, () scalar, differentiable in mean and var (not in loadings)
    new_loadings : Tensor, (Db, L)
    """
    loadings = loadings.detach()
    ll, parts, spot_sums = _evaluate(batch, mean, var, loadings, mode, num_samples, generator)
    if not parts:
        return ll, torch.zeros_like(loadings)
    with torch.no_grad():
        numer = sum(p.mm_numerator(batch) for p in parts) / len(parts)
        new = _mm_ratio(loadings, numer, spot_sums.detach())
    return ll, new


def likelihood_and_statistics(batch: CountBatch, mean: Tensor, var: Tensor, loadings: Tensor,
                              mode: str = "lower-bound", num_samples: int = 8,
                              generator: Optional[torch.Generator] = None):
    """:func:`likelihood_and_update` with the step's sums over spots instead of the step.

    Returns ``(ll, numer (Db, L), spot_sums (L,))``; the new loadings are
    ``_mm_ratio(loadings, numer, spot_sums)``. Both statistics are sums over the block's
    spots, so a data-parallel fit adds them over the ranks' shares of a batch first.
    """
    loadings = loadings.detach()
    ll, parts, spot_sums = _evaluate(batch, mean, var, loadings, mode, num_samples, generator)
    with torch.no_grad():
        numer = (sum(p.mm_numerator(batch) for p in parts) / len(parts) if parts
                 else torch.zeros_like(loadings))
    return ll, numer, spot_sums.detach()


@torch.no_grad()
def poisson_deviance(batch: CountBatch, log_factors: Tensor, loadings: Tensor) -> float:
    """Poisson deviance ``2 sum [y log(y / mu) - (y - mu)]`` of a block under ``mu = W exp(F)``.

    Parameters
    ----------
    batch : CountBatch, B spots x Db genes
    log_factors : Tensor, (L, B)
    loadings : Tensor, (Db, L)

    Sparse throughout: ``y log mu`` only at the non-zeros, ``sum mu`` factorised.
    """
    if log_factors.shape != (loadings.shape[1], batch.n_spots) or loadings.shape[0] != batch.n_genes:
        raise ValueError(f"log_factors {tuple(log_factors.shape)} and loadings {tuple(loadings.shape)} "
                         f"do not fit a block of {batch.n_spots} spots x {batch.n_genes} genes")
    y = batch.values.double()
    y_log_y = float((y * torch.log(y)).sum()) if batch.nnz else 0.0
    y_log_mu = (float(_RateAtCounts.compute(batch, log_factors, loadings).sum_y_log_rate(batch))
                if batch.nnz else 0.0)
    total_mu = float(loadings.double().sum(dim=0) @ torch.exp(log_factors.double()).sum(dim=1))
    return 2.0 * (y_log_y - y_log_mu - float(y.sum()) + total_mu)
