"""analyze's all-spot outputs and ``to_anndata`` / ``spatial_factorization export``.

Real runs in a throw-away sqlite MLflow store; the exported AnnData is checked against the
preprocess run's data, the analyze run's ``moran_i.csv`` (through squidpy's own Moran's I)
and the model's prediction at the held-out spots.
"""

from __future__ import annotations

import csv

import anndata as ad
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import sf_mlflow
from sf_mlflow.cli import main
from sf_mlflow.config import config_from_dict
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.stages._common import load_preprocessed
from sf_mlflow.stages.analyze import run_analyze
from sf_mlflow.stages.preprocess import run_preprocess
from sf_mlflow.stages.train import run_train
from sf_mlflow.tracking import download_artifacts

from test_stages import SMALL, user_error

MODELS = {
    "pnmf": {"n_components": 3, "prior": "Gaussian"},
    "mggp": {"n_components": 3, "prior": "SVGP", "groups": True, "num_inducing": 25,
             "lengthscale": 2.0},
}


def chain(kind, tmp_path):
    raw = {**SMALL, "model": MODELS[kind], "training": {**SMALL["training"], "max_iter": 15},
           "analysis": {"group_loadings_iter": 5}}
    cfg = config_from_dict(raw, f"{kind}.yaml")
    pre_id = run_preprocess(cfg)
    train_id = run_train(cfg, pre_id)
    return cfg, pre_id, train_id, run_analyze(cfg, train_id)


def squidpy_moran(adata, key, k):
    """squidpy's Moran's I of every column of ``obsm[key]`` on the binary kNN graph of
    analyze (k neighbours, self excluded, row-normalised), in column order."""
    import squidpy as sq

    if hasattr(sq.gr, "spatial_neighbors_knn"):   # squidpy >= 1.8; the old name goes in 1.9
        sq.gr.spatial_neighbors_knn(adata, spatial_key="spatial", n_neighs=k)
    else:
        sq.gr.spatial_neighbors(adata, spatial_key="spatial", coord_type="generic", n_neighs=k)
    sq.gr.spatial_autocorr(adata, mode="moran", attr="obsm", layer=key, transformation=True,
                           n_perms=None)
    return adata.uns["moranI"].loc[list(range(adata.obsm[key].shape[1])), "I"].to_numpy()


@pytest.mark.parametrize("kind", ["pnmf", "mggp"])
def test_to_anndata_round_trip(mlflow_store, tmp_path, kind):
    cfg, pre_id, train_id, analyze_id = chain(kind, tmp_path)
    pre = load_preprocessed(pre_id, tmp_path / "pre")
    adata = sf_mlflow.to_anndata(analyze_id)

    # spots and genes of the preprocess run, in its order; counts as X, held-out ones marked
    assert list(adata.obs_names) == [str(s) for s in pre.data.spot_names]
    assert list(adata.var_names) == [str(g) for g in pre.data.gene_names]
    assert (adata.X != pre.data.counts).nnz == 0
    # held-out spots as a two-class category (squidpy colours it as such, not as 0-1)
    assert list(adata.obs["heldout"].cat.categories) == ["training", "held-out"]
    held = (adata.obs["heldout"] == "held-out").to_numpy()
    assert np.array_equal(held, pre.heldout) and held.sum() == 30
    counts = pre.data.counts.toarray()
    np.testing.assert_allclose(adata.var["total_counts"], counts.sum(axis=0))
    np.testing.assert_array_equal(adata.var["n_spots"], (counts > 0).sum(axis=0))
    assert list(adata.obs["group"].cat.categories) == list(pre.data.group_names)
    np.testing.assert_array_equal(adata.obs["group"].cat.codes, pre.data.groups)
    np.testing.assert_allclose(adata.obsm["spatial_scaled"], pre.data.coordinates)

    # Moran's I of the exported factors by squidpy (training spots, analyze's graph) is
    # the run's moran_i.csv, which is in descending order
    a = download_artifacts(analyze_id, "", tmp_path / "analyze")
    with open(a / "moran_i.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = np.array([float(r["moran_i"]) for r in rows])
    order = [int(r["original_factor"]) for r in rows]
    key = f"X_{kind}"
    train_only = adata[~held].copy()
    np.testing.assert_allclose(squidpy_moran(train_only, key, cfg.analysis.moran_k), logged,
                               rtol=1e-10, atol=1e-12)
    assert np.all(np.diff(logged) <= 0)
    uns = adata.uns["sf_mlflow"]
    table = uns["moran_i"]   # labelled: one row per exported factor, in obsm's column order
    assert list(table.index) == [f"factor_{i}" for i in range(3)]
    np.testing.assert_allclose(table["moran_i"], logged)
    assert list(table["original_factor"]) == order and uns["model"] == kind
    assert list(table["spatial"]) == [kind == "mggp"] * 3
    assert uns["groups"] == (kind == "mggp")
    assert dict(uns["run_ids"]) == {"preprocess": pre_id, "train": train_id,
                                    "analyze": analyze_id}
    assert uns["metrics"]["heldout_deviance"] == pytest.approx(
        MlflowClient().get_run(analyze_id).data.metrics["heldout_deviance"])

    # factors: the model's own at training spots, its prediction from position at held-out
    # ones (as analyze predicts them for the held-out deviance); the files say the same
    model = PNMF.load(download_artifacts(train_id, "model.pth", tmp_path / "train"))
    factors, scales = adata.obsm[key], adata.obsm[f"{key}_scales"]
    assert factors.shape == scales.shape == (adata.n_obs, 3)
    np.testing.assert_allclose(factors[~held], model.get_factors()[:, order], rtol=1e-12)
    np.testing.assert_allclose(scales[~held], model.get_factor_scales()[:, order], rtol=1e-12)
    X_held = pre.data.coordinates[held]
    groups = pre.data.groups[held] if model.uses_groups_ else None
    predicted = model.predict_at(X_held, groups=groups, neighbours=cfg.analysis.moran_k)
    np.testing.assert_allclose(factors[held], predicted[:, order], rtol=1e-12)
    if kind == "mggp":
        _, std = model.predict_at(X_held, groups=groups, return_std=True)
        np.testing.assert_allclose(scales[held], std[:, order], rtol=1e-6)
    else:
        assert np.isnan(scales[held]).all()
    np.testing.assert_allclose(factors, np.load(a / "factors.npy"))
    with open(a / "spots.csv") as fh:
        spots = list(csv.DictReader(fh))
    assert [s["spot"] for s in spots] == list(adata.obs_names)
    assert [s["heldout"] == "1" for s in spots] == list(held)
    np.testing.assert_allclose(adata.varm[f"{kind}_loadings"], model.loadings_[:, order])
    # the loadings refitted per group and their enrichment, one varm entry per group (the
    # data has groups: analyze refits them whatever the model)
    files = dict(uns["group_files"])
    assert list(files) == list(pre.data.group_names)
    lfc = np.load(a / "enrichment_lfc.npy")
    for g, (name, file) in enumerate(files.items()):
        np.testing.assert_allclose(adata.varm[f"{kind}_loadings_{file}"],
                                   np.load(a / f"loadings_group_{file}.npy"))
        np.testing.assert_allclose(adata.varm[f"{kind}_enrichment_{file}"], lfc[g])
    assert len(adata.varm) == 1 + 2 * len(files)
    # positions in the data set's own units: one scale and a shift away from the fitted ones
    t = pre.metadata["coordinate_transform"]
    np.testing.assert_allclose((adata.obsm["spatial"] - t["center"]) * t["scale"],
                               pre.data.coordinates, atol=1e-9)


def test_cli_export_writes_a_readable_h5ad(mlflow_store, tmp_path, capsys):
    _, pre_id, train_id, analyze_id = chain("mggp", tmp_path)
    out = tmp_path / "results.h5ad"
    capsys.readouterr()
    assert main(["export", "--run-id", analyze_id, "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    back = ad.read_h5ad(out)
    assert back.n_obs == 300 and (back.obs["heldout"] == "held-out").sum() == 30
    assert back.uns["sf_mlflow"]["run_ids"]["analyze"] == analyze_id
    assert back.obsm["X_mggp"].shape == (300, 3) and back.varm["mggp_loadings"].shape[1] == 3
    np.testing.assert_allclose(back.obsm["X_mggp"], sf_mlflow.to_anndata(analyze_id).obsm["X_mggp"])
    assert list(back.uns["sf_mlflow"]["moran_i"].columns) == ["original_factor", "moran_i",
                                                              "spatial"]

    # a run of another stage, or an output that is not .h5ad: one line naming the fix
    assert main(["export", "--run-id", train_id, "-o", str(tmp_path / "other.h5ad")]) == 2
    assert "is a 'train' run, but an 'analyze' run ID is required" in user_error(
        capsys.readouterr().err)
    assert main(["export", "--run-id", analyze_id, "-o", str(tmp_path / "r.csv")]) == 2
    assert "must end in .h5ad" in user_error(capsys.readouterr().err)


def test_export_from_another_folder_names_the_store_and_never_creates_one(
        mlflow_store, tmp_path, monkeypatch, capsys):
    _, _, _, analyze_id = chain("pnmf", tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    capsys.readouterr()
    assert main(["export", "--run-id", analyze_id, "-o", "r.h5ad"]) == 2
    err = user_error(capsys.readouterr().err)
    assert f"no tracking store at {elsewhere / 'mlflow.db'}" in err and "--tracking-uri" in err
    assert list(elsewhere.iterdir()) == []          # no empty mlflow.db left behind
    assert main(["export", "--run-id", analyze_id, "-o", "r.h5ad",
                 "--tracking-uri", mlflow_store]) == 0
    assert ad.read_h5ad(elsewhere / "r.h5ad").uns["sf_mlflow"]["run_ids"]["analyze"] == analyze_id
    assert sorted(p.name for p in elsewhere.iterdir()) == ["r.h5ad"]
    adata = sf_mlflow.to_anndata(analyze_id, tracking_uri=mlflow_store)
    assert adata.uns["sf_mlflow"]["model"] == "pnmf"


def test_all_spots_puts_rows_back_in_data_order():
    from sf_mlflow.analysis.summary import all_spots

    held = np.array([False, True, False, False, True])
    out = all_spots(np.array([[0.0], [2.0], [3.0]]), np.array([[1.0], [4.0]]), held)
    np.testing.assert_array_equal(out[:, 0], [0, 1, 2, 3, 4])
    # nothing held out: no held-out rows needed
    np.testing.assert_array_equal(all_spots(np.ones((3, 2)), None, np.zeros(3, bool)),
                                  np.ones((3, 2)))
    with pytest.raises(ValueError, match="2 held-out spots but 0 held-out rows"):
        all_spots(np.ones((3, 1)), None, held)


def _export_in_a_child(store: str, run_id: str, out, *extra: str, max_file_bytes: int):
    """``export`` in a fresh process whose files may not grow past ``max_file_bytes``
    (RLIMIT_FSIZE: a write beyond it fails with EFBIG, as on a full disk)."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-m", "sf_mlflow.cli", "export", "--run-id", run_id,
                           "-o", str(out), *extra], env={**os.environ, "MLFLOW_TRACKING_URI": store},
                          preexec_fn=limited, capture_output=True, text=True, timeout=300)


def test_export_replaces_only_with_force_and_a_failed_write_leaves_the_target_as_it_was(
        mlflow_store, tmp_path, capsys):
    _, _, _, analyze_id = chain("pnmf", tmp_path)
    folder = tmp_path / "exports"
    folder.mkdir()
    out = folder / "results.h5ad"
    assert main(["export", "--run-id", analyze_id, "-o", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["export", "--run-id", analyze_id, "-o", str(out)]) == 2
    assert f"output '{out}' exists; pass --force to replace it" in user_error(capsys.readouterr().err)
    assert out.read_bytes() == before

    # the disk fills while the replacement is written: the old file stays, whole
    limit = len(before) // 2
    failed = _export_in_a_child(mlflow_store, analyze_id, out, "--force", max_file_bytes=limit)
    assert failed.returncode == 2, failed.stderr[-3000:]
    line = user_error(failed.stderr).strip()
    assert "\n" not in line and f"cannot write '{out}'" in line, line
    assert "the existing file is untouched" in line
    assert out.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["results.h5ad"]   # no partial file
    # a new target that cannot be written is not left behind half-written
    fresh = folder / "fresh.h5ad"
    failed = _export_in_a_child(mlflow_store, analyze_id, fresh, max_file_bytes=limit)
    assert failed.returncode == 2 and "nothing was written there" in user_error(failed.stderr)
    assert sorted(p.name for p in folder.iterdir()) == ["results.h5ad"]

    assert main(["export", "--run-id", analyze_id, "-o", str(out), "--force"]) == 0
    assert ad.read_h5ad(out).uns["sf_mlflow"]["run_ids"]["analyze"] == analyze_id
    assert sorted(p.name for p in folder.iterdir()) == ["results.h5ad"]
