"""The ``main`` pipeline, stage reuse, interruption and resume, concurrent pipelines.

All against a real sqlite MLflow store in a temp dir; the interruption test sends a
real SIGTERM to a real training process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from mlflow.tracking import MlflowClient

from sf_mlflow.config import config_from_dict
from sf_mlflow.models.pnmf import PNMF
from sf_mlflow.stages.main import run_main
from sf_mlflow.stages.train import run_train

from test_stages import SMALL, all_runs, write_config

# a spatial model so that every stage (groupwise factors included) is exercised
PIPELINE = {**SMALL, "name": "main_tests",
            "model": {"n_components": 3, "prior": "SVGP", "groups": True, "num_inducing": 30,
                      "lengthscale": 2.0},
            "training": {"max_iter": 25, "device": "cpu", "log_every": 25},
            "analysis": {"group_loadings_iter": 20}}


def stage_runs(client, parent_id=None):
    """Runs of the four pipeline stages (children of ``parent_id`` when given)."""
    runs = [r for r in all_runs(client) if r.data.tags.get("sf.stage") in
            ("preprocess", "train", "analyze", "figures")]
    if parent_id:
        runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    return runs


def chain(client, main_id):
    """The chain's run IDs: tags of the parent run (params would crowd the compare view)."""
    run = client.get_run(main_id)
    assert not [k for k in run.data.params if k.startswith("chain.")]
    tags = run.data.tags
    return {s: tags[f"sf.chain.{s}_run_id"] for s in ("preprocess", "train", "analyze", "figures")}


def test_main_runs_then_reuses_then_forces(mlflow_store, tmp_path):
    cfg = config_from_dict(PIPELINE, "pipeline.yaml")
    client = MlflowClient()

    first = run_main(cfg)
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.tags["sf.stage"] == "main"
    assert run.info.run_name == "main/synthetic/mggp/L3/M30/l2"
    children = stage_runs(client, first)
    assert sorted(r.data.tags["sf.stage"] for r in children) == [
        "analyze", "figures", "preprocess", "train"]
    links = chain(client, first)
    assert {r.info.run_id for r in children} == set(links.values())
    # each stage took its upstream's run ID
    assert client.get_run(links["train"]).data.tags["sf.upstream_run_id"] == links["preprocess"]
    assert client.get_run(links["analyze"]).data.tags["sf.upstream_run_id"] == links["train"]
    assert client.get_run(links["figures"]).data.tags["sf.upstream_run_id"] == links["analyze"]
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.tags["sf.code_version"] and r.data.tags["sf.stage_hash"]
        assert r.data.tags["mlflow.note.content"]
    # the parent carries the headline metrics of its chain
    m = run.data.metrics
    for key in ("final_elbo", "moran_i_mean", "heldout_deviance", "heldout_deviance_mean"):
        assert np.isfinite(m[key]), key
    assert m["final_elbo"] == client.get_run(links["train"]).data.metrics["final_elbo"]
    assert m["stages_reused"] == 0
    assert {a.path for a in client.list_artifacts(first)} == {"chain.json", "report.html"}

    # the same again: all four reused, no new stage runs
    n_stage_runs = len(stage_runs(client))
    second = run_main(cfg)
    assert len(stage_runs(client)) == n_stage_runs
    assert stage_runs(client, second) == []
    assert chain(client, second) == links
    tags = client.get_run(second).data.tags
    assert all(tags[f"sf.reused.{s}"] == "true" for s in links)
    assert client.get_run(second).data.metrics["stages_reused"] == 4

    # a newer train run of the same settings (train --register-as, say) does not make main
    # redo analyze and figures: it keeps to the chain it built
    newer = run_train(cfg, links["preprocess"], register_as="main_tests_model")
    assert newer != links["train"]
    kept = run_main(cfg)
    assert chain(client, kept) == links and stage_runs(client, kept) == []

    # force: four new child runs
    forced = run_main(cfg, force=True)
    new = chain(client, forced)
    assert set(new.values()).isdisjoint(links.values())
    assert len(stage_runs(client, forced)) == 4

    # one training param changed: preprocess reused, the rest rerun
    changed = config_from_dict({**PIPELINE, "training": {**PIPELINE["training"],
                                                         "learning_rate": 0.05}}, "changed.yaml")
    third = run_main(changed)
    after = chain(client, third)
    assert after["preprocess"] == new["preprocess"]        # the newest matching one
    assert {after[s] for s in ("train", "analyze", "figures")}.isdisjoint(
        set(links.values()) | set(new.values()))
    assert sorted(r.data.tags["sf.stage"] for r in stage_runs(client, third)) == [
        "analyze", "figures", "train"]

    # changing only an analysis setting reuses preprocess and train
    fourth = run_main(config_from_dict({**PIPELINE, "analysis": {"group_loadings_iter": 10}},
                                       "analysis.yaml"))
    assert sorted(r.data.tags["sf.stage"] for r in stage_runs(client, fourth)) == [
        "analyze", "figures"]


def test_changed_code_version_is_not_reused(mlflow_store, monkeypatch):
    cfg = config_from_dict(PIPELINE, "pipeline.yaml")
    client = MlflowClient()
    first = run_main(cfg)
    import sf_mlflow.stages.main as main_module
    import sf_mlflow.tracking.runs as runs_module

    monkeypatch.setattr(main_module, "code_version", lambda: "9.9.9+src.other")
    monkeypatch.setattr(runs_module, "code_version", lambda: "9.9.9+src.other")
    second = run_main(cfg)
    assert set(chain(client, second).values()).isdisjoint(chain(client, first).values())
    assert client.get_run(chain(client, second)["train"]).data.tags["sf.code_version"] == \
        "9.9.9+src.other"


def test_main_through_the_cli_and_a_failing_stage(mlflow_store, tmp_path):
    path = write_config(tmp_path, {**PIPELINE, "model": {**PIPELINE["model"],
                                                         "n_components": 2}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    out = subprocess.run([sys.executable, "-m", "sf_mlflow.cli", "main", "-c", str(path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[main] chain preprocess" in out.stdout
    again = subprocess.run([sys.executable, "-m", "sf_mlflow.cli", "main", "-c", str(path)],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0 and "reused: preprocess, train, analyze, figures" in again.stdout

    # a stage that refuses its settings (more inducing points than spots: checked before
    # the train run is opened) ends the parent FAILED, leaves no train run to reuse
    bad = write_config(tmp_path, {**PIPELINE, "model": {**PIPELINE["model"], "num_inducing": 10**6,
                                                        "n_components": 2}}, "bad.yaml")
    n_train = sum(r.data.tags.get("sf.stage") == "train" for r in all_runs(MlflowClient()))
    fail = subprocess.run([sys.executable, "-m", "sf_mlflow.cli", "main", "-c", str(bad)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert fail.returncode != 0
    assert "model.num_inducing = 1000000 exceeds the" in fail.stderr
    client = MlflowClient()
    failed = [r for r in all_runs(client) if r.info.status == "FAILED"]
    assert sorted(r.data.tags["sf.stage"] for r in failed) == ["main"]
    assert sum(r.data.tags.get("sf.stage") == "train" for r in all_runs(client)) == n_train
    train_dir = tmp_path / "outputs"
    assert not list(train_dir.rglob("*.partial"))


# ---- interruption and resume -----------------------------------------------------------------

RESUME = {**SMALL, "name": "resume_tests",
          "training": {"max_iter": 400, "tol": 0, "device": "cpu", "log_every": 1,
                       "batch_size": 100, "y_batch_size": 30}}


def _wait_for(proc, text: str, timeout: float = 300.0) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never saw {text!r}; output:\n{''.join(lines)[-3000:]}")


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_fit(mlflow_store,
                                                                            tmp_path):
    client = MlflowClient()
    path = write_config(tmp_path, RESUME)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "sf_mlflow.cli"]
    subprocess.run(cli + ["preprocess", "-c", str(path)], check=True, env=env, cwd=tmp_path,
                   capture_output=True)

    proc = subprocess.Popen(cli + ["train", "-c", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        _wait_for(proc, "iter    20/400")
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "checkpoint logged" in rest
    killed = [r for r in all_runs(client) if r.data.tags.get("sf.stage") == "train"]
    assert len(killed) == 1 and killed[0].info.status == "KILLED"
    assert killed[0].data.tags["sf.interrupted"] == "true"
    killed_id = killed[0].info.run_id
    stopped_at = int(killed[0].data.metrics["interrupted_at_iteration"])
    assert 20 <= stopped_at < 400
    assert [a.path for a in client.list_artifacts(killed_id, "checkpoint")] == [
        "checkpoint/checkpoint.pt"]
    assert not any(a.path == "model.pth" for a in client.list_artifacts(killed_id))

    out = subprocess.run(cli + ["train", "-c", str(path), "--resume-from", killed_id],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming run {killed_id} from iteration {stopped_at}" in out.stdout
    resumed = [r for r in all_runs(client) if r.data.tags.get("sf.resumed_from") == killed_id]
    assert len(resumed) == 1 and resumed[0].info.status == "FINISHED"
    resumed_id = resumed[0].info.run_id
    assert len(client.get_metric_history(resumed_id, "elbo")) == 400

    # the same fit, never interrupted, in this process
    reference_id = run_train(config_from_dict(RESUME, "resume.yaml"))
    models = {}
    for name, rid in (("resumed", resumed_id), ("reference", reference_id)):
        local = client.download_artifacts(rid, "model.pth", str(tmp_path / name))
        models[name] = PNMF.load(local)
    a, b = models["resumed"], models["reference"]
    np.testing.assert_allclose(a.elbo_history_, b.elbo_history_, rtol=1e-6)
    np.testing.assert_allclose(a.loadings_, b.loadings_, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(a.get_factors(), b.get_factors(), rtol=1e-5, atol=1e-8)

    # resuming a run that finished is refused with a readable error
    bad = subprocess.run(cli + ["train", "-c", str(path), "--resume-from", reference_id],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "is FINISHED, not KILLED or FAILED" in bad.stderr

    # resuming with a setting the checkpoint was not made with: refused before a run opens,
    # naming the setting (no FAILED train run left, as for an upstream mismatch)
    runs_before = len(all_runs(client))
    other = subprocess.run(cli + ["train", "-c", str(path), "--resume-from", killed_id, "--set",
                                  "training.batch_size=50"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert other.returncode == 2
    assert ("cannot resume: hyperparameters differ from the checkpoint's (batch_size: "
            "checkpoint 100, now 50)") in other.stderr
    assert len(all_runs(client)) == runs_before

    # a checkpoint deleted after the interrupt: the error says so, not "was not stopped"
    root = killed[0].info.artifact_uri
    root = Path(urlparse(root).path if root.startswith("file:") else root)
    checkpoint = root / "checkpoint" / "checkpoint.pt"
    checkpoint.unlink()
    gone = subprocess.run(cli + ["train", "-c", str(path), "--resume-from", killed_id],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert gone.returncode == 2
    assert ("it was interrupted and logged one, which has since been deleted from its "
            "artifacts); train again without --resume-from") in gone.stderr
    assert len(all_runs(client)) == runs_before


# ---- two pipelines at once ------------------------------------------------------------------

def test_two_pipelines_at_once_on_one_sqlite_store(tmp_path):
    store = f"sqlite:///{tmp_path / 'shared.db'}"     # new: both processes create the schema
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    procs = []
    for i, lr in enumerate((0.1, 0.05)):
        raw = {**PIPELINE, "output_dir": f"outputs{i}",
               "training": {**PIPELINE["training"], "learning_rate": lr}}
        path = write_config(tmp_path, raw, f"p{i}.yaml")
        procs.append(subprocess.Popen([sys.executable, "-m", "sf_mlflow.cli", "main", "-c",
                                       str(path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(store)
    mains = [r for r in all_runs(client) if r.data.tags.get("sf.stage") == "main"]
    assert len(mains) == 2 and all(r.info.status == "FINISHED" for r in mains)
    runs = all_runs(client)
    assert all(r.info.status == "FINISHED" for r in runs)
    # each pipeline has its own train, analyze and figures runs
    assert sorted(r.data.tags["sf.stage"] for r in runs).count("train") == 2
    # the preprocess run both need was computed once, by whichever claimed it first
    assert sorted(r.data.tags["sf.stage"] for r in runs).count("preprocess") == 1


def test_two_identical_pipelines_at_once_make_one_run_per_stage(tmp_path):
    """Each stage is claimed through the store before it is computed: the second main waits
    for the first's run (saying so) and reuses it, instead of computing it again."""
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    path = write_config(tmp_path, {**PIPELINE, "training": {**PIPELINE["training"],
                                                            "max_iter": 60}}, "same.yaml")
    procs = [subprocess.Popen([sys.executable, "-m", "sf_mlflow.cli", "main", "-c", str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(store)
    stages = sorted(r.data.tags["sf.stage"] for r in all_runs(client))
    assert stages == ["analyze", "figures", "main", "main", "preprocess", "train"], stages
    assert all(r.info.status == "FINISHED" for r in all_runs(client))
    said = "\n".join(out for out, _ in outs)
    assert "which is computing it, to finish" in said, said   # one of them waited
    import sqlite3

    with sqlite3.connect(tmp_path / "shared.db") as db:      # every claim was released
        assert db.execute("SELECT COUNT(*) FROM sf_stage_claims").fetchone() == (0,)

