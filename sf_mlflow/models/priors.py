"""Variational priors over the latent log-factors F (L x N).

A prior module owns the variational distribution q(F) of the training spots and
the KL divergence from q to the prior. The estimator only ever asks it for
per-spot marginals of a mini-batch and for that mini-batch's KL term, so the
non-spatial and the spatial (SVGP) prior share one training loop.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class FactorPrior(nn.Module):
    """Interface of a variational prior over L factors.

    Subclasses implement :meth:`marginals` and :meth:`kl`. Both priors are
    independent across factors, and the Poisson likelihood factorises over spots
    and genes, so the per-spot, per-factor Gaussian marginals of q(F) are all the
    likelihood terms need.
    """

    n_components: int

    def marginals(self, index: Tensor, coordinates: Optional[Tensor] = None,
                  groups: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(F) at a mini-batch of training spots.

        Parameters
        ----------
        index : LongTensor, (B,)
            Positions of the batch's spots among the N training spots.
        coordinates : Tensor, (B, 2), optional
            Their coordinates (used by spatial priors).
        groups : LongTensor, (B,), optional
            Their group codes (used by multi-group kernels).

        Returns
        -------
        mean : Tensor, (L, B)
        var : Tensor, (L, B), non-negative
        """
        raise NotImplementedError

    def means(self, index: Tensor, coordinates: Optional[Tensor] = None,
              groups: Optional[Tensor] = None) -> Tensor:
        """Mean of q(F) alone at a mini-batch of spots, (L, B); inputs as :meth:`marginals`.

        Subclasses override it where the mean is much cheaper than the variance.
        """
        return self.marginals(index, coordinates, groups)[0]

    def kl(self, index: Tensor) -> Tensor:
        """KL(q || p) term of the ELBO for a mini-batch, scaled to the whole data set.

        The non-spatial prior's KL is a sum over spots, so a batch's share is scaled
        by N/B; a spatial prior's KL lives on its fixed inducing points and is not
        scaled by the batch.

        Returns
        -------
        Tensor, () scalar
        """
        raise NotImplementedError


class GaussianPrior(FactorPrior):
    """Independent N(0, 1) prior on every F_ln with a mean-field Gaussian q (PNMF).

    ``q(F_ln) = N(mu_ln, s_ln^2)`` with ``s = exp(log_scale)``: the log
    parametrisation keeps ``s > 0`` and gives the optimiser steps of a relative
    size, which suits scales that range over orders of magnitude.

    Parameters
    ----------
    n_spots : int
        N, the number of training spots.
    n_components : int
        L, the number of factors.
    mean : Tensor, (L, N), optional
        Initial variational means (default zeros).
    scale : float or Tensor broadcastable to (L, N), optional
        Initial standard deviations (default 1, the prior's).
    dtype : torch.dtype
        Dtype of the parameters when ``mean`` is not given.
    kl_weight : float
        Multiplies the KL term; 1 gives the true ELBO (a bound on the evidence),
        smaller values weaken the prior's pull towards N(0, 1).

    Attributes
    ----------
    mu : Parameter, (L, N)
    log_scale : Parameter, (L, N)
    """

    def __init__(self, n_spots: int, n_components: int, mean: Optional[Tensor] = None,
                 scale: float | Tensor = 1.0, dtype: torch.dtype = torch.float32,
                 kl_weight: float = 1.0):
        super().__init__()
        self.n_spots = int(n_spots)
        self.n_components = int(n_components)
        self.kl_weight = float(kl_weight)
        shape = (self.n_components, self.n_spots)
        if mean is None:
            mean = torch.zeros(shape, dtype=dtype)
        if tuple(mean.shape) != shape:
            raise ValueError(f"GaussianPrior: mean has shape {tuple(mean.shape)}, expected "
                             f"(n_components, n_spots) = {shape}")
        mean = mean.detach().clone()
        log_scale = torch.log(torch.as_tensor(scale, dtype=mean.dtype, device=mean.device))
        self.mu = nn.Parameter(mean)
        self.log_scale = nn.Parameter(log_scale.expand(shape).clone())

    def marginals(self, index: Tensor, coordinates: Optional[Tensor] = None,
                  groups: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(mean (L, B), var (L, B)) of q at the spots ``index`` (B,); other inputs ignored."""
        return self.mu[:, index], torch.exp(2.0 * self.log_scale[:, index])

    def means(self, index: Tensor, coordinates: Optional[Tensor] = None,
              groups: Optional[Tensor] = None) -> Tensor:
        """Mean of q at the spots ``index`` (B,), (L, B)."""
        return self.mu[:, index]

    def kl(self, index: Tensor) -> Tensor:
        """kl_weight * (N / B) * sum over the batch of KL(N(mu, s^2) || N(0, 1)), a scalar.

        Per entry ``KL = (s^2 + mu^2 - 1) / 2 - log s``.
        """
        mu = self.mu[:, index]
        log_s = self.log_scale[:, index]
        kl = 0.5 * (torch.exp(2.0 * log_s) + mu * mu - 1.0) - log_s
        return kl.sum() * (self.kl_weight * self.n_spots / max(int(index.shape[0]), 1))
