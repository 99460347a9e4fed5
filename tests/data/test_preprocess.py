"""Preprocessing: exact filter accounting, deviance gene selection, scaling and the split."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sf_mlflow.config import PreprocessingConfig
from sf_mlflow.data.counts import SpatialCounts
from sf_mlflow.data.preprocess import (QCWarning, coordinate_side_lengths, describe_filters,
                                       heldout_split, poisson_null_deviance, preprocess,
                                       rescale_coordinates)
from sf_mlflow.data.sources import read_h5ad_counts
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import DataError

GENES = ["mt-Co1", "Actb", "MT-ND1", "Gfap", "Mtor", "Rare"]
COUNTS = np.array([
    [5, 10, 1, 0, 3, 0],   # s0 non-mt total 13
    [50, 2, 0, 1, 0, 0],   # s1 3: mostly mitochondrial, dropped by min_counts
    [0, 7, 0, 4, 2, 1],    # s2 14
    [1, 0, 0, 6, 5, 0],    # s3 11
    [0, 1, 2, 0, 0, 0],    # s4 1
    [3, 8, 0, 2, 9, 0],    # s5 19
])
COORDS = np.array([[0, 0], [100, 100], [10, 0], [0, 4], [-50, -50], [10, 4]], dtype=float)


def tiny() -> SpatialCounts:
    return SpatialCounts(
        counts=sp.csr_matrix(COUNTS.astype(float)),
        coordinates=COORDS.copy(),
        gene_names=np.array(GENES, dtype=object),
        spot_names=np.array([f"s{i}" for i in range(6)], dtype=object),
        groups=np.array([0, 1, 0, 2, 1, 2]),
        group_names=["a", "b", "c"],
    )


def test_hand_made_example_exact_report():
    # the pre-#13 steps alone: no mitochondrial-share filter, longest-side scaling
    cfg = PreprocessingConfig(spatial_scale=50.0, filter_mt=True, min_counts=10, min_cells=2,
                              max_mt_fraction=None, coordinate_scaling="longest_side")
    res = preprocess(tiny(), cfg)
    r = res.report
    assert r["spots_input"] == 6 and r["genes_input"] == 6 and r["counts_input"] == 123
    assert (r["spots_mt_fraction"], r["counts_mt_fraction"]) == (0, 0)
    # mt-Co1 (59) and MT-ND1 (3); "Mtor" is not mitochondrial
    assert (r["genes_mt"], r["counts_mt"]) == (2, 62)
    assert (r["spots_min_counts"], r["counts_min_counts"]) == (2, 4)  # s1 (3) and s4 (1)
    assert (r["genes_min_cells"], r["counts_min_cells"]) == (1, 1)  # "Rare", in one spot
    assert (r["genes_top_k"], r["counts_top_k"]) == (0, 0)
    assert (r["spots_kept"], r["genes_kept"], r["counts_kept"]) == (4, 3, 56)
    d = res.data
    assert list(d.gene_names) == ["Actb", "Gfap", "Mtor"]
    assert list(d.spot_names) == ["s0", "s2", "s3", "s5"]
    np.testing.assert_array_equal(d.counts.toarray(), COUNTS[[0, 2, 3, 5]][:, [1, 3, 4]])
    # bounding box [0, 10] x [0, 4]: centre (5, 2), longest side 10 -> 50
    assert r["coordinate_center"] == [5.0, 2.0] and r["coordinate_scale"] == 5.0
    np.testing.assert_array_equal(d.coordinates, [[-25, -10], [25, -10], [-25, 10], [25, 10]])
    # group "b" lost both its spots but keeps its code and name
    assert d.group_names == ["a", "b", "c"]
    assert r["group_sizes"] == {"a": 2, "b": 0, "c": 2}
    np.testing.assert_array_equal(d.groups, [0, 0, 2, 2])
    assert r["n_heldout"] == 0 and not res.heldout.any()


def test_mt_fraction_filter_runs_first_and_is_accounted():
    # mitochondrial shares over all genes: s0 6/19, s1 50/53, s2 0/14, s3 1/12, s4 2/3, s5 3/22
    cfg = PreprocessingConfig(filter_mt=True, min_counts=10, min_cells=2)
    assert cfg.max_mt_fraction == 0.2  # the plan's default
    r = preprocess(tiny(), cfg).report
    # s0, s1 and s4 exceed 20 %; s0 would have passed min_counts (13 non-mt counts)
    assert (r["spots_mt_fraction"], r["counts_mt_fraction"]) == (3, 19 + 53 + 3)
    assert (r["genes_mt"], r["counts_mt"]) == (2, 4)  # mt-Co1 in s3 (1) and s5 (3)
    assert (r["spots_min_counts"], r["counts_min_counts"]) == (0, 0)
    assert (r["genes_min_cells"], r["counts_min_cells"]) == (1, 1)  # "Rare"
    assert (r["spots_kept"], r["genes_kept"], r["counts_kept"]) == (3, 3, 43)
    assert r["counts_input"] == (r["counts_mt_fraction"] + r["counts_mt"] + r["counts_min_counts"]
                                 + r["counts_min_cells"] + r["counts_top_k"] + r["counts_kept"])
    # a share equal to the maximum is kept (only shares that exceed it go): s3 is 1/12
    res = preprocess(tiny(), PreprocessingConfig(min_counts=0, min_cells=0, max_mt_fraction=1 / 12))
    assert "s3" in list(res.data.spot_names) and "s5" not in list(res.data.spot_names)
    # the share is judged whether or not the mt genes are then dropped
    r = preprocess(tiny(), PreprocessingConfig(filter_mt=False, min_counts=0, min_cells=0)).report
    assert r["spots_mt_fraction"] == 3 and r["genes_mt"] == 0


def test_without_mt_filter_the_mt_counts_stay():
    cfg = PreprocessingConfig(filter_mt=False, min_counts=10, min_cells=2, max_mt_fraction=None)
    r = preprocess(tiny(), cfg).report
    assert (r["genes_mt"], r["counts_mt"]) == (0, 0)
    # totals now include mt: s4 (3) is the only spot below 10
    assert (r["spots_min_counts"], r["counts_min_counts"]) == (1, 3)


def _reference_filters(Y: np.ndarray, names: np.ndarray, min_counts: int, min_cells: int,
                       max_mt_fraction: float = 0.2):
    """Plain dense numpy version of steps 0 and a-c, written independently of the package."""
    out = {}
    mt = np.array([n.startswith("mt-") or n.startswith("MT-") for n in names])
    tot = Y.sum(axis=1)
    pct_mt = 100.0 * Y[:, mt].sum(axis=1) / np.maximum(tot, 1)
    high = pct_mt > 100.0 * max_mt_fraction
    out["spots_mt_fraction"], out["counts_mt_fraction"] = int(high.sum()), int(tot[high].sum())
    Y = Y[~high]
    out["genes_mt"], out["counts_mt"] = int(mt.sum()), int(Y[:, mt].sum())
    Y, names = Y[:, ~mt], names[~mt]
    tot = Y.sum(axis=1)
    out["spots_min_counts"] = int((tot < min_counts).sum())
    out["counts_min_counts"] = int(tot[tot < min_counts].sum())
    Y = Y[tot >= min_counts]
    det = (Y > 0).sum(axis=0)
    out["genes_min_cells"] = int((det < min_cells).sum())
    out["counts_min_cells"] = int(Y[:, det < min_cells].sum())
    Y, names = Y[:, det >= min_cells], names[det >= min_cells]
    return out, Y, names


def _full_deviance(Y: np.ndarray) -> np.ndarray:
    """Per-gene deviance by the full formula, including the sum of (y - mu) that cancels."""
    n = Y.sum(axis=1, keepdims=True).astype(float)
    p = Y.sum(axis=0) / Y.sum()
    dev = np.empty(Y.shape[1])
    for s in range(0, Y.shape[1], 2000):
        y = Y[:, s:s + 2000].astype(float)
        mu = n * p[s:s + 2000]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(y > 0, y * np.log(y / mu), 0.0)
        dev[s:s + 2000] = 2 * (t - (y - mu)).sum(axis=0)
    return dev


def test_real_window_matches_independent_computation(shared_file):
    data = read_h5ad_counts(shared_file("slideseqv2_hippocampus_window.h5ad"))
    Y = data.counts.toarray().astype(np.int32)  # 1,052 x 23,264
    names = np.asarray(data.gene_names, dtype=str)
    cfg = PreprocessingConfig(min_counts=100, min_cells=10, filter_mt=True, n_top_genes=2000)
    res = preprocess(data, cfg)
    expected, Yk, kept_names = _reference_filters(Y, names, 100, 10)
    del Y
    r = res.report
    for key, value in expected.items():
        assert r[key] == value, key
    assert r["spots_mt_fraction"] > 0
    assert r["genes_mt"] > 10 and r["spots_min_counts"] > 0 and r["genes_min_cells"] > 1000
    top = np.sort(np.argsort(-_full_deviance(Yk), kind="stable")[:2000])
    assert r["spots_kept"] == Yk.shape[0]
    assert (r["genes_kept"], r["genes_top_k"]) == (2000, Yk.shape[1] - 2000)
    assert r["counts_top_k"] == int(Yk.sum()) - int(Yk[:, top].sum())
    assert r["counts_kept"] == int(Yk[:, top].sum())
    assert r["counts_input"] == (r["counts_mt_fraction"] + r["counts_mt"] + r["counts_min_counts"]
                                 + r["counts_min_cells"] + r["counts_top_k"]
                                 + r["counts_heldout_only"] + r["counts_kept"])
    np.testing.assert_array_equal(res.data.gene_names, kept_names[top])
    np.testing.assert_array_equal(res.data.counts.toarray(), Yk[:, top])


def test_null_deviance_equals_full_formula():
    d = make_synthetic(n_spots=300, n_genes=40, seed=2)
    Y = d.counts.toarray()
    np.testing.assert_allclose(poisson_null_deviance(d.counts), _full_deviance(Y), rtol=1e-10)


def test_top_k_picks_planted_spatially_variable_genes():
    rng = np.random.default_rng(0)
    n, d = 500, 120
    size = rng.lognormal(0, 0.5, size=(n, 1)) * 200  # spot depth varies, as in real data
    share = rng.dirichlet(np.ones(d) * 2)
    planted = np.array([3, 17, 42, 77, 110])
    # typical (median) expression, so the signal is not hidden by sampling noise
    share[planted] = np.median(share)
    share /= share.sum()
    rate = size * share
    # planted genes vary ~5-fold across spots beyond depth; all others follow the null model
    x = rng.uniform(0, 1, size=n)
    rate[:, planted] *= np.exp(1.6 * np.sin(2 * np.pi * x))[:, None]
    # the planted genes are not simply the most expressed ones
    assert (share[planted] < np.sort(share)[-10]).all()
    Y = rng.poisson(rate)
    data = SpatialCounts(sp.csr_matrix(Y.astype(float)), np.column_stack([x, x ** 2]),
                         np.array([f"g{j}" for j in range(d)], dtype=object),
                         np.array([f"s{i}" for i in range(n)], dtype=object))
    res = preprocess(data, PreprocessingConfig(min_counts=0, min_cells=0, n_top_genes=5))
    assert list(res.data.gene_names) == [f"g{j}" for j in planted]
    assert res.report["genes_top_k"] == d - 5


def test_empty_after_filter_errors_name_the_setting():
    with pytest.raises(DataError, match=r"min_counts = 1000 removed all 6 spots \(the largest "
                       r"spot total is 19\); lower preprocessing.min_counts"):
        preprocess(tiny(), PreprocessingConfig(min_counts=1000, max_mt_fraction=None))
    with pytest.raises(DataError, match=r"min_cells = 50 removed all 4 genes \(the most widely "
                       r"detected gene is in 5 of 6 spots\); lower preprocessing.min_cells"):
        preprocess(tiny(), PreprocessingConfig(min_counts=0, min_cells=50, max_mt_fraction=None))
    only_mt = tiny().subset(genes=[0, 2])
    with pytest.raises(DataError, match="filter_mt = true removed all 2 genes"):
        preprocess(only_mt, PreprocessingConfig(min_counts=0, min_cells=0, max_mt_fraction=None))
    damaged = tiny().subset(spots=[1, 4])  # 50/53 and 2/3 of their counts are mitochondrial
    with pytest.raises(DataError, match=r"max_mt_fraction = 0.2 removed all 2 spots \(the lowest "
                       r"mitochondrial share is 0.667\); raise preprocessing.max_mt_fraction, or "
                       "set it to null"):
        preprocess(damaged, PreprocessingConfig(min_counts=0, min_cells=0))


def _plan_rescale(X: np.ndarray, spatial_scale: float) -> np.ndarray:
    """The plan's reference rule, step by step as it states it (not the package's algebra)."""
    X = X - X.min(axis=0)                      # shift to the minimum
    sides = X.max(axis=0)                      # side lengths of the shifted box
    X = X * 4.0 / np.sqrt(sides[0] * sides[1])  # geometric-mean side -> 4
    X = X - X.mean(axis=0)                     # centre at the mean
    return X * spatial_scale


def _pre13_rescale(X: np.ndarray, spatial_scale: float) -> np.ndarray:
    """The coordinates preprocessing produced before #13 (longest side -> spatial_scale)."""
    lo, hi = X.min(axis=0), X.max(axis=0)
    return (X - (lo + hi) / 2.0) * (spatial_scale / float((hi - lo).max()))


def _check_plan_rule(raw: np.ndarray, spatial_scale: float) -> np.ndarray:
    X, center, scale = rescale_coordinates(raw, spatial_scale)
    np.testing.assert_allclose(X, _plan_rescale(raw, spatial_scale), rtol=1e-12, atol=1e-9)
    side = X.max(axis=0) - X.min(axis=0)
    assert np.sqrt(side[0] * side[1]) == pytest.approx(4.0 * spatial_scale, rel=1e-12)
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose((raw - center) * scale, X, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(X / scale + center, raw, rtol=1e-12, atol=1e-9)  # invertible
    # one isotropic scale: shapes and aspect ratios are kept
    np.testing.assert_allclose(side[0] / side[1], np.ptp(raw[:, 0]) / np.ptp(raw[:, 1]), rtol=1e-12)
    return X


def test_rescale_follows_the_plan_on_a_rectangle():
    # a 3,000 x 1,000 rectangle of spots (a regular grid and its corners), off the origin
    gx, gy = np.meshgrid(np.linspace(0, 3000, 31), np.linspace(0, 1000, 11))
    raw = np.column_stack([gx.ravel(), gy.ravel()]) + [500.0, -200.0]
    X = _check_plan_rule(raw, 50.0)
    # geometric mean sqrt(3000 * 1000) = 1732.05 -> 200: the sides become 346.4 and 115.5
    side = X.max(axis=0) - X.min(axis=0)
    np.testing.assert_allclose(side, [200.0 * np.sqrt(3.0), 200.0 / np.sqrt(3.0)], rtol=1e-12)
    assert coordinate_side_lengths(raw).tolist() == [3000.0, 1000.0]


def test_rescale_follows_the_plan_on_a_rotated_point_cloud():
    rng = np.random.default_rng(4)
    cloud = rng.normal(size=(500, 2)) * [900.0, 250.0]  # elongated
    a = np.deg2rad(30.0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    raw = cloud @ rot.T + [4000.0, 1200.0]
    X = _check_plan_rule(raw, 50.0)
    # the side lengths are the x and y ranges of the cloud as it lies (no re-alignment)
    sides = np.ptp(raw, axis=0)
    np.testing.assert_allclose(np.ptp(X, axis=0), sides * 200.0 / np.sqrt(sides.prod()), rtol=1e-12)
    # and a different spatial_scale only scales the result
    np.testing.assert_allclose(rescale_coordinates(raw, 20.0)[0], X * 20.0 / 50.0, rtol=1e-12)


def test_longest_side_reproduces_the_pre13_coordinates():
    rng = np.random.default_rng(7)
    raw = rng.random((300, 2)) * [3000.0, 1000.0] + [500.0, -200.0]
    X, center, scale = rescale_coordinates(raw, 20.0, "longest_side")
    np.testing.assert_array_equal(X, _pre13_rescale(raw, 20.0))
    np.testing.assert_array_equal(center, (raw.min(axis=0) + raw.max(axis=0)) / 2)
    assert scale == 20.0 / np.ptp(raw[:, 0])
    # and through preprocess, with the transform in the report
    d = make_synthetic(n_spots=400, n_genes=30, seed=1)
    d.coordinates = d.coordinates * [3000.0, 1000.0] + [500.0, -200.0]
    cfg = PreprocessingConfig(spatial_scale=20.0, min_counts=0, min_cells=0,
                              coordinate_scaling="longest_side")
    res = preprocess(d, cfg)
    np.testing.assert_array_equal(res.data.coordinates, _pre13_rescale(d.coordinates, 20.0))
    assert res.report["coordinate_scaling"] == "longest_side"


def test_preprocess_rescales_by_the_plan_rule_by_default():
    d = make_synthetic(n_spots=400, n_genes=30, seed=1)
    d.coordinates = d.coordinates * [3000.0, 1000.0] + [500.0, -200.0]
    res = preprocess(d, PreprocessingConfig(spatial_scale=20.0, min_counts=0, min_cells=0))
    X, r = res.data.coordinates, res.report
    np.testing.assert_allclose(X, _plan_rescale(d.coordinates, 20.0), rtol=1e-12, atol=1e-9)
    assert r["coordinate_scaling"] == "geometric_mean"
    np.testing.assert_allclose(r["coordinate_side_lengths"], np.ptp(d.coordinates, axis=0))
    c, s = np.array(r["coordinate_center"]), r["coordinate_scale"]
    np.testing.assert_allclose((d.coordinates - c) * s, X, rtol=1e-12, atol=1e-9)
    assert s == pytest.approx(80.0 / np.sqrt(np.prod(np.ptp(d.coordinates, axis=0))), rel=1e-12)


def test_generated_data_use_the_same_rule():
    # synthetic spots fill the unit square, so its side becomes 4 x spatial_scale (200 for 50)
    # and the generator's lengthscale l is l x 200 model units
    d = make_synthetic(n_spots=2000, n_genes=20, seed=0)
    X = preprocess(d, PreprocessingConfig(min_counts=0, min_cells=0)).data.coordinates
    side = np.ptp(X, axis=0)
    assert np.sqrt(side.prod()) == pytest.approx(200.0, rel=1e-12)
    np.testing.assert_allclose(side, 200.0, rtol=0.01)


def test_rescale_degenerate_layouts():
    line = np.column_stack([np.linspace(0, 10, 5), np.full(5, 3.0)])
    X, _, scale = rescale_coordinates(line, 50.0)
    assert np.ptp(X[:, 0]) == pytest.approx(200.0) and scale == pytest.approx(20.0)
    X, center, scale = rescale_coordinates(np.full((3, 2), 7.0), 50.0)
    assert scale == 1.0 and (X == 0).all() and center.tolist() == [7.0, 7.0]


@pytest.mark.parametrize("args, message", [
    ((np.zeros((4, 3)), 50.0), r"coordinates has shape \(4, 3\); expected \(N, 2\)"),
    ((np.array([[0.0, np.nan], [1.0, 1.0]]), 50.0), "coordinates contains NaN or infinite"),
    ((np.zeros((4, 2)), 0.0), r"spatial_scale = 0.0 is invalid; expected a positive number"),
    ((np.zeros((4, 2)), 50.0, "area"), r"method = 'area' is unknown; expected one of "
                                       "geometric_mean, longest_side"),
])
def test_rescale_input_errors_name_the_argument(args, message):
    with pytest.raises(DataError, match=message):
        rescale_coordinates(*args)


def test_heldout_split_seeded_stratified_and_sized():
    d = make_synthetic(n_spots=1001, n_genes=20, n_groups=4, seed=0)
    cfg = PreprocessingConfig(min_counts=0, min_cells=0, holdout_fraction=0.2)
    a = preprocess(d, cfg, seed=11)
    b = preprocess(d, cfg, seed=11)
    c = preprocess(d, cfg, seed=12)
    assert a.heldout.dtype == bool and a.heldout.shape == (1001,)
    assert a.heldout.sum() == round(0.2 * 1001) == a.report["n_heldout"]
    np.testing.assert_array_equal(a.heldout, b.heldout)
    assert (a.heldout != c.heldout).any()
    sizes = np.bincount(d.groups)
    held = np.bincount(d.groups[a.heldout], minlength=4)
    assert (np.abs(held - 0.2 * sizes) <= 1).all()


def test_heldout_split_without_groups_and_edge_cases():
    m = heldout_split(10, 0.3, seed=0)
    assert m.sum() == 3
    assert heldout_split(10, 0.0, seed=0).sum() == 0
    assert heldout_split(3, 0.9, seed=0).sum() == 2  # at least one training spot remains
    assert heldout_split(1, 0.5, seed=0).sum() == 0


#: Shipped configs whose lengthscale was chosen for their data under the pre-#13 scaling:
#: (config, model.lengthscale before #13, tuning.lengthscale low/high before #13 or None).
REEXPRESSED = [("osmfish/svgp.yaml", 4.0, None), ("quickstart_tune.yaml", 4.0, (0.2, 50.0))]


@pytest.mark.parametrize("name, old_ls, old_range", REEXPRESSED, ids=[r[0] for r in REEXPRESSED])
def test_reexpressed_lengthscales_keep_their_tissue_distance(name, old_ls, old_range, shared_file):
    import dataclasses
    from pathlib import Path

    from sf_mlflow.config import load_config
    from sf_mlflow.data.sources import load_dataset

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / name)
    if cfg.dataset == "h5ad":  # resolve the shared data folder as the other tests do
        cfg.data.path = str(shared_file(Path(cfg.data.path).name))
    data = load_dataset(cfg)
    new = preprocess(data, cfg.preprocessing).report["coordinate_scale"]
    old_pp = dataclasses.replace(cfg.preprocessing, coordinate_scaling="longest_side",
                                 max_mt_fraction=None)
    old = preprocess(data, old_pp).report["coordinate_scale"]
    # lengthscale / scale is the lengthscale in raw (tissue) units: unchanged up to rounding
    assert cfg.model.lengthscale / new == pytest.approx(old_ls / old, rel=2e-3)
    if old_range is not None:
        t = cfg.tuning.lengthscale
        assert t.low / new == pytest.approx(old_range[0] / old, rel=2e-3)
        assert t.high / new == pytest.approx(old_range[1] / old, rel=2e-3)


def test_default_tune_range_keeps_its_meaning_on_the_default_data():
    from sf_mlflow.config import Config
    from sf_mlflow.data.sources import load_dataset

    cfg = Config()
    data = load_dataset(cfg)
    new = preprocess(data, cfg.preprocessing).report["coordinate_scale"]
    old = preprocess(data, PreprocessingConfig(coordinate_scaling="longest_side",
                                               max_mt_fraction=None)).report["coordinate_scale"]
    t = cfg.tuning.lengthscale
    assert (t.low / new, t.high / new) == pytest.approx((0.5 / old, 20.0 / old), rel=1e-3)


def test_auto_thresholds_follow_the_data_and_are_reported():
    from sf_mlflow.data.preprocess import auto_min_cells, auto_min_counts, describe_filters

    assert auto_min_counts(np.array([10.0, 157.0, 400.0])) == 15
    assert auto_min_counts(np.array([])) == 0
    assert [auto_min_cells(n) for n in (1, 50, 101, 500, 999, 1000, 41786)] == [1, 1, 2, 5, 10, 10, 10]
    r = preprocess(tiny(), PreprocessingConfig(filter_mt=True, max_mt_fraction=None)).report
    # non-mt totals 13, 3, 14, 11, 1, 19: median 12 -> min_counts 1 drops none; 6 spots -> 1
    assert (r["min_counts_used"], r["spots_min_counts"]) == (1, 0)
    assert (r["min_cells_used"], r["genes_min_cells"]) == (1, 0)
    assert describe_filters(r) == [
        "filter_mt = true: removed 2 mitochondrial genes, 50.4 % of the counts",
        "min_counts = auto (1) = 10 % of the median spot total: removed 0 of 6 spots (0.0 %)",
        "min_cells = auto (1): removed 0 of 4 genes (0.0 %), 0.0 % of the counts",
    ]


def test_filters_that_remove_more_than_a_tenth_warn_naming_the_setting():
    from sf_mlflow.data.preprocess import QCWarning

    with pytest.warns(QCWarning) as caught:
        preprocess(tiny(), PreprocessingConfig(filter_mt=True, min_counts=10, min_cells=2,
                                               max_mt_fraction=None))
    # (6 spots in 2 groups also warn of more groups than a tenth of the spots)
    messages = [str(w.message) for w in caught if "groups for" not in str(w.message)]
    assert len(messages) == 2, messages
    assert messages[0].startswith("preprocessing.filter_mt = true removed 2 genes holding 50.4 % "
                                  "of the counts; set preprocessing.filter_mt: false")
    assert messages[1].startswith("preprocessing.min_counts = 10 removed 2 of 6 spots (33.3 %)")


def test_degenerate_positions_and_groups_warn_naming_the_setting():
    base = make_synthetic(n_spots=200, n_genes=30, n_components=2, n_groups=2, seed=1)
    cfg = PreprocessingConfig(min_counts=0, min_cells=0, holdout_fraction=0.1)
    one_place = base.subset()
    one_place.coordinates = np.zeros_like(one_place.coordinates)
    with pytest.warns(QCWarning) as caught:
        preprocess(one_place, cfg, min_training_spots=7)
    (w,) = [str(w.message) for w in caught if "distinct position" in str(w.message)]
    assert w.startswith("the 200 spots lie at 1 distinct position(s), fewer than the 7 ")
    assert "data.coordinates_key" in w

    per_spot = base.subset()
    per_spot.groups = np.arange(200)
    per_spot.group_names = [f"cell{i}" for i in range(200)]
    with pytest.warns(QCWarning) as caught:
        preprocess(per_spot, cfg, min_training_spots=7)
    (w,) = [str(w.message) for w in caught if "groups for" in str(w.message)]
    assert w.startswith("200 groups for 200 spots (more than one per ten spots)")
    assert "data.group_key" in w and "model.groups: false" in w

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", QCWarning)      # the usual data set: no warning
        preprocess(base, cfg, min_training_spots=7)


def test_genes_only_held_out_spots_detect_are_dropped_and_reported():
    # every model's loading of such a gene is 0, so its held-out counts made the held-out
    # deviance of every model infinite (the olfactory bulb at min_cells: auto = 3 spots)
    rng = np.random.default_rng(0)
    n = 40
    held = heldout_split(n, 0.25, seed=0)
    Y = rng.poisson(3.0, (n, 4)).astype(float)
    Y[:, 3] = 0
    Y[np.flatnonzero(held)[:3], 3] = [2, 1, 4]      # "Late": 7 counts, all in held-out spots
    data = SpatialCounts(counts=sp.csr_matrix(Y), coordinates=rng.uniform(0, 10, (n, 2)),
                         gene_names=np.array(["A", "B", "C", "Late"], dtype=object),
                         spot_names=np.array([f"s{i}" for i in range(n)], dtype=object))
    cfg = PreprocessingConfig(min_counts=1, min_cells=1, filter_mt=False, holdout_fraction=0.25)
    res = preprocess(data, cfg, seed=0)
    np.testing.assert_array_equal(res.heldout, held)
    assert list(res.data.gene_names) == ["A", "B", "C"]
    r = res.report
    assert (r["genes_heldout_only"], r["counts_heldout_only"]) == (1, 7)
    assert (r["genes_kept"], r["counts_kept"]) == (3, int(Y[:, :3].sum()))
    assert describe_filters(r)[-1] == ("removed 1 gene detected in held-out spots only "
                                       "(7 counts): no model can learn them")
    # without a held-out spot nothing is dropped, and the report says 0
    res = preprocess(data, PreprocessingConfig(min_counts=1, min_cells=1, filter_mt=False,
                                               holdout_fraction=0.0))
    assert res.data.n_genes == 4 and res.report["genes_heldout_only"] == 0
