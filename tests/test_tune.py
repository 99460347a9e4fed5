"""The tune stage: an Optuna study whose trials are nested train runs.

Real Optuna storages (sqlite files, and a PostgreSQL server started for the session),
a real sqlite MLflow store, real training on tiny generated data.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sf_mlflow.cli import main
from sf_mlflow.config import config_from_dict
from sf_mlflow.errors import ConfigError
from sf_mlflow.stages.preprocess import run_preprocess
from sf_mlflow.stages._study import with_driver
from sf_mlflow.stages.tune import default_study_name, run_tune

REPO = Path(__file__).resolve().parents[1]

#: A spatial problem small enough for ~1-3 s trials. The lengthscale range is wide on
#: purpose: far too short (0.01) or far too long (100) lengthscales predict held-out
#: spots badly from the first evaluation on, so the median pruner has clear losers.
TUNE = {
    "name": "tune_tests",
    "seed": 1,
    "dataset": "synthetic",
    "output_dir": "outputs",
    "data": {"synthetic": {"n_spots": 300, "n_genes": 40, "n_components": 2, "n_groups": 2,
                           "mean_counts": 200, "lengthscale": 0.15}},
    "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.2,
                      "spatial_scale": 10.0},
    "model": {"n_components": 2, "prior": "SVGP", "groups": False},
    "training": {"max_iter": 50, "device": "cpu", "log_every": 50, "learning_rate": 0.05},
    "tuning": {"n_trials": 6, "lengthscale": {"low": 0.01, "high": 100.0},
               "num_inducing": {"low": 10, "high": 50}, "report_every": 10,
               "n_startup_trials": 2, "register_as": "tune_tests_model"},
}


def write_config(tmp_path, raw, name="tune.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def user_error(stderr: str) -> str:
    assert "Traceback" not in stderr
    return stderr[stderr.index("error: "):]


def child_runs(client, parent_ids):
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, "tags.`sf.stage` = 'train'")
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") in set(parent_ids)]


def sqlite_storage(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def check_study(study, client, tune_run_ids, n_trials, register_as):
    """Every trial counted once, each a nested train run, the best one registered."""
    trials = study.get_trials()
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == n_trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # surplus trials (a race for the last slot) are the only other ones allowed
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))

    children = {r.info.run_id: r for r in child_runs(client, tune_run_ids)}
    assert len(children) == n_trials
    for t in counted:
        run = children[t.user_attrs["train_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == t.user_attrs["tune_run_id"]
        assert run.data.tags["sf.tune.trial_number"] == str(t.number)
        assert run.data.tags["sf.tune.state"] == ("pruned" if t.state == TrialState.PRUNED
                                                  else "complete")
        assert float(run.data.params["model.lengthscale"]) == pytest.approx(
            t.params["model.lengthscale"])
        assert int(run.data.params["model.num_inducing"]) == t.params["model.num_inducing"]
        assert run.data.metrics["heldout_deviance"] == pytest.approx(t.value)
        assert run.data.metrics["trial_number"] == t.number
        curve = client.get_metric_history(run.info.run_id, "heldout_deviance")
        # step 0 is the start's check (the trainer's, before any step; not reported)
        assert curve and min(m.step for m in curve) == 0
        steps = {m.step for m in curve} - {0}
        # every reported value, plus for a finished trial its final model's
        assert set(t.intermediate_values) <= steps
        assert steps == set(t.intermediate_values) or t.state == TrialState.COMPLETE

    best = study.best_trial
    assert best.value == min(t.value for t in counted if t.state == TrialState.COMPLETE)
    version = client.get_model_version_by_alias(register_as, "best")
    assert version.run_id == best.user_attrs["train_run_id"]
    return counted


# ---- config -----------------------------------------------------------------------------------

def test_tuning_block_leaves_stage_hashes_alone():
    base = {k: v for k, v in TUNE.items() if k != "tuning"}
    with_block = config_from_dict(TUNE, "t.yaml")
    without = config_from_dict(base, "t.yaml")
    assert with_block.digest() == without.digest()
    assert with_block.digest("seed", "dataset", "data", "preprocessing") == without.digest(
        "seed", "dataset", "data", "preprocessing")
    assert not [k for k in with_block.flat() if k.startswith("tuning.")]
    assert with_block.flat("tuning")["tuning.n_trials"] == 6
    # ... but the block is written back with the config and read again unchanged.
    assert config_from_dict(yaml.safe_load(with_block.to_yaml()), "t.yaml") == with_block


def test_search_space_entries_are_validated_against_the_schema():
    ok = config_from_dict({"tuning": {"search_space": {
        "model.sigma": {"type": "float", "low": 0.5, "high": 2.0, "log": True},
        "training.optimizer": {"type": "categorical", "choices": ["Adam", "AdamW"]},
        "model.n_components": {"type": "int", "low": 2, "high": 5}}}}, "t.yaml")
    assert ok.tuning.search_space["training.optimizer"].choices == ["Adam", "AdamW"]
    bad = [
        ({"model.sigmaa": {"low": 1, "high": 2}}, "'model.sigmaa' is not a setting that can be "
                                                   "searched (did you mean 'model.sigma'?)"),
        ({"preprocessing.min_counts": {"type": "int", "low": 1, "high": 9}},
         "'preprocessing.min_counts' is not a setting that can be searched"),
        ({"model.sigma": {"low": -1, "high": 2}},
         "tuning.search_space.model.sigma.low = -1.0 is out of range for model.sigma"),
        ({"model.sigma": {"type": "int", "low": 1, "high": 2}}, "does not fit model.sigma"),
        ({"model.sigma": {"high": 2}}, "tuning.search_space.model.sigma.low is missing"),
        ({"training.optimizer": {"type": "categorical", "choices": ["Adm"]}},
         "'Adm' is invalid for training.optimizer"),
        ({"model.lengthscale": {"low": 1, "high": 2}}, "set its range in tuning.lengthscale"),
        ({"model.sigma": {"low": 3, "high": 2}}, "model.sigma.low = 3.0 is larger than"),
    ]
    for space, fragment in bad:
        with pytest.raises(ConfigError) as err:
            config_from_dict({"tuning": {"search_space": space}}, "t.yaml")
        assert str(err.value).startswith("t.yaml: ") and fragment in str(err.value), str(err.value)
    for block, fragment in [({"pruner": "mediann"}, "did you mean 'median'"),
                            ({"lengthscale": {"low": 5, "high": 1}},
                             "tuning.lengthscale.low = 5.0 is larger than"),
                            ({"n_trials": 0}, "tuning.n_trials = 0 is out of range"),
                            ({"bogus": 1}, "unknown key 'tuning.bogus'")]:
        with pytest.raises(ConfigError, match="t.yaml") as err:
            config_from_dict({"tuning": block}, "t.yaml")
        assert fragment in str(err.value), str(err.value)


def test_default_study_name_ignores_searched_keys_and_run_settings():
    a = config_from_dict(TUNE, "a.yaml")
    b = config_from_dict(TUNE, "b.yaml", overrides={"model.lengthscale": 9.0,
                                                      "tuning.n_trials": 20,
                                                      "output_dir": "elsewhere"})
    c = config_from_dict(TUNE, "a.yaml", overrides={"training.max_iter": 99})
    assert default_study_name(a) == default_study_name(b) != default_study_name(c)
    assert default_study_name(a).startswith("tune_tests-")


# ---- one worker -------------------------------------------------------------------------------

def test_tune_six_trials_nested_pruned_and_registered(mlflow_store, tmp_path, capsys):
    cfg = config_from_dict(TUNE, "tune.yaml")
    run_preprocess(cfg)
    storage = sqlite_storage(tmp_path)
    tune_id = run_tune(cfg, n_trials=6, storage=storage, study_name="one_worker")
    out = capsys.readouterr().out
    client = MlflowClient()
    run = client.get_run(tune_id)
    assert run.info.status == "FINISHED" and run.data.tags["sf.stage"] == "tune"

    study = optuna.load_study(study_name="one_worker", storage=storage)
    counted = check_study(study, client, [tune_id], 6, "tune_tests_model")
    pruned = [t for t in counted if t.state == TrialState.PRUNED]
    assert pruned, "the median pruner stopped no trial"
    for t in pruned:
        # stopped at a report, before max_iter; the train run says so
        assert t.user_attrs["pruned_at_iteration"] == max(t.intermediate_values) < 50
        train = client.get_run(t.user_attrs["train_run_id"])
        assert train.data.metrics["n_iter"] == t.user_attrs["pruned_at_iteration"]
        assert train.data.tags.get("sf.reusable") == "false"  # never reused as a finished fit
        assert f"trial {t.number}: pruned at iteration" in out
    assert "[tune] trial 0: lengthscale=" in out

    m, p = run.data.metrics, run.data.params
    assert m["best_heldout_deviance"] == pytest.approx(study.best_value)
    assert m["best_trial_number"] == study.best_trial.number
    assert m["n_trials_complete"] + m["n_trials_pruned"] == 6
    assert m["n_trials_pruned"] == len(pruned) >= 1
    assert float(p["best.model.lengthscale"]) == pytest.approx(
        study.best_params["model.lengthscale"])
    assert p["best.train_run_id"] == study.best_trial.user_attrs["train_run_id"]
    assert p["tune.study_name"] == "one_worker" and p["tuning.report_every"] == "10"

    arts = {a.path for a in client.list_artifacts(tune_id)}
    assert {"trials.csv", "optimization_history.png", "param_importances.png"} <= arts
    rows = list(csv.DictReader(open(client.download_artifacts(tune_id, "trials.csv",
                                                               str(tmp_path)))))
    assert [int(r["number"]) for r in rows] == list(range(6))
    assert sum(r["state"] == "PRUNED" for r in rows) == len(pruned)

    # Running the same command again joins the finished study: no new trial, same best.
    again = run_tune(cfg, n_trials=6, storage=storage, study_name="one_worker")
    assert len(optuna.load_study(study_name="one_worker", storage=storage).trials) == 6
    assert client.get_run(again).data.metrics["n_trials_this_worker"] == 0
    assert client.get_model_version_by_alias("tune_tests_model", "best").run_id == \
        study.best_trial.user_attrs["train_run_id"]


def test_too_few_complete_trials_skip_the_importance_plot(mlflow_store, tmp_path, capsys):
    cfg = config_from_dict(TUNE, "tune.yaml", overrides={"training.max_iter": 10})
    run_preprocess(cfg)
    tune_id = run_tune(cfg, n_trials=1, storage=sqlite_storage(tmp_path))
    client = MlflowClient()
    arts = {a.path for a in client.list_artifacts(tune_id)}
    assert "optimization_history.png" in arts and "param_importances.png" not in arts
    tags = client.get_run(tune_id).data.tags
    assert "at least 2 complete trials" in tags["sf.tune.skipped.param_importances.png"]
    assert "param_importances.png not drawn: needs at least 2 complete trials" in \
        capsys.readouterr().out


# ---- user errors ------------------------------------------------------------------------------

def test_tune_without_heldout_spots_names_holdout_fraction(mlflow_store, tmp_path, capsys):
    raw = {**TUNE, "preprocessing": {**TUNE["preprocessing"], "holdout_fraction": 0.0}}
    path = write_config(tmp_path, raw)
    assert main(["preprocess", "-c", str(path)]) == 0
    capsys.readouterr()
    assert main(["tune", "-c", str(path), "--storage", sqlite_storage(tmp_path)]) == 2
    err = user_error(capsys.readouterr().err)
    assert "has no held-out spots" in err and "preprocessing.holdout_fraction" in err


def test_tune_needs_the_spatial_model(mlflow_store, tmp_path, capsys):
    raw = {**TUNE, "model": {"n_components": 2, "prior": "Gaussian"}}
    path = write_config(tmp_path, raw)
    assert main(["tune", "-c", str(path)]) == 2
    err = user_error(capsys.readouterr().err)
    assert "model.prior: SVGP" in err and str(path) in err


def test_tune_rejects_a_bad_n_trials(mlflow_store, tmp_path, capsys):
    path = write_config(tmp_path, TUNE)
    assert main(["tune", "-c", str(path), "--n-trials", "2.5"]) == 2
    assert "n_trials = '2.5' is invalid" in user_error(capsys.readouterr().err)


# ---- several workers --------------------------------------------------------------------------

def start_worker(config: Path, storage: str, study: str, cwd: Path, n_trials: int):
    cmd = [sys.executable, str(REPO / "entry_points" / "tune.py"), "--config", str(config),
           "--n-trials", str(n_trials), "--storage", storage, "--study-name", study]
    return subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_two_workers(tmp_path, storage: str, study: str, n_trials: int = 6):
    path = write_config(tmp_path, TUNE)
    # One preprocess run first: it also creates the MLflow store both workers then share.
    assert main(["preprocess", "-c", str(path)]) == 0
    workers = [start_worker(path, storage, study, tmp_path, n_trials) for _ in range(2)]
    results = [w.communicate() for w in workers]
    for w, (out, err) in zip(workers, results):
        assert w.returncode == 0, err[-3000:]
        assert "[tune] finished run" in out
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    tune_runs = client.search_runs(exps, "tags.`sf.stage` = 'tune'")
    assert len(tune_runs) == 2 and all(r.info.status == "FINISHED" for r in tune_runs)
    tune_ids = [r.info.run_id for r in tune_runs]
    # the workers were given the bare postgresql:// URL; pick the installed driver here too
    optuna_study = optuna.load_study(study_name=study, storage=with_driver(storage))
    counted = check_study(optuna_study, client, tune_ids, n_trials, "tune_tests_model")
    # both workers ran trials of the one study
    assert {t.user_attrs["tune_run_id"] for t in counted} == set(tune_ids)
    ran = sum(int(r.data.metrics["n_trials_this_worker"]) for r in tune_runs)
    assert ran == n_trials
    return optuna_study


def test_two_workers_share_one_sqlite_study(mlflow_store, tmp_path):
    run_two_workers(tmp_path, sqlite_storage(tmp_path), "shared_sqlite")


def test_two_workers_share_one_postgres_study(mlflow_store, tmp_path, postgres_url):
    run_two_workers(tmp_path, postgres_url, "shared_postgres")


# ---- PostgreSQL ---------------------------------------------------------------------------------

def _pg_bin() -> Path | None:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and (Path(found).parent / "initdb").is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 for this test session; yields a database URL.

    Uses Debian's server binaries (package ``postgresql``). PostgreSQL refuses to run as
    root, so as root the server runs as the ``postgres`` user. Skips when the binaries are
    missing, unless SF_REQUIRE_POSTGRES=1 (CI), where that is a failure.
    """
    bindir = _pg_bin()
    if bindir is None:
        msg = ("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); "
               "install Debian's postgresql package (apt-get install -y postgresql)")
        if os.environ.get("SF_REQUIRE_POSTGRES") == "1":
            pytest.fail(msg + " -- required because SF_REQUIRE_POSTGRES=1")
        pytest.skip(msg)
    root = Path(tempfile.mkdtemp(prefix="sf_pg_"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log, port = root / "data", root / "server.log", _free_port()

    def pg(tool: str, *args: str, check: bool = True):
        return subprocess.run([*as_user, str(bindir / tool), *args], cwd=root,
                              capture_output=True, text=True, check=check)

    pg("initdb", "-D", str(data), "--auth=trust", "--username=postgres", "--encoding=UTF8")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    started = pg("pg_ctl", "-D", str(data), "-o", opts, "-l", str(log), "-w", "start",
                 check=False)
    if started.returncode != 0:
        text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {started.stderr}\n{text}")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "sf_tune")
        yield f"postgresql://postgres@127.0.0.1:{port}/sf_tune"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


# ---- the MLflow Project entry point -------------------------------------------------------------

@pytest.mark.slow
def test_tune_via_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_config(tmp_path, {**TUNE, "output_dir": str(tmp_path / "outputs")})
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}

    def mlflow_run(entry, *params):
        cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager",
               "local", "--experiment-name", "tune_project", "-P", f"config={path}"]
        for p in params:
            cmd += ["-P", p]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)

    pre = mlflow_run("preprocess")
    assert pre.returncode == 0, pre.stderr[-3000:]
    proc = mlflow_run("tune", "n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tune_project")
    (tune,) = client.search_runs([exp.experiment_id], "tags.`sf.stage` = 'tune'")
    assert tune.info.status == "FINISHED"
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{tune.info.run_id}'")
    assert len(children) == 3
    # default storage: a sqlite file under output_dir
    assert (tmp_path / "outputs" / "optuna.db").is_file()
    assert tune.data.params["n_trials"] == "3"
    assert client.get_model_version_by_alias("tune_tests_model", "best").run_id in {
        c.info.run_id for c in children}
