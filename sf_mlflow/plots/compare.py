"""Side-by-side comparison of models (e.g. PNMF vs MGGP-SVGP): Moran's I and factor maps."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from sf_mlflow.analysis.ordering import factor_correlation, match_factors
from sf_mlflow.errors import DataError
from sf_mlflow.plots._common import (FACTOR_CMAP, INVERT_Y, LABEL_SIZE, MAX_COLS, QUALITATIVE,
                                     SUPTITLE_SIZE, TICK_SIZE, TITLE_SIZE, area_per_spot,
                                     as_coordinates, as_mask, binned, as_matrix, finish,
                                     heldout_legend, marker_size, new_figure, tissue_aspect,
                                     tissue_scatter, wrap)

__all__ = ["compare_morans_i", "compare_factor_maps", "WEAK_R"]

#: A factor paired with the reference by a correlation weaker than this (in absolute value)
#: has no real counterpart: its title says so, in red.
WEAK_R = 0.5


def compare_morans_i(values: Mapping[str, np.ndarray], *,
                     title: Optional[str] = "Spatial autocorrelation of the factors",
                     path: Optional[str | os.PathLike] = None) -> Figure:
    """Moran's I of every factor of each model: one column of dots per model, its mean
    marked. The factors of different models do not correspond one to one, so nothing
    pairs them (a factor's counterpart, if any, is in :func:`compare_factor_maps`).

    Parameters
    ----------
    values : mapping of str to ndarray, (L_m,)
        Model label -> Moran's I of each of its factors (models may have different L).
    title : str, optional
        Figure title.
    path : str or path-like, optional
        Save the figure there too.

    Returns
    -------
    matplotlib.figure.Figure
        Dots are labelled with the factor's rank within its model (1 = highest Moran's
        I); NaN values are left out and counted under the model's name.
    """
    if not values:
        raise DataError("values is empty; expected a mapping label -> Moran's I (L,)")
    series = {}
    for label, v in values.items():
        a = np.asarray(v, dtype=np.float64).ravel()
        if a.size == 0:
            raise DataError(f"values[{label!r}] is empty; expected one Moran's I per factor")
        series[str(label)] = a
    M = len(series)
    fig = new_figure(min(max(3.6, 1.6 + 1.3 * M), 12.0), 3.8)
    ax = fig.subplots()
    names = []
    for m, (label, a) in enumerate(series.items()):
        ok = np.isfinite(a)
        order = np.argsort(-np.where(ok, a, -np.inf), kind="stable")
        rank = np.empty(a.size, int)
        rank[order] = np.arange(1, a.size + 1)
        # spread dots of similar value sideways so each stays visible
        offset = 0.12 * (((rank - 1) % 5) - 2) / 2
        colour = QUALITATIVE[m % len(QUALITATIVE)]
        ax.scatter(m + offset[ok], a[ok], s=22, color=colour, zorder=3)
        for x, y, r in zip(m + offset[ok], a[ok], rank[ok]):
            ax.annotate(str(r), (x, y), xytext=(3, 0), textcoords="offset points",
                        fontsize=TICK_SIZE - 1, va="center", color="0.35")
        if ok.any():
            mean = float(a[ok].mean())
            ax.hlines(mean, m - 0.3, m + 0.3, color=colour, lw=2.0, zorder=2)
            ax.annotate(f"mean {mean:.2f}", (m + 0.3, mean), xytext=(2, 0),
                        textcoords="offset points", fontsize=TICK_SIZE, va="center",
                        color=colour)
        missing = int((~ok).sum())
        names.append(label + (f"\n({missing} NaN)" if missing else ""))
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xticks(np.arange(M), names, fontsize=LABEL_SIZE)
    ax.set_xlim(-0.6, M - 0.4 + 0.35)
    ax.set_ylabel("Moran's I (higher: smoother, not better)", fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(True, axis="y", lw=0.3, color="0.85")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        fig.suptitle(title + "\n(each dot a factor, numbered by its rank in its model)",
                     fontsize=SUPTITLE_SIZE)
    return finish(fig, path)


def compare_factor_maps(coordinates: np.ndarray, factors: Mapping[str, np.ndarray],
                        titles: Optional[Mapping[str, Sequence[str]]] = None, *,
                        match: bool = True, panel_width: float = 2.0,
                        max_cols: int = MAX_COLS,
                        title: Optional[str] = "Factors of each model, paired by correlation",
                        invert_y: bool = INVERT_Y, heldout: Optional[np.ndarray] = None,
                        match_spots: Optional[np.ndarray] = None,
                        path: Optional[str | os.PathLike] = None) -> Figure:
    """Factor maps of several models side by side, each factor beside its best partner.

    Parameters
    ----------
    coordinates : ndarray, (N, 2)
        Spot positions, shared by all models.
    factors : mapping of str to ndarray, (N, L_m)
        Model label -> its factors. The first model is the reference: its factors are
        shown in the given order, each in a framed block with the factor of every other
        model paired with it. Models may have different L; a factor left unpaired gets a
        block of its own at the end.
    titles : mapping of str to sequence of str, (L_m,), optional
        Panel titles per model, in each model's column order; default "factor k".
    match : bool
        Pair factors by Hungarian matching on their correlation over the spots
        (:func:`sf_mlflow.analysis.ordering.match_factors`); ``False`` pairs column k
        with column k. Either way each panel title gives the correlation r with the
        reference factor of its block.
    panel_width : float
        Inches per panel.
    max_cols : int
        Panels per row at most (blocks of one factor per model; default 4).
    title : str, optional
        Figure title.
    invert_y : bool
        Draw y downwards (as squidpy does, the default), see
        :func:`sf_mlflow.plots.spatial.spatial_grid`.
    heldout : ndarray of bool, (N,), optional
        Held-out spots, drawn as hollow rings.
    match_spots : ndarray of bool, (N,), optional
        The spots the correlations are computed on (e.g. the training spots, whose
        factors were fitted); default all.
    path : str or path-like, optional
        Save the figure there too.

    Returns
    -------
    matplotlib.figure.Figure
        Every panel is scaled to its own 0.5th-99.5th percentile range and shares one
        colour bar (0 = low, 1 = high): the comparison is of patterns, since the scale split
        between factors and loadings differs between models.
    """
    X = as_coordinates(coordinates)
    if not factors:
        raise DataError("factors is empty; expected a mapping label -> factors (N, L)")
    mats = {str(k): as_matrix(v, X.shape[0], f"factors[{k!r}]") for k, v in factors.items()}
    heads = {}
    for label, F in mats.items():
        h = None if titles is None else titles.get(label)
        if h is not None and len(h) != F.shape[1]:
            raise DataError(f"titles[{label!r}] has {len(h)} entries; expected {F.shape[1]}")
        heads[label] = [str(t) for t in h] if h is not None else \
            [f"factor {k + 1}" for k in range(F.shape[1])]
    use = as_mask(match_spots, X.shape[0], "match_spots")
    blocks = _pair_blocks({k: (v if use is None else v[use]) for k, v in mats.items()}, match)
    labels = list(mats)
    M = len(labels)
    per_row = max(1, max_cols // M)
    n_rows = -(-len(blocks) // per_row)
    per_row = min(per_row, len(blocks))
    held = as_mask(heldout, X.shape[0])
    pw = panel_width
    ph = pw * tissue_aspect(X) + 0.5
    foot = 0.65 + (0.25 if held is not None else 0.0)
    body_h = n_rows * ph
    fig = new_figure(per_row * M * pw + 0.3, body_h + foot + (0.35 if title else 0.0))
    body, bottom = fig.subfigures(2, 1, height_ratios=[body_h, foot])
    subs = np.atleast_1d(body.subfigures(n_rows, per_row, squeeze=False).ravel())
    s = marker_size(X, pw, ph - 0.5, area=area_per_spot(X))
    for sub, block in zip(subs, blocks):
        sub.set_edgecolor("0.8")
        sub.set_linewidth(0.8)
        sub.set_frameon(True)
        for ax, label, (col, r) in zip(sub.subplots(1, M, squeeze=False).ravel(), labels,
                                       block):
            if col < 0:
                ax.axis("off")
                continue
            v = mats[label][:, col]
            fin = v[np.isfinite(v)]
            lo, hi = (np.percentile(fin, [0.5, 99.5]) if fin.size else (0.0, 1.0))
            scaled = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
            tissue_scatter(ax, X, np.clip(scaled, 0, 1), s, FACTOR_CMAP, 0.0, 1.0, invert_y,
                           held)
            head = f"{label} {heads[label][col]}".replace("\n", ", ")
            weak = False
            if label != labels[0] and block[0][0] >= 0:
                weak = bool(np.isnan(r) or abs(r) < WEAK_R)
                head += "\nr = n/a" if np.isnan(r) else f"\nr = {r:.2f}"
                head += " (no counterpart)" if weak else ""
            ax.set_title(wrap(head, pw), fontsize=TITLE_SIZE - 1,
                         color="#B00020" if weak else "black")
    for sub in subs[len(blocks):]:
        sub.set_frameon(False)
    # one shared colour bar (every panel is on the same 0-1 scale) in a footer of its own
    cax = bottom.add_axes((0.3, 1 - 0.26 / foot, 0.4, 0.14 / foot))
    cb = fig.colorbar(ScalarMappable(Normalize(0, 1), FACTOR_CMAP), cax=cax,
                      orientation="horizontal")
    cb.ax.tick_params(labelsize=TICK_SIZE, length=2)
    cb.set_label("factor, scaled per panel (0 = low, 1 = high)", fontsize=LABEL_SIZE)
    if held is not None and not binned(held.size):  # binned maps draw no rings
        heldout_legend(bottom, outside=False)
    if title:
        # two lines: one line overflowed the figure's width at three models
        fig.suptitle(title + (f"\nr: correlation with the first model's factor; |r| < {WEAK_R}: "
                              "no counterpart" if M > 1 else ""), fontsize=SUPTITLE_SIZE)
    return finish(fig, path)


def _pair_blocks(mats: dict[str, np.ndarray], match: bool) -> list[list[tuple[int, float]]]:
    """Blocks of (column, r) per model: one per reference factor, then unpaired factors.

    Block k holds the reference's column k and, for every other model, the column paired
    with it (``-1`` if none) and its correlation r with the reference column.
    """
    labels = list(mats)
    ref = mats[labels[0]]
    L1 = ref.shape[1]
    blocks = [[(k, 1.0)] for k in range(L1)]
    extra = []
    for label in labels[1:]:
        F = mats[label]
        if match:
            assign, corr = match_factors(ref, F)
        else:
            C = factor_correlation(ref, F)
            assign = np.array([k if k < F.shape[1] else -1 for k in range(L1)])
            corr = np.array([C[k, a] if a >= 0 else np.nan for k, a in enumerate(assign)])
        for k in range(L1):
            blocks[k].append((int(assign[k]), float(corr[k])))
        used = set(int(a) for a in assign if a >= 0)
        for j in range(F.shape[1]):
            if j not in used:
                extra.append((label, j))
    for label, j in extra:
        blocks.append([(j, np.nan) if lab == label else (-1, np.nan) for lab in labels])
    return blocks
