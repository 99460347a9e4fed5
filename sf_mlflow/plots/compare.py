"""Side-by-side comparison of models (e.g. PNMF vs MGGP-SVGP): Moran's I and factor maps."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from sf_mlflow.errors import DataError
from sf_mlflow.plots._common import (FACTOR_CMAP, LABEL_SIZE, QUALITATIVE, SUPTITLE_SIZE,
                                     TICK_SIZE, TITLE_SIZE, area_per_spot, as_coordinates,
                                     as_matrix, colorbar, finish, marker_size, new_figure,
                                     tissue_aspect, tissue_scatter, wrap)

__all__ = ["compare_morans_i", "compare_factor_maps"]


def compare_morans_i(values: Mapping[str, np.ndarray], *, sort: bool = True,
                     title: Optional[str] = "Spatial autocorrelation of the factors",
                     path: Optional[str | os.PathLike] = None) -> Figure:
    """Grouped bars of Moran's I per factor, one colour per model.

    Parameters
    ----------
    values : mapping of str to ndarray, (L_m,)
        Model label -> Moran's I of each of its factors (models may have different L).
    sort : bool
        Sort each model's values from highest to lowest, so bars compare factors of equal
        rank (the factors of different models do not correspond one to one). With
        ``sort=False`` bar k shows factor k of each model as given.
    title : str, optional
        Figure title.
    path : str or path-like, optional
        Save the figure there too.

    Returns
    -------
    matplotlib.figure.Figure
        The legend gives each model's mean Moran's I; NaN values leave a gap.
    """
    if not values:
        raise DataError("values is empty; expected a mapping label -> Moran's I (L,)")
    series = {}
    for label, v in values.items():
        a = np.asarray(v, dtype=np.float64).ravel()
        if a.size == 0:
            raise DataError(f"values[{label!r}] is empty; expected one Moran's I per factor")
        if sort:
            a = np.concatenate([np.sort(a[~np.isnan(a)])[::-1], a[np.isnan(a)]])
        series[str(label)] = a
    M = len(series)
    L = max(a.size for a in series.values())
    width = 0.8 / M
    fig = new_figure(min(max(4.5, 1.2 + 0.22 * L * M + 0.2 * L), 12.0), 3.6)
    ax = fig.subplots()
    x = np.arange(L)
    for m, (label, a) in enumerate(series.items()):
        mean = np.nanmean(a) if np.isfinite(a).any() else np.nan
        ax.bar(np.arange(a.size) + (m - (M - 1) / 2) * width, a, width=width * 0.95,
               color=QUALITATIVE[m % len(QUALITATIVE)], label=f"{label} (mean {mean:.2f})")
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xticks(x, [str(k + 1) for k in x], fontsize=TICK_SIZE)
    ax.set_xlabel("factor rank (highest Moran's I first)" if sort else "factor",
                  fontsize=LABEL_SIZE)
    ax.set_ylabel("Moran's I", fontsize=LABEL_SIZE)
    finite = np.concatenate([a[np.isfinite(a)] for a in series.values()])
    top = max(1.0, float(finite.max()) if finite.size else 1.0)
    bottom = min(0.0, float(finite.min()) if finite.size else 0.0)
    # headroom above the tallest bar for the legend, ticks only over the data range
    ax.set_ylim(bottom - 0.05 * (top - bottom) if bottom < 0 else 0.0,
                top + 0.06 * (1 + M // 4) * (top - bottom) + 0.06 * (top - bottom))
    ticks = [t for t in ax.get_yticks() if t <= top + 1e-9]
    ax.set_yticks(ticks)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(True, axis="y", lw=0.3, color="0.85")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(fontsize=LABEL_SIZE, frameon=False, ncols=min(M, 4), loc="upper center")
    if title:
        fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    return finish(fig, path)


def compare_factor_maps(coordinates: np.ndarray, factors: Mapping[str, np.ndarray],
                        titles: Optional[Mapping[str, Sequence[str]]] = None, *,
                        panel_width: float = 2.0,
                        title: Optional[str] = "Factors of each model",
                        invert_y: bool = False,
                        path: Optional[str | os.PathLike] = None) -> Figure:
    """Factor maps of several models, one row per model.

    Parameters
    ----------
    coordinates : ndarray, (N, 2)
        Spot positions, shared by all models.
    factors : mapping of str to ndarray, (N, L_m)
        Model label -> its factors, columns in display order (e.g. each sorted by its own
        Moran's I). Models may have different L; shorter rows leave empty panels.
    titles : mapping of str to sequence of str, (L_m,), optional
        Panel titles per model; default "factor k".
    panel_width : float
        Inches per panel.
    title : str, optional
        Figure title.
    invert_y : bool
        Draw y downwards.
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
    R = len(mats)
    L = max(m.shape[1] for m in mats.values())
    pw = panel_width
    ph = pw * tissue_aspect(X) + 0.35
    fig = new_figure(L * pw + 0.9, R * ph + 0.3 + (0.35 if title else 0.0))
    axes = fig.subplots(R, L, squeeze=False)
    s = marker_size(X, pw, ph - 0.35, area=area_per_spot(X))
    for r, (label, F) in enumerate(mats.items()):
        heads = None if titles is None else titles.get(label)
        if heads is not None and len(heads) != F.shape[1]:
            raise DataError(f"titles[{label!r}] has {len(heads)} entries; expected {F.shape[1]}")
        for l in range(L):
            ax = axes[r, l]
            if l >= F.shape[1]:
                ax.axis("off")
                continue
            v = F[:, l]
            fin = v[np.isfinite(v)]
            lo, hi = (np.percentile(fin, [0.5, 99.5]) if fin.size else (0.0, 1.0))
            scaled = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
            tissue_scatter(ax, X, np.clip(scaled, 0, 1), s, FACTOR_CMAP, 0.0, 1.0, invert_y)
            ax.set_title(wrap(heads[l] if heads is not None else f"factor {l + 1}", pw),
                         fontsize=TITLE_SIZE)
            if l == 0:
                ax.set_ylabel(wrap(label, ph, LABEL_SIZE), fontsize=TITLE_SIZE, fontweight="bold")
    sm = ScalarMappable(Normalize(0, 1), FACTOR_CMAP)
    colorbar(fig, sm, list(axes.ravel()), "factor, scaled per panel", shrink=0.5, aspect=25)
    if title:
        fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    return finish(fig, path)
