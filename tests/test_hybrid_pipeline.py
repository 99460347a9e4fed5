"""The hybrid model (NSFH) through the pipeline: preprocess -> train -> analyze -> figures,
export, tune over K and the registered model, on a tiny generated data set with groups
against a real sqlite MLflow store (``sf_mlflow.cli.main`` in-process).

What a hybrid adds: analyze marks which factor is spatial (``spatial_factors.npy`` and the
``spatial`` column of ``moran_i.csv``, aligned with the Moran's I order), logs the GP facts
of its spatial part and each kind's mean Moran's I; figures title every panel "spatial" or
"non-spatial"; export carries the marking; a registered hybrid fitted with groups needs them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sf_mlflow.cli import main
from sf_mlflow.config import config_from_dict
from sf_mlflow.errors import ConfigError
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.stages import figures as figures_stage

# many small torch ops: one thread (see tests/conftest.py, one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

matplotlib.use("Agg")

L, K = 4, 2
HYBRID = {
    "name": "hybrid_pipeline",
    "seed": 2,
    "dataset": "synthetic",
    "output_dir": "outputs",
    "data": {"synthetic": {"n_spots": 200, "n_genes": 30, "n_components": 3, "n_groups": 2,
                           "mean_counts": 200, "lengthscale": 0.15}},
    "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.15,
                      "spatial_scale": 10.0},
    "model": {"n_components": L, "spatial_components": K, "prior": "SVGP", "groups": True,
              "num_inducing": 25, "lengthscale": 6.0},
    "training": {"max_iter": 12, "device": "cpu", "log_every": 12, "validation_every": 4,
                 "patience": 50},
    "analysis": {"group_loadings_iter": 5},
}


def runs_of(client, stage):
    exp = client.get_experiment_by_name(HYBRID["name"])
    return client.search_runs([exp.experiment_id], f"tags.`sf.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"])


def test_hybrid_through_analyze_figures_export_and_registry(mlflow_store, tmp_path, capsys):
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump(HYBRID))
    client = MlflowClient()
    assert main(["preprocess", "-c", str(path)]) == 0
    assert main(["train", "-c", str(path), "--register-as", "hybrid_model"]) == 0
    (train,) = runs_of(client, "train")
    assert train.data.tags["sf.model"] == "hybrid" and train.data.tags["sf.spatial_components"] == "2"
    # early stopping's held-out checks ran for the hybrid (every 4 iterations)
    assert [m.step for m in client.get_metric_history(train.info.run_id, "heldout_deviance")
            ] == [0, 4, 8, 12]      # 0: the start's check
    assert main(["analyze", "-c", str(path)]) == 0
    (an,) = runs_of(client, "analyze")
    a = Path(client.download_artifacts(an.info.run_id, "", str(tmp_path / "an")))

    # the marking, in the reported (Moran's I) order, in both artifacts and agreeing
    marking = np.load(a / "spatial_factors.npy")
    with open(a / "moran_i.csv") as fh:
        rows = list(csv.DictReader(fh))
    order = np.array([int(r["original_factor"]) for r in rows])
    assert marking.dtype == bool and marking.tolist() == (order < K).tolist()
    assert [int(r["spatial"]) for r in rows] == marking.astype(int).tolist()
    moran = np.array([float(r["moran_i"]) for r in rows])
    assert np.all(np.diff(moran) <= 0)

    # metrics: each kind's mean Moran's I and the spatial part's GP facts
    m = an.data.metrics
    assert m["n_spatial_factors"] == K
    assert m["moran_i_mean_spatial"] == pytest.approx(moran[marking].mean())
    assert m["moran_i_mean_nonspatial"] == pytest.approx(moran[~marking].mean())
    assert m["num_inducing"] == 25 and m["lengthscale"] == pytest.approx(6.0)
    assert "heldout_deviance" in m and np.isfinite(m["heldout_deviance"])

    # held-out rows: GP sd for the spatial factors, NaN for the others; factors finite
    held = np.array([r["heldout"] == "1" for r in csv.DictReader(open(a / "spots.csv"))])
    scales, factors = np.load(a / "scales.npy"), np.load(a / "factors.npy")
    assert held.any() and np.isfinite(factors).all()
    assert np.isfinite(scales[held][:, marking]).all() and (scales[held][:, marking] > 0).all()
    assert np.isnan(scales[held][:, ~marking]).all()
    # group-wise factors: only the spatial factors have a group-wise GP
    with np.load(a / "groupwise_factors.npz") as z:
        gw = z["factors"]
    assert gw.shape[:2] == (2, L)
    assert np.isfinite(gw[:, marking]).all() and np.isnan(gw[:, ~marking]).all()

    # the held-out factors are predict_at's: GP predictive / nearest training spots
    model = PNMF.load(client.download_artifacts(train.info.run_id, "model.pth", str(tmp_path / "t")))
    assert model.spatial_factors_.tolist() == [True] * K + [False] * (L - K)
    coords = np.load(client.download_artifacts(train.data.tags["sf.upstream_run_id"], "data/X.npy",
                                               str(tmp_path / "x")))
    codes = np.load(client.download_artifacts(train.data.tags["sf.upstream_run_id"],
                                              "data/C.npy", str(tmp_path / "g")))
    np.testing.assert_allclose(model.predict_at(coords[held], codes[held])[:, order], factors[held],
                               rtol=1e-6)

    # figures: every panel says which kind its factor is
    assert main(["figures", "-c", str(path), "--analyze-run-ids", an.info.run_id]) == 0
    (fig,) = runs_of(client, "figures")
    made = json.loads(Path(client.download_artifacts(fig.info.run_id, "figures.json",
                                                     str(tmp_path / "f"))).read_text())
    assert {"figures/factors_spatial.png", "figures/groupwise_factors.png"} <= set(made)
    lin = figures_stage.lineage(an.info.run_id)
    (loaded,) = figures_stage.load_all([lin])
    titles = loaded.titles()
    assert [t.split("\n")[0].endswith(", spatial") for t in titles] == marking.tolist()
    assert [t.split("\n")[0].endswith(", non-spatial") for t in titles] == (~marking).tolist()

    # export carries the marking
    from sf_mlflow.export import to_anndata

    adata = to_anndata(an.info.run_id)
    assert adata.uns["sf_mlflow"]["spatial_factors"].tolist() == marking.tolist()
    assert adata.obsm["X_hybrid"].shape[1] == L

    # the registered hybrid, fitted with groups, needs and uses them
    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model("models:/hybrid_model@latest")
    inputs = [c["name"] for c in pyfunc.metadata.get_input_schema().to_dict()]
    assert inputs == ["x", "y", "group"]
    example = pyfunc.input_example
    out = pyfunc.predict(example)
    assert list(out.columns) == [f"factor_{i}" for i in range(L)]
    assert np.isfinite(out.to_numpy()).all() and (out.to_numpy() > 0).all()
    # the spatial factors depend on the group (MGGP), the non-spatial ones do not
    other = example.copy()
    groups = json.loads(Path(client.download_artifacts(
        train.data.tags["sf.upstream_run_id"], "data/metadata.json",
        str(tmp_path / "p"))).read_text())["group_names"]
    other["group"] = [groups[1] if g == groups[0] else groups[0] for g in example["group"]]
    moved = pyfunc.predict(other).to_numpy()
    assert not np.allclose(moved[:, :K], out.to_numpy()[:, :K])
    np.testing.assert_allclose(moved[:, K:], out.to_numpy()[:, K:])
    with pytest.raises(Exception, match="group"):
        pyfunc.predict(example[["x", "y"]])
    version = client.get_model_version_by_alias("hybrid_model", "latest")
    assert "hybrid: 2 spatial factors (`factor_0`, `factor_1`)" in version.description


def test_tune_searches_the_number_of_spatial_factors(mlflow_store, tmp_path):
    raw = {**HYBRID, "name": "hybrid_tune",
           "training": {**HYBRID["training"], "max_iter": 6, "validation_every": 0},
           "tuning": {"n_trials": 2, "lengthscale": {"low": 2.0, "high": 20.0},
                      "num_inducing": {"low": 10, "high": 20},
                      "spatial_components": {"low": 0, "high": L}, "report_every": 3,
                      "sampler": "random", "register_as": "hybrid_tuned"}}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["preprocess", "-c", str(path)]) == 0
    assert main(["tune", "-c", str(path)]) == 0
    client = MlflowClient()
    exp = client.get_experiment_by_name("hybrid_tune")
    trials = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'train'")
    assert len(trials) == 2
    for t in trials:
        k = int(t.data.params["model.spatial_components"])
        assert 0 <= k <= L and t.data.tags["sf.spatial_components"] == str(k)
        assert t.data.tags["sf.model"] == "hybrid"
    # the best trial's hybrid is registered (its held-out check found by predict_at)
    best = client.get_model_version_by_alias("hybrid_tuned", "best")
    assert best.tags["sf.train_run_id"] in {t.info.run_id for t in trials}


def test_the_tuning_range_of_k_is_checked_against_n_components():
    with pytest.raises(ConfigError, match=r"run\.yaml: tuning\.spatial_components = \{low: 1, "
                                          r"high: 5\} is invalid: expected 0 <= low <= high <= "
                                          r"model\.n_components = 4"):
        config_from_dict({**HYBRID, "tuning": {"spatial_components": {"low": 1, "high": 5}}},
                         "run.yaml")
    with pytest.raises(ConfigError, match=r"tuning\.spatial_components = \{low: 2, high: None\}"):
        config_from_dict({**HYBRID, "tuning": {"spatial_components": {"low": 2}}}, "run.yaml")
    with pytest.raises(ConfigError, match=r"set its range in tuning\.spatial_components"):
        config_from_dict({**HYBRID, "tuning": {"search_space": {
            "model.spatial_components": {"type": "int", "low": 0, "high": 2}}}}, "run.yaml")


def test_the_hybrid_preset_makes_half_the_factors_spatial_rounded_up():
    cfg = config_from_dict({"model": {"n_components": 5}, "models": ["svgp", "hybrid"]}, "m.yaml")
    eff = cfg.model_configs()
    assert eff["hybrid"].model.spatial_components == 3 and eff["hybrid"].model.spatial
    assert eff["svgp"].model.spatial_components is None
    own = config_from_dict({"model": {"n_components": 5},
                            "models": {"hybrid": {"model": {"n_components": 6}}}}, "m.yaml")
    assert own.model_configs()["hybrid"].model.spatial_components == 3
    given = config_from_dict({"models": {"hybrid": {"model": {"spatial_components": 1}}}}, "m.yaml")
    assert given.model_configs()["hybrid"].model.spatial_components == 1
    # the YAML of the config says which K was fitted, and reads back the same
    again = config_from_dict(cfg.to_dict(), "again.yaml")
    assert again.model_configs()["hybrid"].digest() == eff["hybrid"].digest()


def test_main_and_the_report_describe_a_hybrid():
    from sf_mlflow.report import ModelResult, render_report
    from sf_mlflow.stages.main import describe_model

    cfg = config_from_dict(HYBRID, "h.yaml")
    text = describe_model(cfg)
    assert text.startswith("hybrid (NSFH): 2 spatial factors with the MGGP-SVGP prior "
                           "(with groups), M=25, lengthscale 6")
    used = describe_model(cfg, {"num_inducing": 31, "lengthscale_0": 4.5, "lengthscale_1": 7.25})
    assert "M=31, lengthscales 4.5-7.25 (one per factor)" in used   # what the fit used
    assert text.endswith("2 non-spatial with the Gaussian prior")
    metrics = {"n_spatial_factors": 2, "moran_i_mean_spatial": 0.61, "moran_i_mean_nonspatial": 0.04}
    page = render_report("r", [ModelResult("hybrid", text, metrics, {"train": "abc"}),
                               ModelResult("svgp", "SVGP", {"moran_i_mean": 0.5}, {})])
    assert ("hybrid: 2 spatial factors (GP prior), the others non-spatial (Gaussian prior); "
            "figure panels say which; mean Moran's I spatial 0.610, non-spatial 0.040.") in page
    assert page.count("spatial factors (GP prior)") == 1
