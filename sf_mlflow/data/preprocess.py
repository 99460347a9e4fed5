"""Quality control, gene selection, coordinate scaling and the held-out split.

The steps run in a fixed order and each one records in the report exactly how many spots,
genes and counts it removed, so a run's data can be audited without re-running it:

0. ``max_mt_fraction``: drop spots whose mitochondrial share of counts (genes ``mt-`` or
   ``MT-``, over all genes) exceeds the threshold; first, as the plan's reference loader
   filters on ``pct_counts_mt`` before ``min_counts``;
a. ``filter_mt``: drop genes whose name starts with ``mt-`` or ``MT-``;
b. ``min_counts``: drop spots whose total count (after a) is below the threshold; ``auto``
   (the default) is 10 % of the median spot total, so only spots far shallower than the
   rest go, whatever the technology's depth;
c. ``min_cells``: drop genes detected (count > 0) in fewer than that many remaining spots;
   ``auto`` is 1 % of the spots, between 1 and 10;
d. ``n_top_genes``: keep the k genes of highest Poisson deviance under the null model
   ``mu_ij = n_i p_j`` (spot total times gene share; Townes et al. 2019);
e. rescale the coordinates (:func:`rescale_coordinates`): by default the plan's rule, which
   makes the geometric mean of the two side lengths ``4 x spatial_scale`` and centres the
   spots at their mean;
f. hold out a seeded random fraction of spots, stratified by group when there are groups;
g. drop the genes no training spot detects (only held-out spots have their counts): no
   model can learn their loadings, and their held-out counts under a rate of 0 would make
   every model's held-out deviance infinite.

A filter that removes more than :data:`QC_WARN_SHARE` of the spots (steps 0 and b) or of the
counts (steps a and c) raises a :class:`QCWarning` that names the setting to change;
:func:`describe_filters` words the report, one line per step, for the stage's output.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from sf_mlflow.config import PreprocessingConfig
from sf_mlflow.data.blocks import nonzero_rows, row_blocks
from sf_mlflow.data.counts import SpatialCounts
from sf_mlflow.errors import DataError

__all__ = ["PreprocessResult", "preprocess", "poisson_null_deviance", "heldout_split",
           "rescale_coordinates", "coordinate_side_lengths", "describe_filters",
           "auto_min_counts", "auto_min_cells", "QCWarning",
           "MT_PREFIXES", "COORDINATE_SCALINGS", "GEOMETRIC_MEAN_SIDE", "QC_WARN_SHARE"]

#: Mitochondrial gene prefixes: mouse (mt-) and human (MT-) symbol conventions.
MT_PREFIXES = ("mt-", "MT-")

#: Rules of :func:`rescale_coordinates`; the first is the default.
COORDINATE_SCALINGS = ("geometric_mean", "longest_side")

#: The plan's reference scales the geometric mean of the side lengths to this before
#: multiplying by ``spatial_scale`` (so its ``lengthscale: 4.0`` is "after spatial_scale = 50").
GEOMETRIC_MEAN_SIDE = 4.0

#: A filter removing more than this share of the spots (or, for gene filters, of the
#: counts) warns: holes that large in the maps are rarely what the user meant.
QC_WARN_SHARE = 0.10

#: ``min_counts: auto`` = this share of the median spot total.
AUTO_MIN_COUNTS_SHARE = 0.10
#: ``min_cells: auto`` = this share of the spots, rounded up, within AUTO_MIN_CELLS_RANGE.
AUTO_MIN_CELLS_SHARE = 0.01
AUTO_MIN_CELLS_RANGE = (1, 10)


class QCWarning(UserWarning):
    """A quality-control filter removed a large share of the data."""


def auto_min_counts(spot_totals: np.ndarray) -> int:
    """``min_counts: auto``: 10 % of the median spot total, rounded down (0 for no spots)."""
    if len(spot_totals) == 0:
        return 0
    return int(math.floor(AUTO_MIN_COUNTS_SHARE * float(np.median(spot_totals))))


def auto_min_cells(n_spots: int) -> int:
    """``min_cells: auto``: 1 % of ``n_spots``, rounded up, at least 1 and at most 10."""
    lo, hi = AUTO_MIN_CELLS_RANGE
    return int(min(hi, max(lo, math.ceil(AUTO_MIN_CELLS_SHARE * n_spots))))


@dataclass
class PreprocessResult:
    """Output of :func:`preprocess`.

    Attributes
    ----------
    data : SpatialCounts
        Filtered counts (N, D) with rescaled coordinates (N, 2); groups keep their codes
        and names even if a group lost all its spots.
    heldout : ndarray of bool, (N,)
        True for spots held out for validation.
    report : dict
        What each step removed and the transform applied; JSON-serialisable.
    """

    data: SpatialCounts
    heldout: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


def _total(Y: sp.csr_matrix) -> int:
    return int(round(float(Y.sum())))


def poisson_null_deviance(counts: sp.spmatrix, *, block: int = 2_000_000) -> np.ndarray:
    """Per-gene Poisson deviance against the rank-one null model ``mu_ij = n_i p_j``.

    Parameters
    ----------
    counts : scipy.sparse matrix, (N, D)
        Non-negative counts.
    block : int
        About this many non-zeros per row block (memory bound; the result does not depend
        on it beyond rounding).

    Returns
    -------
    ndarray, (D,)
        ``2 * sum_i [y_ij log(y_ij / mu_ij) - (y_ij - mu_ij)]``; with ``n_i`` the spot
        totals and ``p_j`` the gene shares, ``sum_i mu_ij = sum_i y_ij`` for every gene, so
        only the non-zero entries contribute. Genes with no counts get 0.
    """
    Y = sp.csr_matrix(counts)
    n = np.asarray(Y.sum(axis=1)).ravel()  # (N,)
    col = np.asarray(Y.sum(axis=0)).ravel()  # (D,)
    total = col.sum()
    if total <= 0:
        return np.zeros(Y.shape[1])
    p = col / total
    out = np.zeros(Y.shape[1])
    # row blocks of ~block non-zeros: the temporaries stay ~100 MB at any N
    for block_rows in row_blocks(Y.shape[0], Y.nnz / max(Y.shape[0], 1), block):
        part = Y[block_rows]
        rows = block_rows.start + nonzero_rows(part)
        y = part.data.astype(np.float64)
        pos = y > 0  # explicit zeros contribute y log y = 0
        r, c, y = rows[pos], part.indices[pos], y[pos]
        out += np.bincount(c, weights=y * np.log(y / (n[r] * p[c])), minlength=Y.shape[1])
    return 2.0 * out


def _is_mt(gene_names) -> np.ndarray:
    """True for mitochondrial gene names (prefix ``mt-`` or ``MT-``), (D,) bool."""
    names = np.asarray(gene_names).astype(str)
    return np.char.startswith(names, MT_PREFIXES[0]) | np.char.startswith(names, MT_PREFIXES[1])


def _check_coordinates(coordinates) -> np.ndarray:
    X = np.asarray(coordinates, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 2 or X.shape[0] == 0:
        raise DataError(f"coordinates has shape {X.shape}; expected (N, 2) with N >= 1 "
                        "(one row of x, y per spot)")
    if not np.isfinite(X).all():
        raise DataError("coordinates contains NaN or infinite values; expected finite (N, 2) "
                        "positions (remove those spots first)")
    return X


def coordinate_side_lengths(coordinates) -> np.ndarray:
    """Side lengths of the coordinates' bounding box, ``max - min`` per axis, ndarray (2,).

    These are the "side lengths" of the plan's rule: the x and y extents after shifting the
    spots to the minimum.
    """
    X = _check_coordinates(coordinates)
    return X.max(axis=0) - X.min(axis=0)


def rescale_coordinates(coordinates, spatial_scale: float, method: str = "geometric_mean"
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """Map spot coordinates to model units, by the plan's rule or the pre-#13 one.

    Parameters
    ----------
    coordinates : array-like, (N, 2)
        Raw spot positions (pixels, micrometres, ...), finite.
    spatial_scale : float
        Positive; the plan's ``spatial_scale`` (50 in its configs).
    method : {"geometric_mean", "longest_side"}
        ``"geometric_mean"`` (the plan's reference): shift to the minimum, multiply by
        ``4 / sqrt(side_x * side_y)``, centre at the mean, multiply by ``spatial_scale``; the
        geometric-mean side becomes ``4 * spatial_scale`` (200 for 50) and the mean of the
        spots sits at the origin. ``"longest_side"`` (before #13): centre on the
        bounding-box midpoint and scale the longest side to ``spatial_scale``.

    Returns
    -------
    scaled : ndarray, (N, 2)
    center : ndarray, (2,)
    scale : float
        Both rules are one shift and one isotropic scale, ``scaled = (raw - center) * scale``,
        so these two numbers reproduce and invert the mapping: for ``"geometric_mean"``
        ``center`` is the mean of the raw coordinates and ``scale = 4 * spatial_scale /
        sqrt(side_x * side_y)``; for ``"longest_side"`` ``center`` is the bounding-box
        midpoint and ``scale = spatial_scale / max(side_x, side_y)``.

    Notes
    -----
    Degenerate layouts: when all spots lie on one line (one side is 0, so the geometric mean
    is 0) the other side stands in for the geometric mean; when all spots are at one point
    they are only centred (``scale = 1``), since any scale would divide by zero.
    """
    X = _check_coordinates(coordinates)
    if isinstance(spatial_scale, bool) or not np.isfinite(spatial_scale) or not spatial_scale > 0:
        raise DataError(f"spatial_scale = {spatial_scale!r} is invalid; expected a positive number "
                        "(preprocessing.spatial_scale)")
    if method not in COORDINATE_SCALINGS:
        raise DataError(f"coordinate scaling method = {method!r} is unknown; expected one of "
                        f"{', '.join(COORDINATE_SCALINGS)} (preprocessing.coordinate_scaling)")
    lo, hi = X.min(axis=0), X.max(axis=0)
    sides = hi - lo
    if method == "longest_side":
        center = (lo + hi) / 2.0
        extent = float(sides.max())
        scale = float(spatial_scale) / extent if extent > 0 else 1.0
        return (X - center) * scale, center, scale
    # shift-to-minimum, scale and centre-at-mean compose to one affine map: the shift cancels
    # against the centring, leaving (X - mean(X)) * 4 * spatial_scale / geometric mean
    geo = float(np.sqrt(sides[0] * sides[1]))
    if geo == 0.0:
        geo = float(sides.max())  # a line of spots: its length plays the geometric mean
    center = X.mean(axis=0)
    scale = GEOMETRIC_MEAN_SIDE * float(spatial_scale) / geo if geo > 0 else 1.0
    return (X - center) * scale, center, scale


def heldout_split(n_spots: int, fraction: float, seed: int,
                  groups: np.ndarray | None = None) -> np.ndarray:
    """Seeded random held-out mask, stratified by group when groups are given.

    Parameters
    ----------
    n_spots : int
        Number of spots N.
    fraction : float
        Fraction in [0, 1) to hold out; ``round(fraction * N)`` spots are chosen (at most
        N - 1, so some training data always remain).
    seed : int
        Seed of the ``numpy.random.Generator``.
    groups : ndarray of int, (N,), optional
        Group codes; each group contributes its share of held-out spots (largest-remainder
        rounding, so the total is still exact).

    Returns
    -------
    ndarray of bool, (N,)
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(n_spots, dtype=bool)
    n_hold = int(round(fraction * n_spots))
    if n_spots > 1:
        n_hold = min(n_hold, n_spots - 1)
    else:
        n_hold = 0
    if n_hold == 0:
        return mask
    if groups is None:
        mask[rng.choice(n_spots, size=n_hold, replace=False)] = True
        return mask
    codes, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse)
    quota = sizes * (n_hold / n_spots)
    take = np.floor(quota).astype(np.int64)
    short = n_hold - int(take.sum())
    if short > 0:
        # largest remainders first; a random tie-break keeps small groups from always losing
        order = np.lexsort((rng.random(len(codes)), -(quota - take)))
        take[order[:short]] += 1
    for k in range(len(codes)):
        members = np.flatnonzero(inverse == k)
        mask[rng.choice(members, size=take[k], replace=False)] = True
    return mask


def preprocess(data: SpatialCounts, cfg: PreprocessingConfig, seed: int = 0,
               min_training_spots: int = 1) -> PreprocessResult:
    """Filter spots and genes, rescale coordinates and draw the held-out split.

    Parameters
    ----------
    data : SpatialCounts
        Counts (N0, D0), coordinates (N0, 2), optional groups (N0,).
    cfg : PreprocessingConfig
        The settings (see the module docstring for the order of the steps).
    seed : int
        Seed of the held-out split.
    min_training_spots : int
        Fewest training (kept, not held-out) spots accepted; the stage asks for
        ``analysis.moran_k + 1``, the spots Moran's I needs.

    Returns
    -------
    PreprocessResult
        Filtered data (N, D), held-out mask (N,) and the report, with keys
        ``{spots,genes,counts}_input``; ``spots_mt_fraction``/``counts_mt_fraction``;
        ``genes_mt``/``counts_mt``;
        ``spots_min_counts``/``counts_min_counts``; ``genes_min_cells``/``counts_min_cells``;
        ``min_counts_used``/``min_cells_used`` (the thresholds applied: ``auto`` resolved);
        ``genes_top_k``/``counts_top_k``; ``{spots,genes,counts}_kept``;
        ``coordinate_center`` [2] and ``coordinate_scale`` (new = (old - center) * scale),
        ``coordinate_scaling`` (the rule), ``coordinate_side_lengths`` [2] (raw units);
        ``group_sizes`` (name -> kept spots, or None), ``n_heldout`` and
        ``genes_heldout_only``/``counts_heldout_only`` (step g).
    """
    Y = data.counts.tocsr()
    report: dict[str, Any] = {
        "settings": dataclasses.asdict(cfg),
        "spots_input": int(Y.shape[0]),
        "genes_input": int(Y.shape[1]),
        "counts_input": _total(Y),
    }
    spots = np.arange(Y.shape[0])
    genes = np.arange(Y.shape[1])
    is_mt = _is_mt(data.gene_names)
    Y, spots = _drop_mt_spots(Y, spots, is_mt, cfg, report)          # (0)
    Y, genes = _drop_mt_genes(Y, genes, is_mt, cfg, report)          # (a)
    Y, spots = _drop_low_count_spots(Y, spots, cfg, report)          # (b)
    Y, genes = _drop_rare_genes(Y, genes, cfg, report)               # (c)
    genes = _keep_top_genes(Y, genes, cfg, report)                   # (d)
    for message in _large_removals(report, cfg):
        warnings.warn(message, QCWarning, stacklevel=2)

    out = data.subset(spots=spots, genes=genes)
    report["spots_kept"] = int(out.n_spots)
    report["genes_kept"] = int(out.n_genes)
    report["counts_kept"] = _total(out.counts)
    _rescale(out, cfg, report)                                       # (e)
    report["group_sizes"] = _group_sizes(out)

    # (f) held-out split
    heldout = heldout_split(out.n_spots, cfg.holdout_fraction, seed, out.groups)
    report["n_heldout"] = int(heldout.sum())
    out = _drop_genes_unseen_in_training(out, heldout, report)       # (g)
    _check_training_spots(report, cfg, min_training_spots)
    for message in _degenerate(out, min_training_spots):
        warnings.warn(message, QCWarning, stacklevel=2)
    return PreprocessResult(data=out, heldout=heldout, report=report)


def _degenerate(data: SpatialCounts, need: int) -> list[str]:
    """Warnings for data a spatial analysis cannot use as meant: fewer distinct positions than
    the neighbours Moran's I needs (every factor would look spatial, or none), and more
    groups than a tenth of the spots (labels that name spots or cells, not cell types)."""
    out = []
    distinct = int(np.unique(data.coordinates, axis=0).shape[0])
    if distinct < max(need, 2):
        out.append(f"the {data.n_spots:,} spots lie at {distinct} distinct position(s), fewer "
                   f"than the {max(need, 2)} Moran's I and a spatial model need "
                   "(analysis.moran_k + 1); check data.coordinates_key names the spot "
                   "coordinates (a spatial model is refused at train; model.prior: Gaussian fits)")
    G = data.n_groups
    if data.groups is not None and G > max(data.n_spots / 10, 1):
        out.append(f"{G} groups for {data.n_spots:,} spots (more than one per ten spots): "
                   "check that data.group_key names cell types, not spot or cell IDs; the "
                   "multi-group kernel learns one pattern per group and needs many spots in each "
                   "(set model.groups: false to fit without them)")
    return out


def _check_training_spots(report: dict, cfg: PreprocessingConfig, need: int) -> None:
    """Refuse fewer than ``need`` training spots, naming the counts and the filters to loosen."""
    n_train = report["spots_kept"] - report["n_heldout"]
    if n_train >= need:
        return
    raise DataError(
        f"preprocessing kept {report['spots_kept']} of {report['spots_input']} spots "
        f"({report['n_heldout']} held out), leaving {n_train} training spots, fewer than "
        f"the {need} the analysis needs (analysis.moran_k + 1); loosen the filters: "
        f"preprocessing.min_counts = {_setting(cfg.min_counts, report['min_counts_used'])} "
        f"(removed {report['spots_min_counts']}), "
        f"max_mt_fraction = {cfg.max_mt_fraction} "
        f"(removed {report.get('spots_mt_fraction', 0)}), "
        f"holdout_fraction = {cfg.holdout_fraction:g}; or lower analysis.moran_k")


def _share(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "0 %"


def _setting(value, used) -> str:
    """``auto (15)`` for a resolved ``auto``, else the value."""
    return f"auto ({used})" if value == "auto" else f"{value}"


def _spots_before_min_counts(report: dict) -> int:
    return report["spots_input"] - report["spots_mt_fraction"]


def describe_filters(report: dict) -> list[str]:
    """One line per step of :func:`preprocess`: the setting, what it removed and its share.

    Shares of spots are of the spots the step saw; shares of counts are of all input counts.
    """
    cfg = report["settings"]
    spots_in, counts_in = report["spots_input"], report["counts_input"]
    lines = []
    if cfg["max_mt_fraction"] is not None:
        n = report["spots_mt_fraction"]
        lines.append(f"max_mt_fraction = {cfg['max_mt_fraction']:g}: removed {n:,} of "
                     f"{spots_in:,} spots ({_share(n, spots_in)})")
    if cfg["filter_mt"]:
        lines.append(f"filter_mt = true: removed {report['genes_mt']:,} mitochondrial genes, "
                     f"{_share(report['counts_mt'], counts_in)} of the counts")
    n, seen = report["spots_min_counts"], _spots_before_min_counts(report)
    rule = " = 10 % of the median spot total" if cfg["min_counts"] == "auto" else ""
    lines.append(f"min_counts = {_setting(cfg['min_counts'], report['min_counts_used'])}{rule}: "
                 f"removed {n:,} of {seen:,} spots ({_share(n, seen)})")
    n, genes_seen = report["genes_min_cells"], report["genes_input"] - report["genes_mt"]
    lines.append(f"min_cells = {_setting(cfg['min_cells'], report['min_cells_used'])}: removed "
                 f"{n:,} of {genes_seen:,} genes ({_share(n, genes_seen)}), "
                 f"{_share(report['counts_min_cells'], counts_in)} of the counts")
    if report["genes_top_k"]:
        lines.append(f"n_top_genes = {cfg['n_top_genes']}: left out {report['genes_top_k']:,} "
                     f"genes of lower deviance, {_share(report['counts_top_k'], counts_in)} of "
                     "the counts")
    if n := report.get("genes_heldout_only"):
        lines.append(f"removed {n:,} gene{'s' if n > 1 else ''} detected in held-out spots only "
                     f"({report['counts_heldout_only']:,} counts): no model can learn them")
    return lines


def _large_removals(report: dict, cfg: PreprocessingConfig) -> list[str]:
    """The warnings of the filters that removed more than QC_WARN_SHARE (module docstring)."""
    out = []
    spots_in, counts_in = report["spots_input"], report["counts_input"]
    n = report["spots_mt_fraction"]
    if n > QC_WARN_SHARE * spots_in:
        out.append(f"preprocessing.max_mt_fraction = {cfg.max_mt_fraction:g} removed {n:,} of "
                   f"{spots_in:,} spots ({_share(n, spots_in)}), leaving holes in the maps; "
                   "raise it, or set it to null to keep every spot")
    if report["counts_mt"] > QC_WARN_SHARE * counts_in:
        out.append(f"preprocessing.filter_mt = true removed {report['genes_mt']:,} genes holding "
                   f"{_share(report['counts_mt'], counts_in)} of the counts; set "
                   "preprocessing.filter_mt: false to keep them")
    n, seen = report["spots_min_counts"], _spots_before_min_counts(report)
    if n > QC_WARN_SHARE * seen:
        out.append(f"preprocessing.min_counts = "
                   f"{_setting(cfg.min_counts, report['min_counts_used'])} removed {n:,} of "
                   f"{seen:,} spots ({_share(n, seen)}), leaving holes in the maps; lower "
                   "preprocessing.min_counts (auto = 10 % of the median spot total), or set it "
                   "to 0 to keep every spot")
    if report["counts_min_cells"] > QC_WARN_SHARE * counts_in:
        out.append(f"preprocessing.min_cells = "
                   f"{_setting(cfg.min_cells, report['min_cells_used'])} removed "
                   f"{report['genes_min_cells']:,} genes holding "
                   f"{_share(report['counts_min_cells'], counts_in)} of the counts; lower "
                   "preprocessing.min_cells")
    return out


# ---- the steps of preprocess, in order; each records what it removed in ``report`` ------------

def _drop_mt_spots(Y: sp.csr_matrix, spots: np.ndarray, is_mt: np.ndarray, cfg: PreprocessingConfig,
                   report: dict) -> tuple[sp.csr_matrix, np.ndarray]:
    """(0) Drop spots whose mitochondrial share of all counts exceeds ``max_mt_fraction``."""
    # damaged cells, judged on all genes as the reference's pct_counts_mt is; spots with no
    # counts have share 0 and go at (b)
    if cfg.max_mt_fraction is None:
        report["spots_mt_fraction"] = 0
        report["counts_mt_fraction"] = 0
        return Y, spots
    totals = np.asarray(Y.sum(axis=1)).ravel()
    mt_totals = np.asarray(Y[:, is_mt].sum(axis=1)).ravel()
    share = np.divide(mt_totals, totals, out=np.zeros_like(totals), where=totals > 0)
    high = share > cfg.max_mt_fraction
    report["spots_mt_fraction"] = int(high.sum())
    report["counts_mt_fraction"] = int(round(float(totals[high].sum())))
    if high.all():
        raise DataError(f"preprocessing.max_mt_fraction = {cfg.max_mt_fraction:g} removed all "
                        f"{len(high)} spots (the lowest mitochondrial share is "
                        f"{share.min():.3g}); raise preprocessing.max_mt_fraction, or set it "
                        "to null to keep every spot")
    return Y[~high], spots[~high]


def _drop_mt_genes(Y: sp.csr_matrix, genes: np.ndarray, is_mt: np.ndarray, cfg: PreprocessingConfig,
                   report: dict) -> tuple[sp.csr_matrix, np.ndarray]:
    """(a) Drop the mitochondrial genes when ``filter_mt``."""
    if not cfg.filter_mt:
        report["genes_mt"] = 0
        report["counts_mt"] = 0
        return Y, genes
    report["genes_mt"] = int(is_mt.sum())
    report["counts_mt"] = _total(Y[:, is_mt])
    if is_mt.all():
        raise DataError(f"preprocessing.filter_mt = true removed all {len(is_mt)} genes "
                        f"(every name starts with {' or '.join(MT_PREFIXES)}); set "
                        "preprocessing.filter_mt: false")
    return Y[:, ~is_mt], genes[~is_mt]


def _drop_low_count_spots(Y: sp.csr_matrix, spots: np.ndarray, cfg: PreprocessingConfig,
                          report: dict) -> tuple[sp.csr_matrix, np.ndarray]:
    """(b) Drop spots whose total over the remaining genes is below ``min_counts``."""
    totals = np.asarray(Y.sum(axis=1)).ravel()
    threshold = auto_min_counts(totals) if cfg.min_counts == "auto" else cfg.min_counts
    low = totals < threshold
    report["min_counts_used"] = threshold
    report["spots_min_counts"] = int(low.sum())
    report["counts_min_counts"] = int(round(float(totals[low].sum())))
    if low.all():
        raise DataError(f"preprocessing.min_counts = {_setting(cfg.min_counts, threshold)} "
                        f"removed all {len(low)} spots "
                        f"(the largest spot total is {totals.max():g}); lower "
                        "preprocessing.min_counts")
    return Y[~low], spots[~low]


def _drop_rare_genes(Y: sp.csr_matrix, genes: np.ndarray, cfg: PreprocessingConfig,
                     report: dict) -> tuple[sp.csr_matrix, np.ndarray]:
    """(c) Drop genes detected in fewer than ``min_cells`` of the remaining spots."""
    detected = np.asarray((Y > 0).sum(axis=0)).ravel()
    threshold = auto_min_cells(Y.shape[0]) if cfg.min_cells == "auto" else cfg.min_cells
    rare = detected < threshold
    gene_totals = np.asarray(Y.sum(axis=0)).ravel()
    report["min_cells_used"] = threshold
    report["genes_min_cells"] = int(rare.sum())
    report["counts_min_cells"] = int(round(float(gene_totals[rare].sum())))
    if rare.all():
        raise DataError(f"preprocessing.min_cells = {_setting(cfg.min_cells, threshold)} "
                        f"removed all {len(rare)} genes "
                        f"(the most widely detected gene is in {detected.max()} of {Y.shape[0]} "
                        "spots); lower preprocessing.min_cells")
    return Y[:, ~rare].tocsr(), genes[~rare]


def _drop_genes_unseen_in_training(out: SpatialCounts, heldout: np.ndarray,
                                   report: dict) -> SpatialCounts:
    """(g) Drop genes without a count in the training spots (all theirs are held out)."""
    seen = np.asarray(out.counts.tocsr()[~heldout].sum(axis=0)).ravel() > 0
    gene_totals = np.asarray(out.counts.sum(axis=0)).ravel()
    report["genes_heldout_only"] = int((~seen).sum())
    report["counts_heldout_only"] = int(round(float(gene_totals[~seen].sum())))
    if seen.all():
        return out
    out = out.subset(genes=np.flatnonzero(seen))
    report["genes_kept"] = int(out.n_genes)
    report["counts_kept"] = _total(out.counts)
    return out


def _keep_top_genes(Y: sp.csr_matrix, genes: np.ndarray, cfg: PreprocessingConfig,
                    report: dict) -> np.ndarray:
    """(d) Keep the ``n_top_genes`` genes of highest Poisson null-model deviance."""
    k = cfg.n_top_genes
    if k is None or k >= Y.shape[1]:
        report["genes_top_k"] = 0
        report["counts_top_k"] = 0
        return genes
    dev = poisson_null_deviance(Y)
    # stable sort: among equal deviances the earlier gene wins, so selection is reproducible
    top = np.sort(np.argsort(-dev, kind="stable")[:k])
    keep = np.zeros(Y.shape[1], dtype=bool)
    keep[top] = True
    gene_totals = np.asarray(Y.sum(axis=0)).ravel()
    report["genes_top_k"] = int((~keep).sum())
    report["counts_top_k"] = int(round(float(gene_totals[~keep].sum())))
    return genes[keep]


def _rescale(out: SpatialCounts, cfg: PreprocessingConfig, report: dict) -> None:
    """(e) Rescale ``out.coordinates`` in place by the configured rule (``rescale_coordinates``)."""
    sides = coordinate_side_lengths(out.coordinates)
    out.coordinates, center, scale = rescale_coordinates(out.coordinates, cfg.spatial_scale,
                                                         cfg.coordinate_scaling)
    report["coordinate_center"] = [float(c) for c in center]
    report["coordinate_scale"] = float(scale)
    report["coordinate_scaling"] = cfg.coordinate_scaling
    report["coordinate_side_lengths"] = [float(v) for v in sides]


def _group_sizes(out: SpatialCounts) -> dict[str, int] | None:
    """Kept spots per group name, or None without groups."""
    if out.groups is None:
        return None
    sizes = np.bincount(out.groups, minlength=out.n_groups)
    return {name: int(s) for name, s in zip(out.group_names, sizes)}
