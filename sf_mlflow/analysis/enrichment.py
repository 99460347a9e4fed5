"""Gene rankings per factor and group-versus-global enrichment of loadings.

Every gene's loadings are first normalised to sum to 1 across the factors, so a gene's
row says which share of its expression each factor explains (independent of how highly
the gene is expressed). For group g with refitted loadings W_g
(:func:`sf_mlflow.analysis.group_loadings.group_loadings`) the relative enrichment is

    lfc[g, d, l] = log2( (S_g[d, l] + a) / (W_norm[d, l] + a) ),

positive where factor l explains more of gene d in group g than in the data overall.
``a`` is a pseudo-share (default :data:`PSEUDO_SHARE` = 0.05, the share below which
:func:`relevant_genes` calls a factor negligible for a gene): it bounds the log-ratio by
``log2((1 + a) / a)`` (about 4.4), so a group refit that drives a loading to ~0 cannot
read as a million-fold change. Given the gene's counts n in the group, the group share is
shrunk towards the global one, ``S_g = (n W_g_norm + k W_norm) / (n + k)`` with
``k = PRIOR_COUNTS``, so genes with little evidence in a group move little, and genes with
fewer than ``MIN_COUNTS`` counts in the group are left out (NaN).

The one "top gene" criterion used in figures and summaries is :data:`TOP_GENE_CRITERION`
(loading x share, named by :data:`CRITERION_NAMES`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from sf_mlflow.errors import DataError

__all__ = ["normalize_gene_loadings", "relative_enrichment", "relevant_genes", "gene_scores",
           "top_genes", "enrichment_summary", "group_gene_counts", "PSEUDO_SHARE",
           "PRIOR_COUNTS", "MIN_COUNTS", "TOP_GENE_CRITERION", "CRITERION_NAMES"]

#: Pseudo-share added to both shares of the enrichment log-ratio: bounds it by
#: log2((1 + a) / a), about 4.4 for 0.05.
PSEUDO_SHARE = 0.05

#: Strength (in counts) of the shrinkage of a group's shares towards the global ones.
PRIOR_COUNTS = 20.0

#: Genes with fewer counts than this in a group get no enrichment there (NaN).
MIN_COUNTS = 10.0

#: How a factor's top genes are ranked, in every figure and summary: loading x share.
TOP_GENE_CRITERION = "specific"

#: Readable names of the ranking criteria of :func:`gene_scores`, for titles and labels.
CRITERION_NAMES = {"loading": "loading", "share": "share of the gene's loadings",
                   "specific": "loading \u00d7 share"}


def normalize_gene_loadings(loadings: np.ndarray) -> np.ndarray:
    """Each gene's loadings divided by their sum over factors.

    Parameters
    ----------
    loadings : ndarray, (..., D, L)
        Non-negative loadings, optionally with leading (e.g. group) axes.

    Returns
    -------
    ndarray, (..., D, L)
        Rows summing to 1; NaN rows for genes whose loadings are all 0 (their shares are
        undefined, e.g. a gene with no counts in a group).
    """
    W = np.asarray(loadings, dtype=np.float64)
    s = W.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, W / np.where(s > 0, s, 1.0), np.nan)


def group_gene_counts(counts, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Total counts of every gene in every group, (G, D).

    Parameters
    ----------
    counts : scipy.sparse matrix or ndarray, (N, D)
    groups : ndarray of int, (N,)
        Group code of every spot, in ``0..n_groups-1``.
    n_groups : int
    """
    import scipy.sparse as sp

    g = np.asarray(groups).ravel().astype(np.int64)
    if g.shape[0] != counts.shape[0]:
        raise DataError(f"groups have {g.shape[0]} entries; expected {counts.shape[0]}, one "
                        "per spot of counts")
    ind = sp.csr_matrix((np.ones(g.size), (g, np.arange(g.size))),
                        shape=(int(n_groups), g.size))
    return np.asarray((ind @ counts).todense() if sp.issparse(counts)
                      else ind @ np.asarray(counts, dtype=np.float64), dtype=np.float64)


def relative_enrichment(loadings: np.ndarray, group_loadings: np.ndarray,
                        pseudo: float = PSEUDO_SHARE, *,
                        group_counts: Optional[np.ndarray] = None,
                        prior_counts: float = PRIOR_COUNTS,
                        min_counts: float = MIN_COUNTS) -> np.ndarray:
    """log2 enrichment of each group's normalised loadings over the global ones.

    Parameters
    ----------
    loadings : ndarray, (D, L)
        Global non-negative loadings W.
    group_loadings : ndarray, (G, D, L)
        Per-group loadings W_g.
    pseudo : float
        Pseudo-share added to numerator and denominator; bounds the log-ratio by
        ``log2((1 + pseudo) / pseudo)`` whatever the loadings (4.39 for 0.05).
    group_counts : ndarray, (G, D), optional
        Counts of each gene in each group (:func:`group_gene_counts`). When given, each
        group share is shrunk towards the global share with weight
        ``n / (n + prior_counts)``, and genes with fewer than ``min_counts`` counts in
        a group are NaN there.
    prior_counts, min_counts : float
        See ``group_counts``.

    Returns
    -------
    ndarray, (G, D, L)
        ``log2((S_g + pseudo) / (W_norm + pseudo))`` with rows normalised to sum to 1 over
        factors. NaN for a gene whose loadings are all 0 globally or in that group (no
        share to compare) or, with ``group_counts``, with too few counts in the group;
        :func:`enrichment_summary` skips those.
    """
    W = np.asarray(loadings, dtype=np.float64)
    Wg = np.asarray(group_loadings, dtype=np.float64)
    if W.ndim != 2:
        raise DataError(f"loadings have shape {W.shape}; expected (D, L)")
    if Wg.ndim != 3 or Wg.shape[1:] != W.shape:
        raise DataError(f"group_loadings have shape {Wg.shape}; expected (G, D, L) = "
                        f"(G, {W.shape[0]}, {W.shape[1]}) to match loadings")
    if (W < 0).any() or (Wg < 0).any():
        raise DataError("loadings and group_loadings must be non-negative")
    if not pseudo > 0:
        raise DataError(f"pseudo = {pseudo!r} must be positive")
    share, share_g = normalize_gene_loadings(W)[None], normalize_gene_loadings(Wg)
    if group_counts is not None:
        n = np.asarray(group_counts, dtype=np.float64)
        if n.shape != Wg.shape[:2]:
            raise DataError(f"group_counts have shape {n.shape}; expected (G, D) = "
                            f"{Wg.shape[:2]}")
        if not prior_counts >= 0:
            raise DataError(f"prior_counts = {prior_counts!r} must be non-negative")
        w = (n / np.maximum(n + prior_counts, 1e-300))[..., None]
        share_g = w * share_g + (1 - w) * share
        share_g = np.where((n < min_counts)[..., None], np.nan, share_g)
    return np.log2((share_g + pseudo) / (share + pseudo))


def relevant_genes(loadings: np.ndarray, lfc: np.ndarray, min_share: float = 0.05,
                   pseudo: float = PSEUDO_SHARE) -> np.ndarray:
    """Which (group, gene, factor) log-ratios rest on a share large enough to matter.

    A gene that a factor explains 1e-3 of globally and 1e-2 of in one group has a
    log-ratio that means nothing: both shares are noise. This mask keeps the
    entries where the factor explains at least ``min_share`` of the gene globally or in
    the group, so rankings show genes the factor actually uses.

    Parameters
    ----------
    loadings : ndarray, (D, L)
        Global loadings W.
    lfc : ndarray, (G, D, L)
        From :func:`relative_enrichment` with the same ``pseudo``; the (shrunk) group
        share is recovered from it as ``(W_norm + pseudo) * 2**lfc - pseudo``.
    min_share : float
        Threshold on the larger of the two shares, in [0, 1].
    pseudo : float
        The ``pseudo`` that ``lfc`` was computed with.

    Returns
    -------
    ndarray of bool, (G, D, L)
        True where ``max(W_norm[d, l], W_g_norm[d, l]) >= min_share``; False for NaN lfc.
    """
    X = np.asarray(lfc, dtype=np.float64)
    share = normalize_gene_loadings(loadings)
    if X.ndim != 3 or X.shape[1:] != share.shape:
        raise DataError(f"lfc has shape {X.shape}; expected (G, D, L) with (D, L) = {share.shape} "
                        "like loadings")
    if not 0 <= min_share <= 1:
        raise DataError(f"min_share = {min_share!r} must lie in [0, 1]")
    share_g = (share[None] + pseudo) * np.exp2(X) - pseudo
    with np.errstate(invalid="ignore"):
        keep = np.fmax(share[None], share_g) >= min_share - 1e-12
    return keep & ~np.isnan(X)


def gene_scores(loadings: np.ndarray, by: str = "loading") -> np.ndarray:
    """Per-gene, per-factor score used to rank genes.

    Parameters
    ----------
    loadings : ndarray, (D, L)
        Non-negative loadings.
    by : {"loading", "share", "specific"}
        ``"loading"``: W itself (favours highly expressed genes, which may top several
        factors); ``"share"``: the gene's normalised loading, the fraction of it the factor
        explains (favours specific genes, however rare); ``"specific"``: loading x share,
        genes both strongly loaded and specific to the factor (best for showing one gene
        per factor).

    Returns
    -------
    ndarray, (D, L)
        Scores; genes with all-zero loadings score 0.
    """
    W = np.asarray(loadings, dtype=np.float64)
    if W.ndim != 2:
        raise DataError(f"loadings have shape {W.shape}; expected (D, L)")
    if by == "loading":
        return W
    share = np.nan_to_num(normalize_gene_loadings(W), nan=0.0)
    if by == "share":
        return share
    if by == "specific":
        return W * share
    raise DataError(f"by = {by!r} is unknown; use 'loading', 'share' or 'specific'")


def _names(gene_names, d: int, what: str = "gene_names") -> list[str]:
    names = [str(x) for x in np.asarray(gene_names, dtype=object).ravel()]
    if len(names) != d:
        raise DataError(f"{what} has {len(names)} entries; expected {d}")
    return names


def top_genes(loadings: np.ndarray, gene_names: Sequence[str], n: int = 10,
              by: str = TOP_GENE_CRITERION) -> list[list[list]]:
    """The n highest-scoring genes of every factor.

    Parameters
    ----------
    loadings : ndarray, (D, L)
        Non-negative loadings.
    gene_names : sequence of str, (D,)
    n : int
        Genes per factor (fewer if D < n).
    by : {"loading", "share", "specific"}
        Ranking score, see :func:`gene_scores`.

    Returns
    -------
    list, (L,) of lists, (n,) of ``[gene_name, score]``
        Highest score first, ``score`` a Python float, so the result is JSON-serialisable.
    """
    S = gene_scores(loadings, by)
    names = _names(gene_names, S.shape[0])
    if int(n) < 1:
        raise DataError(f"n = {n!r} must be at least 1")
    out = []
    for l in range(S.shape[1]):
        idx = np.argsort(-S[:, l], kind="stable")[: int(n)]
        out.append([[names[i], float(S[i, l])] for i in idx])
    return out


def enrichment_summary(lfc: np.ndarray, gene_names: Sequence[str], group_names: Sequence[str],
                       n: int = 10, mask: Optional[np.ndarray] = None) -> dict:
    """Most enriched and most depleted genes per group and factor.

    Parameters
    ----------
    lfc : ndarray, (G, D, L)
        From :func:`relative_enrichment`.
    gene_names : sequence of str, (D,)
    group_names : sequence of str, (G,)
    n : int
        Genes in each list.
    mask : ndarray of bool, (G, D, L), optional
        Only entries where it is True are ranked, e.g. :func:`relevant_genes`, which
        drops log-ratios between two negligible shares (with the default ``eps`` those
        dominate both ends of the raw ranking).

    Returns
    -------
    dict
        ``{group_name: {factor_index: {"top": [[gene, lfc], ...], "bottom": [...]}}}`` with
        ``factor_index`` the factor's original column as a string (``"0"``, ``"1"``, ...;
        JSON object keys are strings, so the dict equals its own JSON round trip).
        ``top``: the n largest lfc, largest first; ``bottom``: the n smallest, smallest
        first. NaN entries are skipped; values are Python floats.
    """
    X = np.asarray(lfc, dtype=np.float64)
    if X.ndim != 3:
        raise DataError(f"lfc has shape {X.shape}; expected (G, D, L)")
    G, D, L = X.shape
    genes = _names(gene_names, D)
    groups = _names(group_names, G, "group_names")
    if len(set(groups)) != G:
        raise DataError(f"group_names must be unique, got {groups}")
    if int(n) < 1:
        raise DataError(f"n = {n!r} must be at least 1")
    if mask is not None:
        M = np.asarray(mask, dtype=bool)
        if M.shape != X.shape:
            raise DataError(f"mask has shape {M.shape}; expected {X.shape} like lfc")
        X = np.where(M, X, np.nan)
    out: dict = {}
    for g in range(G):
        per_factor = {}
        for l in range(L):
            col = X[g, :, l]
            ok = np.flatnonzero(~np.isnan(col))
            order = ok[np.argsort(col[ok], kind="stable")]
            bottom = order[: int(n)]
            top = order[::-1][: int(n)]
            per_factor[str(l)] = {
                "top": [[genes[i], float(col[i])] for i in top],
                "bottom": [[genes[i], float(col[i])] for i in bottom],
            }
        out[groups[g]] = per_factor
    return out
