"""Generated data: shapes, determinism, the Poisson model, smoothness and group structure."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

from sf_mlflow.config import SyntheticConfig
from sf_mlflow.data.counts import SpatialCounts
from sf_mlflow.data.synthetic import make_synthetic, synthetic_from_config
from sf_mlflow.errors import DataError


@pytest.fixture(scope="module")
def small() -> SpatialCounts:
    return make_synthetic(n_spots=2000, n_genes=300, n_components=5, n_groups=3, seed=1)


def test_shapes_types_and_names(small):
    d = small
    assert isinstance(d.counts, sp.csr_matrix) and d.counts.shape == (2000, 300)
    assert d.coordinates.shape == (2000, 2)
    assert d.coordinates.min() >= 0 and d.coordinates.max() <= 1
    np.testing.assert_array_equal(d.counts.data, np.round(d.counts.data))
    assert d.counts.data.min() > 0  # no explicit zeros stored
    assert d.truth["factors"].shape == (2000, 5)
    assert d.truth["log_factors"].shape == (2000, 5)
    assert d.truth["loadings"].shape == (300, 5)
    assert (d.truth["factors"] > 0).all() and (d.truth["loadings"] >= 0).all()
    np.testing.assert_allclose(np.log(d.truth["factors"]), d.truth["log_factors"])
    assert d.group_names == ["group0", "group1", "group2"]
    assert set(np.unique(d.groups)) == {0, 1, 2}
    assert list(d.gene_names[:2]) == ["gene0", "gene1"] and d.spot_names[-1] == "spot1999"
    d.validate()


def test_deterministic_for_a_seed():
    a = make_synthetic(n_spots=300, n_genes=50, seed=7)
    b = make_synthetic(n_spots=300, n_genes=50, seed=7)
    c = make_synthetic(n_spots=300, n_genes=50, seed=8)
    assert (a.counts != b.counts).nnz == 0
    np.testing.assert_array_equal(a.coordinates, b.coordinates)
    np.testing.assert_array_equal(a.truth["loadings"], b.truth["loadings"])
    assert (a.counts != c.counts).nnz > 0


def test_mean_total_count_and_poisson_model(small):
    d = small
    F, W = d.truth["factors"], d.truth["loadings"]
    mu = F @ W.T
    # the expected totals average exactly mean_counts; observed totals within Poisson noise
    assert mu.sum(axis=1).mean() == pytest.approx(300.0, rel=1e-10)
    assert d.counts.sum(axis=1).mean() == pytest.approx(300.0, abs=1.5)
    # each gene's total is Poisson(sum_i mu_ij): standardised residuals ~ N(0, 1)
    obs = np.asarray(d.counts.sum(axis=0)).ravel()
    z = (obs - mu.sum(axis=0)) / np.sqrt(mu.sum(axis=0))
    assert abs(z.mean()) < 0.25 and 0.8 < z.std() < 1.2
    # spot-level residuals too, which would catch rows drawn from the wrong rates
    obs_n = np.asarray(d.counts.sum(axis=1)).ravel()
    z_n = (obs_n - mu.sum(axis=1)) / np.sqrt(mu.sum(axis=1))
    assert abs(z_n.mean()) < 0.1 and 0.9 < z_n.std() < 1.1


def test_loadings_concentrate_on_one_or_two_factors(small):
    W = small.truth["loadings"]
    share = np.sort(W / W.sum(axis=1, keepdims=True), axis=1)[:, ::-1]
    assert np.median(share[:, 0]) > 0.5
    assert np.median(share[:, :2].sum(axis=1)) > 0.85
    # every factor is the main one for some genes
    assert len(np.unique(W.argmax(axis=1))) == 5


def _empirical_correlation(fields: np.ndarray, coords: np.ndarray, radii, width):
    diff = coords[:, None, :] - coords[None, :, :]
    dist = np.sqrt((diff ** 2).sum(-1))
    iu = np.triu_indices(len(coords), 1)
    dist = dist[iu]
    prods = np.einsum("il,jl->ij", fields, fields)[iu] / fields.shape[1]
    return [prods[np.abs(dist - r) < width].mean() for r in radii]


def test_fields_have_the_rbf_covariance():
    # n_groups=1, group_effect=0: log-factors are the shared fields, unit-variance GP draws
    ls = 0.05
    d = make_synthetic(n_spots=1500, n_genes=5, n_components=12, n_groups=1, group_effect=0.0,
                       lengthscale=ls, seed=3)
    f = d.truth["log_factors"]
    assert f.var() == pytest.approx(1.0, abs=0.15)
    radii = [0.025, 0.05, 0.1]
    emp = _empirical_correlation(f, d.coordinates, radii, 0.005)
    expected = [np.exp(-r ** 2 / (2 * ls ** 2)) for r in radii]  # 0.88, 0.61, 0.14
    np.testing.assert_allclose(emp, expected, atol=0.12)


def test_group_effect_controls_jumps_at_group_borders():
    # same seed: same positions, groups and field weights; only the mixing weight differs
    kw = dict(n_spots=3000, n_genes=5, n_components=4, n_groups=4, lengthscale=0.2, seed=5)
    shared = make_synthetic(group_effect=0.0, **kw)
    separate = make_synthetic(group_effect=1.0, **kw)
    np.testing.assert_array_equal(shared.groups, separate.groups)
    _, nn = cKDTree(shared.coordinates).query(shared.coordinates, k=2)
    j = nn[:, 1]
    border = shared.groups != shared.groups[j]
    same = ~border
    assert border.sum() > 200

    def jump(d, pairs):
        lf = d.truth["log_factors"]
        return ((lf[pairs] - lf[j[pairs]]) ** 2).mean()

    # with one pattern for all groups, neighbours across a border are as close as within
    assert jump(shared, border) < 2 * jump(shared, same)
    # with independent patterns, a border is a jump of ~2 (difference of 2 unit variances)
    assert jump(separate, border) > 1.0
    assert jump(separate, border) > 10 * jump(separate, same)


def test_groups_are_spatially_coherent(small):
    _, nn = cKDTree(small.coordinates).query(small.coordinates, k=2)
    same = (small.groups == small.groups[nn[:, 1]]).mean()
    assert same > 0.75  # random labels would give about 1/3


def test_one_group_and_grid_layout():
    d = make_synthetic(n_spots=150, n_genes=20, n_groups=1, layout="grid", seed=0)
    assert d.group_names == ["group0"] and (d.groups == 0).all()
    X = d.coordinates
    assert X.shape == (150, 2) and len(np.unique(X, axis=0)) == 150
    # 13 x 12 grid in the unit square, the first 150 points
    assert np.unique(X[:, 0]).size == 13 and X.min() == 0.0 and X[:, 0].max() == 1.0


def test_synthetic_from_config_matches_make_synthetic():
    cfg = SyntheticConfig(n_spots=200, n_genes=30, n_components=3, n_groups=2,
                          lengthscale=0.3, group_effect=0.2, mean_counts=50.0, layout="grid")
    a = synthetic_from_config(cfg, seed=4)
    b = make_synthetic(200, 30, 3, 2, 0.3, 0.2, 50.0, "grid", seed=4)
    assert (a.counts != b.counts).nnz == 0
    assert a.counts.sum(axis=1).mean() == pytest.approx(50.0, rel=0.05)


def test_bad_settings_raise_data_error():
    with pytest.raises(DataError, match="layout = 'hex'"):
        make_synthetic(n_spots=20, n_genes=5, layout="hex")
    with pytest.raises(DataError, match="group_effect = 1.5"):
        make_synthetic(n_spots=20, n_genes=5, group_effect=1.5)


def test_slideseq_scale_is_sparse_and_quick():
    # the size of the real Slide-seqV2 data; generated block-wise straight into CSR
    d = make_synthetic(n_spots=41_786, n_genes=4_000, n_components=10, n_groups=14,
                       mean_counts=120.0, seed=0)
    assert d.counts.shape == (41_786, 4_000)
    density = d.counts.nnz / (41_786 * 4_000)
    assert 0.01 < density < 0.06
    assert d.counts.sum(axis=1).mean() == pytest.approx(120.0, rel=0.01)
    assert np.bincount(d.groups, minlength=14).min() > 0
