"""Data sources: the Slide-seqV2 loader, the generic h5ad reader and their error messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sf_mlflow.config import config_from_dict
from sf_mlflow.data.sources import load_dataset, load_slideseq, read_h5ad_counts
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import DataError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WINDOW = "slideseqv2_hippocampus_window.h5ad"
OSMFISH = "osmfish_sscortex.h5ad"
MOB = "st_mouse_olfactory_bulb.h5ad"


def _write(tmp_path, name="tiny.h5ad", X=None, coords=None, obs=None, layers=None):
    """A small AnnData file: 4 spots x 3 genes unless told otherwise."""
    if X is None:
        X = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0], [0, 0, 5]], dtype=np.int32))
    n, d = X.shape
    if coords is None:
        coords = np.arange(2 * n, dtype=float).reshape(n, 2)
    a = ad.AnnData(X=X, obs=obs if obs is not None else pd.DataFrame(index=[f"s{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"g{j}" for j in range(d)]),
                   obsm={"spatial": coords}, layers=layers or {})
    path = tmp_path / name
    a.write_h5ad(path)
    return path


# ---- slideseq --------------------------------------------------------------------------------

def test_slideseq_loader_reads_a_local_copy(shared_file, tmp_path):
    copy = tmp_path / "slideseqv2.h5ad"
    shutil.copy(shared_file(WINDOW), copy)
    cfg = config_from_dict({"dataset": "slideseq", "data": {"path": str(copy), "group_key": None}})
    d = load_dataset(cfg)
    ref = ad.read_h5ad(copy)
    assert (d.n_spots, d.n_genes) == (1052, 23264)
    assert d.groups is None and d.group_names is None
    assert d.counts.dtype == np.float64
    assert abs(d.counts - ref.X).max() == 0
    np.testing.assert_array_equal(d.coordinates, ref.obsm["spatial"])
    assert list(d.gene_names[:3]) == list(ref.var_names[:3])
    assert list(d.spot_names) == list(ref.obs_names)
    # the window file has no adata.raw: its X (raw counts) is read
    assert ref.raw is None and d.counts_source == "X"


def test_slideseq_default_group_key_is_cluster(shared_file, tmp_path):
    copy = tmp_path / "slideseqv2.h5ad"
    shutil.copy(shared_file(WINDOW), copy)
    cfg = config_from_dict({"dataset": "slideseq", "data": {"path": str(copy)}})
    # the window has no cell types, so "auto" -> "cluster" must be reported as missing
    with pytest.raises(DataError, match=r"obs column 'cluster'.*available obs columns: \(none\)"):
        load_dataset(cfg)


def test_slideseq_missing_file_says_how_to_fetch_it(tmp_path):
    where = tmp_path / "nowhere" / "slideseqv2.h5ad"
    with pytest.raises(DataError) as err:
        load_slideseq(where, download=False)
    msg = str(err.value)
    assert str(where) in msg
    assert f"squidpy.datasets.slideseqv2(path='{where}')" in msg
    assert "data.path" in msg


def test_slideseq_default_path_is_data_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="'data/slideseqv2.h5ad' not found"):
        load_slideseq(None, download=False)


# ---- squidpy's layout: X = 4,000 log-normalised genes, adata.raw = all genes as counts --------

N_BEADS, N_RAW_GENES, N_X_GENES, N_TYPES = 300, 4400, 4000, 14
N_MT_GENES, DAMAGED, SHALLOW = 13, np.arange(0, 20), np.arange(20, 35)


def _squidpy_like(path, with_raw: bool = True):
    """Write an .h5ad laid out like squidpy.datasets.slideseqv2(): ``X`` holds 4,000
    log-normalised selected genes, ``adata.raw`` the integral float32 counts of all
    4,400 genes (13 of them ``mt-``), ``obs["cluster"]`` 14 cell types and
    ``obsm["spatial"]`` bead positions in a ~3,000 x 2,500 px puck.

    Beads 0-19 are damaged (~40 % mitochondrial counts, yet > 100 non-mt counts) and
    beads 20-34 shallow (< 100 counts); 300 genes are too rare for min_cells = 10.
    Returns (path, raw counts (N, D_raw) int64, raw gene names).
    """
    rng = np.random.default_rng(13)
    genes = np.array([f"mt-G{j}" for j in range(N_MT_GENES)]
                     + [f"Gene{j}" for j in range(N_RAW_GENES - N_MT_GENES)], dtype=object)
    depth = rng.uniform(1500, 3000, size=(N_BEADS, 1))
    depth[SHALLOW] = rng.uniform(30, 80, size=(len(SHALLOW), 1))
    share = rng.lognormal(0.0, 0.5, size=N_RAW_GENES)
    share[rng.choice(np.arange(N_MT_GENES, N_RAW_GENES), size=300, replace=False)] = 0.004
    share[:N_MT_GENES] *= 8.0  # ~2 % mitochondrial counts in healthy beads
    share /= share.sum()
    rate = depth * share
    rate[DAMAGED, :N_MT_GENES] *= 30.0  # ~40 % in damaged ones
    counts = rng.poisson(rate)
    raw = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)),
                     var=pd.DataFrame(index=genes),
                     obs=pd.DataFrame({"cluster": pd.Categorical(
                         [f"type{k}" for k in rng.integers(0, N_TYPES, N_BEADS)])},
                         index=[f"bead{i}" for i in range(N_BEADS)]))
    raw.obsm["spatial"] = rng.uniform([0.0, 0.0], [3000.0, 2500.0], size=(N_BEADS, 2))
    selected = np.sort(rng.choice(N_RAW_GENES, size=N_X_GENES, replace=False))
    a = raw[:, selected].copy()
    totals = counts.sum(axis=1, keepdims=True)
    a.X = sp.csr_matrix(np.log1p(counts[:, selected] / totals * 1e4).astype(np.float32))
    if with_raw:
        a.raw = raw
    a.write_h5ad(path)
    return path, counts, genes


@pytest.fixture(scope="module")
def squidpy_like(tmp_path_factory):
    return _squidpy_like(tmp_path_factory.mktemp("slideseq") / "slideseqv2.h5ad")


def test_squidpy_like_file_is_laid_out_as_squidpy_s(squidpy_like):
    path, counts, genes = squidpy_like
    a = ad.read_h5ad(path)
    assert a.shape == (N_BEADS, N_X_GENES) and a.raw.shape == (N_BEADS, N_RAW_GENES)
    assert a.raw.X.dtype == np.float32 and (a.X.data != np.round(a.X.data)).any()
    assert a.obs["cluster"].nunique() == N_TYPES and a.obsm["spatial"].shape == (N_BEADS, 2)


def test_slideseq_source_trains_on_the_raw_genes_with_the_plan_filters(squidpy_like, tmp_path):
    from sf_mlflow.config import load_config
    from sf_mlflow.data.io import read_preprocessed, write_preprocessed
    from sf_mlflow.data.preprocess import preprocess

    path, counts, genes = squidpy_like
    # the shipped plan config (the non-spatial one: same data and preprocessing as
    # slideseq/svgp.yaml, and its fit starts in a second), shrunk to run on a CPU
    cfg = load_config(CONFIGS / "slideseq" / "pnmf.yaml", overrides={
        "data.path": str(path), "model.n_components": 3, "training.max_iter": 5,
        "training.device": "cpu", "training.batch_size": None, "training.y_batch_size": None})
    assert cfg.data.use_raw == "auto" and cfg.preprocessing.max_mt_fraction == 0.2
    data = load_dataset(cfg)
    assert data.counts_source == "adata.raw"
    assert (data.n_spots, data.n_genes, data.n_groups) == (N_BEADS, N_RAW_GENES, N_TYPES)
    np.testing.assert_array_equal(data.gene_names, genes)
    np.testing.assert_array_equal(data.counts.toarray(), counts)  # integral float32 -> cast

    res = preprocess(data, cfg.preprocessing, seed=cfg.seed)
    r = res.report
    # the plan's filters, computed here independently: mt share > 20 %, then < 100 non-mt
    # counts, then genes in < 10 beads, then the mt- genes out
    mt = np.char.startswith(genes.astype(str), "mt-")
    pct_mt = counts[:, mt].sum(axis=1) / counts.sum(axis=1)
    keep = pct_mt <= 0.2
    np.testing.assert_array_equal(np.flatnonzero(~keep), DAMAGED)
    Y = counts[keep][:, ~mt]
    keep_spots = Y.sum(axis=1) >= 100
    Y = Y[keep_spots]
    keep_genes = (Y > 0).sum(axis=0) >= 10
    assert (r["spots_mt_fraction"], r["genes_mt"]) == (len(DAMAGED), N_MT_GENES)
    assert r["spots_min_counts"] == len(SHALLOW) and r["genes_min_cells"] > 100
    assert (r["spots_kept"], r["genes_kept"]) == (keep_spots.sum(), keep_genes.sum())
    np.testing.assert_array_equal(res.data.counts.toarray(), Y[:, keep_genes])
    assert res.data.n_genes > N_X_GENES  # more genes than X has: the raw ones
    # the plan's coordinates: geometric-mean side 200, mean at the origin
    side = np.ptp(res.data.coordinates, axis=0)
    assert np.sqrt(side.prod()) == pytest.approx(200.0, rel=1e-12)

    # and the real fit path: the folder the train stage reads, the model it builds
    from sf_mlflow.stages.train import build_model, training_inputs

    write_preprocessed(tmp_path / "data", res, {"counts_source": data.counts_source})
    pre = read_preprocessed(tmp_path / "data")
    assert pre.metadata["counts_source"] == "adata.raw"
    train, groups = training_inputs(cfg, pre)
    model = build_model(cfg).fit(train.counts, coordinates=train.coordinates, groups=groups)
    assert model.loadings_.shape == (res.data.n_genes, 3)
    assert model.n_iter_ == 5 and np.isfinite(model.elbo_history_).all()


def test_slideseq_use_raw_false_gives_the_clear_non_integer_error(squidpy_like):
    path, _, _ = squidpy_like
    cfg = config_from_dict({"dataset": "slideseq", "data": {"path": str(path), "use_raw": False}})
    with pytest.raises(DataError) as err:
        load_dataset(cfg)
    msg = str(err.value)
    assert str(path) in msg
    assert "X holds" in msg and "non-integer values (first: spot 'bead0', gene" in msg
    assert "set data.use_raw: true to read adata.raw (4,400 genes)" in msg
    assert "data.layer to a layer of raw counts (available layers: (none))" in msg


def test_h5ad_use_raw_auto_true_false(squidpy_like, tmp_path):
    path, counts, genes = squidpy_like
    # auto: X is not integral and the file has raw -> raw
    d = read_h5ad_counts(path, group_key="cluster")
    assert d.counts_source == "adata.raw" and d.n_genes == N_RAW_GENES
    d = load_dataset(config_from_dict({"dataset": "h5ad", "data": {"path": str(path),
                                                                     "use_raw": True}}))
    assert d.counts_source == "adata.raw" and d.n_genes == N_RAW_GENES
    with pytest.raises(DataError, match=r"X holds .* non-integer values .*set data.use_raw: true"):
        read_h5ad_counts(path, use_raw=False)
    # auto on an h5ad whose X is raw counts reads X even though raw is present
    a = ad.read_h5ad(path)
    a.X = sp.csr_matrix(counts[:, :N_X_GENES].astype(np.float32))
    a.var_names = genes[:N_X_GENES]
    both = tmp_path / "counts_in_x.h5ad"
    a.write_h5ad(both)
    d = read_h5ad_counts(both)
    assert d.counts_source == "X" and d.n_genes == N_X_GENES
    # ...while the Slide-seq source reads raw whenever the file has it
    d = load_slideseq(both, download=False)
    assert d.counts_source == "adata.raw" and d.n_genes == N_RAW_GENES


def test_use_raw_errors_name_the_settings(tmp_path):
    X = sp.csr_matrix(np.array([[0.5, 0, 1.2], [0, 2.1, 0], [0.3, 0, 0], [0, 0, 0.9]]))
    raw = np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0], [0, 0, 5]], dtype=np.int64)
    path = _write(tmp_path, X=X, layers={"counts": raw})
    with pytest.raises(DataError, match=r"data.use_raw = true but the file has no adata.raw; set "
                       r"data.use_raw: false \(or auto\) to read X, or data.layer to a layer of "
                       r"raw counts \(available layers: 'counts'\)"):
        read_h5ad_counts(path, use_raw=True)
    with pytest.raises(DataError, match=r"data.layer = 'counts' and data.use_raw = true both pick "
                       "the counts; set data.layer: null to read adata.raw, or data.use_raw: false"):
        read_h5ad_counts(path, layer="counts", use_raw=True)
    with pytest.raises(DataError, match=r"use_raw = 'yes' is invalid; expected 'auto', true or false"):
        read_h5ad_counts(path, use_raw="yes")
    # a layer beats auto; its name is what the error names when it is not counts
    assert read_h5ad_counts(path, layer="counts").counts_source == "layer 'counts'"
    path2 = _write(tmp_path, name="norm_layer.h5ad", X=sp.csr_matrix(raw), layers={"norm": X.toarray()})
    with pytest.raises(DataError, match=r"layer 'norm' holds 5 non-integer values .*available "
                       r"layers: \(none\)\), or data.use_raw: false and data.layer: null to read X"):
        read_h5ad_counts(path2, layer="norm")


# ---- h5ad with groups ------------------------------------------------------------------------

def test_osmfish_groups(shared_file):
    path = shared_file(OSMFISH)
    cfg = config_from_dict({"dataset": "h5ad", "data": {"path": str(path), "group_key": "cluster"}})
    d = load_dataset(cfg)
    ref = ad.read_h5ad(path)
    assert (d.n_spots, d.n_genes, d.n_groups) == (6471, 33, 32)
    assert "Excluded" in d.group_names and d.group_names == sorted(d.group_names)
    labels = np.asarray(d.group_names, dtype=object)[d.groups]
    np.testing.assert_array_equal(labels, ref.obs["cluster"].astype(str).to_numpy())
    assert (d.groups == d.group_names.index("Excluded")).sum() == 1632


def test_h5ad_group_key_auto_means_no_groups(shared_file):
    cfg = config_from_dict({"dataset": "h5ad", "data": {"path": str(shared_file(OSMFISH))}})
    d = load_dataset(cfg)
    assert d.groups is None and d.n_groups == 0


@pytest.fixture
def osmfish_with_nan(shared_file, tmp_path):
    a = ad.read_h5ad(shared_file(OSMFISH))
    labels = a.obs["cluster"].astype(object)
    missing = np.array([0, 5, 17, 100, 6000])
    labels.iloc[missing[:4]] = np.nan
    labels.iloc[missing[4]] = ""  # a blank label counts as missing too
    a.obs["cluster"] = labels.to_numpy()
    path = tmp_path / "osmfish_nan.h5ad"
    a.write_h5ad(path)
    return path, missing


def test_missing_groups_drop(osmfish_with_nan):
    path, missing = osmfish_with_nan
    d = read_h5ad_counts(path, group_key="cluster", missing_groups="drop")
    assert d.n_spots == 6471 - 5 and d.n_groups == 32
    full = ad.read_h5ad(path)
    kept = np.setdiff1d(np.arange(6471), missing)
    np.testing.assert_array_equal(d.spot_names, full.obs_names[kept])
    assert abs(d.counts - full.X[kept]).max() == 0


def test_missing_groups_unknown(osmfish_with_nan):
    path, missing = osmfish_with_nan
    d = read_h5ad_counts(path, group_key="cluster", missing_groups="unknown")
    assert d.n_spots == 6471 and d.n_groups == 33
    assert d.group_names == sorted(d.group_names)
    unknown = d.group_names.index("unknown")
    np.testing.assert_array_equal(np.flatnonzero(d.groups == unknown), missing)


def test_real_nan_labels_in_olfactory_bulb(shared_file):
    path = shared_file(MOB)
    assert read_h5ad_counts(path, group_key="layer").n_spots == 260
    d = read_h5ad_counts(path, group_key="layer", missing_groups="unknown")
    assert d.n_spots == 262 and d.n_groups == 6 and (d.groups == d.group_names.index("unknown")).sum() == 2


def test_numeric_group_labels_sort_as_numbers(tmp_path):
    obs = pd.DataFrame({"cid": [10, 2, 2, 1]}, index=[f"s{i}" for i in range(4)])
    d = read_h5ad_counts(_write(tmp_path, obs=obs), group_key="cid")
    assert d.group_names == ["1", "2", "10"]
    np.testing.assert_array_equal(d.groups, [2, 1, 1, 0])


# ---- h5ad errors -----------------------------------------------------------------------------

def test_missing_group_column_lists_obs_columns(shared_file):
    with pytest.raises(DataError) as err:
        read_h5ad_counts(shared_file(OSMFISH), group_key="celltype")
    msg = str(err.value)
    assert "'celltype'" in msg and "'cluster'" in msg and "'region'" in msg and OSMFISH in msg


def test_missing_obsm_key_lists_keys(shared_file):
    with pytest.raises(DataError, match=r"obsm key 'X_spatial'.*available obsm keys: 'spatial'"):
        read_h5ad_counts(shared_file(MOB), coordinates_key="X_spatial")


def test_layers(tmp_path):
    X = sp.csr_matrix(np.array([[0.5, 0, 1.2], [0, 2.1, 0], [0.3, 0, 0], [0, 0, 0.9]]))
    raw = np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0], [0, 0, 5]], dtype=np.int64)  # dense layer
    path = _write(tmp_path, X=X, layers={"counts": raw})
    d = read_h5ad_counts(path, layer="counts")
    np.testing.assert_array_equal(d.counts.toarray(), raw)
    assert sp.isspmatrix_csr(d.counts)
    with pytest.raises(DataError, match=r"layer 'raw' not found; available layers: 'counts'"):
        read_h5ad_counts(path, layer="raw")
    # X holds normalised values: the error points at data.layer
    with pytest.raises(DataError, match=r"5 non-integer values \(first: spot 's0', gene 'g0' = 0.5\).*data.layer"):
        read_h5ad_counts(path)


def test_negative_counts(tmp_path):
    X = sp.csr_matrix(np.array([[1, 0, 2], [0, -3, 0], [4, 0, 0], [0, 0, 5]], dtype=np.int32))
    path = _write(tmp_path, X=X)
    with pytest.raises(DataError) as err:
        read_h5ad_counts(path)
    msg = str(err.value)
    assert str(path) in msg and "1 negative values" in msg and "spot 's1', gene 'g1' = -3" in msg


def test_nan_coordinates(tmp_path):
    coords = np.array([[0.0, 1.0], [2.0, np.nan], [4.0, 5.0], [np.inf, 7.0]])
    path = _write(tmp_path, coords=coords)
    with pytest.raises(DataError, match=r"2 spots have NaN or infinite coordinates \(first: spot 's1'"):
        read_h5ad_counts(path)


def test_three_column_coordinates(tmp_path):
    path = _write(tmp_path, coords=np.zeros((4, 3)))
    with pytest.raises(DataError, match=r"obsm\['spatial'\] has shape \(4, 3\)"):
        read_h5ad_counts(path)


def test_h5ad_path_required_and_must_exist(tmp_path):
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset(config_from_dict({"dataset": "h5ad"}))
    missing = tmp_path / "absent.h5ad"
    with pytest.raises(DataError, match="absent.h5ad' not found"):
        load_dataset(config_from_dict({"dataset": "h5ad", "data": {"path": str(missing)}}))
    not_h5 = tmp_path / "bad.h5ad"
    not_h5.write_text("not hdf5")
    with pytest.raises(DataError, match="cannot be read as an AnnData"):
        read_h5ad_counts(not_h5)


def test_bad_missing_groups_policy(tmp_path):
    with pytest.raises(DataError, match="missing_groups = 'keep'"):
        read_h5ad_counts(_write(tmp_path), missing_groups="keep")


# ---- synthetic and dispatch ------------------------------------------------------------------

def test_synthetic_dataset_uses_config_and_seed():
    cfg = config_from_dict({"dataset": "synthetic", "seed": 3,
                            "data": {"synthetic": {"n_spots": 120, "n_genes": 15, "n_groups": 2}}})
    d = load_dataset(cfg)
    ref = make_synthetic(n_spots=120, n_genes=15, n_groups=2, seed=3)
    assert (d.counts != ref.counts).nnz == 0 and d.n_groups == 2


def test_unknown_dataset_lists_valid_ones():
    cfg = config_from_dict({})
    cfg.dataset = "visium"
    with pytest.raises(DataError, match="'visium' is unknown; valid datasets: slideseq, h5ad, synthetic"):
        load_dataset(cfg)


def test_repeated_spot_names_are_refused_or_made_unique(tmp_path):
    obs = pd.DataFrame(index=["s0", "s1", "s0", "s0-1"])
    path = _write(tmp_path, obs=obs)
    with pytest.raises(DataError, match=r"1 spot names occur more than once \('s0' x2\).*"
                                        r"data.make_unique: true"):
        read_h5ad_counts(path)
    d = read_h5ad_counts(path, make_unique=True)
    assert list(d.spot_names) == ["s0", "s1", "s0-2", "s0-1"]   # anndata's rule: s0-1 is taken
    cfg = config_from_dict({"dataset": "h5ad", "data": {"path": str(path), "make_unique": True}})
    assert list(load_dataset(cfg).spot_names) == list(d.spot_names)
    assert "data.make_unique" in cfg.flat()
    unset = config_from_dict({"dataset": "h5ad", "data": {"path": str(path)}})
    assert "data.make_unique" not in unset.flat()   # hashes of configs without it stay
