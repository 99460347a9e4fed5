"""Factors and their uncertainties on the tissue: one panel per factor, or per group x factor."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from sf_mlflow.errors import DataError
from sf_mlflow.plots._common import (FACTOR_CMAP, FACTOR_LABEL, HELDOUT_LABEL, INVERT_Y,
                                     MAX_COLS, SCALE_CMAP, SCALE_LABEL, SUPTITLE_SIZE,
                                     TITLE_SIZE, area_per_spot, as_coordinates, as_mask, binned,
                                     as_matrix, as_titles, colorbar, finish, grid_shape,
                                     heldout_legend, marker_size, new_figure, panel_axes,
                                     robust_limits, tissue_aspect, tissue_scatter, wrap)

__all__ = ["spatial_grid", "factors_spatial", "scales_spatial", "groupwise_factors"]


def spatial_grid(coordinates: np.ndarray, values: np.ndarray,
                 titles: Optional[Sequence[str]] = None, *, cmap: str = FACTOR_CMAP,
                 colorbar_label: str = "", title: Optional[str] = None,
                 max_cols: int = MAX_COLS, panel_width: float = 2.6,
                 invert_y: bool = INVERT_Y, panel_label: str = "panel",
                 heldout: Optional[np.ndarray] = None, heldout_label: str = HELDOUT_LABEL,
                 path: Optional[str | os.PathLike] = None) -> Figure:
    """Several spatial variables on the tissue, one panel each with its own colour bar.

    Parameters
    ----------
    coordinates : ndarray, (N, 2)
        Spot positions.
    values : ndarray, (N, L) or (N,)
        One column per panel.
    titles : sequence of str, (L,), optional
        Panel titles; long ones are wrapped to the panel width. Default
        ``"<panel_label> k"``, k from 1.
    cmap : str
        Matplotlib colour map.
    colorbar_label : str
        Label of every colour bar (e.g. units).
    title : str, optional
        Figure title.
    max_cols : int
        Panels per row at most (default 4); more panels wrap onto further rows.
    panel_width : float
        Width of one panel in inches; the height follows the tissue's aspect ratio.
    invert_y : bool
        Draw y growing downwards (image convention), as ``squidpy.pl.spatial_scatter``
        does, so the maps match squidpy's of the same coordinates; ``False`` draws y
        growing upwards (mathematical convention), mirrored vertically.
    panel_label : str
        Word used in default titles.
    heldout : ndarray of bool, (N,), optional
        Held-out spots, drawn as hollow rings and explained in a legend below the panels.
    heldout_label : str
        That legend's text.
    path : str or path-like, optional
        Save the figure there too.

    Returns
    -------
    matplotlib.figure.Figure
        Colour limits are the 0.5th and 99.5th percentiles of each column (an arrow on the
        colour bar marks values beyond them).
    """
    X = as_coordinates(coordinates)
    V = as_matrix(values, X.shape[0], "values")
    L = V.shape[1]
    names = as_titles(titles, L, panel_label)
    rows, cols = grid_shape(L, max_cols)
    pw = panel_width
    ph = pw * tissue_aspect(X) + 0.35  # room for a two-line title
    held = as_mask(heldout, X.shape[0])
    fig = new_figure(cols * (pw + 0.55), rows * ph + (0.35 if title else 0.0)
                     + (0.25 if held is not None else 0.0))
    s = marker_size(X, pw, ph - 0.35, area=area_per_spot(X))
    for l, ax in enumerate(panel_axes(fig, L, rows, cols)):
        lo, hi, ext = robust_limits(V[:, l])
        sc = tissue_scatter(ax, X, V[:, l], s, cmap, lo, hi, invert_y, held)
        ax.set_title(wrap(names[l], pw), fontsize=TITLE_SIZE)
        colorbar(fig, sc, ax, colorbar_label, ext)
    if held is not None and not binned(held.size):  # binned maps draw no rings
        heldout_legend(fig, heldout_label)
    if title:
        fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    return finish(fig, path)


def factors_spatial(coordinates: np.ndarray, factors: np.ndarray,
                    titles: Optional[Sequence[str]] = None, *, title: Optional[str] = "Factors",
                    log: bool = False, max_cols: int = MAX_COLS, invert_y: bool = INVERT_Y,
                    heldout: Optional[np.ndarray] = None,
                    path: Optional[str | os.PathLike] = None) -> Figure:
    """All factors on the tissue, in a grid (viridis, one colour bar per factor).

    Parameters
    ----------
    coordinates : ndarray, (N, 2)
        Spot positions.
    factors : ndarray, (N, L)
        Factor values ``exp(F)`` per spot, columns in display order (e.g. sorted by
        Moran's I with :func:`sf_mlflow.analysis.ordering.order_by`).
    titles : sequence of str, (L,), optional
        e.g. from :func:`sf_mlflow.analysis.ordering.factor_titles`:
        ``"factor 1 (orig 7)\\nMoran's I 0.84"``. Default "factor k".
    title : str, optional
        Figure title.
    log : bool
        Show ``log(factors)`` (the log-factors F) instead.
    max_cols, invert_y, heldout, path
        See :func:`spatial_grid`.

    Returns
    -------
    matplotlib.figure.Figure
        Colour bars labelled "factor value exp(F)" (or "log factor F").
    """
    F = np.asarray(factors, dtype=np.float64)
    if log:
        if (F <= 0).any():
            raise DataError("log=True needs positive factors; pass exp(F) or use log=False")
        F = np.log(F)
    return spatial_grid(coordinates, F, titles, cmap=FACTOR_CMAP,
                        colorbar_label="log factor F" if log else FACTOR_LABEL, title=title,
                        max_cols=max_cols, invert_y=invert_y, panel_label="factor",
                        heldout=heldout, path=path)


def scales_spatial(coordinates: np.ndarray, scales: np.ndarray,
                   titles: Optional[Sequence[str]] = None, *,
                   title: Optional[str] = "Posterior standard deviation of the log-factors",
                   max_cols: int = MAX_COLS, invert_y: bool = INVERT_Y,
                   heldout: Optional[np.ndarray] = None,
                   heldout_label: str = HELDOUT_LABEL,
                   path: Optional[str | os.PathLike] = None) -> Figure:
    """Posterior scales (standard deviations) of the factors on the tissue (cividis).

    Parameters
    ----------
    coordinates : ndarray, (N, 2)
        Spot positions.
    scales : ndarray, (N, L)
        Non-negative posterior standard deviations, columns in the same order as the
        factors figure.
    titles : sequence of str, (L,), optional
        Default "factor k".
    title, max_cols, invert_y, heldout, heldout_label, path
        See :func:`spatial_grid`. Held-out spots without a scale (NaN) are grey rings.

    Returns
    -------
    matplotlib.figure.Figure
    """
    S = np.asarray(scales, dtype=np.float64)
    if (S[np.isfinite(S)] < 0).any():
        raise DataError("scales must be non-negative standard deviations")
    return spatial_grid(coordinates, S, titles, cmap=SCALE_CMAP, colorbar_label=SCALE_LABEL,
                        title=title, max_cols=max_cols, invert_y=invert_y,
                        panel_label="factor", heldout=heldout, heldout_label=heldout_label,
                        path=path)


def groupwise_factors(coordinates: np.ndarray, factors: np.ndarray, groupwise: np.ndarray,
                      group_names: Sequence[str], titles: Optional[Sequence[str]] = None, *,
                      title: Optional[str] = "Factors as seen by each group's GP",
                      panel_width: float = 1.8, max_cols: int = MAX_COLS,
                      invert_y: bool = INVERT_Y, heldout: Optional[np.ndarray] = None,
                      heldout_label: str = HELDOUT_LABEL,
                      path: Optional[str | os.PathLike] = None) -> Figure:
    """Factors overall and as predicted for every group, on a shared scale per factor.

    Parameters
    ----------
    coordinates : ndarray, (N, 2)
        Spot positions.
    factors : ndarray, (N, L)
        The factors of all spots (each spot under its own group): the first panel of
        every factor.
    groupwise : ndarray, (G, L, N)
        ``groupwise[g, l]``: factor l at every spot as if all spots belonged to group g
        (the multi-group GP's prediction for group g).
    group_names : sequence of str, (G,)
        Panel labels.
    titles : sequence of str, (L,), optional
        Factor titles (one block per factor). Default "factor k".
    title : str, optional
        Figure title.
    panel_width : float
        Inches per panel.
    max_cols : int
        Panels per row within a factor's block (default 4); more groups wrap.
    invert_y : bool
        Draw y downwards (as squidpy does, the default), see :func:`spatial_grid`.
    heldout : ndarray of bool, (N,), optional
        Held-out spots, drawn as hollow rings (grey where their value is NaN).
    heldout_label : str
        The legend's text for them.
    path : str or path-like, optional
        Save the figure there too.

    Returns
    -------
    matplotlib.figure.Figure
        One framed block per factor, stacked vertically: "all groups", then each group.
        Every block has one colour scale (0.5th to 99.5th percentile over all its panels)
        and one labelled colour bar, so differences between groups are differences in colour.
    """
    X = as_coordinates(coordinates)
    F = as_matrix(factors, X.shape[0], "factors")
    N, L = F.shape
    Gw = np.asarray(groupwise)  # float32 from analyze: a float64 copy would double (G, L, N)
    if Gw.ndim != 3 or Gw.shape[1:] != (L, N):
        raise DataError(f"groupwise has shape {Gw.shape}; expected (G, L, N) = (G, {L}, {N})")
    G = Gw.shape[0]
    groups = as_titles(group_names, G, "group", "group_names")
    heads = as_titles(titles, L, "factor")
    held = as_mask(heldout, N)
    rows, cols = grid_shape(G + 1, max_cols)
    pw = panel_width
    ph = pw * tissue_aspect(X) + 0.3
    block_h = rows * ph + 0.35
    fig = new_figure(cols * pw + 0.9, L * block_h + (0.35 if title else 0.0)
                     + (0.25 if held is not None else 0.0))
    subs = np.atleast_1d(fig.subfigures(L, 1, squeeze=False).ravel())
    s = marker_size(X, pw, ph - 0.3, area=area_per_spot(X))
    labels = ["all groups"] + groups
    for l, sub in enumerate(subs):
        sub.set_edgecolor("0.8")
        sub.set_linewidth(0.8)
        sub.set_frameon(True)
        lo, hi, ext = robust_limits(np.concatenate([F[:, l], Gw[:, l, :].ravel()]))
        axes = panel_axes(sub, G + 1, rows, cols)
        sc = None
        for r, ax in enumerate(axes):
            vals = F[:, l] if r == 0 else Gw[r - 1, l]
            sc = tissue_scatter(ax, X, vals, s, FACTOR_CMAP, lo, hi, invert_y, held)
            ax.set_title(wrap(labels[r], pw), fontsize=TITLE_SIZE)
        colorbar(sub, sc, axes, FACTOR_LABEL, ext, shrink=0.9)
        sub.suptitle(wrap(heads[l].replace("\n", ", "), cols * pw), fontsize=TITLE_SIZE,
                     fontweight="bold")
    if held is not None and not binned(held.size):  # binned maps draw no rings
        heldout_legend(fig, heldout_label)
    if title:
        fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    return finish(fig, path)
