"""The model registry: train -> registered pyfunc model, loaded by alias in a fresh process.

Each test runs the real pipeline (preprocess -> train(register_as) -> analyze) on a tiny
generated data set against a sqlite MLflow store, then deletes everything but the
registry's copy of the model and loads ``models:/<name>@<alias>`` in a new Python
process. The predictions at the training spots' raw coordinates (and groups) must
reproduce the factors the analyze run logged.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sf_mlflow.models.neighbours import nearest_neighbour_log_factors
from sf_mlflow.cli import main
from sf_mlflow.config import config_from_dict
from sf_mlflow.data.sources import load_dataset
from sf_mlflow.models.pnmf import PNMF as PNMFModel
from sf_mlflow.stages.analyze import run_analyze
from sf_mlflow.stages.preprocess import run_preprocess
from sf_mlflow.stages.train import run_train
from sf_mlflow.tracking import download_artifacts, register_train_run

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "seed": 5,
    "dataset": "synthetic",
    "data": {"synthetic": {"n_spots": 240, "n_genes": 40, "n_components": 3, "n_groups": 2,
                           "mean_counts": 200}},
    "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1,
                      "spatial_scale": 10.0},
    "training": {"max_iter": 20, "device": "cpu", "log_every": 20},
}
SPATIAL = {**BASE, "name": "registry_svgp",
           "model": {"n_components": 3, "prior": "SVGP", "groups": True, "num_inducing": 30}}
PNMF = {**BASE, "name": "registry_pnmf", "model": {"n_components": 3, "prior": "Gaussian"}}

# Loads the models named in a JSON job file and predicts; run with a fresh interpreter
# in an empty working directory. Errors are recorded, not raised, so the test can check
# their messages. It also reports where the sf_mlflow code it ran came from.
LOADER = r'''
import json, sys
import numpy as np, pandas as pd
import mlflow.pyfunc

jobs = json.load(open(sys.argv[1]))
models, results = {}, {}
for job in jobs["calls"]:
    uri = job["uri"]
    if uri not in models:
        models[uri] = mlflow.pyfunc.load_model(uri)
    model = models[uri]
    frame = pd.DataFrame(job["frame"])
    try:
        out = model.predict(frame, params=job.get("params"))
        results[job["key"]] = {"columns": [str(c) for c in out.columns],
                               "values": out.to_numpy(dtype=float).tolist()}
    except Exception as e:
        results[job["key"]] = {"error": f"{type(e).__name__}: {e}"}
meta = {uri: {"inputs": [c["name"] for c in m.metadata.get_input_schema().to_dict()],
              "params": [p.name for p in m.metadata.get_params_schema().params]}
        for uri, m in models.items()}
code = sorted({getattr(m, "__file__", None) or "" for n, m in sys.modules.items()
               if n == "sf_mlflow" or n.startswith("sf_mlflow.")})
json.dump({"results": results, "schema": meta, "code": code}, open(sys.argv[2], "w"))
'''


def pipeline(raw, tmp_path, *, register_as=None, alias="latest", seed=None):
    """preprocess -> train(register_as) -> analyze; returns (config, pre_id, train_id, analyze_id)."""
    raw = {**raw, "output_dir": str(tmp_path / "outputs")}
    if seed is not None:
        raw["seed"] = seed
    cfg = config_from_dict(raw, f"{raw['name']}.yaml")
    pre_id = run_preprocess(cfg)
    train_id = run_train(cfg, pre_id, register_as=register_as, register_alias=alias)
    analyze_id = run_analyze(cfg, train_id)
    return cfg, pre_id, train_id, analyze_id


def analyzed_factors(analyze_id, dst):
    """analyze's factors of the training spots (N_train, L) put back into the model's own
    factor order, and loadings (D, L)."""
    folder = download_artifacts(analyze_id, "", dst)
    factors = np.load(folder / "factors.npy")           # (N, L) all spots, descending Moran's I
    with open(folder / "spots.csv") as fh:
        heldout = np.array([row["heldout"] == "1" for row in csv.DictReader(fh)])
    factors = factors[~heldout]
    loadings = np.load(folder / "loadings.npy")         # (D, L), same order
    with open(folder / "moran_i.csv") as fh:
        order = [int(row["original_factor"]) for row in csv.DictReader(fh)]
    model_f, model_w = np.empty_like(factors), np.empty_like(loadings)
    model_f[:, order] = factors                          # rank r holds model factor order[r]
    model_w[:, order] = loadings
    return model_f, model_w


def raw_spots(cfg, pre_id, dst):
    """Raw (original-unit) coordinates, group names and the preprocess metadata of the spots
    of a preprocess run, taken from the generated data set itself (not from the run)."""
    meta = json.loads(download_artifacts(pre_id, "data/metadata.json", dst).read_text())
    raw = load_dataset(cfg)
    where = {str(s): i for i, s in enumerate(raw.spot_names)}
    idx = np.array([where[s] for s in meta["spot_names"]])
    held = np.zeros(len(idx), dtype=bool)
    held[meta["split"]["heldout_indices"]] = True
    xy = np.asarray(raw.coordinates, dtype=np.float64)[idx]
    groups = np.asarray(raw.group_names, dtype=object)[np.asarray(raw.groups)[idx]]
    return xy, groups, held, meta


def local_dir(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def delete_all_but_registry(client, run_ids, output_dir):
    """Delete the runs' artifact folders and the local output_dir.

    MLflow 3 stores a logged model's files under ``<experiment root>/models/<model_id>/``,
    apart from the run's ``<experiment root>/<run_id>/artifacts``; a registered version's
    source is ``models:/<model_id>``. Deleting the run folders therefore removes model.pth,
    the preprocessed data and metadata.json everywhere except inside the logged model.
    """
    for run_id in run_ids:
        folder = local_dir(client.get_run(run_id).info.artifact_uri)
        assert folder.name == "artifacts" and folder.parent.name == run_id
        shutil.rmtree(folder.parent)
    shutil.rmtree(output_dir)


def load_in_fresh_process(tmp_path, uri, calls):
    """Run LOADER in a new interpreter, cwd an empty folder, with only the tracking URI."""
    fresh = tmp_path / "fresh"
    fresh.mkdir(exist_ok=True)
    (fresh / "loader.py").write_text(LOADER)
    (fresh / "jobs.json").write_text(json.dumps({"calls": calls}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "loader.py", "jobs.json", "out.json"], cwd=fresh,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((fresh / "out.json").read_text())
    # The package code came with the model (code_paths), not from this checkout.
    assert out["code"] and not [f for f in out["code"] if f.startswith(str(REPO))], out["code"]
    return out


def frame(xy, groups=None):
    cols = {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist()}
    if groups is not None:
        cols["group"] = [str(g) for g in groups]
    return cols


def result(out, key):
    r = out["results"][key]
    assert "error" not in r, r.get("error")
    return r["columns"], np.asarray(r["values"])


def test_spatial_model_with_groups_by_alias_in_fresh_process(mlflow_store, tmp_path):
    cfg, pre_id, train_id, analyze_id = pipeline(SPATIAL, tmp_path, register_as="svgp_model",
                                                 alias="champion")
    client = MlflowClient()
    run = client.get_run(train_id)
    assert run.data.tags["sf.registered_model"] == "svgp_model"
    assert run.data.tags["sf.registered_model_version"] == "1"
    mv = client.get_model_version_by_alias("svgp_model", "champion")
    assert str(mv.version) == "1" and mv.run_id == train_id

    # What the tune stage does: register an existing FINISHED train run (no pyfunc model
    # logged yet) under another alias; "champion" stays on version 1.
    cfg2 = config_from_dict({**SPATIAL, "output_dir": str(tmp_path / "outputs"),
                             "training": {**SPATIAL["training"], "max_iter": 5}}, "b.yaml")
    train2 = run_train(cfg2, pre_id)
    assert register_train_run(train2, "svgp_model", alias="best") == "2"
    assert str(client.get_model_version_by_alias("svgp_model", "best").version) == "2"
    assert str(client.get_model_version_by_alias("svgp_model", "champion").version) == "1"
    expected2 = PNMFModel.load(download_artifacts(train2, "model.pth", tmp_path / "m2")).get_factors()
    model1 = PNMFModel.load(download_artifacts(train_id, "model.pth", tmp_path / "m1"))

    expected, W = analyzed_factors(analyze_id, tmp_path / "expected")
    xy, groups, held, meta = raw_spots(cfg, pre_id, tmp_path / "meta")
    train_xy, train_groups = xy[~held], groups[~held]
    genes = [meta["gene_names"][3], meta["gene_names"][7]]
    names = sorted(set(groups))
    # the pyfunc model's factors at held-out spots are the model's predict_at there
    X_scaled = np.load(download_artifacts(pre_id, "data/X.npy", tmp_path / "scaled"))
    codes = np.array([meta["group_names"].index(g) for g in groups[held]])
    predicted = {em: model1.predict_at(X_scaled[held], groups=codes, exp_mean=em)
                 for em in (False, True)}

    delete_all_but_registry(client, [train_id, train2, pre_id], tmp_path / "outputs")
    uri = "models:/svgp_model@champion"
    out = load_in_fresh_process(tmp_path, mlflow_store, [
        {"key": "factors", "uri": uri, "frame": frame(train_xy, train_groups)},
        {"key": "best", "uri": "models:/svgp_model@best", "frame": frame(train_xy, train_groups)},
        {"key": "counts", "uri": uri, "frame": frame(train_xy, train_groups),
         "params": {"output": "expected_counts", "genes": genes}},
        {"key": "heldout", "uri": uri, "frame": frame(xy[held], groups[held])},
        {"key": "heldout_exp_mean", "uri": uri, "frame": frame(xy[held], groups[held]),
         "params": {"exp_mean": True}},
        {"key": "no_y", "uri": uri, "frame": {"x": [0.1], "group": [names[0]]}},
        {"key": "no_group", "uri": uri, "frame": {"x": [0.1], "y": [0.2]}},
        {"key": "bad_group", "uri": uri, "frame": {"x": [0.1, 0.2], "y": [0.2, 0.3],
                                                  "group": [names[0], "no_such_group"]}},
    ])

    columns, factors = result(out, "factors")
    assert columns == ["factor_0", "factor_1", "factor_2"]
    assert factors.shape == expected.shape == (int((~held).sum()), 3)
    # float32 GP arithmetic on the same float32 inputs as analyze's: equal up to rounding
    np.testing.assert_allclose(factors, expected, rtol=1e-6, atol=0)
    np.testing.assert_allclose(result(out, "best")[1], expected2, rtol=1e-6, atol=0)
    assert not np.allclose(expected, expected2)
    np.testing.assert_allclose(result(out, "heldout")[1], predicted[False], rtol=1e-6, atol=0)
    np.testing.assert_allclose(result(out, "heldout_exp_mean")[1], predicted[True], rtol=1e-6, atol=0)

    columns, counts = result(out, "counts")
    assert columns == genes
    idx = [meta["gene_names"].index(g) for g in genes]
    np.testing.assert_allclose(counts, factors @ W[idx].T, rtol=1e-10)

    assert "missing inputs ['y']" in out["results"]["no_y"]["error"]
    assert "missing inputs ['group']" in out["results"]["no_group"]["error"]
    err = out["results"]["bad_group"]["error"]
    assert "no_such_group" in err and all(n in err for n in names), err
    schema = out["schema"][uri]
    assert schema["inputs"] == ["x", "y", "group"]
    assert {"output", "genes", "coordinates", "neighbours", "exp_mean"} <= set(schema["params"])


def test_non_spatial_model_and_alias_moves(mlflow_store, tmp_path):
    cfg, pre_id, train_a, analyze_a = pipeline(PNMF, tmp_path, register_as="pnmf_model",
                                               alias="champion")
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("pnmf_model", "champion").version) == "1"

    # A second train run, not registered by the stage: register_train_run logs its
    # pyfunc model first, makes version 2 and moves the alias there.
    cfg_b = config_from_dict({**PNMF, "output_dir": str(tmp_path / "outputs"),
                              "training": {**PNMF["training"], "max_iter": 35}}, "b.yaml")
    train_b = run_train(cfg_b, pre_id)
    assert "sf.registered_model" not in client.get_run(train_b).data.tags
    analyze_b = run_analyze(cfg_b, train_b)
    assert register_train_run(train_b, "pnmf_model", alias="champion") == "2"
    assert str(client.get_model_version_by_alias("pnmf_model", "champion").version) == "2"
    assert client.get_run(train_b).data.tags["sf.registered_model_version"] == "2"
    # registering the same run again reuses its logged model: a new version, same source
    assert register_train_run(train_b, "pnmf_model") == "3"
    v2, v3 = (client.get_model_version("pnmf_model", v) for v in ("2", "3"))
    assert v2.source == v3.source and v2.source.startswith("models:/")
    assert str(client.get_model_version_by_alias("pnmf_model", "champion").version) == "2"

    expected_a, _ = analyzed_factors(analyze_a, tmp_path / "expected_a")
    expected_b, W_b = analyzed_factors(analyze_b, tmp_path / "expected_b")
    xy, groups, held, meta = raw_spots(cfg, pre_id, tmp_path / "meta")
    pre_dir = download_artifacts(pre_id, "data/X.npy", tmp_path / "scaled")
    X_scaled = np.load(pre_dir)
    # the pyfunc model's factors at held-out spots are the model's predict_at there
    model_b = PNMFModel.load(download_artifacts(train_b, "model.pth", tmp_path / "mb"))
    k = cfg.analysis.moran_k
    predicted = {em: model_b.predict_at(X_scaled[held], neighbours=k, exp_mean=em)
                 for em in (False, True)}

    delete_all_but_registry(client, [train_a, train_b, pre_id], tmp_path / "outputs")
    one = {"neighbours": 1}
    out = load_in_fresh_process(tmp_path, mlflow_store, [
        # non-spatial: the nearest training spot of a training spot is itself
        {"key": "b", "uri": "models:/pnmf_model@champion", "frame": frame(xy[~held]),
         "params": one},
        {"key": "latest", "uri": "models:/pnmf_model@latest", "frame": frame(xy[~held]),
         "params": one},
        {"key": "a", "uri": "models:/pnmf_model/1", "frame": frame(xy[~held]), "params": one},
        # already-scaled coordinates, and a group column the model ignores
        {"key": "scaled", "uri": "models:/pnmf_model/1", "frame": frame(X_scaled[~held], groups[~held]),
         "params": {**one, "coordinates": "scaled"}},
        # default k: analyze's held-out prediction
        {"key": "heldout", "uri": "models:/pnmf_model@champion", "frame": frame(xy[held])},
        {"key": "heldout_exp_mean", "uri": "models:/pnmf_model@champion", "frame": frame(xy[held]),
         "params": {"exp_mean": True}},
        {"key": "counts", "uri": "models:/pnmf_model@champion", "frame": frame(xy[held]),
         "params": {"output": "expected_counts"}},
        {"key": "bad_gene", "uri": "models:/pnmf_model@champion", "frame": frame(xy[held]),
         "params": {"output": "expected_counts", "genes": ["no_such_gene"]}},
        {"key": "no_x", "uri": "models:/pnmf_model@champion", "frame": {"y": [0.0]}},
    ])
    np.testing.assert_allclose(result(out, "b")[1], expected_b, rtol=1e-10)
    np.testing.assert_allclose(result(out, "latest")[1], expected_b, rtol=1e-10)
    np.testing.assert_allclose(result(out, "a")[1], expected_a, rtol=1e-10)
    np.testing.assert_allclose(result(out, "scaled")[1], expected_a, rtol=1e-10)
    assert not np.allclose(expected_a, expected_b)  # the alias really points elsewhere

    want = np.exp(nearest_neighbour_log_factors(X_scaled[~held], np.log(expected_b),
                                                X_scaled[held], k=k))
    _, heldout = result(out, "heldout")
    np.testing.assert_allclose(heldout, want, rtol=1e-8)
    np.testing.assert_allclose(heldout, predicted[False], rtol=1e-12)
    np.testing.assert_allclose(result(out, "heldout_exp_mean")[1], predicted[True], rtol=1e-12)
    columns, counts = result(out, "counts")
    assert columns == meta["gene_names"]
    np.testing.assert_allclose(counts, heldout @ W_b.T, rtol=1e-10)
    assert "no_such_gene" in out["results"]["bad_gene"]["error"]
    assert "missing inputs ['x']" in out["results"]["no_x"]["error"]
    assert out["schema"]["models:/pnmf_model@champion"]["inputs"] == ["x", "y"]


def test_cli_registration_and_bad_run_ids(mlflow_store, tmp_path):
    from sf_mlflow.errors import ModelError, RunLookupError

    with pytest.raises(RunLookupError, match="does not exist"):
        register_train_run("0123456789abcdef", "m")
    cfg = config_from_dict({**PNMF, "output_dir": str(tmp_path / "outputs"),
                            "training": {**PNMF["training"], "max_iter": 5}}, "c.yaml")
    pre_id = run_preprocess(cfg)
    with pytest.raises(RunLookupError, match="'train' run ID is required"):
        register_train_run(pre_id, "m")
    # the CLI flags (the MLproject's register_as / register_alias params end up here)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**PNMF, "output_dir": str(tmp_path / "outputs"),
                                    "training": {**PNMF["training"], "max_iter": 5}}))
    assert main(["train", "-c", str(path), "--preprocess-run-id", pre_id,
                 "--register-as", "cli_model", "--register-alias", "staging"]) == 0
    client = MlflowClient()
    mv = client.get_model_version_by_alias("cli_model", "staging")
    train_id = mv.run_id
    tags = client.get_run(train_id).data.tags
    assert tags["sf.registered_model"] == "cli_model" and tags["sf.registered_model_version"] == "1"
    assert tags["sf.pyfunc_model_id"] in mv.source
    with pytest.raises(ModelError, match="name is empty"):
        register_train_run(train_id, " ")
    # without --register-as nothing is registered
    assert main(["train", "-c", str(path), "--preprocess-run-id", pre_id]) == 0
    assert [m.name for m in client.search_registered_models()] == ["cli_model"]
