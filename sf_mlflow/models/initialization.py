"""Where a fit starts: KL-NMF loadings and log-factors, and the GP warm start.

Initialisation runs a few sparse KL-NMF multiplicative iterations (Lee & Seung)
from a seeded random start, then sets ``mu = log H`` shifted per factor to mean
zero (the shift moved into W, so ``W exp(mu)`` is unchanged), and the variances
to the fixed point of the lower bound, ``v = 1 / (1 + sum_d W_dl exp(mu_ln))``.
A spatial prior starts from a PNMF fit begun here (:mod:`sf_mlflow.models.start`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from sf_mlflow.models.likelihood import CountBatch, _csr

__all__ = ["initial_state", "kl_nmf", "fixed_point_scale"]

#: KL-NMF multiplicative iterations of the initialisation. Each costs two sparse
#: sampled products and two sparse-dense products; 20 put W and H close enough that
#: the variational optimiser starts in the right basin.
INIT_ITER = 20

#: Floor on initial factors, relative to the factor's mean over spots, before the log:
#: spots where KL-NMF drove a factor to ~0 start at mean - 6.9 rather than -inf.
INIT_FLOOR = 1e-3



def initial_state(full: CountBatch, L: int, gen: torch.Generator,
                  W_fixed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """KL-NMF start: loadings W (D, L) and log-factors mu (L, N) with per-factor mean 0.

    With ``W_fixed`` (D, L) (transform) only the factors are fitted and W is kept.
    """
    N, D = full.n_spots, full.n_genes
    device, dtype = full.device, full.values.dtype
    # sklearn's "random" NMF init scale: entries of H W^T average the data mean
    scale = math.sqrt(max(float(full.values.sum()) / (N * D), 1e-12) / L)
    H = scale * (0.5 + torch.rand((N, L), generator=gen, device=device, dtype=dtype))
    if W_fixed is None:
        W = scale * (0.5 + torch.rand((D, L), generator=gen, device=device, dtype=dtype))
    else:
        W = W_fixed.clone()
        H.fill_(1.0)
    H, W = kl_nmf(full, H, W, INIT_ITER, update_w=W_fixed is None)
    mu = log_factors_from_nmf(H)
    if W_fixed is None:
        # Centre each factor: the prior N(0, 1) sees mean-zero log-factors and W
        # absorbs the shift, leaving the rates W exp(mu) unchanged.
        shift = mu.mean(dim=1)
        mu = mu - shift[:, None]
        W = W * torch.exp(shift)[None, :]
    return W, mu


@torch.no_grad()
def kl_nmf(batch: CountBatch, H: Tensor, W: Tensor, n_iter: int, update_w: bool = True,
            eps: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Lee-Seung multiplicative updates for KL-NMF, ``Y ~= H W^T``, sparse throughout.

    H: (N, L) and W: (D, L) positive, updated in place and returned.
    """
    crow_t, col_t, perm = batch.csr_t_structure()
    y = batch.values
    pattern = _csr(*batch.csr_structure(), y, (batch.n_spots, batch.n_genes))

    def ratio() -> Tensor:  # y / (H W^T) at the non-zeros
        rate = torch.sparse.sampled_addmm(pattern, H, W.T, beta=0.0).values()
        return y / rate.clamp_min(eps)

    for _ in range(n_iter):
        s = ratio()
        H.mul_((_csr(*batch.csr_structure(), s, pattern.shape) @ W) / W.sum(0).clamp_min(eps))
        if update_w:
            s = ratio()
            W.mul_((_csr(crow_t, col_t, torch.index_select(s, 0, perm), (batch.n_genes, batch.n_spots)) @ H)
                   / H.sum(0).clamp_min(eps))
    return H, W


def log_factors_from_nmf(H: Tensor) -> Tensor:
    """log H with a relative floor, (L, N)."""
    floor = INIT_FLOOR * H.mean(dim=0, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)
    return torch.log(torch.maximum(H, floor)).T.contiguous()


def fixed_point_scale(mu: Tensor, W: Tensor) -> Tensor:
    """Posterior sd where the lower bound is stationary in v for small v: (L, N)."""
    return torch.rsqrt(1.0 + W.sum(0)[:, None] * torch.exp(mu))
