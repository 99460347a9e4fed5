"""Shared figure plumbing: pyplot-free figures, tissue panels, marker sizes, colour limits.

Figures are built as :class:`matplotlib.figure.Figure` objects with an Agg canvas attached
directly, never through pyplot, so nothing here changes the user's backend or leaves
figures open in a notebook; the caller saves them (``fig.savefig(path)``) or passes
``path=`` to the plotting function.
"""

from __future__ import annotations

import os
import textwrap
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy.spatial import cKDTree

from sf_mlflow.errors import DataError

#: Resolution of saved PNGs: 150 dpi keeps 8-pt text crisp and files small.
DPI = 150

#: Font sizes (points): panel titles, axis labels, tick labels, figure title.
TITLE_SIZE = 9
LABEL_SIZE = 8
TICK_SIZE = 7
SUPTITLE_SIZE = 11

#: Marker area bounds (points^2): 0.05 pt^2 is still drawn (about one pixel at 150 dpi),
#: 60 pt^2 stops a few hundred spots turning into large blobs.
MIN_MARKER = 0.05
MAX_MARKER = 60.0

#: Colour maps (perceptually uniform; the diverging one for signed log-ratios).
FACTOR_CMAP = "viridis"
SCALE_CMAP = "cividis"
GENE_CMAP = "magma"
DIVERGING_CMAP = "RdBu_r"

#: Panels per row at most: wider grids wrap, so previews (e.g. MLflow's) stay legible.
MAX_COLS = 4

#: Above this many spots a tissue map is a binned image of the mean value per bin
#: (:func:`binned_image`) instead of one marker per spot: 10^6 markers take tens of seconds
#: per panel and overplot anyway. Held-out spots are then part of their bins' means.
BIN_ABOVE = 200_000
#: Bins along the longer side of the tissue in a binned map (~ a panel's pixels at DPI).
BIN_PIXELS = 300

#: Draw y growing downwards by default, as ``squidpy.pl.spatial_scatter`` and image
#: viewers do (``invert_y=False`` in any map function gives y growing upwards).
INVERT_Y = True

#: Colour-bar labels of the quantities drawn on the tissue.
FACTOR_LABEL = "factor value exp(F)"
SCALE_LABEL = "posterior sd of F"
GENE_LABEL = "log1p counts"

#: Legend text for the hollow markers of held-out spots.
HELDOUT_LABEL = "held-out spot (not fitted; value predicted from its position)"

#: Colour-blind-safe qualitative colours (Okabe-Ito) for model comparisons.
QUALITATIVE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442",
               "#000000"]


#: Largest side and area of a saved figure, in pixels: beyond them the resolution is lowered
#: (the layout in inches stays), so that no figure is an image viewers refuse (Pillow warns
#: of a decompression bomb from 89 Mpx on).
MAX_SIDE_PX = 12_000
MAX_AREA_PX = 40_000_000


def figure_dpi(width: float, height: float) -> float:
    """:data:`DPI`, or less for a figure of ``width`` x ``height`` inches beyond the caps."""
    return min(DPI, MAX_SIDE_PX / max(width, height), (MAX_AREA_PX / (width * height)) ** 0.5)


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout Figure of about ``width`` x ``height`` inches, Agg canvas.

    The size is rounded to whole pixels at its resolution (:data:`DPI`, lower for a figure
    beyond :data:`MAX_SIDE_PX` or :data:`MAX_AREA_PX`), so a saved PNG has exactly
    ``fig.get_size_inches() * fig.dpi`` pixels.
    """
    dpi = figure_dpi(max(width, 0.01), max(height, 0.01))
    width, height = (max(1, round(v * dpi)) / dpi for v in (width, height))
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(w_pad=0.03, h_pad=0.03, wspace=0.02, hspace=0.02)
    return fig


def finish(fig: Figure, path: Optional[str | os.PathLike] = None) -> Figure:
    """Save ``fig`` to ``path`` (format from the extension) if given; return ``fig``.

    Saved at the figure's size and resolution without tight cropping, so a PNG has
    exactly ``width * fig.dpi`` x ``height * fig.dpi`` pixels (``fig.dpi`` is :data:`DPI`
    unless the figure is beyond the pixel caps, see :func:`new_figure`).
    """
    if path is not None:
        fig.savefig(os.fspath(path), dpi=fig.dpi, facecolor="white")
    return fig


# ---------------------------------------------------------------------------- checking

def as_coordinates(coordinates) -> np.ndarray:
    """Validated coordinates, ndarray (N, 2) float64."""
    X = np.asarray(coordinates, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 2 or X.shape[0] == 0:
        raise DataError(f"coordinates have shape {X.shape}; expected (N, 2) with N >= 1")
    if not np.isfinite(X).all():
        raise DataError("coordinates contain NaN or infinite values; drop those spots first")
    return X


def as_matrix(values, n_rows: int, name: str, what: str = "(N, L)") -> np.ndarray:
    """Validated 2-D array with ``n_rows`` rows (a 1-D array becomes one column)."""
    V = np.asarray(values, dtype=np.float64)
    if V.ndim == 1:
        V = V[:, None]
    if V.ndim != 2 or V.shape[0] != n_rows:
        raise DataError(f"{name} has shape {np.shape(values)}; expected {what} with "
                        f"{n_rows} rows like coordinates")
    return V


def as_titles(titles: Optional[Sequence[str]], n: int, default: str, name: str = "titles") -> list[str]:
    """``n`` panel titles: the given ones, or ``"<default> k"`` numbered from 1."""
    if titles is None:
        return [f"{default} {k + 1}" for k in range(n)]
    out = [str(t) for t in titles]
    if len(out) != n:
        raise DataError(f"{name} has {len(out)} entries; expected {n}, one per panel")
    return out


def wrap(text: str, width_in: float, size: float = TITLE_SIZE) -> str:
    """Wrap each line of ``text`` to fit ``width_in`` inches at font ``size`` points."""
    chars = max(8, int(width_in * 72 / (0.55 * size)))
    return "\n".join(textwrap.fill(line, chars) if len(line) > chars else line
                     for line in str(text).split("\n"))


# ------------------------------------------------------------------------- tissue maps

def tissue_aspect(coords: np.ndarray) -> float:
    """Height / width of the coordinates' bounding box, limited to [0.4, 2.5]."""
    span = np.ptp(coords, axis=0)
    if span[0] <= 0 or span[1] <= 0:
        return 1.0
    return float(np.clip(span[1] / span[0], 0.4, 2.5))


def area_per_spot(coords: np.ndarray, k: int = 6, max_queries: int = 5000,
                  seed: int = 0) -> float:
    """Typical area around one spot, in squared coordinate units.

    The median over spots of pi r_k^2 / k, with r_k the distance to the k-th nearest
    neighbour: the local density, robust to the tissue's outline and to empty regions
    (a bounding-box estimate would count the holes). Queried at most ``max_queries`` spots.
    """
    n = coords.shape[0]
    if n <= 1:
        span = np.ptp(coords, axis=0)
        return float(max(span.max(), 1.0) ** 2)
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    q = coords if n <= max_queries else coords[rng.choice(n, max_queries, replace=False)]
    dist, _ = cKDTree(coords).query(q, k=k + 1)
    r = dist[:, -1]
    r = r[r > 0]
    if r.size == 0:  # all positions duplicated
        return 1.0
    return float(np.median(np.pi * r ** 2 / k))


def marker_size(coords: np.ndarray, panel_width_in: float, panel_height_in: float,
                fill: float = 2.0, area: Optional[float] = None) -> float:
    """Scatter marker area (points^2) so spots tile the tissue without heavy overlap.

    ``s = clip(fill * A * scale^2, MIN_MARKER, MAX_MARKER)``, with A the area per spot
    (:func:`area_per_spot`) and ``scale`` the points per coordinate unit when the
    coordinates' bounding box is fitted, at equal aspect, into the panel's drawing area
    (taken as 85% of the panel's width and height, the rest being title and colour bar).
    A circle of area ``s`` covers ``pi / 4 * s``, so ``fill = 1.3`` would just cover the
    area of a regular lattice; but spots placed irregularly (beads, or a Poisson layout)
    leave a fraction of about ``exp(-pi / 4 * fill)`` uncovered, and one-pixel markers
    are drawn faint by anti-aliasing. The default 2.0 balances the two faults of a scatter
    map: about 20 % white in the worst, Poisson, case, and markers that overlap little
    enough for each spot to stay visible (2.8 hid many spots under their neighbours at a
    few hundred spots).
    """
    span = np.ptp(coords, axis=0)
    span = np.where(span > 0, span, max(span.max(), 1.0))
    w_pt, h_pt = 0.85 * panel_width_in * 72, 0.85 * panel_height_in * 72
    scale = min(w_pt / span[0], h_pt / span[1])
    a = area_per_spot(coords) if area is None else area
    return float(np.clip(fill * a * scale ** 2, MIN_MARKER, MAX_MARKER))


def robust_limits(values: np.ndarray, low: float = 0.5, high: float = 99.5,
                  symmetric: bool = False) -> tuple[float, float, str]:
    """Colour limits at percentiles, ignoring NaN, and the colour bar's ``extend``.

    A few extreme spots would otherwise stretch the scale and leave every other spot
    one colour. ``symmetric`` gives ``(-m, m)`` with m the ``high`` percentile of |values|,
    for diverging maps centred at 0.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (-1.0, 1.0, "neither") if symmetric else (0.0, 1.0, "neither")
    if symmetric:
        m = float(np.percentile(np.abs(v), high))
        if m <= 0:
            m = float(np.abs(v).max()) or 1.0
        over = np.abs(v).max() > m
        return -m, m, "both" if over else "neither"
    lo, hi = (float(x) for x in np.percentile(v, [low, high]))
    if hi <= lo:  # e.g. a sparse gene whose 99.5th percentile is 0
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1.0
    ext = {(False, False): "neither", (True, False): "min", (False, True): "max",
           (True, True): "both"}[(bool(v.min() < lo), bool(v.max() > hi))]
    return lo, hi, ext


def clean_tissue_axes(ax) -> None:
    """Equal aspect, no ticks or frame; the tissue is the picture."""
    ax.set_aspect("equal", adjustable="box")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.margins(0.02)


def as_mask(mask, n: int, name: str = "heldout") -> Optional[np.ndarray]:
    """Validated boolean mask (N,), or None when ``mask`` is None or all False."""
    if mask is None:
        return None
    m = np.asarray(mask).ravel()
    if m.shape != (n,):
        raise DataError(f"{name} has shape {np.shape(mask)}; expected ({n},), one flag per spot")
    m = m.astype(bool)
    return m if m.any() else None


def binned(n_spots: int) -> bool:
    """Whether a map of ``n_spots`` is drawn as a :func:`binned_image` (no held-out rings)."""
    return n_spots > BIN_ABOVE


def tissue_scatter(ax, coords: np.ndarray, values: np.ndarray, s: float, cmap: str,
                   vmin: float, vmax: float, invert_y: bool = INVERT_Y,
                   heldout: Optional[np.ndarray] = None):
    """Draw one tissue map; returns the PathCollection (for a colour bar).

    Spots are drawn in increasing order of value so high values (small hot spots, sparse
    genes) are on top; NaN values are drawn first in light grey. Spots flagged in
    ``heldout`` (N,) are drawn last as hollow rings in their value's colour (grey when
    NaN), so they are visible but distinct from the spots the model was fitted on.
    ``invert_y`` (default :data:`INVERT_Y`) draws y growing downwards, as squidpy does.
    Above :data:`BIN_ABOVE` spots the map is a :func:`binned_image` instead (the
    returned AxesImage serves the colour bar the same way).
    """
    v = np.asarray(values, dtype=np.float64)
    held = np.zeros(v.shape, bool) if heldout is None else np.asarray(heldout, bool)
    if binned(v.size):
        sc = binned_image(ax, coords, v, cmap, vmin, vmax)
        _tissue_limits(ax, coords, invert_y)
        return sc
    nan = ~np.isfinite(v)
    if (nan & ~held).any():
        m = nan & ~held
        ax.scatter(coords[m, 0], coords[m, 1], s=s, c="#dddddd", linewidths=0,
                   rasterized=True)
    idx = np.flatnonzero(~nan & ~held)
    idx = idx[np.argsort(v[idx], kind="stable")]
    sc = ax.scatter(coords[idx, 0], coords[idx, 1], c=v[idx], s=s, cmap=cmap, vmin=vmin,
                    vmax=vmax, linewidths=0, marker="o", rasterized=True, plotnonfinite=False)
    if held.any():
        h = np.flatnonzero(held)
        rgba = colormaps[cmap](Normalize(vmin, vmax, clip=True)(np.nan_to_num(v[h])))
        rgba[nan[h]] = (0.55, 0.55, 0.55, 1.0)
        lw = float(np.clip(0.18 * np.sqrt(s), 0.35, 1.2))
        ax.scatter(coords[h, 0], coords[h, 1], s=s, facecolors="none", edgecolors=rgba,
                   linewidths=lw, marker="o", rasterized=True)
    _tissue_limits(ax, coords, invert_y)
    return sc


def _tissue_limits(ax, coords: np.ndarray, invert_y: bool) -> None:
    """Clean axes over the full tissue extent (kept even when every value is NaN)."""
    clean_tissue_axes(ax)
    x0, y0 = coords.min(axis=0)
    x1, y1 = coords.max(axis=0)
    padx, pady = 0.02 * max(x1 - x0, 1e-12), 0.02 * max(y1 - y0, 1e-12)
    ax.set_xlim(x0 - padx, x1 + padx)
    if invert_y:
        ax.set_ylim(y1 + pady, y0 - pady)
    else:
        ax.set_ylim(y0 - pady, y1 + pady)


def binned_image(ax, coords: np.ndarray, values: np.ndarray, cmap: str, vmin: float,
                 vmax: float, pixels: int = BIN_PIXELS):
    """The mean value of the spots in each square bin, drawn as one image; returns it.

    A million markers take tens of seconds to draw and overplot into noise; the per-bin
    mean costs two ``bincount`` passes and reads like the scatter at the panel's
    resolution. Bins without a finite value are transparent. ``pixels`` bins span the
    longer side of the tissue; the other side gets as many as keep the bins square.
    """
    finite = np.isfinite(values)
    x, y, v = coords[finite, 0], coords[finite, 1], values[finite]
    (x0, y0), (x1, y1) = coords.min(axis=0), coords.max(axis=0)
    width, height = max(x1 - x0, 1e-12), max(y1 - y0, 1e-12)
    step = max(width, height) / pixels
    nx, ny = max(1, int(np.ceil(width / step))), max(1, int(np.ceil(height / step)))
    edges = (x0 + step * np.arange(nx + 1), y0 + step * np.arange(ny + 1))
    # integer bin indices and bincount: one pass each, where histogram2d's bisection
    # search took ~0.3 s per panel of 10^6 spots (a figure may have hundreds of panels)
    ix = np.minimum(((x - x0) / step).astype(np.intp), nx - 1)
    iy = np.minimum(((y - y0) / step).astype(np.intp), ny - 1)
    flat = ix * ny + iy
    total = np.bincount(flat, weights=v, minlength=nx * ny).reshape(nx, ny)
    count = np.bincount(flat, minlength=nx * ny).reshape(nx, ny)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
    return ax.imshow(mean.T, origin="lower", extent=(edges[0][0], edges[0][-1], edges[1][0],
                                                     edges[1][-1]),
                     cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")


def heldout_legend(fig, label: str = HELDOUT_LABEL, outside: bool = True) -> None:
    """A figure legend explaining the hollow markers of held-out spots.

    ``outside``: below the panels, with room made by the layout; else at the bottom of
    ``fig`` (e.g. a footer sub-figure kept free for it).
    """
    ring = Line2D([], [], ls="none", marker="o", markersize=6, markerfacecolor="none",
                  markeredgecolor="0.25", markeredgewidth=1.0)
    fig.legend([ring], [label], loc="outside lower center" if outside else "lower center",
               fontsize=LABEL_SIZE,
               frameon=False, handletextpad=0.3)


def colorbar(fig: Figure, mappable, ax, label: str = "", extend: str = "neither",
             **kwargs):
    """A slim colour bar beside ``ax`` (or a list of axes) with small tick labels."""
    opts = dict(shrink=0.85, pad=0.01, fraction=0.05, aspect=22)
    opts.update(kwargs)
    cb = fig.colorbar(mappable, ax=ax, extend=extend, **opts)
    cb.ax.tick_params(labelsize=TICK_SIZE, length=2)
    cb.outline.set_linewidth(0.4)
    if label:
        cb.set_label(label, fontsize=LABEL_SIZE)
    return cb


def grid_shape(n: int, max_cols: int = MAX_COLS) -> tuple[int, int]:
    """(rows, cols) for n panels: at most ``max_cols`` columns, rows balanced."""
    n = max(int(n), 1)
    rows = -(-n // max_cols)
    cols = -(-n // rows)
    return rows, cols


def panel_axes(fig: Figure, n: int, rows: int, cols: int) -> list:
    """The first n axes of a rows x cols grid; the unused ones are removed."""
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()
    return list(axes[:n])


def dense_columns(counts, columns: Sequence[int]) -> np.ndarray:
    """Selected columns of a sparse or dense (N, D) matrix as a dense (N, len(columns))."""
    if sp.issparse(counts):
        return np.asarray(sp.csc_matrix(counts[:, list(columns)]).toarray(), dtype=np.float64)
    return np.asarray(counts, dtype=np.float64)[:, list(columns)]
