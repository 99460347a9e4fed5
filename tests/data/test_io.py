"""The preprocessed folder: round trips and incomplete folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sf_mlflow.config import PreprocessingConfig
from sf_mlflow.data.io import read_preprocessed, write_preprocessed
from sf_mlflow.data.preprocess import preprocess
from sf_mlflow.data.sources import read_h5ad_counts
from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.errors import DataError

CFG = PreprocessingConfig(min_counts=20, min_cells=5, holdout_fraction=0.1, n_top_genes=80)


@pytest.fixture
def synthetic_result():
    return preprocess(make_synthetic(n_spots=500, n_genes=100, n_groups=3, seed=0), CFG, seed=3)


def test_round_trip_synthetic(tmp_path, synthetic_result):
    res = synthetic_result
    files = write_preprocessed(tmp_path / "pp", res, {"dataset": "synthetic", "digest": "abc123"})
    assert [f.name for f in files] == ["X.npy", "Y.npz", "C.npy", "truth.npz", "metadata.json"]
    back = read_preprocessed(tmp_path / "pp")
    d, e = res.data, back.data
    assert (d.counts != e.counts).nnz == 0 and e.counts.shape == (500, 80)
    assert e.coordinates.dtype == np.float64
    np.testing.assert_array_equal(d.coordinates, e.coordinates)
    np.testing.assert_array_equal(d.groups, e.groups)
    assert e.group_names == ["group0", "group1", "group2"]
    np.testing.assert_array_equal(d.gene_names, e.gene_names)
    np.testing.assert_array_equal(d.spot_names, e.spot_names)
    np.testing.assert_array_equal(back.heldout, res.heldout)
    assert back.heldout.sum() == 50
    for key in ("factors", "log_factors", "loadings"):
        np.testing.assert_array_equal(back.truth[key], d.truth[key])
    assert back.truth["loadings"].shape == (80, 5) and back.truth["factors"].shape == (500, 5)
    m = back.metadata
    assert m["dataset"] == "synthetic" and m["digest"] == "abc123"
    assert (m["n_spots"], m["n_genes"]) == (500, 80)
    assert m["split"]["holdout_fraction"] == 0.1
    assert m["split"]["heldout_indices"] == np.flatnonzero(res.heldout).tolist()
    assert m["preprocessing"]["genes_top_k"] == 20
    t = m["coordinate_transform"]
    assert t["scale"] == res.report["coordinate_scale"]
    # the record is enough to re-derive the mapping and to invert it
    assert t["rule"] == "geometric_mean" and t["spatial_scale"] == CFG.spatial_scale
    raw = d.coordinates / t["scale"] + np.array(t["center"])
    sides = np.ptp(raw, axis=0)
    np.testing.assert_allclose(t["side_lengths"], sides, rtol=1e-12)
    assert t["scale"] == pytest.approx(4 * t["spatial_scale"] / np.sqrt(sides.prod()), rel=1e-12)
    np.testing.assert_allclose(t["center"], raw.mean(axis=0), atol=1e-12)
    assert np.load(tmp_path / "pp" / "C.npy").dtype == np.int64


def test_round_trip_without_groups(tmp_path, shared_file):
    data = read_h5ad_counts(shared_file("slideseqv2_hippocampus_window.h5ad"))
    res = preprocess(data, PreprocessingConfig(n_top_genes=300))
    files = write_preprocessed(tmp_path, res, {})
    assert "truth.npz" not in [f.name for f in files]
    back = read_preprocessed(tmp_path)
    assert back.data.groups is None and back.truth is None
    assert back.metadata["group_names"] is None
    np.testing.assert_array_equal(np.load(tmp_path / "C.npy"), np.zeros(res.data.n_spots))
    assert (back.data.counts != res.data.counts).nnz == 0
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["gene_names"] == [str(g) for g in res.data.gene_names]


def test_rewrite_replaces_stale_truth(tmp_path, synthetic_result, shared_file):
    write_preprocessed(tmp_path, synthetic_result, {})
    assert (tmp_path / "truth.npz").exists()
    data = read_h5ad_counts(shared_file("osmfish_sscortex.h5ad"), group_key="cluster")
    res = preprocess(data, PreprocessingConfig(min_counts=10, min_cells=10))
    write_preprocessed(tmp_path, res, {})
    assert not (tmp_path / "truth.npz").exists()
    back = read_preprocessed(tmp_path)
    assert back.truth is None and back.data.n_groups == 32


def test_missing_files_are_named(tmp_path, synthetic_result):
    write_preprocessed(tmp_path, synthetic_result, {})
    (tmp_path / "Y.npz").unlink()
    with pytest.raises(DataError, match=rf"'{tmp_path}' lacks Y.npz"):
        read_preprocessed(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        read_preprocessed(tmp_path / "nothing")


def test_half_written_folder_is_incomplete(tmp_path, synthetic_result):
    write_preprocessed(tmp_path, synthetic_result, {})
    # a writer that dies after the first data file leaves no metadata.json behind
    (tmp_path / "metadata.json").unlink()
    with pytest.raises(DataError, match=r"lacks metadata.json \(metadata.json is written last"):
        read_preprocessed(tmp_path)


def test_reserved_metadata_keys_are_refused(tmp_path, synthetic_result):
    with pytest.raises(ValueError, match="gene_names"):
        write_preprocessed(tmp_path / "pp", synthetic_result, {"gene_names": []})
    assert not (tmp_path / "pp").exists()  # refused before anything was written


def test_a_preprocess_stage_folder_reads_its_data_subfolder(tmp_path, synthetic_result):
    # the preprocess stage keeps its files in <output_dir>/preprocess/<run id>/data
    stage = tmp_path / "preprocess" / "abc123"
    write_preprocessed(stage / "data", synthetic_result, {})
    (stage / "config.yaml").write_text("name: x\n")
    back = read_preprocessed(stage)
    assert back.data.n_spots == synthetic_result.data.n_spots
    # a folder with neither the files nor data/ says what to pass, not "did not finish"
    with pytest.raises(DataError, match=r"is not a preprocessed folder.*pass the 'data' folder"):
        read_preprocessed(tmp_path / "preprocess")
