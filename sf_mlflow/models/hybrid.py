"""The hybrid prior (NSFH, Townes & Engelhardt 2023): K spatial factors beside L - K non-spatial ones.

With ``PNMF(prior=SVGP(...), spatial_components=K)`` the first K of the L log-factors
follow the SVGP prior over the spot coordinates and the other L - K the independent
N(0, 1) prior of PNMF. Both share one likelihood and one loadings matrix W (D, L), so
the data decide which gene programmes are spatially smooth and which vary spot by spot.

:class:`HybridPrior` is a :class:`~sf_mlflow.models.priors.FactorPrior` over all L
factors: its marginals stack the two parts' along the factor axis and its KL is their sum.
Either part may be empty (K = 0 or K = L); an empty part is absent (None), so such a
hybrid computes exactly what the plain Gaussian or spatial prior computes. The trainer
(:mod:`sf_mlflow.models._training`) steps the spatial part's q(v) by natural gradients
and the Gaussian part's parameters with the optimiser.

This module also builds the prior of a saved model (:func:`empty_prior`; a fit's comes from
:func:`sf_mlflow.models.start.initial_prior`); its factors at new positions come from
:func:`sf_mlflow.models.prediction.predict_factors`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from sf_mlflow.models.priors import FactorPrior, GaussianPrior

__all__ = ["HybridPrior", "empty_prior", "spatial_order", "validation_predictor"]

#: Neighbours of the spot graph on which :func:`spatial_order` measures autocorrelation.
NEIGHBOURS = 6


class HybridPrior(FactorPrior):
    """A spatial (SVGP) prior over factors ``0..K-1`` and a Gaussian prior over ``K..L-1``.

    Parameters
    ----------
    spatial : SVGPPrior or None
        The prior of the K spatial factors (None when K = 0).
    gaussian : GaussianPrior or None
        The prior of the L - K non-spatial factors (None when K = L).

    Attributes
    ----------
    n_components : int
        L = K + (L - K).
    n_spatial : int
        K.
    """

    def __init__(self, spatial: Optional[FactorPrior], gaussian: Optional[GaussianPrior]):
        super().__init__()
        if spatial is None and gaussian is None:
            raise ValueError("HybridPrior needs a spatial or a Gaussian part (or both)")
        self.spatial, self.gaussian = spatial, gaussian
        self.n_spatial = 0 if spatial is None else int(spatial.n_components)
        self.n_components = self.n_spatial + (0 if gaussian is None else int(gaussian.n_components))

    @property
    def kl_weight(self) -> float:
        return float((self.spatial if self.spatial is not None else self.gaussian).kl_weight)

    # The spatial prior's facts the estimator and persistence read (None without spatial part).
    @property
    def Z(self) -> Optional[Tensor]:
        return None if self.spatial is None else self.spatial.Z

    @property
    def g_Z(self) -> Optional[Tensor]:
        return None if self.spatial is None else getattr(self.spatial, "g_Z", None)

    @property
    def num_inducing(self) -> Optional[int]:
        return None if self.spatial is None else self.spatial.num_inducing

    def _stack(self, spatial: Optional[Tensor], gaussian: Optional[Tensor]) -> Tensor:
        parts = [t for t in (spatial, gaussian) if t is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def marginals(self, index: Tensor, coordinates: Optional[Tensor] = None,
                  groups: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(mean (L, B), var (L, B)): the spatial factors' rows first, then the Gaussian ones."""
        ms = vs = mg = vg = None
        if self.spatial is not None:
            ms, vs = self.spatial.marginals(index, coordinates, groups)
        if self.gaussian is not None:
            mg, vg = self.gaussian.marginals(index)
        return self._stack(ms, mg), self._stack(vs, vg)

    def means(self, index: Tensor, coordinates: Optional[Tensor] = None,
              groups: Optional[Tensor] = None) -> Tensor:
        """Mean of q(F) at the spots, (L, B), spatial rows first."""
        return self._stack(None if self.spatial is None else self.spatial.means(index, coordinates, groups),
                           None if self.gaussian is None else self.gaussian.means(index))

    def kl(self, index: Tensor) -> Tensor:
        """The spatial part's KL (on its inducing points) plus the Gaussian part's (batch-scaled)."""
        if self.spatial is None:
            return self.gaussian.kl(index)
        if self.gaussian is None:
            return self.spatial.kl(index)
        return self.spatial.kl(index) + self.gaussian.kl(index)

    def clear_cache(self) -> None:
        if self.spatial is not None and hasattr(self.spatial, "clear_cache"):
            self.spatial.clear_cache()


def spatial_order(mu: Tensor, coords: Tensor, k: int = NEIGHBOURS) -> np.ndarray:
    """Factors by decreasing Moran's I of their log-factors mu (L, N) on the ``k``-nearest
    neighbour graph of the spots (coords (N, 2)), a stable order (L,)."""
    X = coords.detach().cpu().double().numpy()
    F = mu.detach().cpu().double().numpy()
    F = F - F.mean(axis=1, keepdims=True)
    k = min(k, X.shape[0] - 1)
    if k < 1:
        return np.arange(F.shape[0])
    _, idx = cKDTree(X).query(X, k=k + 1)
    lagged = F[:, idx[:, 1:]].mean(axis=2)                  # mean over each spot's neighbours
    moran = (F * lagged).sum(axis=1) / np.maximum((F * F).sum(axis=1), 1e-300)
    return np.argsort(-moran, kind="stable")


def empty_prior(p: dict, n_spots: int, coords: Optional[Tensor], groups: Optional[Tensor],
                inducing_points: Optional[Tensor], inducing_groups: Optional[Tensor],
                dtype: torch.dtype) -> FactorPrior:
    """The prior module of a saved model, before its state is loaded into it.

    The spatial part is rebuilt at the saved inducing points (no k-means rerun).
    """
    L, spatial, K = p["n_components"], p["spatial"], p["n_spatial"]
    gp = gaussian = None
    if spatial is not None and K > 0:
        gp = spatial.build(coords, groups, K, kl_weight=p["kl_weight"], seed=p["random_state"],
                           inducing_points=inducing_points, inducing_groups=inducing_groups)
    if K < L:
        gaussian = GaussianPrior(n_spots, L - K, dtype=dtype, kl_weight=p["kl_weight"])
    if not p["hybrid"]:
        return gp if gp is not None else gaussian
    return HybridPrior(gp, gaussian)


def validation_predictor(prior: FactorPrior, coords: Optional[Tensor], x: Tensor,
                         k: int = NEIGHBOURS):
    """``predict(groups) -> log-factors (L, Nv)`` at validation spots ``x`` (Nv, 2), the
    rule of ``predict_at`` (:mod:`sf_mlflow.models.prediction`) on the live training state.

    A plain spatial prior: its GP predictive mean. A hybrid: that for the spatial factors
    and, for the others, the mean current log-factor of the ``k`` nearest training spots
    (``coords`` (N, 2)); the neighbours are found once, as training spots do not move.
    """
    if not isinstance(prior, HybridPrior):
        return lambda g: prior.predict(x, g, return_var=False)
    idx = None
    if prior.gaussian is not None:
        k = max(1, min(int(k), int(coords.shape[0])))
        _, nn = cKDTree(coords.detach().cpu().double().numpy()).query(
            x.detach().cpu().double().numpy(), k=k)
        idx = torch.as_tensor(np.asarray(nn).reshape(x.shape[0], k), device=x.device)

    def predict(g: Optional[Tensor]) -> Tensor:
        spatial = None if prior.spatial is None else prior.spatial.predict(x, g, return_var=False)
        rest = None if idx is None else prior.gaussian.mu[:, idx].mean(dim=2)
        return prior._stack(spatial, rest)
    return predict
