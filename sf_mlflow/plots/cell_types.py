"""Where the cell types are: one map of the spots coloured by their group."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sf_mlflow.errors import DataError
from sf_mlflow.plots._common import (INVERT_Y, QUALITATIVE, SUPTITLE_SIZE, TICK_SIZE,
                                     _tissue_limits, area_per_spot, as_coordinates, as_mask,
                                     finish, marker_size, new_figure, tissue_aspect)

__all__ = ["cell_types", "group_colours"]


def group_colours(n_groups: int) -> np.ndarray:
    """(G, 4) RGBA: the colour-blind-safe palette for up to 8 groups, tab20 up to 20, then
    tab20, tab20b and tab20c (60), then colours spread along turbo."""
    if n_groups <= len(QUALITATIVE):
        from matplotlib.colors import to_rgba

        return np.array([to_rgba(c) for c in QUALITATIVE[:n_groups]])
    if n_groups <= 60:
        table = np.concatenate([colormaps[m](np.arange(20)) for m in ("tab20", "tab20b", "tab20c")])
        return table[:n_groups]
    return colormaps["turbo"](np.linspace(0, 1, n_groups))


def cell_types(coordinates: np.ndarray, groups: np.ndarray, group_names: Sequence[str], *,
               title: Optional[str] = "Cell types", invert_y: bool = INVERT_Y,
               heldout: Optional[np.ndarray] = None, panel_width: float = 5.0,
               path: Optional[str | os.PathLike] = None) -> Figure:
    """The spots on the tissue coloured by cell type, with a legend of every type and its
    number of spots.

    Parameters
    ----------
    coordinates : ndarray, (N, 2)
        Spot positions.
    groups : ndarray of int, (N,)
        Group code of each spot, in ``0 .. G-1``.
    group_names : sequence of str, (G,)
        The names of the codes.
    title, invert_y, path
        As in :func:`sf_mlflow.plots.spatial_grid`.
    heldout : ndarray of bool, (N,), optional
        Held-out spots, drawn as rings in their type's colour.
    panel_width : float
        Width of the map in inches (the legend is beside it, in as many columns as needed).
    """
    X = as_coordinates(coordinates)
    g = np.asarray(groups).ravel()
    names = [str(n) for n in group_names]
    if g.shape != (X.shape[0],):
        raise DataError(f"groups has shape {np.shape(groups)}; expected ({X.shape[0]},), one "
                        "code per spot")
    if g.size and (g.min() < 0 or g.max() >= len(names)):
        raise DataError(f"groups holds codes {int(g.min())}..{int(g.max())}, but group_names "
                        f"names {len(names)} groups; expected codes 0..{len(names) - 1}")
    held = as_mask(heldout, X.shape[0])
    colours = group_colours(len(names))
    ph = panel_width * tissue_aspect(X)
    # as many legend rows as the map's height holds (7-point lines), then more columns
    per_col = max(8, int((max(ph, 2.5) - 0.4) / 0.17))
    n_cols = max(1, -(-len(names) // per_col))
    longest = max((len(f"{n} (0000)") for n in names), default=8)
    legend_w = n_cols * (0.3 + 0.058 * longest)
    fig = new_figure(panel_width + legend_w, max(ph, 0.17 * min(len(names), per_col) + 0.4)
                     + (0.35 if title else 0.0))
    ax = fig.subplots()
    s = marker_size(X, panel_width, ph, area=area_per_spot(X))
    fitted = np.ones(X.shape[0], bool) if held is None else ~held
    order = np.random.default_rng(0).permutation(X.shape[0])   # no type drawn over all others
    order = order[fitted[order]]
    ax.scatter(X[order, 0], X[order, 1], s=s, c=colours[g[order]], linewidths=0,
               rasterized=True)
    if held is not None:
        lw = float(np.clip(0.18 * np.sqrt(s), 0.35, 1.2))
        ax.scatter(X[held, 0], X[held, 1], s=s, facecolors="none", edgecolors=colours[g[held]],
                   linewidths=lw, rasterized=True)
    _tissue_limits(ax, X, invert_y)
    counts = np.bincount(g, minlength=len(names))
    handles = [Line2D([], [], marker="o", ls="", color=colours[k], markersize=5,
                      label=f"{name} ({counts[k]:,})") for k, name in enumerate(names)]
    fig.legend(handles=handles, loc="outside right center", ncol=n_cols, frameon=False,
               fontsize=TICK_SIZE, handletextpad=0.2, columnspacing=0.8,
               title="type (spots)" + ("; rings: held-out" if held is not None else ""),
               title_fontsize=TICK_SIZE)
    if title:
        fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    return finish(fig, path)
