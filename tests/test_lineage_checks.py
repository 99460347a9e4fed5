"""Lineage you can trust: an upstream run named by ID must hold the config's data and
settings, and what would fail after a long fit is refused before the run is opened.

Every test runs the CLI in-process against a real sqlite MLflow store and checks the
one-line error, the exit code 2 and that no run (or output folder) was left behind.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sf_mlflow.cli import main
from sf_mlflow.stages._common import group_file_names, preprocess_hash, safe_name
from sf_mlflow.config import load_config

BASE = {
    "name": "lineage_checks",
    "seed": 1,
    "dataset": "synthetic",
    "output_dir": "outputs",
    "data": {"synthetic": {"n_spots": 120, "n_genes": 30, "n_components": 2, "n_groups": 2,
                           "mean_counts": 200}},
    "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1,
                      "spatial_scale": 10.0},
    "model": {"n_components": 2, "prior": "Gaussian"},
    "training": {"max_iter": 5, "device": "cpu", "log_every": 5},
    "analysis": {"group_loadings_iter": 5},
}


def write(tmp_path: Path, raw: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err[err.index("error: "):].strip()
    assert "\n" not in line, line
    return line


def runs(stage: str | None = None) -> list:
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(exps) if exps else []
    return [r for r in found if stage is None or r.data.tags.get("sf.stage") == stage]


def only_run(stage: str) -> str:
    (run,) = runs(stage)
    return run.info.run_id


def write_h5ad(path: Path, n_spots: int, n_genes: int = 20, groups=("a", "b"), seed: int = 0):
    """A small AnnData of Poisson counts with 2-D positions and group labels in obs['ct']."""
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"ct": [groups[i % len(groups)] for i in range(n_spots)]},
                       index=[f"s{i}" for i in range(n_spots)])
    adata = ad.AnnData(X=rng.poisson(20, (n_spots, n_genes)).astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    adata.obsm["spatial"] = rng.uniform(0, 100, (n_spots, 2))
    adata.write_h5ad(path)
    return path


H5AD_PRE = {"min_counts": 0, "min_cells": 0, "holdout_fraction": 0.0, "filter_mt": False,
            "spatial_scale": 10.0}


def h5ad_config(path: Path, **extra) -> dict:
    return {**BASE, "dataset": "h5ad", "preprocessing": H5AD_PRE,
            "data": {"path": str(path), "group_key": "ct"}, **extra}


# ---- 1. an upstream run of other data or settings is refused --------------------------------

def test_train_refuses_a_preprocess_run_of_other_data(mlflow_store, tmp_path, capsys):
    """The old bug: train FINISHED on the other run's data, tagged with this config's."""
    path = write(tmp_path, BASE)
    assert main(["preprocess", "-c", str(path)]) == 0
    mine = only_run("preprocess")
    assert main(["preprocess", "-c", str(path), "--set", "data.synthetic.n_spots=90"]) == 0
    (other,) = [r.info.run_id for r in runs("preprocess") if r.info.run_id != mine]
    other_cfg = load_config(path, overrides=["data.synthetic.n_spots=90"])
    here, there = preprocess_hash(load_config(path)), preprocess_hash(other_cfg)
    capsys.readouterr()

    assert main(["train", "-c", str(path), "--preprocess-run-id", other]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: preprocess run {other} does not match {path}: ")
    assert f"sf.preprocess_hash is '{there}' there, '{here}' here" in err
    assert "sf.dataset" not in err  # same data set: only the differing key is named
    assert "omit --preprocess-run-id" in err
    assert runs("train") == []

    # the reverse direction: the config says 90 spots, the run holds the 120
    assert main(["train", "-c", str(path), "--set", "data.synthetic.n_spots=90",
                 "--preprocess-run-id", mine]) == 2
    assert f"sf.preprocess_hash is '{here}' there, '{there}' here" in one_line_error(capsys)
    assert runs("train") == []

    # the matching run is accepted, and its tags describe it
    assert main(["train", "-c", str(path), "--preprocess-run-id", mine]) == 0
    tags = runs("train")[0].data.tags
    assert tags["sf.upstream_run_id"] == mine and tags["sf.preprocess_hash"] == here


def test_train_refuses_a_preprocess_run_of_another_dataset(mlflow_store, tmp_path, capsys):
    h5 = write_h5ad(tmp_path / "small.h5ad", 40)
    assert main(["preprocess", "-c", str(write(tmp_path, h5ad_config(h5), "h5.yaml"))]) == 0
    other = only_run("preprocess")
    path = write(tmp_path, BASE)
    capsys.readouterr()
    assert main(["train", "-c", str(path), "--preprocess-run-id", other]) == 2
    err = one_line_error(capsys)
    assert "sf.dataset is 'h5ad' there, 'synthetic' here; sf.preprocess_hash is" in err
    assert runs("train") == []


def test_analyze_and_figures_refuse_runs_of_other_settings(mlflow_store, tmp_path, capsys):
    path = write(tmp_path, BASE)
    assert main(["preprocess", "-c", str(path)]) == 0
    assert main(["train", "-c", str(path), "--set", "training.max_iter=4"]) == 0
    other_train = only_run("train")
    capsys.readouterr()
    # analyze: the train run was fitted with other training settings than the config's
    assert main(["analyze", "-c", str(path), "--train-run-id", other_train]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: train run {other_train} does not match {path}: "
                          "sf.stage_hash (the seed, model and training settings) is ")
    assert "omit --train-run-id" in err
    assert runs("analyze") == []

    # figures: an analyze run of other preprocessing settings (its data, not its model)
    assert main(["analyze", "-c", str(path), "--set", "training.max_iter=4",
                 "--train-run-id", other_train]) == 0
    analyze_id = only_run("analyze")
    capsys.readouterr()
    assert main(["figures", "-c", str(path), "--set", "preprocessing.min_counts=6",
                 "--analyze-run-ids", analyze_id]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: analyze run {analyze_id} (its preprocess run ")
    assert "sf.preprocess_hash is" in err and "omit --analyze-run-ids" in err
    assert runs("figures") == []


def test_analyze_checks_the_data_a_train_run_read(mlflow_store, tmp_path, capsys):
    """A train run tagged with this config but fitted on another preprocess run (as the old
    bug made them) is refused by analyze, also when the automatic lookup picks it."""
    path = write(tmp_path, BASE)
    assert main(["preprocess", "-c", str(path), "--set", "data.synthetic.n_spots=90"]) == 0
    other = only_run("preprocess")
    assert main(["preprocess", "-c", str(path)]) == 0
    assert main(["train", "-c", str(path)]) == 0
    train_id = only_run("train")
    MlflowClient().set_tag(train_id, "sf.upstream_run_id", other)  # what the old bug recorded
    capsys.readouterr()
    for extra in ([], ["--train-run-id", train_id]):
        assert main(["analyze", "-c", str(path), *extra]) == 2
        err = one_line_error(capsys)
        assert err.startswith(f"error: train run {train_id} (its preprocess run {other}) does "
                              f"not match {path}: sf.preprocess_hash is ")
    assert runs("analyze") == []


# ---- 2. checks before the long fit ------------------------------------------------------------

def test_bad_registered_name_is_refused_before_the_fit(mlflow_store, tmp_path, capsys):
    path = write(tmp_path, BASE)
    assert main(["preprocess", "-c", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", "-c", str(path), "--register-as", "a/b"]) == 2
    err = one_line_error(capsys)
    assert err == ("error: --register-as 'a/b': MLflow refuses registered model names containing "
                   "'/'; choose a name such as 'sf_quickstart' (letters, digits, '_', '-', '.')")
    assert main(["train", "-c", str(path), "--register-as", "ok", "--register-alias", "v2"]) == 2
    assert "reserved by MLflow for versions" in one_line_error(capsys)
    assert runs("train") == []
    assert not (tmp_path / "outputs" / "train").exists()


def test_failed_registration_leaves_no_complete_output(mlflow_store, tmp_path, monkeypatch):
    """A registry that cannot be written: the run ends FAILED, no final output folder."""
    from sf_mlflow.config import load_config as load
    from sf_mlflow.stages.preprocess import run_preprocess
    from sf_mlflow.stages.train import run_train

    cfg = load(write(tmp_path, BASE))
    run_preprocess(cfg)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{blocker / 'registry.db'}")
    with pytest.raises(OSError) as failed:  # the registry's sqlite file cannot be made
        run_train(cfg, register_as="fine_name")
    assert "register_fitted_model" in "".join(traceback.format_tb(failed.tb))
    (train,) = runs("train")
    assert train.info.status == "FAILED" and "elbo" in train.data.metrics  # fitted, then failed
    folder = tmp_path / "outputs" / "train"
    assert not folder.exists() or list(folder.iterdir()) == []  # no final, no .partial


def test_checks_of_output_dir_spots_and_inducing(mlflow_store, tmp_path, capsys):
    path = write(tmp_path, BASE)
    assert main(["preprocess", "-c", str(path)]) == 0
    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    assert main(["train", "-c", str(path), "--set", "output_dir=afile/out"]) == 2
    assert "output_dir 'afile/out' cannot be written" in one_line_error(capsys)

    assert main(["train", "-c", str(path), "--set", "analysis.moran_k=500"]) == 2
    err = one_line_error(capsys)
    assert "training spots, fewer than analysis.moran_k + 1 = 501" in err

    assert main(["train", "-c", str(path), "--set", "model.prior=SVGP", "--set",
                 "model.groups=false", "--set", "model.num_inducing=5000"]) == 2
    err = one_line_error(capsys)
    assert "model.num_inducing = 5000 exceeds the" in err and "distinct training spot" in err
    assert runs("train") == []
    assert not (tmp_path / "outputs" / "train").exists()


def test_preprocess_refuses_fewer_spots_than_moran_needs(mlflow_store, tmp_path, capsys):
    """The old bug: one spot left passed preprocess and train and failed only in analyze."""
    h5 = write_h5ad(tmp_path / "tiny.h5ad", 6)
    path = write(tmp_path, h5ad_config(h5))
    assert main(["preprocess", "-c", str(path)]) == 2
    err = one_line_error(capsys)
    assert ("kept 6 of 6 spots (0 held out), leaving 6 training spots, fewer than the 7 the "
            "analysis needs (analysis.moran_k + 1)") in err
    assert "preprocessing.min_counts = 0" in err and "holdout_fraction = 0" in err
    assert main(["preprocess", "-c", str(path), "--set", "analysis.moran_k=5"]) == 0


# ---- 3. an empty AnnData ----------------------------------------------------------------------

@pytest.mark.parametrize("shape,says", [((0, 5), "no spots (0 obs)"), ((5, 0), "no genes (0 vars)")])
def test_empty_h5ad_says_it_is_empty(mlflow_store, tmp_path, capsys, shape, says):
    n, d = shape
    adata = ad.AnnData(X=np.zeros(shape, dtype=np.float32),
                       obs=pd.DataFrame({"ct": ["a"] * n}, index=[f"s{i}" for i in range(n)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(d)]))
    adata.obsm["spatial"] = np.zeros((n, 2))
    adata.write_h5ad(tmp_path / "empty.h5ad")
    path = write(tmp_path, h5ad_config(tmp_path / "empty.h5ad"))
    assert main(["preprocess", "-c", str(path)]) == 2
    err = one_line_error(capsys)
    assert says in err and "empty AnnData" in err and "group" not in err


# ---- 4. figures checks its run IDs before opening a run ---------------------------------------

def test_figures_refuses_a_wrong_stage_id_without_a_run(mlflow_store, tmp_path, capsys):
    path = write(tmp_path, BASE)
    assert main(["preprocess", "-c", str(path)]) == 0
    pre = only_run("preprocess")
    capsys.readouterr()
    assert main(["figures", "-c", str(path), "--analyze-run-ids", pre]) == 2
    err = one_line_error(capsys)
    assert f"'{pre}' is a 'preprocess' run" in err and "'analyze' run ID is required" in err
    assert runs("figures") == []


# ---- 5. group names that sanitise alike -------------------------------------------------------

def test_group_file_names_are_distinct_and_stable():
    names = ["L2/3", "L2_3", "Astro", "L2 3"]
    files = group_file_names(names)
    assert len(set(files)) == 4
    assert files[2] == "Astro"  # no clash: the plain safe name, as before
    # a clash spells out what the file name would drop, so each file says whose it is
    assert files == ["L2_slash_3", "L2_3", "Astro", "L2_space_3"]
    assert group_file_names(names) == files
    # names that still coincide once spelled out get a suffix from their own name
    odd = group_file_names(["a/b", "a_slash_b", "a_b"])
    assert len(set(odd)) == 3 and odd[2] == "a_b" and all(o.startswith("a_slash_b_")
                                                           for o in odd[:2])
    assert group_file_names(["L2/3", "Astro"]) == ["L2_3", "Astro"]


def test_analyze_keeps_both_groups_loadings(mlflow_store, tmp_path):
    """``L2/3`` and ``L2_3``: two loadings_group files, read back by the figures stage."""
    from sf_mlflow.stages.figures import lineage, load_analysis

    h5 = write_h5ad(tmp_path / "groups.h5ad", 60, groups=("L2/3", "L2_3"))
    path = write(tmp_path, h5ad_config(h5))
    for stage in ("preprocess", "train", "analyze"):
        assert main([stage, "-c", str(path)]) == 0
    analyze_id = only_run("analyze")
    arts = {a.path for a in MlflowClient().list_artifacts(analyze_id)}
    files = group_file_names(["L2/3", "L2_3"])
    assert {f"loadings_group_{f}.npy" for f in files} <= arts
    local = Path(MlflowClient().download_artifacts(analyze_id, "", str(tmp_path / "a")))
    w = [np.load(local / f"loadings_group_{f}.npy") for f in files]
    assert not np.allclose(w[0], w[1])  # neither overwrote the other
    an = load_analysis(lineage(analyze_id), tmp_path / "fig")
    assert an.lfc is not None and an.lfc.shape[0] == 2
