"""The preprocess and train stages in-process against a real sqlite MLflow store.

Covers what each stage logs, upstream-run lookup, and every bad input of the
foundation issue: one readable error line, the run ended FAILED (never RUNNING),
and no artifacts presented as a result.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from mlflow.tracking import MlflowClient

from sf_mlflow.cli import main
from sf_mlflow.config import config_from_dict
from sf_mlflow.stages.preprocess import run_preprocess
from sf_mlflow.stages.train import run_train

SMALL = {
    "name": "stage_tests",
    "seed": 3,
    "dataset": "synthetic",
    "data": {"synthetic": {"n_spots": 300, "n_genes": 60, "n_components": 3, "n_groups": 2,
                           "mean_counts": 200}},
    "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1,
                      "spatial_scale": 10.0},
    "model": {"n_components": 3, "prior": "Gaussian"},
    "training": {"max_iter": 40, "device": "cpu", "log_every": 20},
}


def write_config(tmp_path, raw, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def user_error(stderr: str) -> str:
    """The CLI's error message (MLflow may log its own INFO lines to stderr too)."""
    assert "Traceback" not in stderr
    start = stderr.index("error: ")
    return stderr[start:]


def all_runs(client):
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps) if exps else []


def test_preprocess_then_train_log_everything(mlflow_store, tmp_path):
    cfg = config_from_dict(SMALL, "small.yaml")
    pre_id = run_preprocess(cfg)
    train_id = run_train(cfg)  # no run ID: finds the newest matching preprocess run
    client = MlflowClient()

    pre = client.get_run(pre_id)
    assert pre.info.status == "FINISHED"
    assert pre.data.tags["sf.stage"] == "preprocess"
    assert pre.data.params["preprocessing.min_counts"] == "5"
    assert pre.data.metrics["n_heldout"] == 30
    files = {f.path for f in client.list_artifacts(pre_id, "data")}
    assert {"data/X.npy", "data/Y.npz", "data/C.npy", "data/metadata.json"} <= files

    run = client.get_run(train_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train/pnmf/L3"
    assert run.data.tags["sf.upstream_run_id"] == pre_id
    assert run.data.params["upstream.preprocess_run_id"] == pre_id
    assert run.data.params["model.n_components"] == "3"
    assert run.data.params["training.max_iter"] == "40"
    history = client.get_metric_history(train_id, "elbo")
    n_iter = int(run.data.metrics["n_iter"])
    assert len(history) == n_iter and sorted(m.step for m in history) == list(range(1, n_iter + 1))
    assert run.data.metrics["final_elbo"] == pytest.approx(
        max(history, key=lambda m: m.step).value, rel=1e-6)
    names = {f.path for f in client.list_artifacts(train_id)}
    assert {"model.pth", "elbo_history.csv", "training.json", "config.yaml"} <= names
    local = client.download_artifacts(train_id, "training.json", str(tmp_path))
    summary = json.loads(open(local).read())
    assert summary["n_train_spots"] == 270 and summary["preprocess_run_id"] == pre_id
    # Finished outputs also sit in output_dir, and no partial folder is left behind.
    assert (tmp_path / cfg.output_dir / "train" / train_id / "model.pth").is_file()
    assert not list((tmp_path / cfg.output_dir).rglob("*.partial"))


def test_train_without_preprocess_run_says_what_to_run(mlflow_store, tmp_path, capsys):
    path = write_config(tmp_path, SMALL)
    assert main(["train", "-c", str(path)]) == 2
    err = user_error(capsys.readouterr().err)
    assert err.startswith("error: no FINISHED preprocess run matches dataset 'synthetic'")
    assert f"mlflow run . -e preprocess --env-manager local -P config={path}" in err


def test_run_id_checks(mlflow_store, tmp_path, capsys):
    path = write_config(tmp_path, SMALL)
    assert main(["preprocess", "-c", str(path)]) == 0
    pre_id = [r for r in all_runs(MlflowClient()) if r.data.tags.get("sf.stage") == "preprocess"][0]
    pre_id = pre_id.info.run_id
    capsys.readouterr()

    assert main(["train", "-c", str(path), "--preprocess-run-id", "0123456789abcdef"]) == 2
    assert "preprocess run ID '0123456789abcdef' does not exist" in user_error(
        capsys.readouterr().err)

    assert main(["train", "-c", str(path), "--preprocess-run-id", pre_id, "--set",
                 "training.max_iter=5"]) == 0
    train_id = [r for r in all_runs(MlflowClient()) if r.data.tags.get("sf.stage") == "train"][0]
    capsys.readouterr()
    assert main(["train", "-c", str(path), "--preprocess-run-id", train_id.info.run_id]) == 2
    err = user_error(capsys.readouterr().err)
    assert "is a 'train' run, but a 'preprocess' run ID is required" in err


def test_cli_overrides_in_mlflow_run_form(mlflow_store, tmp_path):
    path = write_config(tmp_path, SMALL)
    assert main(["preprocess", "-c", str(path), "--preprocessing.min_counts", "7"]) == 0
    (run,) = all_runs(MlflowClient())
    assert run.data.params["preprocessing.min_counts"] == "7"
    with pytest.raises(SystemExit):
        main(["preprocess", "-c", str(path), "--bogus"])


def _h5ad(tmp_path, *, counts=None, coords=None, obs=None, name="bad.h5ad"):
    rng = np.random.default_rng(0)
    n, d = 60, 20
    counts = rng.poisson(3.0, size=(n, d)).astype(np.float32) if counts is None else counts
    coords = rng.uniform(size=(n, 2)) if coords is None else coords
    obs = pd.DataFrame(index=[f"s{i}" for i in range(n)]) if obs is None else obs
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs,
                       var=pd.DataFrame(index=[f"g{j}" for j in range(d)]))
    adata.obsm["spatial"] = coords
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _bad_input_config(tmp_path, h5ad_path, **data):
    raw = {**SMALL, "dataset": "h5ad",
           "data": {"path": str(h5ad_path), **data},
           "preprocessing": {"min_counts": 1, "min_cells": 1}}
    return write_config(tmp_path, raw)


def _bad_counts(tmp_path):
    c = np.random.default_rng(1).poisson(3.0, size=(60, 20)).astype(np.float32)
    c[4, 2] = -1
    return _h5ad(tmp_path, counts=c)


def _fractional_counts(tmp_path):
    c = np.random.default_rng(1).poisson(3.0, size=(60, 20)).astype(np.float32)
    c[5, 1] = 0.5
    return _h5ad(tmp_path, counts=c)


def _nan_coords(tmp_path):
    xy = np.random.default_rng(2).uniform(size=(60, 2))
    xy[7, 0] = np.nan
    return _h5ad(tmp_path, coords=xy)


@pytest.mark.parametrize("make, data, fragment", [
    (_bad_counts, {}, "negative values"),
    (_fractional_counts, {}, "non-integer values"),
    (_nan_coords, {}, "NaN or infinite coordinates"),
    (lambda p: _h5ad(p), {"group_key": "celltype"}, "celltype"),
])
def test_bad_inputs_fail_cleanly(mlflow_store, tmp_path, capsys, make, data, fragment):
    path = _bad_input_config(tmp_path, make(tmp_path), **data)
    assert main(["preprocess", "-c", str(path)]) == 2
    err = user_error(capsys.readouterr().err)
    assert fragment in err
    (run,) = all_runs(MlflowClient())
    assert run.info.status == "FAILED"
    assert MlflowClient().list_artifacts(run.info.run_id) == []
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.npy"))


def test_empty_after_filtering_fails_cleanly(mlflow_store, tmp_path, capsys):
    path = write_config(tmp_path, {**SMALL, "preprocessing": {"min_counts": 10**9}})
    assert main(["preprocess", "-c", str(path)]) == 2
    err = user_error(capsys.readouterr().err)
    assert "min_counts" in err
    (run,) = all_runs(MlflowClient())
    assert run.info.status == "FAILED"


def test_unknown_dataset_is_a_config_error(mlflow_store, tmp_path, capsys):
    path = write_config(tmp_path, {**SMALL, "dataset": "merfish"})
    assert main(["preprocess", "-c", str(path)]) == 2
    err = user_error(capsys.readouterr().err)
    assert "dataset = 'merfish'" in err and "'slideseq', 'h5ad', 'synthetic'" in err
    assert all_runs(MlflowClient()) == []  # nothing started, nothing left RUNNING


def test_figures_compare_pnmf_and_svgp(mlflow_store, tmp_path, capsys):
    """Several analyze run IDs: each run's figures plus the side-by-side comparisons.

    The two models come from two preprocess runs with identical settings (accepted: same
    settings hash, same spots); a run from other settings is refused before any drawing.
    """
    import matplotlib.image as mpimg

    from sf_mlflow.errors import RunLookupError
    from sf_mlflow.stages.analyze import run_analyze
    from sf_mlflow.stages.figures import run_figures

    pnmf = config_from_dict({**SMALL, "training": {**SMALL["training"], "max_iter": 20}}, "p.yaml")
    svgp = config_from_dict({**SMALL, "model": {"n_components": 3, "prior": "SVGP",
                                                "num_inducing": 25, "lengthscale": 2.0},
                             "training": {**SMALL["training"], "max_iter": 20},
                             "analysis": {"group_loadings_iter": 10}}, "s.yaml")
    pre_ids = [run_preprocess(pnmf), run_preprocess(svgp)]  # same settings, two runs
    assert pre_ids[0] != pre_ids[1]
    ids = [run_analyze(cfg, run_train(cfg, pre)) for cfg, pre in zip((pnmf, svgp), pre_ids)]
    capsys.readouterr()
    fig_id = run_figures(svgp, ids)
    printed = capsys.readouterr().out
    client = MlflowClient()
    run = client.get_run(fig_id)
    assert run.data.tags["sf.upstream_run_id"] == ",".join(ids)
    local = Path(client.download_artifacts(fig_id, "figures", str(tmp_path / "figs")))
    names = {str(p.relative_to(local)) for p in local.rglob("*.png")}
    assert {"compare_moran_i.png", "compare_factors.png", "cell_types.png"} <= names
    for model, rid in zip(("pnmf", "mggp"), ids):   # the SVGP prior with groups: mggp
        sub = f"{model}_{rid[:8]}"
        assert f"{sub}/factors_spatial.png" in names and f"{sub}/elbo_curve.png" in names
    assert f"mggp_{ids[1][:8]}/groupwise_factors.png" in names
    assert not any(n.startswith(f"pnmf_{ids[0][:8]}/groupwise") for n in names)
    assert run.data.metrics["n_figures"] == len(names)
    assert printed.count("[figures] drew figures/") == len(names)  # each figure as it goes
    assert "drew figures/compare_factors.png" in printed
    for p in local.rglob("*.png"):
        img = mpimg.imread(p)
        assert img[..., :3].var() > 1e-3, p

    # other preprocessing settings: refused before anything is drawn or a run is opened
    other = config_from_dict({**SMALL, "preprocessing": {**SMALL["preprocessing"],
                                                         "holdout_fraction": 0.2},
                              "training": {**SMALL["training"], "max_iter": 5}}, "o.yaml")
    other_id = run_analyze(other, run_train(other, run_preprocess(other)))
    n_runs = len(all_runs(client))
    capsys.readouterr()
    with pytest.raises(RunLookupError, match="preprocess runs with different settings"):
        run_figures(svgp, [ids[0], other_id])
    assert "drew" not in capsys.readouterr().out
    assert len(all_runs(client)) == n_runs


def test_figures_refuse_different_spot_indexes():
    from sf_mlflow.errors import RunLookupError
    from sf_mlflow.stages.figures import check_same_spots

    class An:
        def __init__(self, run_id, spots):
            self.run_id, self.spots = run_id, np.array(spots)

    check_same_spots([An("a", ["s1", "s2"]), An("b", ["s1", "s2"])])
    with pytest.raises(RunLookupError, match=r"cover different spots \(1 rows differ\)"):
        check_same_spots([An("a", ["s1", "s2"]), An("b", ["s1", "s3"])])
    with pytest.raises(RunLookupError, match="different spots"):
        check_same_spots([An("a", ["s1", "s2"]), An("b", ["s1"])])


def test_figures_read_runs_with_and_without_spots_csv(tmp_path):
    """spots.csv: rows are every kept spot; absent (older runs): the training rows only."""
    from types import SimpleNamespace

    from sf_mlflow.errors import RunLookupError
    from sf_mlflow.stages.figures import _expand, _spot_layout

    pre = SimpleNamespace(data=SimpleNamespace(spot_names=np.array(["a", "b", "c"])),
                          heldout=np.array([False, True, False]))
    rows, complete = _spot_layout(tmp_path, pre)
    assert not complete and rows.tolist() == [True, False, True]
    F = _expand(np.array([[1.0], [3.0]]), rows)
    assert F[0, 0] == 1.0 and np.isnan(F[1, 0]) and F[2, 0] == 3.0
    (tmp_path / "spots.csv").write_text("spot,heldout\na,0\nb,1\nc,0\n")
    rows, complete = _spot_layout(tmp_path, pre)
    assert complete and rows.all()
    (tmp_path / "spots.csv").write_text("spot,heldout\na,0\nc,0\nb,1\n")
    with pytest.raises(RunLookupError, match="does not list the preprocess run's 3 spots"):
        _spot_layout(tmp_path, pre)


SPATIAL = {**SMALL, "model": {"n_components": 3, "prior": "SVGP", "groups": True,
                              "num_inducing": 40, "lengthscale": 2.0},
           "training": {"max_iter": 30, "device": "cpu", "log_every": 10, "validation_every": 5}}


def test_unconverged_spatial_fit_warns_tags_and_logs_heldout_deviance(mlflow_store, capsys):
    cfg = config_from_dict(SPATIAL, "spatial.yaml")
    run_preprocess(cfg)
    run_id = run_train(cfg)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sf.converged"] == "false"
    assert "warning: PNMF did not converge: max_iter = 30 reached" in capsys.readouterr().out
    held = MlflowClient().get_metric_history(run_id, "heldout_deviance")
    assert [m.step for m in held] == [0, 5, 10, 15, 20, 25, 30]     # 0: the start's check
    assert all(np.isfinite(m.value) and m.value > 0 for m in held)
    assert run.data.metrics["num_inducing"] == 40


def test_a_fit_the_time_budget_ended_is_tagged_and_says_so(mlflow_store, capsys):
    raw = {**SPATIAL, "training": {**SPATIAL["training"], "time_budget": 0.001}}
    cfg = config_from_dict(raw, "spatial.yaml")
    assert cfg.training.time_budget == 0.001
    run_preprocess(cfg)
    run = MlflowClient().get_run(run_train(cfg))
    out = capsys.readouterr().out
    assert run.info.status == "FINISHED"
    assert run.data.tags["sf.stop_reason"] == "time_budget"
    assert run.data.tags["sf.converged"] == "false"
    assert run.data.metrics["time_budget_s"] == 0.001 and run.data.metrics["n_iter"] <= 1
    assert run.data.params["training.time_budget"] == "0.001"
    assert "warning: PNMF did not converge: the time budget (0.001 s) ran out at iteration 1" in out
    assert "stopped by the time budget" in out


def test_converged_fit_is_tagged_converged(mlflow_store):
    raw = {**SPATIAL, "training": {**SPATIAL["training"], "max_iter": 2000, "learning_rate": 1.0,
                                   "validation_every": 0, "tol": 1e-3}}
    cfg = config_from_dict(raw, "spatial.yaml")
    run_preprocess(cfg)
    run = MlflowClient().get_run(run_train(cfg))
    assert run.data.tags["sf.converged"] == "true"
    assert run.data.metrics["n_iter"] < 2000


def test_non_finite_elbo_fails_the_run_but_logs_a_checkpoint_that_resumes(mlflow_store, tmp_path,
                                                                           capsys):
    import torch

    from sf_mlflow.models.pnmf import NonFiniteELBOError

    raw = {**SPATIAL, "training": {**SPATIAL["training"], "validation_every": 0, "tol": 0}}
    cfg = config_from_dict(raw, "spatial.yaml")
    run_preprocess(cfg)

    def corrupt(model, it, elbo):
        if it == 12:
            with torch.no_grad():
                model.prior_.mu.fill_(float("inf"))

    with pytest.raises(NonFiniteELBOError):
        run_train(cfg, on_iteration=corrupt)
    client = MlflowClient()
    (failed,) = [r for r in all_runs(client) if r.data.tags.get("sf.stage") == "train"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["sf.diverged"] == "true" and failed.data.tags["sf.reusable"] == "false"
    assert "checkpoint/checkpoint.pt" in {a.path for a in client.list_artifacts(failed.info.run_id, "checkpoint")}
    out = capsys.readouterr().out
    assert "keeps the last finite state (iteration 10)" in out and f"-P resume_from={failed.info.run_id}" in out
    resumed = client.get_run(run_train(cfg, resume_from=failed.info.run_id))
    assert resumed.info.status == "FINISHED" and resumed.data.metrics["n_iter"] == 30
    elbo = [m.value for m in client.get_metric_history(resumed.info.run_id, "elbo")]
    assert len(elbo) == 30 and np.isfinite(elbo).all()
