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
