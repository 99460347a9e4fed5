"""Relative enrichment, gene rankings and their JSON summary, on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sf_mlflow.analysis.enrichment import (enrichment_summary, gene_scores,
                                           normalize_gene_loadings, relative_enrichment,
                                           relevant_genes, top_genes)
from sf_mlflow.analysis.ordering import factor_titles, order_by
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
    lfc = relative_enrichment(W, WG, eps=1e-12)
    assert lfc.shape == (2, 3, 2)
    # gene 0, group 0: shares (1/4, 3/4) vs (1/2, 1/2)
    np.testing.assert_allclose(lfc[0, 0], [np.log2(0.5), np.log2(1.5)])
    # unchanged rows give 0
    np.testing.assert_allclose(lfc[0, 1:], 0.0, atol=1e-12)
    # gene 1, group 1: (1/4, 3/4) vs (3/4, 1/4)
    np.testing.assert_allclose(lfc[1, 1], [np.log2(1 / 3), np.log2(3)])
    # silenced gene: no share to compare
    assert np.isnan(lfc[1, 2]).all()


def test_eps_bounds_the_ratio_of_a_zero_share():
    lfc = relative_enrichment(np.array([[1.0, 1.0]]), np.array([[[1.0, 0.0]]]), eps=1e-8)
    np.testing.assert_allclose(lfc[0, 0, 1], np.log2(1e-8 / (0.5 + 1e-8)))


def test_normalize_and_scores():
    share = normalize_gene_loadings(W)
    np.testing.assert_allclose(share.sum(axis=1), 1.0)
    assert np.isnan(normalize_gene_loadings(np.zeros((1, 3)))).all()
    np.testing.assert_allclose(gene_scores(W, "share")[1], [0.75, 0.25])
    np.testing.assert_allclose(gene_scores(W, "specific")[1], [3 * 0.75, 0.25])
    with pytest.raises(DataError, match="by = 'x' is unknown"):
        gene_scores(W, "x")


def test_top_genes():
    top = top_genes(W, GENES, n=2)
    assert top == [[["Gfap", 3.0], ["Mbp", 2.0]], [["Mbp", 2.0], ["Actb", 1.0]]]
    assert top_genes(W, GENES, n=10)[0][-1][0] == "Actb"  # n > D gives all D
    assert [g for g, _ in top_genes(W, GENES, n=1, by="share")[0]] == ["Gfap"]
    with pytest.raises(DataError, match="gene_names has 2 entries; expected 3"):
        top_genes(W, GENES[:2])


def test_summary_ranks_skips_nan_and_is_json():
    lfc = relative_enrichment(W, WG, eps=1e-12)
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
    lfc = relative_enrichment(Wb, Wgb)
    assert lfc[0, 0, 1] > 6  # a big ratio of two negligible shares
    keep = relevant_genes(Wb, lfc, min_share=0.05)
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
