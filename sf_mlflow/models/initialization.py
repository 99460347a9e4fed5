"""Where a fit starts: KL-NMF loadings and log-factors, and the GP warm start.

Initialisation runs a few sparse KL-NMF multiplicative iterations (Lee & Seung)
from a seeded random start, then sets ``mu = log H`` shifted per factor to mean
zero (the shift moved into W, so ``W exp(mu)`` is unchanged), and the variances
to the fixed point of the lower bound, ``v = 1 / (1 + sum_d W_dl exp(mu_ln))``.
A spatial prior cannot take mu directly; its mean is regressed onto it instead
(:func:`warm_start`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from sf_mlflow.models.likelihood import CountBatch, _csr
from sf_mlflow.models.priors import FactorPrior

__all__ = ["initial_state", "kl_nmf", "fixed_point_scale", "warm_start"]

#: KL-NMF multiplicative iterations of the initialisation. Each costs two sparse
#: sampled products and two sparse-dense products; 20 put W and H close enough that
#: the variational optimiser starts in the right basin.
INIT_ITER = 20

#: Floor on initial factors, relative to the factor's mean over spots, before the log:
#: spots where KL-NMF drove a factor to ~0 start at mean - 6.9 rather than -inf.
INIT_FLOOR = 1e-3

#: Warm start of a spatial prior: Adam steps, step size and spots per step of a
#: least-squares fit of its mean to the KL-NMF log-factors (see ``warm_start``).
WARM_ITER = 100
WARM_LR = 0.05
WARM_BATCH = 2000


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


def warm_start(prior: FactorPrior, mu0: Tensor, coords: Tensor, groups: Optional[Tensor],
                gen: torch.Generator) -> None:
    """Fit the prior's inducing means ``mu`` so its q(F) mean matches mu0 (L, N), least squares.

    A spatial prior starts at mean zero, i.e. flat factors, and the ELBO optimiser
    then has to discover the factors from scratch, which is slow and often ends in a
    poor local optimum (a factor that never separates). Regressing the GP mean on
    the KL-NMF log-factors first hands it the factors the initial W was fitted to.
    Only ``mu`` moves (the mean is linear in it, so this is a convex problem); kernel
    hyperparameters stay put so they cannot shrink to fit noise. Priors without a
    ``mu`` parameter are left as they are.
    """
    params = [p for name, p in prior.named_parameters() if name == "mu"]
    if not params:
        return
    n = mu0.shape[1]
    opt = torch.optim.Adam(params, lr=WARM_LR)
    for _ in range(WARM_ITER):
        idx = (torch.randperm(n, generator=gen, device=mu0.device)[:WARM_BATCH] if n > WARM_BATCH
               else torch.arange(n, device=mu0.device))
        mean = prior.means(idx, coords[idx], None if groups is None else groups[idx])
        loss = (mean - mu0[:, idx]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    if hasattr(prior, "clear_cache"):
        prior.clear_cache()
