"""Everything a biologist reads off a fitted model, in one MLflow-free function.

:func:`analyze_model` turns a fitted :class:`~sf_mlflow.models.pnmf.PNMF` plus its
training (and held-out) spots into arrays, tables and scalar metrics. One code path
serves the non-spatial, the spatial and the hybrid model (NSFH: K spatial factors beside
L - K non-spatial ones, :mod:`sf_mlflow.models.hybrid`); only the held-out prediction and
the GP facts differ (a hybrid's GP facts and group-wise factors are its spatial part's).
The held-out prediction is the model's own
:meth:`~sf_mlflow.models.pnmf.PNMF.predict_at` (:func:`heldout_factors`):

* spatial model: held-out factors are the GP predictive at the held-out coordinates
  and groups;
* non-spatial model: the factors of a new spot are unknown without its counts, so
  the honest prediction is the mean log-factor of its nearest training spots
  (:func:`~sf_mlflow.models.neighbours.nearest_neighbour_log_factors`); the held-out
  counts are used only to score;
* hybrid: the first rule for its spatial factors, the second for the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from sf_mlflow.analysis.deviance import poisson_deviance, poisson_deviance_per_spot
from sf_mlflow.analysis.enrichment import (enrichment_summary, group_gene_counts, relative_enrichment,
                                           relevant_genes)
from sf_mlflow.analysis.group_loadings import group_loadings
from sf_mlflow.analysis.moran import knn_weights, morans_i
from sf_mlflow.analysis.ordering import order_by
from sf_mlflow.analysis.predictor import with_train_coordinates
from sf_mlflow.data.blocks import nonzero_rows, row_blocks
from sf_mlflow.data.counts import SpatialCounts


@dataclass
class AnalysisResult:
    """Outputs of :func:`analyze_model`; factor axes are already in Moran's I order.

    arrays : name -> ndarray, e.g. ``factors`` (N, L), ``scales`` (N, L) of the N training
        spots, ``heldout_factors`` (Nh, L) and ``heldout_scales`` (Nh, L) of the held-out
        spots and their Poisson deviance ``heldout_deviance`` (Nh,) (when given),
        ``loadings`` (D, L), ``group_loadings`` (G, D, L),
        ``groupwise_factors`` (G, L, N; NaN for a hybrid's non-spatial factors),
        ``spatial_factors`` bool (L,): which factors have the GP prior
    metrics : scalar metrics (Moran's I per rank, deviances, reconstruction error, GP facts)
    order : (L,) original factor index of each rank
    moran : (L,) Moran's I in rank order
    enrichment : JSON-ready top and bottom genes per group and factor (or None)
    """

    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]
    order: np.ndarray
    moran: np.ndarray
    enrichment: Optional[dict] = None
    extra: dict[str, Any] = field(default_factory=dict)


def reconstruction_error(Y: sp.csr_matrix, factors: np.ndarray, loadings: np.ndarray, *,
                         block: int = 2_000_000) -> float:
    """``||Y - F W^T||_F / ||Y||_F`` without forming the dense (N, D) product.

    Uses ``||Y - M||^2 = ||Y||^2 - 2 <Y, M> + ||M||^2`` with ``||F W^T||^2 =
    sum((F^T F) * (W^T W))`` and ``<Y, M>`` over the non-zeros of Y only, taken in row
    blocks of about ``block`` non-zeros so no (nnz,)-sized index array is built.
    """
    Y = sp.csr_matrix(Y)
    y2 = float(np.dot(Y.data, Y.data))
    cross = 0.0
    n = Y.shape[0]
    for rows in row_blocks(n, Y.nnz / max(n, 1), block):
        part = Y[rows]
        r = rows.start + nonzero_rows(part)
        cross += float(np.dot(part.data, np.einsum("ij,ij->i", factors[r],
                                                   loadings[part.indices])))
    m2 = float(np.sum((factors.T @ factors) * (loadings.T @ loadings)))
    return float(np.sqrt(max(y2 - 2 * cross + m2, 0.0) / y2)) if y2 > 0 else float("nan")


def _deviance_metrics(prefix: str, Y, factors, loadings) -> dict[str, float]:
    dev = poisson_deviance(Y, factors=factors, loadings=loadings)
    return {f"{prefix}_deviance": dev["total"], f"{prefix}_deviance_mean": dev["mean"],
            f"{prefix}_deviance_nsf": dev["nsf"]}


def gp_prior(model):
    """The fitted SVGP prior of a model's spatial factors: the whole prior of a spatial
    model, a hybrid's spatial part; None without spatial factors."""
    if model.is_spatial:
        return model.prior_
    return getattr(model.prior_, "spatial", None) if model.spatial_components is not None else None


def gp_facts(model) -> dict[str, float]:
    """Kernel facts of a fitted model's spatial factors (empty without any).

    ``num_inducing``, ``group_diff_param``, ``jitter_used`` (when a Cholesky needed more
    than the configured jitter), ``lengthscale`` and ``sigma`` (the mean, plus
    ``lengthscale_<l>`` and ``sigma_<l>`` per factor when each factor has its own; for a
    hybrid, l counts its spatial factors in the model's order).
    """
    prior = gp_prior(model)
    if prior is None:
        return {}
    facts = {"num_inducing": int(prior.num_inducing),
             "group_diff_param": float(prior.group_diff_param),
             "jitter_used": prior.jitter_used}
    for name, value in (("lengthscale", prior.lengthscale), ("sigma", prior.sigma)):
        if isinstance(value, (list, tuple)):
            facts.update({f"{name}_{i}": float(v) for i, v in enumerate(value)})
            facts[name] = float(sum(value) / len(value))
        else:
            facts[name] = float(value)
    return {k: v for k, v in facts.items() if v is not None}


def heldout_factors(model, heldout: SpatialCounts, *, k: int = 6, chunk_size: int = 10000,
                    exp_mean: bool = False) -> np.ndarray:
    """Predicted factors of held-out spots from their positions (and groups), (Nh, L).

    Only :meth:`PNMF.predict_at <sf_mlflow.models.pnmf.PNMF.predict_at>`, the one rule for
    factors where the model saw no counts: the GP predictive of a spatial model, the mean
    log-factor of the ``k`` nearest training spots of a non-spatial one (which needs the
    model's ``train_coordinates_``: fit it with ``coordinates``, or see
    :func:`~sf_mlflow.analysis.predictor.with_train_coordinates`). The held-out counts are
    never used. Works on a model in the middle of training too (e.g. from a fit callback).
    """
    groups = heldout.groups if model.uses_groups_ else None
    return model.predict_at(heldout.coordinates, groups=groups, neighbours=k,
                            exp_mean=exp_mean, chunk_size=chunk_size)


def heldout_scales(model, heldout: SpatialCounts, *, chunk_size: int = 10000) -> np.ndarray:
    """Predictive standard deviation of the log-factors at held-out spots, (Nh, L).

    The GP predictive sd of a spatial model (:meth:`PNMF.predict_at
    <sf_mlflow.models.pnmf.PNMF.predict_at>` with ``return_std=True``); NaN for the
    non-spatial model, whose nearest-spot prediction has no sd, and so for a hybrid's
    non-spatial factors.
    """
    if gp_prior(model) is None:
        return np.full((heldout.n_spots, np.shape(model.loadings_)[1]), np.nan)
    groups = heldout.groups if model.uses_groups_ else None
    _, std = model.predict_at(heldout.coordinates, groups=groups, return_std=True,
                              chunk_size=chunk_size)
    return std


def all_spots(train_rows: np.ndarray, heldout_rows: Optional[np.ndarray],
              heldout: np.ndarray) -> np.ndarray:
    """Training and held-out rows interleaved back into the spot order of the data, (N, ...).

    heldout : bool (N,), True for held-out spots; training rows fill the False entries in
    order, held-out rows the True ones. ``heldout_rows`` may be None when none is held out.
    """
    heldout = np.asarray(heldout, dtype=bool)
    n_held = int(heldout.sum())
    if len(train_rows) != heldout.size - n_held:
        raise ValueError(f"{len(train_rows)} training rows for {heldout.size - n_held} "
                         "training spots")
    out = np.empty((heldout.size,) + train_rows.shape[1:], dtype=np.float64)
    out[~heldout] = train_rows
    if n_held:
        if heldout_rows is None or len(heldout_rows) != n_held:
            raise ValueError(f"{n_held} held-out spots but "
                             f"{0 if heldout_rows is None else len(heldout_rows)} held-out rows")
        out[heldout] = heldout_rows
    return out


def heldout_deviance(model, train_coordinates: Optional[np.ndarray], heldout: SpatialCounts, *,
                     k: int = 6) -> dict[str, float]:
    """Poisson deviance of held-out counts under the model's prediction from position alone.

    train_coordinates : (N, 2) coordinates the model was fitted on, or None. Checked
        against the model's ``train_coordinates_``, and the fallback for a model fitted
        without coordinates (see :func:`~sf_mlflow.analysis.predictor.with_train_coordinates`);
        None uses the model's own.

    Returns ``{"total", "mean", "nsf"}`` as :func:`~sf_mlflow.analysis.deviance.poisson_deviance`.
    """
    model = with_train_coordinates(model, train_coordinates)
    factors = heldout_factors(model, heldout, k=k)
    return poisson_deviance(heldout.counts, factors=factors,
                            loadings=np.asarray(model.loadings_, dtype=np.float64))


def _spatial_outputs(model, train: SpatialCounts, order: np.ndarray, arrays: dict,
                     chunk_size: int, say) -> dict[str, float]:
    """GP facts and the distance to the inducing points; ``groupwise_factors`` into ``arrays``
    (a hybrid's non-spatial factors have no group-wise GP: NaN rows)."""
    X = train.coordinates
    prior = gp_prior(model)
    if model.uses_groups_ and train.group_names:
        say(f"groupwise factors for {train.n_groups} groups")
        import torch

        with torch.no_grad():
            coords = torch.as_tensor(X, dtype=prior.Z.dtype, device=prior.Z.device)
            gw = prior.groupwise(coords, list(range(train.n_groups)), chunk_size=chunk_size)
            gw = gw.exp_()
        # float32, (G, L, N): 20 groups x 10 factors x 10^6 spots is 0.8 GB (1.6 in float64);
        # a hybrid's non-spatial factors have no group-wise field: NaN rows
        full = np.full((train.n_groups, len(order), X.shape[0]), np.nan, dtype=np.float32)
        full[:, model.spatial_factors_] = gw.detach().cpu().to(torch.float32).numpy()
        arrays["groupwise_factors"] = full[:, order, :]
    metrics = gp_facts(model)
    dist, _ = cKDTree(model.inducing_points_).query(X, k=1)
    metrics["mean_distance_to_inducing"] = float(np.mean(dist))
    return metrics


def analyze_model(model, train: SpatialCounts, heldout: Optional[SpatialCounts] = None, *,
                  moran_k: int = 6, exp_mean: bool = False, group_loadings_iter: int = 100,
                  n_top_genes: int = 10, chunk_size: int = 10000,
                  verbose: bool = False, progress=None) -> AnalysisResult:
    """Compute factors, Moran's I, deviances, group loadings, enrichment and GP facts.

    Parameters
    ----------
    model : PNMF, fitted on ``train``'s spots (in the same order).
    train : SpatialCounts, N training spots.
    heldout : SpatialCounts, optional, held-out spots for held-out deviance.
    moran_k : neighbours of the binary, row-normalised kNN graph of Moran's I.
    exp_mean : report ``E[exp F]`` instead of ``exp(E[F])`` as the factors.
    verbose : print a line as each step starts; ``progress(line)`` receives them instead
        (the analyze stage prefixes them with ``[analyze]``).
    """
    say = progress or (print if verbose else (lambda *a, **k: None))
    X = train.coordinates
    model = with_train_coordinates(model, X)  # checks them; the fallback of a fit without them
    factors = model.get_factors(exp_mean=exp_mean)                 # (N, L)
    scales = model.get_factor_scales()                               # (N, L)
    loadings = np.asarray(model.loadings_, dtype=np.float64)         # (D, L)

    say("Moran's I of every factor")
    weights = knn_weights(X, k=moran_k)
    moran_orig = np.atleast_1d(morans_i(factors, weights=weights))
    order = order_by(moran_orig)
    moran = moran_orig[order]
    metrics: dict[str, float] = {f"moran_i_{r}": float(v) for r, v in enumerate(moran)}
    metrics["moran_i_mean"] = float(np.nanmean(moran))
    spatial = np.asarray(model.spatial_factors_, dtype=bool)[order]
    if model.spatial_components is not None:   # a hybrid: each kind's mean where it has any
        metrics["n_spatial_factors"] = int(spatial.sum())
        for name, which in (("spatial", spatial), ("nonspatial", ~spatial)):
            if which.any():
                metrics[f"moran_i_mean_{name}"] = float(np.nanmean(moran[which]))

    say("reconstruction error and deviance")
    metrics["reconstruction_error"] = reconstruction_error(train.counts, factors, loadings)
    metrics.update(_deviance_metrics("train", train.counts, factors, loadings))

    arrays: dict[str, np.ndarray] = {
        "factors": factors[:, order], "scales": scales[:, order], "loadings": loadings[:, order],
        "factor_order": order, "spatial_factors": spatial,
    }
    if heldout is not None and heldout.n_spots > 0:
        say(f"held-out deviance on {heldout.n_spots:,} spots")
        # (as before: exp_mean reaches only the non-spatial, nearest-spot prediction)
        held_factors = heldout_factors(model, heldout, k=moran_k, chunk_size=chunk_size,
                                       exp_mean=exp_mean and not model.is_spatial)
        metrics.update(_deviance_metrics("heldout", heldout.counts, held_factors, loadings))
        arrays["heldout_deviance"] = poisson_deviance_per_spot(heldout.counts, held_factors,
                                                               loadings)
        arrays["heldout_factors"] = held_factors[:, order]
        arrays["heldout_scales"] = heldout_scales(model, heldout, chunk_size=chunk_size)[:, order]

    enrichment = None
    if train.groups is not None and train.group_names:
        say(f"group-specific loadings for {train.n_groups} groups")
        Wg = group_loadings(train.counts, factors, loadings, train.groups,
                            n_groups=train.n_groups, n_iter=group_loadings_iter)
        Wg = Wg[:, :, order]
        arrays["group_loadings"] = Wg
        # shrunk by each gene's counts in the group, as the figures draw it
        lfc = relative_enrichment(arrays["loadings"], Wg, group_counts=group_gene_counts(
            train.counts, train.groups, train.n_groups))
        arrays["enrichment_lfc"] = lfc
        mask = relevant_genes(arrays["loadings"], lfc)
        enrichment = enrichment_summary(lfc, list(train.gene_names), list(train.group_names),
                                        n=n_top_genes, mask=mask)

    if gp_prior(model) is not None:
        metrics.update(_spatial_outputs(model, train, order, arrays, chunk_size, say))
    return AnalysisResult(arrays=arrays, metrics=metrics, order=order, moran=moran,
                          enrichment=enrichment)
