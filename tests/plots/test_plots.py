"""Every figure function renders a decodable, correctly sized, non-blank PNG, without pyplot."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from sf_mlflow import plots
from sf_mlflow.analysis.enrichment import relative_enrichment
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import DataError
from sf_mlflow.plots._common import DPI, MAX_MARKER, MIN_MARKER, marker_size


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_spots=300, n_genes=40, n_components=3, n_groups=2, mean_counts=80.0,
                       seed=0)
    F, W = d.truth["factors"], d.truth["loadings"]
    rng = np.random.default_rng(0)
    Wg = W[None] * rng.lognormal(0, 0.5, size=(2,) + W.shape)
    return d, F, W, relative_enrichment(W, Wg)


def check_png(fig: Figure, path) -> np.ndarray:
    """The file decodes, has figsize x DPI pixels and real content; returns the image."""
    assert isinstance(fig, Figure)
    img = imread(str(path))
    w_in, h_in = fig.get_size_inches()
    assert img.shape[:2] == (round(h_in * DPI), round(w_in * DPI))
    grey = img[..., :3].mean(axis=-1)
    assert grey.var() > 2e-3, "image is (nearly) blank"
    assert (grey < 0.5).mean() > 0.002, "no dark content"
    return img


def test_factors_and_scales(data, tmp_path):
    d, F, _, _ = data
    titles = ["factor 1 (orig 2)\nMoran's I 0.84", "factor 2 (orig 0)\nMoran's I 0.61",
              "factor 3 (orig 1)\nMoran's I 0.12"]
    fig = plots.factors_spatial(d.coordinates, F, titles, path=tmp_path / "f.png")
    check_png(fig, tmp_path / "f.png")
    assert [ax.get_title() for ax in fig.axes[::2]][:1] == [titles[0]]
    fig = plots.factors_spatial(d.coordinates, F, log=True, invert_y=True, path=tmp_path / "lf.png")
    check_png(fig, tmp_path / "lf.png")
    fig = plots.scales_spatial(d.coordinates, 0.1 + 0.05 * np.abs(np.log(F)), path=tmp_path / "s.png")
    check_png(fig, tmp_path / "s.png")


def test_factors_spatial_at_slideseq_size(tmp_path):
    """41,786 spots (the Slide-seq V2 cerebellum) x 10 factors render (no timing assertion)."""
    rng = np.random.default_rng(0)
    n = 41_786
    r, a = 1500 * np.sqrt(rng.random(n)), 2 * np.pi * rng.random(n)  # a disc, in microns
    X = np.column_stack([r * np.cos(a), r * np.sin(a)])
    F = np.exp(np.column_stack([np.sin(X[:, 0] / (200 + 50 * l)) + np.cos(X[:, 1] / 300)
                                for l in range(10)]))
    fig = plots.factors_spatial(X, F, path=tmp_path / "big.png")
    img = check_png(fig, tmp_path / "big.png")
    # the disc is filled: inside a tissue panel few pixels stay white
    h, w = img.shape[:2]
    centre = img[int(0.15 * h):int(0.35 * h), int(0.05 * w):int(0.12 * w), :3]
    assert (centre.min(axis=-1) > 0.97).mean() < 0.2


def test_marker_size_rule():
    rng = np.random.default_rng(0)
    small = marker_size(rng.random((300, 2)), 2.6, 2.6)
    large = marker_size(rng.random((41_786, 2)) * 3000, 2.6, 2.6)
    assert MIN_MARKER <= large < small <= MAX_MARKER
    # the rule is scale-free: same layout in other units, same size
    X = rng.random((2000, 2))
    assert marker_size(X, 2.6, 2.6) == pytest.approx(marker_size(1000 * X, 2.6, 2.6))


def test_elbo_curve(tmp_path):
    rng = np.random.default_rng(0)
    t = np.arange(2000)
    elbo = -2e7 - 8e7 * np.exp(-t / 50) + rng.normal(0, 1e5, t.size)
    fig = plots.elbo_curve(elbo, path=tmp_path / "e.png")
    check_png(fig, tmp_path / "e.png")
    # spans decades: symlog on the left; NaN steps are dropped and reported
    wild = np.concatenate([[-1e12, -1e10], -1e5 - np.exp(-t / 100), [np.nan]])
    fig = plots.elbo_curve(wild, path=tmp_path / "e2.png")
    check_png(fig, tmp_path / "e2.png")
    assert fig.axes[0].get_yscale() == "symlog"
    assert "1 non-finite" in fig._suptitle.get_text()
    check_png(plots.elbo_curve([1.0], path=tmp_path / "e3.png"), tmp_path / "e3.png")
    with pytest.raises(DataError, match="elbo is empty"):
        plots.elbo_curve([])


def test_elbo_curve_shows_the_heldout_deviance_and_the_kept_iteration(tmp_path):
    t = np.arange(1, 401)
    elbo = -1e5 - 5e5 * np.exp(-t / 40)
    steps = np.arange(0, 401, 10)
    dev = 3000 + 2000 * np.exp(-steps / 60) + 2.0 * np.maximum(steps - 330, 0)
    fig = plots.elbo_curve(elbo, t, heldout=(steps, dev), kept=330, path=tmp_path / "e.png")
    check_png(fig, tmp_path / "e.png")
    twins = [ax for ax in fig.axes if ax.get_ylabel().startswith("held-out deviance")]
    assert len(twins) == 2                                       # both panels
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["held-out deviance", "kept iteration 330"]
    kept_lines = [ln for ax in fig.axes[:2] for ln in ax.get_lines()
                  if ln.get_label() == "kept iteration 330"]
    assert len(kept_lines) == 2 and all(ln.get_xdata()[0] == 330 for ln in kept_lines)
    with pytest.raises(DataError, match="heldout has 3 steps and 2 values"):
        plots.elbo_curve(elbo, heldout=([0, 1, 2], [1.0, 2.0]))


def test_cell_type_map_colours_every_type_and_counts_its_spots(data, tmp_path):
    d, _, _, _ = data
    held = np.zeros(d.n_spots, bool)
    held[::10] = True
    fig = plots.cell_types(d.coordinates, d.groups, d.group_names, heldout=held,
                           path=tmp_path / "ct.png")
    check_png(fig, tmp_path / "ct.png")
    counts = np.bincount(d.groups, minlength=len(d.group_names))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        f"{n} ({c:,})" for n, c in zip(d.group_names, counts)]
    many = plots.cell_types(d.coordinates, np.arange(d.n_spots) % 40,
                            [f"cluster {k}" for k in range(40)], path=tmp_path / "ct40.png")
    check_png(many, tmp_path / "ct40.png")
    colours = plots.cell_types.__globals__["group_colours"](40)
    assert len({tuple(c) for c in colours}) == 40                 # 40 distinct colours
    with pytest.raises(DataError, match="group_names names 3 groups"):
        plots.cell_types(d.coordinates, np.full(d.n_spots, 5), ["a", "b", "c"])


def test_gene_figures(data, tmp_path):
    d, F, W, lfc = data
    fig = plots.top_genes(W, d.gene_names, n=6, path=tmp_path / "t.png")
    check_png(fig, tmp_path / "t.png")
    fig = plots.factors_with_genes(d.coordinates, F, d.counts, W, d.gene_names,
                                   path=tmp_path / "fg.png")
    check_png(fig, tmp_path / "fg.png")
    fig = plots.gene_enrichment_heatmap(lfc, d.gene_names, d.group_names, loadings=W,
                                        path=tmp_path / "h.png")
    check_png(fig, tmp_path / "h.png")
    fig = plots.gene_enrichment_heatmap(lfc, d.gene_names, d.group_names, path=tmp_path / "h1.png")
    check_png(fig, tmp_path / "h1.png")
    fig = plots.gene_enrichment_heatmap(np.nanmean(lfc, axis=1), None, d.group_names,
                                        path=tmp_path / "h2.png")
    check_png(fig, tmp_path / "h2.png")
    fig = plots.enrichment_for_group(lfc[0], d.gene_names, d.group_names[0], loadings=W,
                                     path=tmp_path / "g.png")
    check_png(fig, tmp_path / "g.png")


def test_groupwise_and_comparisons(data, tmp_path):
    d, F, _, _ = data
    rng = np.random.default_rng(1)
    gw = np.stack([F.T * rng.lognormal(0, 0.3, size=(3, 1)) for _ in range(2)])  # (G, L, N)
    fig = plots.groupwise_factors(d.coordinates, F, gw, d.group_names, path=tmp_path / "gw.png")
    check_png(fig, tmp_path / "gw.png")
    fig = plots.compare_morans_i({"PNMF": [0.3, 0.1, 0.5], "MGGP-SVGP": [0.9, 0.7, np.nan, 0.8]},
                                 path=tmp_path / "mi.png")
    check_png(fig, tmp_path / "mi.png")
    fig = plots.compare_factor_maps(d.coordinates, {"PNMF": F[:, :2], "MGGP-SVGP": F},
                                    path=tmp_path / "cm.png")
    check_png(fig, tmp_path / "cm.png")


def test_no_pyplot_state_touched(data, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    d, F, W, _ = data
    fig = plots.factors_spatial(d.coordinates, F)
    fig.savefig(tmp_path / "x.png")  # the caller can save a returned figure
    assert plt.get_fignums() == before
    assert matplotlib.get_backend() == backend


def test_errors_name_the_argument(data):
    d, F, W, lfc = data
    with pytest.raises(DataError, match=r"coordinates have shape \(300, 3\)"):
        plots.factors_spatial(np.ones((300, 3)), F)
    with pytest.raises(DataError, match=r"values has shape \(299, 3\)"):
        plots.factors_spatial(d.coordinates, F[:299])
    with pytest.raises(DataError, match="titles has 1 entries; expected 3"):
        plots.factors_spatial(d.coordinates, F, ["a"])
    with pytest.raises(DataError, match=r"groupwise has shape \(2, 3, 10\)"):
        plots.groupwise_factors(d.coordinates, F, np.ones((2, 3, 10)), ["a", "b"])
    with pytest.raises(DataError, match=r"counts have shape \(300, 39\)"):
        plots.factors_with_genes(d.coordinates, F, d.counts[:, :39], W, d.gene_names)
    with pytest.raises(DataError, match=r"lfc has shape \(2,\)"):
        plots.gene_enrichment_heatmap(np.ones(2), None, ["a", "b"])


def test_maps_draw_y_downwards_like_squidpy_and_can_flip(data):
    d, F, _, _ = data
    ax = plots.factors_spatial(d.coordinates, F).axes[0]
    lo, hi = ax.get_ylim()
    assert lo > hi  # y grows downwards, as squidpy.pl.spatial_scatter draws it
    ax = plots.factors_spatial(d.coordinates, F, invert_y=False).axes[0]
    assert ax.get_ylim()[0] < ax.get_ylim()[1]


def test_heldout_rings_legend_labelled_colourbars_and_wrapping(data, tmp_path):
    d, F, W, _ = data
    held = np.zeros(len(F), bool)
    held[::7] = True
    F6 = np.column_stack([F, F[:, ::-1]])  # 6 panels: must wrap (at most 4 a row)
    fig = plots.factors_spatial(d.coordinates, F6, heldout=held, path=tmp_path / "h.png")
    check_png(fig, tmp_path / "h.png")
    maps = [ax for ax in fig.axes if ax.get_title()]
    assert len({round(ax.get_position().x0, 3) for ax in maps}) <= 4
    assert len({round(ax.get_position().y0, 3) for ax in maps}) == 2
    rings = [c for ax in maps for c in ax.collections if len(c.get_facecolors()) == 0]
    assert len(rings) == 6 and all(len(c.get_offsets()) == held.sum() for c in rings)
    assert "held-out spot" in fig.legends[0].get_texts()[0].get_text()
    cbars = [ax for ax in fig.axes if not ax.get_title()]
    assert all(ax.get_ylabel() == "factor value exp(F)" for ax in cbars)
    scales = np.where(held[:, None], np.nan, 0.1 + 0.05 * np.abs(np.log(F)))
    fig = plots.scales_spatial(d.coordinates, scales, heldout=held, path=tmp_path / "s.png")
    check_png(fig, tmp_path / "s.png")


def test_one_named_top_gene_criterion(data):
    d, F, W, _ = data
    top = plots.top_genes(W, d.gene_names, n=3)
    pairs = plots.factors_with_genes(d.coordinates, F, d.counts, W, d.gene_names)
    first = [ax.get_yticklabels()[0].get_text() for ax in top.axes]
    shown = [ax.get_title() for sub in pairs.subfigs for ax in sub.axes
             if ax.get_title().startswith("top gene: ")]
    assert shown == [f"top gene: {g}" for g in first]
    assert "loading \u00d7 share" in top._suptitle.get_text()
    assert "loading \u00d7 share" in pairs._suptitle.get_text()


def test_comparison_pairs_a_permutation_by_correlation(data, tmp_path):
    d, F, _, _ = data
    perm = [2, 0, 1]
    fig = plots.compare_factor_maps(d.coordinates, {"A": F, "B": F[:, perm]},
                                    path=tmp_path / "p.png")
    check_png(fig, tmp_path / "p.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    # block k: A factor k beside the B column holding the same factor, r = 1.00
    for k in range(3):
        j = perm.index(k)
        assert f"A factor {k + 1}" in titles
        assert f"B factor {j + 1}\nr = 1.00" in titles
    assert titles.index(f"B factor {perm.index(0) + 1}\nr = 1.00") == titles.index("A factor 1") + 1


def test_a_figure_beyond_the_pixel_caps_keeps_its_layout_at_a_lower_resolution(tmp_path):
    from PIL import Image

    from sf_mlflow.plots._common import MAX_AREA_PX, MAX_SIDE_PX, finish, new_figure

    small = new_figure(4.0, 3.0)
    assert small.dpi == DPI
    tall = new_figure(8.0, 540.0)            # 200 groups' panels once asked for 80,489 px
    assert tall.dpi < DPI
    assert abs(tall.get_size_inches()[1] - 540.0) < 0.1     # the layout is the same
    finish(tall, tmp_path / "tall.png")
    width, height = Image.open(tmp_path / "tall.png").size
    assert height <= MAX_SIDE_PX and width * height <= MAX_AREA_PX
    assert (width, height) == tuple(round(v * tall.dpi) for v in tall.get_size_inches())


def test_many_groups_draw_the_most_populous_per_group_panels():
    from sf_mlflow.data.counts import SpatialCounts
    from sf_mlflow.stages.figures import MAX_GROUP_PANELS, panel_groups
    import scipy.sparse as sp

    sizes = np.arange(1, 51)                            # group g has g + 1 spots
    groups = np.repeat(np.arange(50), sizes)
    n = groups.size
    d = SpatialCounts(counts=sp.csr_matrix((n, 2)), coordinates=np.zeros((n, 2)),
                      gene_names=np.array(["a", "b"], dtype=object),
                      spot_names=np.array([f"s{i}" for i in range(n)], dtype=object),
                      groups=groups, group_names=[f"g{i}" for i in range(50)])
    assert panel_groups(d) == list(range(50 - MAX_GROUP_PANELS, 50))
    few = SpatialCounts(**{**d.__dict__, "groups": groups % 3, "group_names": ["a", "b", "c"]})
    assert panel_groups(few) == [0, 1, 2]
