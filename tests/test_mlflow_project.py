"""The MLflow Project itself: `mlflow run . -e <stage> --env-manager local` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sf_mlflow.stages._common import safe_name

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def mlflow_run(entry_point, params, tmp_path, uri, experiment="project_test"):
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point,
           "--env-manager", "local"] + (["--experiment-name", experiment] if experiment else [])
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return proc


def test_preprocess_then_train_via_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({
        "name": "project_test", "seed": 1, "dataset": "synthetic",
        "output_dir": str(tmp_path / "outputs"),
        "data": {"synthetic": {"n_spots": 400, "n_genes": 80, "n_components": 3}},
        "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1},
        "model": {"n_components": 3, "prior": "Gaussian"},
        "training": {"max_iter": 200, "tol": 0.0, "device": "cpu", "log_every": 10},
    }))
    pre = mlflow_run("preprocess", {"config": config}, tmp_path, uri)
    assert pre.returncode == 0, pre.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("project_test")
    (pre_run,) = client.search_runs([exp.experiment_id])
    pre_id = pre_run.info.run_id
    assert pre_run.info.status == "FINISHED" and pre_run.data.tags["sf.stage"] == "preprocess"

    train = mlflow_run("train", {"config": config, "preprocess_run_id": pre_id,
                                 "training.max_iter": 25}, tmp_path, uri)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "[train] finished run" in train.stdout
    assert "ELBO" in train.stdout  # progress lines
    runs = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'train'")
    (run,) = runs
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["training.max_iter"] == "25" and p["preprocess_run_id"] == pre_id
    assert p["model.n_components"] == "3" and p["dataset"] == "synthetic"
    history = client.get_metric_history(run.info.run_id, "elbo")
    assert len(history) == 25 == int(run.data.metrics["n_iter"])
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert values[-1] > values[0]  # the ELBO went up
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pth", "elbo_history.csv", "training.json", "config.yaml"} <= arts

    # A user error through `mlflow run`: one error line, the run FAILED.
    bad = mlflow_run("train", {"config": config, "preprocess_run_id": run.info.run_id},
                     tmp_path, uri)
    assert bad.returncode != 0
    assert "is a 'train' run, but a 'preprocess' run ID is required" in bad.stderr
    assert "Traceback (most recent call last)" not in bad.stderr.split("error:")[0][-2000:]
    failed = client.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
    assert len(failed) == 1


def osmfish_config(tmp_path, shared_file) -> Path:
    """The shipped osmFISH SVGP config, pointed at the shared file and a temp output folder."""
    raw = yaml.safe_load((REPO / "configs/osmfish/svgp.yaml").read_text())
    raw["data"]["path"] = str(shared_file("osmfish_sscortex.h5ad"))
    raw["output_dir"] = str(tmp_path / "outputs")
    config = tmp_path / "osmfish.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def test_spatial_train_on_osmfish_via_mlflow_run(tmp_path, shared_file):
    import torch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = osmfish_config(tmp_path, shared_file)

    pre = mlflow_run("preprocess", {"config": config}, tmp_path, uri)
    assert pre.returncode == 0, pre.stderr[-3000:]
    train = mlflow_run("train", {"config": config, "training.max_iter": 20,
                                 "model.num_inducing": 200}, tmp_path, uri)
    assert train.returncode == 0, train.stderr[-3000:]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("project_test")
    (run,) = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'train'")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train/mggp/L6/M200/l20.35"  # osmFISH's lengthscale since #13
    assert run.data.tags["sf.model"] == "mggp"
    p, m = run.data.params, run.data.metrics
    assert p["model.num_inducing"] == "200" and p["model.kernel"] == "Matern32"
    assert p["model.inducing_allocation"] == "proportional"
    assert float(p["model.group_diff_param"]) == 10.0
    assert m["num_inducing"] == 200 and m["lengthscale"] == pytest.approx(20.35) and m["sigma"] == 1.0
    assert m["jitter_used"] > 0
    assert len(client.get_metric_history(run.info.run_id, "elbo")) == 20

    local = client.download_artifacts(run.info.run_id, "model.pth", str(tmp_path))
    saved = torch.load(local, weights_only=True)
    prior = saved["state"]["prior"]
    assert prior["mu"].shape == (6, 200) and prior["Z"].shape == (200, 2)
    assert prior["g_Z"].shape == (200,) and int(prior["g_Z"].max()) > 0  # several groups
    assert any("lengthscale" in k for k in prior) and any("sigma" in k for k in prior)
    assert any(k.startswith("Lu") for k in prior)
    assert saved["state"]["loadings"].shape == (33, 6)

    # analyze -> figures on the same run chain; analyze takes the train run's overrides too
    # (a train run of other model or training settings than the config's is refused)
    analyze = mlflow_run("analyze", {"config": config, "train_run_id": run.info.run_id,
                                     "training.max_iter": 20, "model.num_inducing": 200},
                         tmp_path, uri)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    (an,) = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'analyze'")
    groups = json.loads(Path(client.download_artifacts(
        pre_run_id(client, exp), "data/metadata.json", str(tmp_path))).read_text())["group_names"]
    expected = {"factors.npy", "scales.npy", "loadings.npy", "moran_i.csv", "metrics.json",
                "gene_enrichment.json", "groupwise_factors.npz", "enrichment_lfc.npy"}
    expected |= {f"loadings_group_{safe_name(g)}.npy" for g in groups}
    assert expected <= {a.path for a in client.list_artifacts(an.info.run_id)}
    check_analyze_metrics(client, an, tmp_path, spatial=True, n_factors=6)

    figures = mlflow_run("figures", {"config": config, "analyze_run_ids": an.info.run_id},
                         tmp_path, uri)
    assert figures.returncode == 0, figures.stderr[-3000:]
    (fig,) = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'figures'")
    pngs = check_figures(client, fig, tmp_path)
    assert "figures/groupwise_factors.png" in pngs
    assert {f"figures/enrichment_by_group/{safe_name(g)}.png" for g in groups} <= pngs


@pytest.mark.parametrize("learning_rate", [0.1, 0.3])
def test_grouped_osmfish_trains_finite_at_the_plan_learning_rates(tmp_path, shared_file, learning_rate):
    # Adam on Lu blew this model up at lr 0.1 (NaN at iteration 22, issue #8); natural steps
    # with a trust region cannot.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = osmfish_config(tmp_path, shared_file)
    pre = mlflow_run("preprocess", {"config": config}, tmp_path, uri)
    assert pre.returncode == 0, pre.stderr[-3000:]
    train = mlflow_run("train", {"config": config, "training.max_iter": 40,
                                 "training.learning_rate": learning_rate,
                                 "model.num_inducing": 200}, tmp_path, uri)
    assert train.returncode == 0, train.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("project_test")
    (run,) = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'train'")
    assert run.info.status == "FINISHED" and run.data.params["model.groups"] == "true"
    assert run.data.params["training.optimizer"] == "natural"
    elbo = [m.value for m in client.get_metric_history(run.info.run_id, "elbo")]
    assert len(elbo) == 40 and np.isfinite(elbo).all()
    held = [m.value for m in client.get_metric_history(run.info.run_id, "heldout_deviance")]
    assert len(held) == 5 and np.isfinite(held).all()     # iteration 0 (the start), then every 10


def pre_run_id(client, exp):
    (pre,) = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'preprocess'")
    return pre.info.run_id


def check_analyze_metrics(client, run, tmp_path, *, spatial, n_factors):
    """Every scalar of metrics.json is an MLflow metric, with the values of the plan."""
    metrics = run.data.metrics
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / "m"))
    saved = json.loads(Path(local).read_text())
    for key, value in saved.items():
        if isinstance(value, (int, float)):
            assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    morans = [metrics[f"moran_i_{r}"] for r in range(n_factors)]
    assert morans == sorted(morans, reverse=True)
    assert metrics["moran_i_mean"] == pytest.approx(np.mean(morans))
    for key in ("reconstruction_error", "train_deviance", "train_deviance_mean",
                "train_deviance_nsf", "heldout_deviance", "heldout_deviance_mean"):
        assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    if spatial:
        for key in ("lengthscale", "sigma", "num_inducing", "mean_distance_to_inducing"):
            assert key in metrics


def check_figures(client, run, tmp_path):
    """Every figure of the plan exists, decodes and is not blank; returns the PNG paths."""
    import matplotlib.image as mpimg

    local = Path(client.download_artifacts(run.info.run_id, "figures", str(tmp_path / "f")))
    pngs = {f"figures/{p.relative_to(local)}" for p in local.rglob("*.png")}
    for name in ("factors_spatial", "scales_spatial", "elbo_curve", "top_genes",
                 "factors_with_genes"):
        assert f"figures/{name}.png" in pngs
    for p in local.rglob("*.png"):
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].var() > 1e-3, p  # not blank
    return pngs


def test_pnmf_pipeline_on_slideseq_window_via_mlflow_run(tmp_path, shared_file):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = yaml.safe_load((REPO / "configs/slideseq/window_pnmf.yaml").read_text())
    raw["data"]["path"] = str(shared_file("slideseqv2_hippocampus_window.h5ad"))
    raw["output_dir"] = str(tmp_path / "outputs")
    raw["name"] = "project_test"
    raw["training"]["max_iter"] = 150
    config = tmp_path / "window.yaml"
    config.write_text(yaml.safe_dump(raw))
    for stage in ("preprocess", "train", "analyze", "figures"):
        proc = mlflow_run(stage, {"config": config}, tmp_path, uri)
        assert proc.returncode == 0, (stage, proc.stderr[-3000:])
        # no run ID given: each stage finds the newest FINISHED upstream run of this config
        assert "using the newest matching" in proc.stdout or stage == "preprocess"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("project_test")
    runs = {r.data.tags["sf.stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"preprocess", "train", "analyze", "figures"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    an = runs["analyze"]
    arts = {a.path for a in client.list_artifacts(an.info.run_id)}
    assert {"factors.npy", "scales.npy", "loadings.npy", "moran_i.csv", "metrics.json"} <= arts
    assert not any(a.startswith("loadings_group_") for a in arts)  # the window has no groups
    check_analyze_metrics(client, an, tmp_path, spatial=False, n_factors=10)
    factors = np.load(client.download_artifacts(an.info.run_id, "factors.npy", str(tmp_path)))
    assert factors.shape[1] == 10 and (factors > 0).all()
    pngs = check_figures(client, runs["figures"], tmp_path)
    assert "figures/groupwise_factors.png" not in pngs


def test_ctrl_c_on_mlflow_run_train_checkpoints_and_resume_from_finishes(tmp_path):
    """SIGINT to `mlflow run` (what Ctrl-C sends) reaches training as one SIGTERM."""
    import signal
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = {"name": "ctrl_c", "seed": 1, "dataset": "synthetic", "output_dir": str(tmp_path / "out"),
           "data": {"synthetic": {"n_spots": 300, "n_genes": 50, "n_components": 3}},
           "preprocessing": {"min_counts": 5, "min_cells": 3},
           "model": {"n_components": 3, "prior": "Gaussian"},
           "training": {"max_iter": 3000, "tol": 0, "device": "cpu", "log_every": 1,
                        "batch_size": 100}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert mlflow_run("preprocess", {"config": config}, tmp_path, uri).returncode == 0

    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager",
           "local", "--experiment-name", "project_test", "-P", f"config={config}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    # A shell starts background jobs with SIGINT ignored, and exec keeps that, so a test
    # session launched that way would hand `mlflow run` an ignored Ctrl-C; a terminal's
    # `mlflow run` has the default disposition, which is what this test is about.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if not line or "iter    10/3000" in line:
                break
        assert "iter    10/3000" in seen[-1], "".join(seen)[-3000:]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "checkpoint logged" in rest, rest[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("project_test")
    killed = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'train'")
    # The stage ends the run KILLED; MLflow's launcher then overwrites it with FAILED
    # (mlflow.projects._maybe_set_run_terminated passes the status string to
    # RunStatus.is_terminated, which expects the integer code). The tag tells the truth.
    assert len(killed) == 1 and killed[0].info.status in ("KILLED", "FAILED")
    assert killed[0].data.tags["sf.interrupted"] == "true"
    assert [a.path for a in client.list_artifacts(killed[0].info.run_id, "checkpoint")] == [
        "checkpoint/checkpoint.pt"]

    raw["training"]["max_iter"] = int(killed[0].data.metrics["interrupted_at_iteration"]) + 20
    config.write_text(yaml.safe_dump(raw))   # max_iter may change on resume
    out = mlflow_run("train", {"config": config, "resume_from": killed[0].info.run_id},
                     tmp_path, uri)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = client.search_runs([exp.experiment_id],
                                 f"tags.`sf.resumed_from` = '{killed[0].info.run_id}'")
    assert len(resumed) == 1 and resumed[0].info.status == "FINISHED"
    assert resumed[0].data.metrics["n_iter"] == raw["training"]["max_iter"]


def test_main_without_experiment_name_logs_to_the_configs_experiment_and_reuses_there(tmp_path):
    """`mlflow run . -e main` given no experiment: every stage run in the config's experiment.

    MLflow creates its run in Default before the config is read; it stays there as a
    launcher run linked to the main run. The second run reuses every stage in the config's
    experiment; a run in another experiment with the same settings is never reused.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny_main", "seed": 2, "dataset": "synthetic",
        "output_dir": str(tmp_path / "outputs"),
        "data": {"synthetic": {"n_spots": 200, "n_genes": 30, "n_components": 2}},
        "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1},
        "model": {"n_components": 2, "prior": "Gaussian"},
        "training": {"max_iter": 20, "tol": 0.0, "device": "cpu", "log_every": 10},
    }))
    first = mlflow_run("main", {"config": config}, tmp_path, uri, experiment=None)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_main")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "mlflow.sharedViewState.sf-headline" in exp.tags
    runs = client.search_runs([exp.experiment_id])
    stages = sorted(r.data.tags.get("sf.stage") for r in runs)
    assert stages == ["analyze", "figures", "main", "preprocess", "train"], stages
    (main_run,) = [r for r in runs if r.data.tags["sf.stage"] == "main"]
    # the launcher run mlflow created in Default points at the main run, and back
    (launcher,) = client.search_runs(["0"])
    assert "sf.stage" not in launcher.data.tags
    assert launcher.data.tags["sf.redirected_to_run_id"] == main_run.info.run_id
    assert main_run.data.tags["sf.launcher_run_id"] == launcher.info.run_id
    assert main_run.data.tags["mlflow.project.entryPoint"] == "main"
    assert f"finished run {main_run.info.run_id}" in first.stdout
    assert "experiment 'tiny_main'" in first.stdout and "artifacts:" in first.stdout

    second = mlflow_run("main", {"config": config}, tmp_path, uri, experiment=None)
    assert second.returncode == 0, second.stderr[-3000:]
    mains = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'main'",
                               order_by=["attributes.start_time DESC"])
    assert len(mains) == 2 and mains[0].data.metrics["stages_reused"] == 4
    assert len(client.search_runs([exp.experiment_id])) == 6  # only the new main run

    # The console script with another experiment name: nothing of tiny_main is reused.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    other = subprocess.run([sys.executable, "-m", "sf_mlflow.cli", "main", "-c", str(config),
                            "--experiment-name", "elsewhere"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 0, other.stderr[-3000:]
    elsewhere = client.get_experiment_by_name("elsewhere")
    runs = client.search_runs([elsewhere.experiment_id], "tags.`sf.stage` = 'main'")
    assert len(runs) == 1 and runs[0].data.metrics["stages_reused"] == 0


def test_train_on_two_processes_via_mlflow_run(tmp_path):
    """`-P nproc_per_node=2`: the entry point re-runs itself under torchrun (2 gloo ranks);
    rank 0 takes over the run `mlflow run` made, the other rank makes none, and the fit equals
    the one-process fit of the same batches."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({
        "name": "project_test", "seed": 2, "dataset": "synthetic",
        "output_dir": str(tmp_path / "outputs"),
        "data": {"synthetic": {"n_spots": 200, "n_genes": 40, "n_components": 3}},
        "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1},
        "model": {"n_components": 3, "prior": "SVGP", "num_inducing": 20},
        "training": {"max_iter": 8, "tol": 0.0, "device": "cpu", "log_every": 4,
                     "batch_size": 60},
    }))
    assert mlflow_run("preprocess", {"config": config}, tmp_path, uri).returncode == 0
    two = mlflow_run("train", {"config": config, "nproc_per_node": 2}, tmp_path, uri)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "starting 2 processes: torchrun --standalone --nproc-per-node 2" in two.stdout
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("project_test")
    (run,) = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'train'")
    assert run.info.status == "FINISHED" and run.data.params["training.distributed"] == "true"
    one = mlflow_run("train", {"config": config}, tmp_path, uri)
    assert one.returncode == 0, one.stderr[-3000:]
    runs = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'train'")
    (single,) = [r for r in runs if r.info.run_id != run.info.run_id]

    def curve(run_id):
        return [m.value for m in sorted(client.get_metric_history(run_id, "elbo"),
                                        key=lambda m: m.step)]

    assert len(curve(run.info.run_id)) == 8
    np.testing.assert_allclose(curve(run.info.run_id), curve(single.info.run_id), rtol=1e-4)
    bad = mlflow_run("train", {"config": config, "nproc_per_node": 0}, tmp_path, uri)
    assert bad.returncode != 0 and "'0' is not a number of processes" in bad.stderr
