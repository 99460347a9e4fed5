"""Where a fit starts: KL-NMF loadings and log-factors, and the GP warm start.

Initialisation runs a few sparse KL-NMF multiplicative iterations (Lee & Seung)
from NNDSVDa (``init="nndsvda"``, the default) or from a seeded random start
(``init="random"``), then sets ``mu = log H`` shifted per factor to mean
zero (the shift moved into W, so ``W exp(mu)`` is unchanged), and the variances
to the fixed point of the lower bound, ``v = 1 / (1 + sum_d W_dl exp(mu_ln))``.

NNDSVDa (Boutsidis & Gallopoulos, 2008) starts each factor from the positive or the
negative part of one singular pair of Y, whichever carries more of it, and the
zeros it leaves at the mean count. From random starts a weak factor is often
absorbed by two others during the fit and dies (its loadings go to ~0): on
generated data at 100 counts a spot with 10 factors every seed lost one, and the
fit's ELBO was lower than with all factors alive; from NNDSVDa none died (a better
start, not a guarantee: on one such draw it left a factor with 0.7 % of the counts).
A spatial prior starts from a PNMF fit begun here (:mod:`sf_mlflow.models.start`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from sf_mlflow.models.likelihood import CountBatch, _sparse, _sparse_t

__all__ = ["INIT_METHODS", "initial_state", "kl_nmf", "nndsvda", "fixed_point_scale"]

#: KL-NMF multiplicative iterations of the initialisation. Each costs two sparse
#: sampled products and two sparse-dense products; 20 put W and H close enough that
#: the variational optimiser starts in the right basin.
INIT_ITER = 20

#: Floor on initial factors, relative to the factor's mean over spots, before the log:
#: spots where KL-NMF drove a factor to ~0 start at mean - 6.9 rather than -inf.
INIT_FLOOR = 1e-3

#: Where KL-NMF starts (``PNMF(init=...)``).
INIT_METHODS = ("nndsvda", "random")

#: Randomised SVD of NNDSVDa: extra columns of the random range and power iterations
#: (Halko, Martinsson & Tropp, 2011; the singular vectors need only be good enough to
#: split the data into its main positive parts, KL-NMF refines them).
SVD_OVERSAMPLES = 10
SVD_POWER_ITER = 8


def initial_state(full: CountBatch, L: int, gen: torch.Generator,
                  W_fixed: Optional[Tensor] = None, init: str = "nndsvda") -> tuple[Tensor, Tensor]:
    """KL-NMF start: loadings W (D, L) and log-factors mu (L, N) with per-factor mean 0.

    ``init`` (:data:`INIT_METHODS`) is where KL-NMF starts. With ``W_fixed`` (D, L)
    (transform) only the factors are fitted, from ones, and W is kept.
    """
    if init not in INIT_METHODS:
        raise ValueError(f"init = {init!r} is not one of {INIT_METHODS}")
    N, D = full.n_spots, full.n_genes
    device, dtype = full.device, full.values.dtype
    if W_fixed is not None:
        W, H = W_fixed.clone(), torch.ones((N, L), device=device, dtype=dtype)
    elif init == "nndsvda":
        H, W = nndsvda(full, L, gen)
    else:
        # sklearn's "random" NMF init scale: entries of H W^T average the data mean
        scale = math.sqrt(_mean_count(full) / L)
        H = scale * (0.5 + torch.rand((N, L), generator=gen, device=device, dtype=dtype))
        W = scale * (0.5 + torch.rand((D, L), generator=gen, device=device, dtype=dtype))
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
    y = batch.values
    pattern = _sparse(batch, y)

    def ratio() -> Tensor:  # y / (H W^T) at the non-zeros
        rate = torch.sparse.sampled_addmm(pattern, H, W.T, beta=0.0).values()
        return y / rate.clamp_min(eps)

    for _ in range(n_iter):
        s = ratio()
        H.mul_((_sparse(batch, s) @ W) / W.sum(0).clamp_min(eps))
        if update_w:
            s = ratio()
            W.mul_((_sparse_t(batch, s) @ H) / H.sum(0).clamp_min(eps))
    return H, W


@torch.no_grad()
def nndsvda(full: CountBatch, L: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """NNDSVDa start of ``Y ~= H W^T``: H (N, L) and W (D, L), positive.

    From the leading singular triplets ``(u_l, s_l, v_l)`` of Y (randomised, seeded by
    ``gen``): factor 0 is ``sqrt(s_0) (|u_0|, |v_0|)``; factor l > 0 keeps the positive parts
    ``(u_l+, v_l+)`` or the negative ones, whichever has the larger product of norms ``m``,
    each part normalised and scaled by ``sqrt(s_l m)``. Entries left at zero take the mean
    count, so multiplicative updates can move them; factors beyond the counts' rank
    (``L > min(N, D)``) start at the mean count times U(0.5, 1.5).
    """
    U, S, V = _top_singular(full, L, gen)
    k = S.shape[0]                        # min(L, N, D): factors beyond the rank start random
    mean = _mean_count(full)
    H = mean * (0.5 + torch.rand((full.n_spots, L), generator=gen, device=U.device, dtype=U.dtype))
    W = mean * (0.5 + torch.rand((full.n_genes, L), generator=gen, device=U.device, dtype=U.dtype))
    H[:, 0], W[:, 0] = S[0].sqrt() * U[:, 0].abs(), S[0].sqrt() * V[:, 0].abs()
    for l in range(1, k):
        parts = []
        for sign in (1.0, -1.0):
            u, v = (sign * U[:, l]).clamp_min(0), (sign * V[:, l]).clamp_min(0)
            nu, nv = torch.linalg.vector_norm(u), torch.linalg.vector_norm(v)
            parts.append((float(nu * nv), u / nu.clamp_min(1e-30), v / nv.clamp_min(1e-30)))
        m, u, v = max(parts, key=lambda t: t[0])
        scale = math.sqrt(max(float(S[l]) * m, 0.0))
        H[:, l], W[:, l] = scale * u, scale * v
    tiny = 1e-6 * max(float(H.max()), float(W.max()), mean)
    H[H < tiny] = mean
    W[W < tiny] = mean
    return H.contiguous(), W.contiguous()


def _mean_count(full: CountBatch) -> float:
    """The mean count over all N x D entries (at least 1e-12): the scale of both starts."""
    return max(float(full.values.sum()) / (full.n_spots * full.n_genes), 1e-12)


def _top_singular(full: CountBatch, k: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The k' = min(k, N, D) leading singular triplets of the counts, U (N, k'), S (k',),
    V (D, k'), by a randomised range finder with power iterations on the sparse counts."""
    N, D = full.n_spots, full.n_genes
    Y, Yt = _sparse(full, full.values), _sparse_t(full, full.values)
    width = min(k + SVD_OVERSAMPLES, N, D)
    omega = torch.randn((D, width), generator=gen, device=full.device, dtype=full.values.dtype)
    Q = torch.linalg.qr(Y @ omega).Q                                     # (N, width)
    for _ in range(SVD_POWER_ITER):
        Q = torch.linalg.qr(Y @ torch.linalg.qr(Yt @ Q).Q).Q
    B = (Yt @ Q).T                                                       # (width, D) = Q^T Y
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k], Vh[:k].T


def log_factors_from_nmf(H: Tensor) -> Tensor:
    """log H with a relative floor, (L, N)."""
    floor = INIT_FLOOR * H.mean(dim=0, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)
    return torch.log(torch.maximum(H, floor)).T.contiguous()


def fixed_point_scale(mu: Tensor, W: Tensor) -> Tensor:
    """Posterior sd where the lower bound is stationary in v for small v: (L, N)."""
    return torch.rsqrt(1.0 + W.sum(0)[:, None] * torch.exp(mu))
