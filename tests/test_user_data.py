"""A user's own data, start to finish (issue 21): an h5ad as a lab would have it --
coordinates in micrometres, raw counts in a ``counts`` layer beside log-normalised ``X``,
cell-type labels, and a region of low expression -- through the stages a newcomer runs.

Real files, a real sqlite MLflow store in a temp dir, the CLI's own entry point.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml

from sf_mlflow.cli import main
from sf_mlflow.data.preprocess import auto_min_counts

#: Spots left of this x (micrometres) are sequenced four times shallower than the rest.
LOW_REGION_X = 600.0


def user_h5ad(path: Path, n_spots: int = 500, n_genes: int = 80, seed: int = 0) -> Path:
    """The user's file: 2 x 2 mm of tissue, 3 cell types, depth ~70 in the low region and
    ~280 elsewhere; ``X`` log-normalised, the raw counts in ``layers["counts"]``."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.0, 2000.0, size=(n_spots, 2))
    cell_type = rng.integers(0, 3, size=n_spots)
    profile = rng.gamma(1.0, 1.0, size=(3, n_genes))
    profile /= profile.sum(axis=1, keepdims=True)
    depth = np.where(xy[:, 0] < LOW_REGION_X, 70.0, 280.0)
    counts = rng.poisson(depth[:, None] * profile[cell_type]).astype(np.float32)
    lognorm = np.log1p(1e4 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1))
    adata = ad.AnnData(
        X=sp.csr_matrix(lognorm),
        obs=pd.DataFrame({"cell_type": pd.Categorical([f"type_{c}" for c in cell_type])},
                         index=[f"spot{i}" for i in range(n_spots)]),
        var=pd.DataFrame(index=[f"Gene{j}" for j in range(n_genes)]))
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.obsm["spatial"] = xy
    adata.write_h5ad(path)
    return path


def user_config(tmp_path: Path, **preprocessing) -> Path:
    """What a newcomer writes after reading the README: the file, its layer and labels."""
    raw = {"name": "my_tissue", "dataset": "h5ad",
           "data": {"path": str(user_h5ad(tmp_path / "my_tissue.h5ad")), "layer": "counts",
                    "group_key": "cell_type"},
           "model": {"n_components": 3}}
    if preprocessing:
        raw["preprocessing"] = preprocessing
    path = tmp_path / "my_tissue.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def qc_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[preprocess] ")]


def test_qc_at_the_defaults_keeps_the_low_expression_region_and_says_what_each_filter_did(
        mlflow_store, tmp_path, capsys):
    path = user_config(tmp_path)
    assert main(["preprocess", "-c", str(path)]) == 0
    lines = qc_lines(capsys.readouterr().out)
    adata = ad.read_h5ad(tmp_path / "my_tissue.h5ad")
    threshold = auto_min_counts(np.asarray(adata.layers["counts"].sum(axis=1)).ravel())
    assert 15 <= threshold <= 30  # 10 % of a median depth near 250
    min_counts = [line for line in lines if "min_counts = " in line]
    assert min_counts == [f"[preprocess] min_counts = auto ({threshold}) = 10 % of the median "
                          "spot total: removed 0 of 500 spots (0.0 %)"]
    assert any(line.startswith("[preprocess] min_cells = auto (5): removed ") for line in lines)
    assert any(line.startswith("[preprocess] max_mt_fraction = 0.2: removed 0 of 500 spots")
               for line in lines)
    assert not [line for line in lines if "warning" in line]
    assert "[preprocess] kept 500 spots x 80 genes" in "\n".join(lines)


def test_a_filter_that_cuts_a_region_out_warns_and_names_the_setting(mlflow_store, tmp_path,
                                                                     capsys):
    path = user_config(tmp_path, min_counts=100)   # the old default
    assert main(["preprocess", "-c", str(path)]) == 0
    lines = qc_lines(capsys.readouterr().out)
    adata = ad.read_h5ad(tmp_path / "my_tissue.h5ad")
    totals = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
    removed = int((totals < 100).sum())
    in_region = int(((totals < 100) & (adata.obsm["spatial"][:, 0] < LOW_REGION_X)).sum())
    assert removed > 0.25 * 500 and in_region >= 0.95 * removed   # the region's spots go
    share = f"{100 * removed / 500:.1f} %"
    assert f"[preprocess] min_counts = 100: removed {removed} of 500 spots ({share})" in lines
    (warning,) = [line for line in lines if "warning" in line]
    assert warning == (f"[preprocess] warning: preprocessing.min_counts = 100 removed {removed} "
                       f"of 500 spots ({share}), leaving holes in the maps; lower "
                       "preprocessing.min_counts (auto = 10 % of the median spot total), or set "
                       "it to 0 to keep every spot")


def test_show_config_lists_every_default_used_and_where_each_value_came_from(tmp_path, capsys):
    path = user_config(tmp_path)
    assert main(["show-config", "-c", str(path), "--set", "model.n_components=4"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line and not line.startswith(("#", "models:"))}
    assert rows["preprocessing.min_counts"] == ["auto", "default"]
    assert rows["preprocessing.min_cells"] == ["auto", "default"]
    assert rows["preprocessing.holdout_fraction"] == ["0.05", "default"]
    assert rows["data.layer"] == ["counts", "file"]
    assert rows["data.group_key"] == ["cell_type", "file"]
    assert rows["model.n_components"] == ["4", "--set"]
    assert rows["training.time_budget"] == ["null", "default"]
    from sf_mlflow.config_reference import settings

    assert set(rows) == {s.key for s in settings()}   # every key, none left out


# ---- repeated gene names (issue 22) --------------------------------------------------------

def _with_repeated_genes(tmp_path: Path) -> tuple[Path, list[str]]:
    """The user's file with Gene1 renamed Gene0 and Gene6, Gene7 renamed Gene5 (as two
    probes of one gene often are), and the names anndata's make_unique gives them."""
    path = user_h5ad(tmp_path / "my_tissue.h5ad")
    adata = ad.read_h5ad(path)
    names = list(adata.var_names)
    names[1], names[6], names[7] = "Gene0", "Gene5", "Gene5"
    adata.var_names = names
    adata.write_h5ad(path)
    unique = adata.copy()
    unique.var_names_make_unique()
    return path, list(unique.var_names)


def test_repeated_gene_names_are_refused_in_one_line_naming_them_and_the_setting(
        mlflow_store, tmp_path, capsys):
    path = user_config(tmp_path)
    _with_repeated_genes(tmp_path)
    assert main(["preprocess", "-c", str(path)]) != 0
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if " INFO mlflow." not in line]      # MLflow's own lines on creating the store
    assert len(err) == 1, err
    assert ("2 gene names occur more than once ('Gene0' x2, 'Gene5' x3)" in err[0]
            and "data.make_unique: true" in err[0]), err[0]


def test_make_unique_gives_the_model_one_loading_and_one_predicted_column_per_gene(
        mlflow_store, tmp_path):
    import mlflow.pyfunc

    path = user_config(tmp_path)
    _, unique = _with_repeated_genes(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["make_unique"] = True
    raw["model"] = {"n_components": 3, "prior": "Gaussian"}
    raw["training"] = {"max_iter": 30}
    path.write_text(yaml.safe_dump(raw))
    assert main(["preprocess", "-c", str(path)]) == 0
    assert main(["train", "-c", str(path), "--register-as", "repeats"]) == 0
    model = mlflow.pyfunc.load_model("models:/repeats/1")
    spots = model.input_example
    counts = model.predict(spots, params={"output": "expected_counts"})
    assert counts.shape == (len(spots), 80)
    assert list(counts.columns) == [g for g in unique]   # every gene, in the file's order
    assert {"Gene0", "Gene0-1", "Gene5", "Gene5-1", "Gene5-2"} <= set(counts.columns)
    picked = model.predict(spots, params={"output": "expected_counts",
                                          "genes": ["Gene5-2", "Gene0"]})
    np.testing.assert_array_equal(picked.to_numpy(), counts[["Gene5-2", "Gene0"]].to_numpy())
    assert not np.allclose(counts["Gene0"], counts["Gene0-1"])   # two genes, two loadings


def test_a_model_registered_with_repeated_names_answers_by_position_and_refuses_the_name():
    """Models registered before repeated names were refused still predict every gene (by
    position); asking for a repeated name is an error, not the last repeat's loadings."""
    import pytest

    from sf_mlflow.analysis.predictor import FactorPredictor, prediction_info
    from sf_mlflow.errors import DataError
    from sf_mlflow.models.pnmf import PNMF

    rng = np.random.default_rng(0)
    Y = rng.poisson(3.0, size=(60, 4)).astype(float)
    xy = rng.uniform(0, 10, size=(60, 2))
    model = PNMF(2, max_iter=20, tol=0).fit(Y, coordinates=xy)
    metadata = {"gene_names": ["a", "b", "a", "c"],
                "coordinate_transform": {"center": [0.0, 0.0], "scale": 1.0}}
    info = prediction_info(model, metadata, model_kind="pnmf", neighbours=3)
    predictor = FactorPredictor(model, info)
    spots = pd.DataFrame({"x": xy[:5, 0], "y": xy[:5, 1]})
    every = predictor.predict(spots, {"output": "expected_counts"})
    assert list(every.columns) == ["a", "b", "a", "c"]
    F = predictor.predict(spots).to_numpy()
    np.testing.assert_allclose(every.to_numpy(), F @ model.loadings_.T)
    with pytest.raises(DataError, match=r"\['a'\] name\(s\) several genes .*rows \[\[0, 2\]\]"):
        predictor.predict(spots, {"output": "expected_counts", "genes": ["a"]})
    assert list(predictor.predict(spots, {"output": "expected_counts", "genes": "c"}).columns) == ["c"]


def test_spots_all_at_one_position_warn_at_preprocess_and_a_spatial_fit_is_refused(
        mlflow_store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    path = user_config(tmp_path)
    adata = ad.read_h5ad(tmp_path / "my_tissue.h5ad")
    adata.obsm["spatial"] = np.zeros((adata.n_obs, 2))    # e.g. the wrong obsm key's zeros
    adata.write_h5ad(tmp_path / "my_tissue.h5ad")
    assert main(["preprocess", "-c", str(path)]) == 0
    assert any("lie at 1 distinct position(s)" in line
               for line in qc_lines(capsys.readouterr().out))
    assert main(["train", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert ("the training spots lie at 1 distinct position(s); a spatial model needs at least 7 "
            "(analysis.moran_k + 1): check data.coordinates_key, or set model.prior: Gaussian"
            ) in err
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.data.tags["sf.stage"] for r in runs] == ["preprocess"]   # no train run opened
