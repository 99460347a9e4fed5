"""Data sources: the Slide-seqV2 loader, the generic h5ad reader and their error messages."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sf_mlflow.config import config_from_dict
from sf_mlflow.data.sources import load_dataset, load_slideseq, read_h5ad_counts
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import DataError

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
