"""Genes behind the factors: top genes, factor-vs-gene maps, group enrichment of loadings."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from sf_mlflow.analysis.enrichment import (CRITERION_NAMES, PSEUDO_SHARE, TOP_GENE_CRITERION,
                                           gene_scores, relevant_genes)
from sf_mlflow.errors import DataError
from sf_mlflow.plots._common import (DIVERGING_CMAP, FACTOR_CMAP, FACTOR_LABEL, GENE_CMAP,
                                     GENE_LABEL, INVERT_Y, MAX_COLS, QUALITATIVE,
                                     SUPTITLE_SIZE, TICK_SIZE, TITLE_SIZE, area_per_spot,
                                     as_coordinates, as_mask, binned, as_matrix, as_titles, colorbar,
                                     dense_columns, finish, grid_shape, heldout_legend,
                                     marker_size, new_figure, panel_axes, robust_limits,
                                     tissue_aspect, tissue_scatter, wrap)

__all__ = ["top_genes", "factors_with_genes", "gene_enrichment_heatmap", "enrichment_for_group"]


def _gene_names(gene_names, d: int) -> list[str]:
    names = [str(x) for x in np.asarray(gene_names, dtype=object).ravel()]
    if len(names) != d:
        raise DataError(f"gene_names has {len(names)} entries; expected {d}, one per gene")
    return names


def _loadings(loadings) -> np.ndarray:
    W = np.asarray(loadings, dtype=np.float64)
    if W.ndim != 2:
        raise DataError(f"loadings have shape {W.shape}; expected (D, L)")
    return W


def _clean_bar_axes(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=TICK_SIZE, length=2)


def _criterion(by: str) -> str:
    gene_scores(np.ones((1, 1)), by)  # validates ``by``
    return CRITERION_NAMES[by]


def top_genes(loadings: np.ndarray, gene_names: Sequence[str], n: int = 10,
              titles: Optional[Sequence[str]] = None, *, by: str = TOP_GENE_CRITERION,
              title: Optional[str] = "Top genes per factor", max_cols: int = MAX_COLS,
              path: Optional[str | os.PathLike] = None) -> Figure:
    """Horizontal bar chart of the n top genes of every factor.

    Parameters
    ----------
    loadings : ndarray, (D, L)
        Non-negative loadings, columns in display order.
    gene_names : sequence of str, (D,)
    n : int
        Genes per factor.
    titles : sequence of str, (L,), optional
        Panel titles; default "factor k".
    by : {"specific", "loading", "share"}
        Ranking, see :func:`sf_mlflow.analysis.enrichment.gene_scores`; the bars show
        that score. The default (loading x share) is the one criterion
        :func:`factors_with_genes` uses too, so both name the same top gene.
    title : str, optional
        Figure title; ", ranked by <criterion>" is appended.
    max_cols : int
        Panels per row at most.
    path : str or path-like, optional
        Save the figure there too.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per factor, top gene at the top.
    """
    W = _loadings(loadings)
    D, L = W.shape
    names = _gene_names(gene_names, D)
    if int(n) < 1:
        raise DataError(f"n = {n!r} must be at least 1")
    n = min(int(n), D)
    S = gene_scores(W, by)
    crit = _criterion(by)
    heads = as_titles(titles, L, "factor")
    rows, cols = grid_shape(L, max_cols)
    pw, ph = 2.5, 0.5 + 0.17 * n + 0.35
    fig = new_figure(cols * pw, rows * ph + (0.35 if title else 0.0))
    for l, ax in enumerate(panel_axes(fig, L, rows, cols)):
        idx = np.argsort(-S[:, l], kind="stable")[:n]
        ax.barh(np.arange(n), S[idx, l], color=QUALITATIVE[0], height=0.75)
        ax.set_yticks(np.arange(n), [names[i] for i in idx], fontsize=TICK_SIZE)
        ax.invert_yaxis()
        ax.set_title(wrap(heads[l], pw), fontsize=TITLE_SIZE)
        ax.set_xlabel(crit, fontsize=TICK_SIZE)
        ax.xaxis.get_major_locator().set_params(nbins=3)
        _clean_bar_axes(ax)
    if title:
        fig.suptitle(f"{title}, ranked by {crit}", fontsize=SUPTITLE_SIZE)
    return finish(fig, path)


def factors_with_genes(coordinates: np.ndarray, factors: np.ndarray, counts, loadings: np.ndarray,
                       gene_names: Sequence[str], titles: Optional[Sequence[str]] = None, *,
                       by: str = TOP_GENE_CRITERION, pairs_per_row: int = 2,
                       panel_width: float = 2.2,
                       title: Optional[str] = "Each factor beside its top gene",
                       invert_y: bool = INVERT_Y, heldout: Optional[np.ndarray] = None,
                       path: Optional[str | os.PathLike] = None) -> Figure:
    """Each factor on the tissue next to the expression of its top gene.

    Parameters
    ----------
    coordinates : ndarray, (N, 2)
        Spot positions.
    factors : ndarray, (N, L)
        Factor values, columns in display order.
    counts : scipy.sparse matrix or ndarray, (N, D)
        Raw counts; only the L top genes' columns are densified, shown as ``log1p``.
    loadings : ndarray, (D, L)
        Loadings in the same column order as ``factors``.
    gene_names : sequence of str, (D,)
    titles : sequence of str, (L,), optional
        Factor panel titles; default "factor k".
    by : {"specific", "loading", "share"}
        How the top gene is chosen (:func:`sf_mlflow.analysis.enrichment.gene_scores`):
        the highest-scoring gene, the first bar of :func:`top_genes` with the same ``by``
        (two factors may share it). The default, loading x share, picks a gene the factor
        both loads strongly and explains most of: raw loadings would show the same
        abundant gene for many factors, shares alone a rare, noisy one. Named in the
        gene panels' titles.
    pairs_per_row : int
        (factor, gene) pairs per row of the figure (default 2: four panels).
    panel_width : float
        Inches per panel.
    title : str, optional
        Figure title.
    invert_y : bool
        Draw y downwards (as squidpy does, the default), see
        :func:`sf_mlflow.plots.spatial.spatial_grid`.
    heldout : ndarray of bool, (N,), optional
        Held-out spots: hollow rings in the factor panels (their counts are observed, so
        the gene panels draw them as any spot).
    path : str or path-like, optional
        Save the figure there too.

    Returns
    -------
    matplotlib.figure.Figure
        Factors in viridis, genes in magma, each with its own labelled colour bar.
    """
    X = as_coordinates(coordinates)
    F = as_matrix(factors, X.shape[0], "factors")
    W = _loadings(loadings)
    N, L = F.shape
    if W.shape[1] != L:
        raise DataError(f"loadings have {W.shape[1]} columns, factors {L}; they must match")
    if tuple(counts.shape) != (N, W.shape[0]):
        raise DataError(f"counts have shape {tuple(counts.shape)}; expected (N, D) = "
                        f"({N}, {W.shape[0]}) from coordinates and loadings")
    names = _gene_names(gene_names, W.shape[0])
    heads = as_titles(titles, L, "factor")
    crit = _criterion(by)
    top = np.argmax(gene_scores(W, by), axis=0)  # (L,), ties: the first gene
    held = as_mask(heldout, N)
    expr = np.log1p(dense_columns(counts, top))  # (N, L)
    per_row = max(1, min(int(pairs_per_row), L))
    rows = -(-L // per_row)
    pw = panel_width
    ph = pw * tissue_aspect(X) + 0.35
    fig = new_figure(per_row * 2 * (pw + 0.55), rows * ph + (0.35 if title else 0.0)
                     + (0.25 if held is not None else 0.0))
    # one framed sub-figure per (factor, gene) pair, so the pairing is unmistakable; the
    # extra padding keeps two-line titles off the frames
    fig.get_layout_engine().set(h_pad=0.09, w_pad=0.06)
    subs = np.atleast_1d(fig.subfigures(rows, per_row, squeeze=False).ravel())
    s = marker_size(X, pw, ph - 0.35, area=area_per_spot(X))
    for l in range(L):
        sub = subs[l]
        sub.set_edgecolor("0.8")
        sub.set_linewidth(0.8)
        sub.set_frameon(True)
        ax_f, ax_g = sub.subplots(1, 2)
        lo, hi, ext = robust_limits(F[:, l])
        sc = tissue_scatter(ax_f, X, F[:, l], s, FACTOR_CMAP, lo, hi, invert_y, held)
        ax_f.set_title(wrap(heads[l], pw), fontsize=TITLE_SIZE)
        colorbar(sub, sc, ax_f, FACTOR_LABEL, ext)
        lo, hi, ext = robust_limits(expr[:, l], low=0.0)
        sc = tissue_scatter(ax_g, X, expr[:, l], s, GENE_CMAP, lo, hi, invert_y)
        ax_g.set_title(wrap(f"top gene: {names[top[l]]}", pw), fontsize=TITLE_SIZE)
        colorbar(sub, sc, ax_g, GENE_LABEL, ext)
    for sub in subs[L:]:
        sub.set_frameon(False)
    if held is not None and not binned(held.size):  # binned maps draw no rings
        heldout_legend(fig, "held-out spot (factor panels: not fitted, predicted from "
                            "its position)")
    if title:
        fig.suptitle(f"{title} (top gene by {crit})", fontsize=SUPTITLE_SIZE)
    return finish(fig, path)


def _heatmap(ax, M: np.ndarray, norm, row_labels, col_labels, annotate: bool):
    """Draw M (rows x cols) with the diverging map, NaN in grey; returns the image."""
    cm = colormaps[DIVERGING_CMAP].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cm, norm=norm, aspect="auto",
                   interpolation="nearest")
    ax.set_yticks(np.arange(M.shape[0]), row_labels, fontsize=TICK_SIZE)
    ax.set_xticks(np.arange(M.shape[1]), col_labels, fontsize=TICK_SIZE, rotation=45,
                  ha="right", rotation_mode="anchor")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if annotate:
        lim = max(abs(norm.vmin), abs(norm.vmax))
        for (i, j), v in np.ndenumerate(M):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * lim else "black")
    return im


def gene_enrichment_heatmap(lfc: np.ndarray, gene_names: Optional[Sequence[str]],
                            group_names: Sequence[str], titles: Optional[Sequence[str]] = None,
                            *, loadings: Optional[np.ndarray] = None, n: int = 8,
                            max_cols: int = MAX_COLS,
                            title: Optional[str] = "Group enrichment of loadings (log2, group / all)",
                            path: Optional[str | os.PathLike] = None) -> Figure:
    """Heatmap(s) of log2 enrichment of loadings per group, diverging colours centred at 0.

    Parameters
    ----------
    lfc : ndarray, (G, D, L) or (G, L)
        (G, D, L): from :func:`sf_mlflow.analysis.enrichment.relative_enrichment`; one
        panel per factor, rows = that factor's ``n`` selected genes, columns = groups.
        (G, L): an already reduced table (e.g. mean enrichment of each factor's top genes);
        one panel, rows = factors, columns = groups, cells annotated when small.
    gene_names : sequence of str, (D,), or None
        Needed for (G, D, L).
    group_names : sequence of str, (G,)
    titles : sequence of str, (L,), optional
        Factor names (panel titles, or row labels for (G, L)); default "factor k".
    loadings : ndarray, (D, L), optional
        Global loadings. When given, each factor's genes are its top ``n`` by
        loading x share (:data:`~sf_mlflow.analysis.enrichment.TOP_GENE_CRITERION`, the
        genes it is about, as in :func:`top_genes`); otherwise the ``n`` genes with the largest
        |lfc| over groups, which may be dominated by genes the factor barely uses.
    n : int
        Genes per factor.
    max_cols : int
        Factor panels per row.
    title : str, optional
        Figure title.
    path : str or path-like, optional
        Save the figure there too.

    Returns
    -------
    matplotlib.figure.Figure
        Red = larger share in the group than overall, blue = smaller, grey = undefined
        (NaN). The colour scale is symmetric, +-(99th percentile of |lfc| shown), with
        arrows on the shared colour bar when values go beyond.
    """
    M = np.asarray(lfc, dtype=np.float64)
    if M.ndim not in (2, 3):
        raise DataError(f"lfc has shape {M.shape}; expected (G, D, L) or (G, L)")
    G = M.shape[0]
    groups = as_titles(group_names, G, "group", "group_names")
    L = M.shape[-1]
    heads = as_titles(titles, L, "factor")
    if M.ndim == 2:
        lo, hi, ext = robust_limits(M, high=99.0, symmetric=True)
        norm = Normalize(lo, hi)
        fig = new_figure(max(4.0, 1.2 + 0.45 * G), max(2.6, 1.4 + 0.3 * L) + (0.35 if title else 0))
        ax = fig.subplots()
        im = _heatmap(ax, M.T, norm, heads, groups, annotate=G * L <= 200)
        colorbar(fig, im, ax, "log2 enrichment", ext, shrink=0.9)
    else:
        D = M.shape[1]
        genes = _gene_names(gene_names, D)
        if int(n) < 1:
            raise DataError(f"n = {n!r} must be at least 1")
        n = min(int(n), D)
        if loadings is not None:
            W = _loadings(loadings)
            if W.shape != (D, L):
                raise DataError(f"loadings have shape {W.shape}; expected (D, L) = ({D}, {L})")
            score = gene_scores(W, TOP_GENE_CRITERION)
        else:
            with np.errstate(invalid="ignore"):
                score = np.nan_to_num(np.nanmax(np.abs(M), axis=0), nan=-1.0)  # (D, L)
        picks = [np.argsort(-score[:, l], kind="stable")[:n] for l in range(L)]
        shown = np.stack([M[:, picks[l], l] for l in range(L)])  # (L, G, n)
        lo, hi, ext = robust_limits(shown, high=99.0, symmetric=True)
        norm = Normalize(lo, hi)
        rows, cols = grid_shape(L, max_cols)
        pw = max(1.9, 0.9 + 0.28 * G)
        ph = 0.9 + 0.17 * n
        fig = new_figure(cols * pw + 0.6, rows * ph + (0.35 if title else 0))
        axes = panel_axes(fig, L, rows, cols)
        im = None
        for l, ax in enumerate(axes):
            im = _heatmap(ax, shown[l].T, norm, [genes[i] for i in picks[l]], groups,
                          annotate=False)
            ax.set_title(wrap(heads[l], pw), fontsize=TITLE_SIZE)
        which = "top genes by loading" if loadings is not None else "most changed genes"
        colorbar(fig, im, axes, f"log2 enrichment of each factor's {which} "
                 f"(scale +-{hi:.2g})", ext, shrink=0.6, aspect=30)
    if title:
        fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    return finish(fig, path)


def enrichment_for_group(lfc_g: np.ndarray, gene_names: Sequence[str], group_name: str,
                         titles: Optional[Sequence[str]] = None, *, n: int = 8,
                         loadings: Optional[np.ndarray] = None, min_share: float = 0.05,
                         pseudo: float = PSEUDO_SHARE, max_cols: int = MAX_COLS,
                         path: Optional[str | os.PathLike] = None) -> Figure:
    """Most enriched and most depleted genes of every factor in one group.

    Parameters
    ----------
    lfc_g : ndarray, (D, L)
        ``relative_enrichment(...)[g]`` for the group.
    gene_names : sequence of str, (D,)
    group_name : str
        Shown in the figure title.
    titles : sequence of str, (L,), optional
        Panel titles; default "factor k".
    n : int
        Enriched genes and depleted genes per factor (up to 2n bars).
    loadings : ndarray, (D, L), optional
        Global loadings; when given only genes passing
        :func:`sf_mlflow.analysis.enrichment.relevant_genes` (the factor explains at
        least ``min_share`` of the gene globally or in the group) are ranked.
    min_share, pseudo : float
        See :func:`sf_mlflow.analysis.enrichment.relevant_genes`; ``pseudo`` must be the
        one ``lfc_g`` was computed with.
    max_cols : int
        Panels per row.
    path : str or path-like, optional
        Save the figure there too.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per factor: red bars to the right (enriched, largest at the top), blue
        bars to the left (depleted), on one shared x-range; bars beyond it are cut at the
        edge and labelled with their value.
    """
    M = np.asarray(lfc_g, dtype=np.float64)
    if M.ndim != 2:
        raise DataError(f"lfc_g has shape {M.shape}; expected (D, L), one group's enrichment")
    D, L = M.shape
    genes = _gene_names(gene_names, D)
    heads = as_titles(titles, L, "factor")
    if int(n) < 1:
        raise DataError(f"n = {n!r} must be at least 1")
    if loadings is not None:
        keep = relevant_genes(loadings, M[None], min_share=min_share, pseudo=pseudo)[0]
        M = np.where(keep, M, np.nan)
    picks = []
    for l in range(L):
        ok = np.flatnonzero(np.isfinite(M[:, l]))
        order = ok[np.argsort(M[ok, l], kind="stable")]
        up = [i for i in order[::-1][:n] if M[i, l] > 0]
        down = [i for i in order[:n] if M[i, l] < 0][::-1]
        picks.append(up + down)
    shown = np.abs(np.concatenate([M[p, l] for l, p in enumerate(picks)])) if any(picks) \
        else np.zeros(0)
    # one shared x-range; a few extreme log-ratios would squash every other bar, so the
    # range stops at the 90th percentile when that is much smaller, and longer bars are
    # cut and labelled
    lim = float(shown.max()) if shown.size else 1.0
    if shown.size and lim > 3 * float(np.percentile(shown, 90)):
        lim = float(np.percentile(shown, 90))
    lim = lim * 1.25 if lim > 0 else 1.0
    rows, cols = grid_shape(L, max_cols)
    n_bars = max(1, max(len(p) for p in picks))
    pw, ph = 2.5, 0.55 + 0.15 * n_bars + 0.35
    fig = new_figure(cols * pw, rows * ph + 0.4)
    cm_norm = Normalize(-lim, lim)
    cm = colormaps[DIVERGING_CMAP]
    for l, ax in enumerate(panel_axes(fig, L, rows, cols)):
        p = picks[l]
        vals = M[p, l]
        if len(p):
            # colours from the diverging map, but never its near-white middle
            shade = np.sign(vals) * np.maximum(np.abs(np.clip(vals, -lim, lim)), 0.45 * lim)
            ax.barh(np.arange(len(p)), np.clip(vals, -lim, lim), color=cm(cm_norm(shade)),
                    height=0.75)
            for i, v in enumerate(vals):
                if abs(v) > lim:  # cut bar: print its value inside the end
                    ax.text(np.sign(v) * lim * 0.97, i, f"{v:.1f}" if abs(v) < 10 else f"{v:.0f}", va="center",
                            ha="right" if v > 0 else "left", fontsize=6, color="white",
                            fontweight="bold")
            ax.set_yticks(np.arange(len(p)), [genes[i] for i in p], fontsize=TICK_SIZE)
            ax.invert_yaxis()
        else:
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no genes pass\nthe filter", ha="center", va="center",
                    transform=ax.transAxes, fontsize=TICK_SIZE, color="0.4")
        ax.axvline(0, color="0.3", lw=0.6)
        ax.set_xlim(-lim, lim)
        ax.set_title(wrap(heads[l], pw), fontsize=TITLE_SIZE)
        ax.set_xlabel(f"log2 enrichment (axis +-{lim:.2g})", fontsize=TICK_SIZE)
        _clean_bar_axes(ax)
    fig.suptitle(f"{group_name}: the genes whose loading share rises (red) or falls (blue) "
                 "most vs all spots\n(the most changed genes: a wider scale than the heatmap "
                 "of each factor's top genes)", fontsize=SUPTITLE_SIZE)
    return finish(fig, path)
