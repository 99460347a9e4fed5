"""The whitened interpolation ``A^T = Kxz Lzz^{-T}`` of the training spots, kept across steps.

With the kernel fixed during training (its hyperparameters chosen at the start, the default)
A depends only on a spot's position and group, yet every natural step computed it again for
its batch: the kernel matrix and a triangular solve of M^2 B per factor, about a third of a
step at the CPU defaults (M 1,000, B 10,000, one kernel per factor). The cache keeps each
training spot's row of A from the first step that computed it (so an epoch of mini-batches
fills it at no extra cost) and gathers a batch's rows from it afterwards.

It is used on the CPU while ``n_spots x M x itemsize`` per kernel stays within
:func:`cache_limit`: :data:`MEMORY_SHARE` of the memory available when the fit starts, shared
by the processes of a ``torchrun`` on this machine (1.6 GB at Slide-seq size and the CPU
defaults: 39,596 spots, L 10, M 1,000; 4.8 GB at the plan's M 3,000, which a machine with
16 GB available keeps), and never with trained kernel hyperparameters (A then changes every
step).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

__all__ = ["InterpCache", "MEMORY_SHARE", "FALLBACK_BYTES", "cache_limit"]

#: The share of the available memory (when the fit starts) a cache may take: the rest of a fit
#: at Slide-seq size (counts, loadings, a batch's kernel matrices) needs a few GB besides.
MEMORY_SHARE = 0.3

#: The limit where the available memory cannot be read (no ``/proc/meminfo``).
FALLBACK_BYTES = 2 * 2 ** 30


def available_memory() -> Optional[int]:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cache_limit() -> int:
    """Largest cache (bytes) this process keeps: :data:`MEMORY_SHARE` of the available memory,
    divided among the processes ``torchrun`` started on this machine (``LOCAL_WORLD_SIZE``);
    :data:`FALLBACK_BYTES` where the available memory is unknown."""
    avail = available_memory()
    if avail is None:
        return FALLBACK_BYTES
    try:
        procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        procs = 1
    return int(MEMORY_SHARE * avail / procs)


class InterpCache:
    """Rows of ``A^T`` for the N training spots of an :class:`~.svgp.SVGPPrior`.

    Parameters
    ----------
    prior : SVGPPrior
    n_spots : int
        N; batches index the training spots by ``idx`` in ``[0, N)``.
    enabled : bool
        False: :meth:`marginals` computes A every time (trained kernel, or a GPU); it is also
        off when the cache would exceed ``limit``.
    limit : int, optional
        Bytes the cache may take; default :func:`cache_limit`.

    Attributes
    ----------
    size : int
        Bytes the full cache takes.
    rows : Tensor, (N, M) or (L, N, M) with per-factor kernels, or None before the first step
    filled : Tensor of bool, (N,)
        Which spots' rows are in ``rows``.
    """

    def __init__(self, prior, n_spots: int, enabled: bool, limit: Optional[int] = None):
        M = prior.num_inducing
        kernels = prior.n_components if prior.kernel.per_factor else 1
        self.size = kernels * n_spots * M * prior.mu.element_size()
        self.prior, self.n_spots = prior, int(n_spots)
        self.enabled = bool(enabled) and prior.mu.device.type == "cpu"
        if self.enabled:
            self.enabled = self.size <= (cache_limit() if limit is None else limit)
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
