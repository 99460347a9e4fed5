"""Chunked analysis gives the same numbers as the unchunked one (issue #12: 10^6 spots).

Every function that walks the spots in blocks to bound its memory is run once with tiny
blocks (many blocks, ragged last one) and once with one block covering everything; the
results must agree to float tolerance.
"""

import matplotlib
import numpy as np
import pytest
import scipy.sparse as sp

import sf_mlflow.analysis.deviance as deviance_mod
import sf_mlflow.analysis.group_loadings as group_mod
import sf_mlflow.plots._common as plot_common
from sf_mlflow.analysis.deviance import poisson_deviance
from sf_mlflow.analysis.group_loadings import group_loadings
from sf_mlflow.analysis.summary import analyze_model, reconstruction_error
from sf_mlflow.data.preprocess import poisson_null_deviance
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.models.settings import SVGP
from sf_mlflow.stages.figures import _expand

matplotlib.use("Agg")

HUGE = 10 ** 12


@pytest.fixture(scope="module")
def data():
    d = make_synthetic(n_spots=330, n_genes=40, n_components=3, n_groups=3,
                       lengthscale=0.2, mean_counts=50, seed=5)
    d.coordinates = d.coordinates * 10.0
    return d


@pytest.fixture(scope="module")
def fitted(data):
    held = np.random.default_rng(1).random(data.n_spots) < 0.1
    train = data.subset(spots=np.flatnonzero(~held))
    heldout = data.subset(spots=np.flatnonzero(held))
    model = PNMF(3, prior=SVGP(num_inducing=30, lengthscale=4.0, groups=True), max_iter=5,
                 tol=0, random_state=0)
    model.fit(train.counts, coordinates=train.coordinates, groups=train.groups)
    return model, train, heldout


def low_rank(data):
    F = data.truth["factors"] * np.random.default_rng(2).uniform(0.5, 1.5, data.truth["factors"].shape)
    return sp.csr_matrix(data.counts), F, data.truth["loadings"]


def test_reconstruction_error_in_tiny_blocks_equals_one_block(data):
    Y, F, W = low_rank(data)
    small = reconstruction_error(Y, F, W, block=7)
    whole = reconstruction_error(Y, F, W, block=HUGE)
    dense = np.linalg.norm(Y.toarray() - F @ W.T) / np.linalg.norm(Y.toarray())
    assert small == pytest.approx(whole, rel=1e-12)
    assert whole == pytest.approx(dense, rel=1e-9)


def test_null_deviance_in_tiny_blocks_equals_one_block(data):
    Y = sp.csr_matrix(data.counts)
    whole = poisson_null_deviance(Y, block=HUGE)
    np.testing.assert_allclose(poisson_null_deviance(Y, block=3), whole, rtol=1e-12)
    assert (whole > 0).all()


def test_deviance_in_tiny_blocks_equals_one_block(data, monkeypatch):
    Y, F, W = low_rank(data)
    monkeypatch.setattr(deviance_mod, "_BLOCK_ENTRIES", HUGE)
    whole = poisson_deviance(Y, factors=F, loadings=W)
    monkeypatch.setattr(deviance_mod, "_BLOCK_ENTRIES", 5)
    small = poisson_deviance(Y, factors=F, loadings=W)
    for key in ("total", "mean", "nsf"):
        assert small[key] == pytest.approx(whole[key], rel=1e-12)


def test_group_loadings_in_tiny_uncached_blocks_equal_one_cached_block(data, monkeypatch):
    Y, F, W = low_rank(data)
    monkeypatch.setattr(group_mod, "_BLOCK_ENTRIES", HUGE)
    whole = group_loadings(Y, F, W, data.groups, n_groups=3, n_iter=15, tol=0)
    monkeypatch.setattr(group_mod, "_BLOCK_ENTRIES", 40)
    cached = group_loadings(Y, F, W, data.groups, n_groups=3, n_iter=15, tol=0)
    # only the first few blocks keep their gathered factor rows; the rest gather per update
    monkeypatch.setattr(group_mod, "_CACHE_ENTRIES", 300)
    mixed = group_loadings(Y, F, W, data.groups, n_groups=3, n_iter=15, tol=0)
    np.testing.assert_allclose(cached, whole, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(mixed, whole, rtol=1e-10, atol=1e-14)
    assert not np.allclose(whole, W[None])  # the refit moved the loadings


def test_model_factors_in_tiny_chunks_equal_one_chunk(fitted):
    model = fitted[0]
    np.testing.assert_allclose(model._means(chunk_size=7).numpy(),
                               model._means(chunk_size=HUGE).numpy(), rtol=1e-4, atol=1e-5)  # float32 sums in another order
    for small, whole in zip(model._marginals(chunk_size=7), model._marginals(chunk_size=HUGE)):
        np.testing.assert_allclose(small.numpy(), whole.numpy(), rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_analysis_in_tiny_chunks_equals_one_chunk(fitted):
    model, train, heldout = fitted
    small = analyze_model(model, train, heldout, chunk_size=7, group_loadings_iter=5)
    whole = analyze_model(model, train, heldout, chunk_size=HUGE, group_loadings_iter=5)
    assert small.arrays["groupwise_factors"].dtype == np.float32
    assert small.arrays["groupwise_factors"].shape == (3, 3, train.n_spots)
    for name in ("groupwise_factors", "heldout_factors", "heldout_scales", "factors"):
        np.testing.assert_allclose(small.arrays[name], whole.arrays[name], rtol=1e-4, atol=1e-5)
    for key, value in whole.metrics.items():
        assert small.metrics[key] == pytest.approx(value, rel=1e-4), key


def test_figures_keep_float32_groupwise_factors_float32():
    rows = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    mask = np.array([True, False, True, True])
    out = _expand(rows, mask, axis=2)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0, :, mask], rows[0].T)
    assert np.isnan(out[0, :, 1]).all()
    assert _expand(np.arange(3), mask[[0, 2, 3]]).dtype == np.float64


def test_many_spots_draw_as_the_mean_per_bin(monkeypatch):
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

    rng = np.random.default_rng(0)
    X = rng.random((4000, 2)) * [2.0, 1.0]
    v = X[:, 0] + np.where(rng.random(4000) < 0.1, np.nan, 0.0)
    monkeypatch.setattr(plot_common, "BIN_ABOVE", 1000)
    ax = Figure().add_subplot()
    img = plot_common.tissue_scatter(ax, X, v, 1.0, "viridis", 0.0, 2.0, heldout=X[:, 1] < 0.1)
    assert isinstance(img, AxesImage)
    assert not ax.collections  # no markers at all
    means = img.get_array()
    # bins along x hold the mean x of their spots: increasing left to right
    col = np.nanmean(np.ma.filled(means.astype(float), np.nan), axis=0)
    assert np.all(np.diff(col) > 0)
    assert np.nanmin(col) == pytest.approx(0.0, abs=0.02) and np.nanmax(col) == pytest.approx(2.0, abs=0.02)
    # below the threshold it is the usual one marker per spot
    ax2 = Figure().add_subplot()
    monkeypatch.setattr(plot_common, "BIN_ABOVE", 10 ** 6)
    plot_common.tissue_scatter(ax2, X, v, 1.0, "viridis", 0.0, 2.0)
    assert len(ax2.collections) >= 1 and not ax2.images


def test_binned_maps_have_no_held_out_legend(monkeypatch):
    from sf_mlflow.plots.spatial import spatial_grid

    rng = np.random.default_rng(1)
    X = rng.random((3000, 2))
    V = np.column_stack([X[:, 0], X[:, 1]])
    held = rng.random(3000) < 0.1
    monkeypatch.setattr(plot_common, "BIN_ABOVE", 1000)
    assert not spatial_grid(X, V, heldout=held).legends   # no rings drawn: nothing to explain
    monkeypatch.setattr(plot_common, "BIN_ABOVE", 10 ** 6)
    assert len(spatial_grid(X, V, heldout=held).legends) == 1
