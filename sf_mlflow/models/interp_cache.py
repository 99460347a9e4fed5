"""The whitened interpolation ``A^T = Kxz Lzz^{-T}`` of the training spots, kept across steps.

With the kernel fixed during training (its hyperparameters chosen at the start, the default)
A depends only on a spot's position and group, yet every natural step computed it again for
its batch: the kernel matrix and a triangular solve of M^2 B per factor, about a third of a
step at the CPU defaults (M 1,000, B 10,000, one kernel per factor). The cache keeps each
training spot's row of A from the first step that computed it (so an epoch of mini-batches
fills it at no extra cost) and gathers a batch's rows from it afterwards.

It is used on the CPU while ``n_spots x M x itemsize`` per kernel stays within
:data:`MAX_BYTES` (1.6 GB at Slide-seq size and the CPU defaults: 39,596 spots, L 10, M 1,000),
and never with trained kernel hyperparameters (A then changes every step).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["InterpCache", "MAX_BYTES"]

#: Largest cache (bytes) a CPU fit keeps; larger ones (e.g. the plan's M 3,000 at 39,596
#: spots: 4.8 GB) compute A every step as before.
MAX_BYTES = 2 * 2 ** 30


class InterpCache:
    """Rows of ``A^T`` for the N training spots of an :class:`~.svgp.SVGPPrior`.

    Parameters
    ----------
    prior : SVGPPrior
    n_spots : int
        N; batches index the training spots by ``idx`` in ``[0, N)``.
    enabled : bool
        False: :meth:`marginals` computes A every time (trained kernel, a GPU, or too large).

    Attributes
    ----------
    rows : Tensor, (N, M) or (L, N, M) with per-factor kernels, or None before the first step
    filled : Tensor of bool, (N,)
        Which spots' rows are in ``rows``.
    """

    def __init__(self, prior, n_spots: int, enabled: bool):
        M = prior.num_inducing
        kernels = prior.n_components if prior.kernel.per_factor else 1
        size = kernels * n_spots * M * prior.mu.element_size()
        self.prior, self.n_spots = prior, int(n_spots)
        self.enabled = bool(enabled) and prior.mu.device.type == "cpu" and size <= MAX_BYTES
        self.rows: Optional[Tensor] = None
        self.filled = torch.zeros(self.n_spots, dtype=torch.bool)

    def marginals(self, idx: Tensor, coordinates: Tensor, groups: Optional[Tensor]
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """``prior.marginals_and_interp(coordinates, groups)`` for the spots ``idx`` (B,),
        whose coordinates (B, 2) and groups (B,) are given; A from the cache where it can."""
        prior = self.prior
        if not self.enabled:
            return prior.marginals_and_interp(coordinates, groups)
        idx = idx.to(self.filled.device)
        if self.rows is not None and bool(self.filled[idx].all()):
            At = self.rows.index_select(-2, idx)
            return (*prior.marginals_from_interp(At), At)
        mean, var, At = prior.marginals_and_interp(coordinates, groups)
        if self.rows is None:
            shape = (*At.shape[:-2], self.n_spots, At.shape[-1])
            self.rows = torch.empty(shape, dtype=At.dtype, device=At.device)
        self.rows.index_copy_(At.dim() - 2, idx, At.detach())
        self.filled[idx] = True
        return mean, var, At
