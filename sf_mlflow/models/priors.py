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
