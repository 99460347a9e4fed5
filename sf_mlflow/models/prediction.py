"""Factors at positions where the model saw no counts, for each kind of prior.

The one rule behind :meth:`PNMF.predict_at <sf_mlflow.models.pnmf.PNMF.predict_at>`:

* spatial (SVGP) prior: the GP predictive at the positions (and groups);
* Gaussian prior: its posterior at an unseen spot is the prior, the same everywhere, so
  the mean posterior log-factor of the nearest training spots
  (:mod:`sf_mlflow.models.neighbours`);
* hybrid prior (:mod:`sf_mlflow.models.hybrid`): the first rule for its spatial factors,
  the second for the others.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from sf_mlflow.errors import DataError, ModelError
from sf_mlflow.models.inputs import check_groups, validated_dtype
from sf_mlflow.models.neighbours import nearest_neighbour_log_factors

__all__ = ["predict_factors"]


def predict_factors(model, X: np.ndarray, groups, *, neighbours: int, return_std: bool,
                    exp_mean: bool, chunk_size: int):
    """Factors (M, L) of a fitted PNMF ``model`` at checked positions X (M, 2); with
    ``return_std`` also the predictive sd of F (M, L). Arguments as ``predict_at``."""
    hybrid = model.spatial_components is not None
    if not (model.is_spatial or hybrid):
        if return_std:
            raise ModelError("predict_at(return_std=True) needs prior = 'svgp'; the "
                             "nearest-neighbour prediction of the Gaussian prior has no std")
        return np.exp(_neighbour_log_factors(model, X, neighbours, exp_mean, slice(None)))
    g = check_groups(groups, X.shape[0]) if model.uses_groups_ else None
    if model.uses_groups_ and g is None:
        raise DataError(f"groups = None, but the model was fitted with groups: pass the "
                        f"group code (0..{int(model.train_groups_.max())}) of each of the "
                        f"{X.shape[0]} positions")
    c = torch.as_tensor(X, dtype=validated_dtype(model.dtype), device=model.device_)
    gg = None if g is None else torch.as_tensor(g, device=model.device_)
    if hybrid:
        return _predict_hybrid(model, X, c, gg, neighbours, return_std, exp_mean, chunk_size)
    with torch.no_grad():
        if not (return_std or exp_mean):
            m = model.prior_.predict(c, gg, chunk_size=chunk_size, return_var=False)
            return torch.exp(m).T.cpu().double().numpy()
        m, v = model.prior_.predict(c, gg, chunk_size=chunk_size)
    f = torch.exp(m + 0.5 * v) if exp_mean else torch.exp(m)
    f = f.T.cpu().double().numpy()
    return (f, torch.sqrt(v).T.cpu().double().numpy()) if return_std else f


def _neighbour_log_factors(model, X: np.ndarray, neighbours: int, exp_mean: bool,
                           factors: slice) -> np.ndarray:
    """Mean training log-factors (of the ``factors`` columns) of the nearest spots, (M, Ls)."""
    if model.train_coordinates_ is None:
        raise ModelError("predict_at() of a Gaussian-prior model needs the training "
                         "coordinates: fit(Y, coordinates=X) stores them")
    train_log = np.log(model.get_factors(exp_mean=exp_mean)[:, factors])
    return nearest_neighbour_log_factors(model.train_coordinates_, train_log, X, k=neighbours)


def _predict_hybrid(model, X: np.ndarray, c: Tensor, g: Optional[Tensor], neighbours: int,
                    return_std: bool, exp_mean: bool, chunk_size: int):
    """A hybrid's factors: GP predictive for the spatial ones, nearest training spots for
    the others (whose predictive sd is NaN: that rule has none)."""
    prior = model.prior_
    K, L = prior.n_spatial, prior.n_components
    log_f = np.empty((X.shape[0], L))
    std = np.full((X.shape[0], L), np.nan)
    if K < L:
        log_f[:, K:] = _neighbour_log_factors(model, X, neighbours, exp_mean, slice(K, None))
    if K > 0:
        with torch.no_grad():
            m, v = prior.spatial.predict(c, g, chunk_size=chunk_size)
        m, v = m.T.cpu().double().numpy(), v.T.cpu().double().numpy()
        log_f[:, :K] = m + 0.5 * v if exp_mean else m
        std[:, :K] = np.sqrt(v)
    f = np.exp(log_f)
    return (f, std) if return_std else f
