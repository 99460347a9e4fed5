"""Relative enrichment, gene rankings and their JSON summary, on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sf_mlflow.analysis.enrichment import (PSEUDO_SHARE, enrichment_summary, gene_scores,
                                           group_gene_counts, normalize_gene_loadings,
                                           relative_enrichment, relevant_genes, top_genes)
from sf_mlflow.analysis.ordering import factor_titles, match_factors, order_by
from sf_mlflow.errors import DataError

# 3 genes x 2 factors; group 0 shifts gene 0 towards factor 1, group 1 silences gene 2
W = np.array([[1.0, 1.0],
              [3.0, 1.0],
              [2.0, 2.0]])
WG = np.array([
    [[1.0, 3.0], [3.0, 1.0], [2.0, 2.0]],
    [[1.0, 1.0], [1.0, 3.0], [0.0, 0.0]],
])
GENES = ["Actb", "Gfap", "Mbp"]
GROUPS = ["astro", "neuron"]


def test_relative_enrichment_by_hand():
    lfc = relative_enrichment(W, WG, pseudo=1e-12)
    assert lfc.shape == (2, 3, 2)
    # gene 0, group 0: shares (1/4, 3/4) vs (1/2, 1/2)
    np.testing.assert_allclose(lfc[0, 0], [np.log2(0.5), np.log2(1.5)])
    # unchanged rows give 0
    np.testing.assert_allclose(lfc[0, 1:], 0.0, atol=1e-12)
    # gene 1, group 1: (1/4, 3/4) vs (3/4, 1/4)
    np.testing.assert_allclose(lfc[1, 1], [np.log2(1 / 3), np.log2(3)])
    # silenced gene: no share to compare
    assert np.isnan(lfc[1, 2]).all()


def test_pseudo_share_bounds_the_ratio_of_a_zero_share():
    lfc = relative_enrichment(np.array([[1.0, 1.0]]), np.array([[[1.0, 0.0]]]), pseudo=1e-8)
    np.testing.assert_allclose(lfc[0, 0, 1], np.log2(1e-8 / (0.5 + 1e-8)))


def test_enrichment_of_a_vanishing_group_loading_stays_bounded():
    """A group refit driving a loading to ~1e-13 once read as -20 log2; now it is bounded."""
    rng = np.random.default_rng(0)
    Wb = rng.gamma(2.0, 1.0, size=(50, 4))
    Wgb = np.stack([Wb * rng.lognormal(0, 0.3, Wb.shape) for _ in range(2)])
    Wgb[0, :, 2] = 1e-13           # factor 2 vanishes in group 0
    Wgb[1, :10] = 1e-13            # and genes 0-9 vanish in group 1 except one factor
    Wgb[1, :10, 0] = 5.0
    bound = np.log2((1 + PSEUDO_SHARE) / PSEUDO_SHARE)
    lfc = relative_enrichment(Wb, Wgb)
    assert np.isfinite(lfc).all()
    assert np.abs(lfc).max() <= bound + 1e-9 and bound < 5
    assert (lfc[0, :, 2] < -0.5).all()  # still clearly depleted, just not a million-fold
    # with counts: little evidence shrinks towards 0, too few counts leaves the gene out
    n = np.full((2, 50), 1000.0)
    n[0, :5] = 3.0                  # below MIN_COUNTS
    n[0, 5:10] = 20.0               # shrunk halfway (PRIOR_COUNTS = 20)
    shrunk = relative_enrichment(Wb, Wgb, group_counts=n)
    assert np.isnan(shrunk[0, :5]).all() and np.isfinite(shrunk[0, 5:]).all()
    assert (np.abs(shrunk[0, 5:10, 2]) < np.abs(lfc[0, 5:10, 2])).all()
    assert np.nanmax(np.abs(shrunk)) <= bound + 1e-9
    mask = relevant_genes(Wb, shrunk)
    assert not mask[0, :5].any()


def test_group_gene_counts():
    import scipy.sparse as sp

    Y = np.array([[1.0, 0.0], [2.0, 3.0], [0.0, 5.0]])
    g = np.array([0, 1, 1])
    expect = [[1.0, 0.0], [2.0, 8.0]]
    np.testing.assert_allclose(group_gene_counts(Y, g, 2), expect)
    np.testing.assert_allclose(group_gene_counts(sp.csr_matrix(Y), g, 2), expect)
    with pytest.raises(DataError, match="groups have 2 entries; expected 3"):
        group_gene_counts(Y, g[:2], 2)


def test_normalize_and_scores():
    share = normalize_gene_loadings(W)
    np.testing.assert_allclose(share.sum(axis=1), 1.0)
    assert np.isnan(normalize_gene_loadings(np.zeros((1, 3)))).all()
    np.testing.assert_allclose(gene_scores(W, "share")[1], [0.75, 0.25])
    np.testing.assert_allclose(gene_scores(W, "specific")[1], [3 * 0.75, 0.25])
    with pytest.raises(DataError, match="by = 'x' is unknown"):
        gene_scores(W, "x")


def test_top_genes():
    top = top_genes(W, GENES, n=2, by="loading")
    assert top == [[["Gfap", 3.0], ["Mbp", 2.0]], [["Mbp", 2.0], ["Actb", 1.0]]]
    assert top_genes(W, GENES, n=10, by="loading")[0][-1][0] == "Actb"  # n > D gives all D
    # the default criterion is loading x share
    assert top_genes(W, GENES, n=1) == top_genes(W, GENES, n=1, by="specific")
    assert [g for g, _ in top_genes(W, GENES, n=1, by="share")[0]] == ["Gfap"]
    with pytest.raises(DataError, match="gene_names has 2 entries; expected 3"):
        top_genes(W, GENES[:2])


def test_summary_ranks_skips_nan_and_is_json():
    lfc = relative_enrichment(W, WG, pseudo=1e-12)
    summary = enrichment_summary(lfc, GENES, GROUPS, n=2)
    assert set(summary) == set(GROUPS)
    assert set(summary["astro"]) == {"0", "1"}
    top = summary["astro"]["1"]["top"]
    assert top[0][0] == "Actb" and top[0][1] == pytest.approx(np.log2(1.5))
    bottom = summary["astro"]["0"]["bottom"]
    assert bottom[0][0] == "Actb" and bottom[0][1] == pytest.approx(-1.0)
    # the silenced gene's NaN never appears
    assert all(g != "Mbp" for g, _ in summary["neuron"]["0"]["top"])
    assert len(summary["neuron"]["0"]["top"]) == 2
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text) == summary
    assert all(isinstance(v, float) for _, v in summary["astro"]["0"]["top"])


def test_relevant_genes_mask():
    Wb = np.array([[1.0, 1e-6], [1.0, 1.0]])
    Wgb = np.array([[[1.0, 1e-4], [1.0, 3.0]]])
    lfc = relative_enrichment(Wb, Wgb, pseudo=1e-8)
    assert lfc[0, 0, 1] > 6  # a big ratio of two negligible shares
    keep = relevant_genes(Wb, lfc, min_share=0.05, pseudo=1e-8)
    assert keep.shape == lfc.shape
    assert not keep[0, 0, 1] and keep[0, 1, 1] and keep[0, 0, 0]
    summary = enrichment_summary(lfc, ["a", "b"], ["g"], n=5, mask=keep)
    assert [g for g, _ in summary["g"]["1"]["top"]] == ["b"]


def test_summary_errors():
    lfc = relative_enrichment(W, WG)
    with pytest.raises(DataError, match="group_names has 1 entries; expected 2"):
        enrichment_summary(lfc, GENES, ["a"])
    with pytest.raises(DataError, match=r"lfc has shape \(3, 2\)"):
        enrichment_summary(lfc[0], GENES, GROUPS)
    with pytest.raises(DataError, match=r"group_loadings have shape \(3, 2\)"):
        relative_enrichment(W, WG[0])


def test_order_by_and_titles():
    I = np.array([0.2, np.nan, 0.9, 0.5, 0.9])
    perm = order_by(I)
    np.testing.assert_array_equal(perm, [2, 4, 3, 0, 1])  # stable ties, NaN last
    np.testing.assert_array_equal(order_by(I, descending=False), [0, 3, 2, 4, 1])
    titles = factor_titles(I, perm)
    assert titles[0] == "factor 1 (orig 2)\nMoran's I 0.90"
    assert titles[-1] == "factor 5 (orig 1)\nMoran's I n/a"
    assert factor_titles(I[:1], one_line=True) == ["factor 1 (orig 0), Moran's I 0.20"]
    with pytest.raises(DataError, match="must be a permutation"):
        factor_titles(I, [0, 0, 1, 2, 3])
    with pytest.raises(DataError, match="values must be a 1-D array"):
        order_by(np.ones((2, 2)))


def test_match_factors_recovers_a_permutation():
    rng = np.random.default_rng(0)
    F = np.exp(rng.normal(size=(400, 5)))
    perm = np.array([3, 0, 4, 1, 2])
    assign, corr = match_factors(F, F[:, perm])
    np.testing.assert_array_equal(perm[assign], np.arange(5))  # F[:, perm][:, assign] == F
    np.testing.assert_allclose(corr, 1.0)
    # noisy copies, a scaled column, a NaN row: still paired, correlations high
    G = F[:, perm] * rng.lognormal(0, 0.1, F.shape) * np.array([1, 10, 0.1, 1, 3])
    G[7] = np.nan
    assign, corr = match_factors(F, G)
    np.testing.assert_array_equal(perm[assign], np.arange(5))
    assert (corr > 0.9).all()
    # fewer factors in the other model: some stay unpaired
    assign, corr = match_factors(F, F[:, [4, 1]])
    assert sorted(assign[assign >= 0].tolist()) == [0, 1] and (assign == -1).sum() == 3
    assert assign[4] == 0 and assign[1] == 1 and np.isnan(corr[assign == -1]).all()
