"""Runs that never lie: real signals sent to real ``sf_mlflow.cli`` processes.

Every test runs the console entry point in a subprocess against a real sqlite MLflow
store in a temp dir (and a real Optuna sqlite storage for tune), waits until the stage
of interest is under way (polling its output or the store, with generous timeouts), then
sends SIGTERM or SIGKILL and checks what the store says afterwards: no run is left
RUNNING, interrupted runs are KILLED, the runs of a killed process are swept FAILED with
a reason, a killed tune worker's trial is failed and retried, and ``main`` resumes an
interrupted fit from its checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sf_mlflow.cli"]
PATIENCE = 600.0  # seconds to wait for a stage to get going: generous, never asserted

DATA = {"synthetic": {"n_spots": 300, "n_genes": 60, "n_components": 3, "n_groups": 3,
                      "mean_counts": 200}}
PREPROCESSING = {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1, "spatial_scale": 10.0}

#: A spatial model with groups: its analyze stage (group loadings, groupwise factors) takes
#: a few seconds on 1500 spots, time enough to be interrupted.
PIPELINE = {"name": "signal_tests", "seed": 0, "dataset": "synthetic", "output_dir": "outputs",
            "data": {"synthetic": {**DATA["synthetic"], "n_spots": 1500, "n_genes": 150}},
            "preprocessing": PREPROCESSING,
            "model": {"n_components": 3, "prior": "SVGP", "groups": True, "num_inducing": 30,
                      "lengthscale": 2.0},
            "training": {"max_iter": 10, "device": "cpu", "log_every": 5}}

#: A fit far longer than any test waits: it is interrupted, never finished.
ENDLESS = {"name": "signal_tests", "seed": 1, "dataset": "synthetic", "output_dir": "outputs",
           "data": DATA, "preprocessing": PREPROCESSING,
           "model": {"n_components": 3, "prior": "Gaussian"},
           "training": {"max_iter": 100000, "tol": 0, "device": "cpu", "log_every": 1}}


def write_config(tmp_path: Path, raw: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def cli_env(store: str, **extra: str) -> dict[str, str]:
    """The environment of a pipeline process: this checkout, the temp store, quick beats."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": path,
            "PYTHONUNBUFFERED": "1", "SF_HEARTBEAT_INTERVAL": "1", **extra}


class Pipeline:
    """A CLI process whose output goes to a file (a pipe left unread would block it)."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str], log: str):
        self.log = tmp_path / log
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(CLI + args, stdout=self._fh, stderr=subprocess.STDOUT,
                                     env=env, cwd=tmp_path)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, check, what: str):
        """Poll ``check()`` until it is truthy; fail if the process ends first."""
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            got = check()
            if got:
                return got
            if self.proc.poll() is not None:
                raise AssertionError(f"the process ended ({self.proc.returncode}) before "
                                     f"{what}:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"never saw {what}:\n{self.output()[-3000:]}")

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=PATIENCE)
        finally:
            self.proc.kill()
            self._fh.close()


def all_runs(client: MlflowClient):
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(exps, run_view_type=ViewType.ALL, max_results=1000)


def runs_of(client: MlflowClient, stage: str):
    return [r for r in all_runs(client) if r.data.tags.get("sf.stage") == stage]


def assert_none_running(client: MlflowClient) -> None:
    running = [(r.data.tags.get("sf.stage"), r.info.run_id) for r in all_runs(client)
               if r.info.status == "RUNNING"]
    assert not running, f"runs left RUNNING: {running}"


def preprocess(tmp_path: Path, path: Path, env: dict[str, str]) -> None:
    out = subprocess.run(CLI + ["preprocess", "-c", str(path)], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


# ---- 1. SIGTERM outside the fit ---------------------------------------------------------------

#: PIPELINE with an analyze of tens of seconds (its group loadings), so that a signal sent
#: once the group loadings have begun lands inside analyze even on a loaded machine (at
#: the default 100 updates analyze took 1.7 s, and a busy CI once saw it finish first).
SLOW_ANALYZE = {**PIPELINE, "analysis": {"group_loadings_iter": 3000}}


def test_sigterm_during_analyze_in_main_ends_the_analyze_and_main_runs_killed(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_config(tmp_path, SLOW_ANALYZE)
    main = Pipeline(tmp_path, ["main", "-c", str(path)], cli_env(store), "main.log")
    main.wait_for(lambda: "[analyze] group-specific loadings" in main.output(),
                  "the analyze run's group loadings")
    code = main.signal(signal.SIGTERM)

    out = main.output()
    assert code == 130, out[-3000:]
    assert "SIGTERM received: ending the open runs as KILLED" in out
    assert "[analyze] finished run" not in out  # it was stopped, not done
    client = MlflowClient(store)
    assert_none_running(client)
    status = {r.data.tags["sf.stage"]: r.info.status for r in all_runs(client)}
    assert status == {"main": "KILLED", "preprocess": "FINISHED", "train": "FINISHED",
                      "analyze": "KILLED"}
    assert not list((tmp_path / "outputs").rglob("*.partial"))


class _SignalsItselfWhenCollected:
    """Sends SIGTERM from ``__del__``: the handler's KeyboardInterrupt is raised there, where
    Python prints "Exception ignored" and drops it (as a ThreadPoolExecutor's weakref callback
    once did during ``analyze``, and ``main`` went on to finish as if no signal had come)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here, inside __del__


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_that_python_swallowed_is_raised_again(mlflow_store, monkeypatch):
    from sf_mlflow.tracking import stage_run

    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    went_on = []
    with pytest.raises(KeyboardInterrupt):
        with stage_run("analyze", experiment="swallowed", params={}, tags={},
                       run_name="r") as run:
            _SignalsItselfWhenCollected()  # collected at once; its interrupt is lost there
            went_on.append("after the swallowed interrupt")
            for _ in range(200):  # 10 s of work the repeated interrupt must cut short
                time.sleep(0.05)
            went_on.append("to the end")
    assert went_on == ["after the swallowed interrupt"]
    assert MlflowClient(mlflow_store).get_run(run.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back


def test_an_interrupt_raised_while_another_unwinds_leaves_no_store_lock(mlflow_store, monkeypatch):
    """A second interrupt that lands in the clean-up of the first (a repeated one, or the
    user's second Ctrl-C) chains them: the frame of the first, with its store connection
    inside a write transaction, is then held by the first's traceback only. The run must
    still end KILLED, not wait for that lock and fail as "database is locked"."""
    from sqlalchemy import text

    from sf_mlflow.tracking import stage_run

    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    client = MlflowClient(mlflow_store)

    def write_then_interrupt():
        connection = client._tracking_client.store.engine.connect()
        connection.execute(text("UPDATE experiments SET name = name WHERE 1 = 0"))
        raise KeyboardInterrupt  # inside the write transaction: sqlite's lock is held

    def clean_up_interrupted():
        try:
            write_then_interrupt()
        finally:
            raise KeyboardInterrupt  # while the first unwinds

    with pytest.raises(KeyboardInterrupt):
        with stage_run("analyze", experiment="chained", params={}, tags={},
                       run_name="r") as run:
            clean_up_interrupted()
    assert client.get_run(run.run_id).info.status == "KILLED"


def test_an_interrupted_process_exits_though_a_stranded_thread_would_hold_it(tmp_path):
    """The console script leaves at once after an interrupt: a non-daemon thread that waits
    for ever (as a thread-pool worker does when the interrupt lands between its start and its
    registration for shutdown) would otherwise keep the interpreter from exiting."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_config(tmp_path, ENDLESS)
    env = cli_env(store)
    preprocess(tmp_path, path, env)
    stranded = ("import sys, threading; threading.Thread(target=threading.Event().wait).start(); "
                "from sf_mlflow.cli import console; console(sys.argv[1:])")
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", stranded, "train", "-c", str(path)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + PATIENCE
            while "iter     3/100000" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=PATIENCE)
        finally:
            proc.kill()
    out = log.read_text()
    assert code == 130, out[-3000:]
    assert "interrupted" in out
    [run] = runs_of(MlflowClient(store), "train")
    assert run.info.status == "KILLED"


#: A spatial fit whose initialisation phases each take a second or more (PNMF start ~3 s,
#: kernel hyperparameters ~7 s, inducing points ~1.4 s on one core here).
SLOW_START = {"name": "signal_tests", "seed": 0, "dataset": "synthetic", "output_dir": "outputs",
              "data": {"synthetic": {**DATA["synthetic"], "n_spots": 4000, "n_genes": 200,
                                     "n_components": 4}},
              "preprocessing": PREPROCESSING,
              "model": {"n_components": 4, "prior": "SVGP", "groups": True},
              "training": {"max_iter": 3, "device": "cpu"}}

#: Each initialisation phase: the line that opens it, and the line that closes it.
PHASES = [("PNMF start: fitting", "PNMF start: held-out deviance"),
          ("kernel hyperparameters: GP evidence of", "kernel hyperparameters from the data"),
          ("inducing points: M =", "conjugate start:")]


@pytest.mark.parametrize("opens, closes", PHASES, ids=["pnmf_start", "hyperparameters", "inducing"])
def test_sigterm_during_an_initialisation_phase_ends_it_and_the_run_killed(tmp_path, opens, closes):
    """Before the first iteration there is no state to wait for: the signal ends the phase
    itself (formerly the fit went on to finish its first iteration, minutes at scale)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_config(tmp_path, SLOW_START)
    env = cli_env(store)
    preprocess(tmp_path, path, env)
    train = Pipeline(tmp_path, ["train", "-c", str(path)], env, "train.log")
    train.wait_for(lambda: opens in train.output(), f"the phase {opens!r}")
    sent = time.monotonic()
    code = train.signal(signal.SIGTERM)
    took = time.monotonic() - sent
    out = train.output()
    assert code == 130, out[-3000:]
    assert closes not in out, f"the phase ran on to its end ({took:.1f} s):\n{out[-3000:]}"
    assert "SIGTERM received: stopping training now" in out
    assert "iter " not in out
    [run] = runs_of(MlflowClient(store), "train")
    assert run.info.status == "KILLED"
    print(f"{opens!r}: ended {took:.2f} s after SIGTERM")


#: Natural steps of several seconds each (M 1,200 over 3,600 spots), after a short start
#: (the kernel hyperparameters are given; trained, so that every step computes the kernel
#: solves again and back-propagates through them instead of taking A from the cache).
SLOW_STEPS = {**SLOW_START,
              "model": {**SLOW_START["model"], "num_inducing": 1200, "lengthscale": 2.0,
                        "sigma": 1.0, "group_diff_param": 1.0, "train_lengthscale": True},
              "training": {"max_iter": 50, "device": "cpu", "log_every": 1, "tol": 0,
                           "validation_every": 0}}


def test_sigterm_during_a_slow_step_undoes_it_and_keeps_the_last_whole_iteration(tmp_path):
    """A step of seconds (minutes at scale) is not waited for: the trainer restores the state
    it snapshotted before the step, and the checkpoint holds the last whole iteration."""
    import torch

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_config(tmp_path, SLOW_STEPS)
    env = cli_env(store)
    preprocess(tmp_path, path, env)
    train = Pipeline(tmp_path, ["train", "-c", str(path)], env, "train.log")
    train.wait_for(lambda: "iter     2/50" in train.output(), "the second iteration")
    time.sleep(1.0)                        # step 3 is under way (2-3 s): seconds of it are left
    code = train.signal(signal.SIGTERM)
    out = train.output()
    assert code == 130, out[-3000:]
    assert "the step under way is undone" in out, out[-3000:]
    assert "iter     3/50" not in out
    assert "interrupted at iteration 2; checkpoint logged" in out
    client = MlflowClient(store)
    [run] = runs_of(client, "train")
    assert run.info.status == "KILLED" and run.data.tags["sf.interrupted"] == "true"
    assert run.data.metrics["interrupted_at_iteration"] == 2
    local = client.download_artifacts(run.info.run_id, "checkpoint", str(tmp_path))
    blob = torch.load(Path(local) / "checkpoint.pt", weights_only=True)
    assert blob["trainer"]["iteration"] == 2 and len(blob["trainer"]["history"]) == 2
    assert [m.step for m in client.get_metric_history(run.info.run_id, "elbo")] == [1, 2]


# ---- 2. SIGKILL: heartbeats and the sweep -----------------------------------------------------

def test_a_sigkilled_fit_is_swept_failed_by_the_next_lookup(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_config(tmp_path, ENDLESS)
    env = cli_env(store)
    preprocess(tmp_path, path, env)
    client = MlflowClient(store)
    train = Pipeline(tmp_path, ["train", "-c", str(path)], env, "train.log")
    train.wait_for(lambda: "iter     3/100000" in train.output(), "the fit's iterations")
    [run] = runs_of(client, "train")
    first_beat = run.data.tags["sf.heartbeat"]
    assert run.data.tags["sf.pid"] == str(train.proc.pid)
    assert run.data.tags["sf.host"] == socket.gethostname()
    # the heartbeat thread keeps the tag fresh during the fit
    train.wait_for(lambda: client.get_run(run.info.run_id).data.tags["sf.heartbeat"]
                   != first_beat, "a new heartbeat")
    code = train.signal(signal.SIGKILL)
    assert code == -signal.SIGKILL
    # the finding: nothing could end the run
    assert client.get_run(run.info.run_id).info.status == "RUNNING"

    # any lookup of the experiment (here: train's of its preprocess run) sweeps it
    again = subprocess.run(CLI + ["train", "-c", str(path), "--set", "training.max_iter=3"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    dead = client.get_run(run.info.run_id)
    assert dead.info.status == "FAILED"
    reason = dead.data.tags["sf.failure_reason"]
    assert f"process {train.proc.pid} on host {socket.gethostname()} is gone" in reason
    assert f"run {run.info.run_id} (" in again.stdout and "marked FAILED" in again.stdout
    assert_none_running(client)


def test_a_run_whose_heartbeat_stopped_on_another_host_is_swept(tmp_path, monkeypatch):
    """The other half of the rule: a pid elsewhere cannot be checked, the heartbeat can."""
    from sf_mlflow.tracking.liveness import sweep_dead_runs

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("SF_HEARTBEAT_INTERVAL", "30")
    client = MlflowClient(store)
    exp = client.create_experiment("elsewhere")
    now = time.time()
    runs = {}
    for name, beat in (("stale", now - 121), ("fresh", now - 5)):
        runs[name] = client.create_run(exp, run_name=name, tags={
            "sf.stage": "train", "sf.host": "another-host", "sf.pid": "1",
            "sf.heartbeat": f"{beat:.0f}"}).info.run_id
    foreign = client.create_run(exp, run_name="not ours", tags={"sf.heartbeat": "0"}).info.run_id

    assert sweep_dead_runs([exp], client) == [runs["stale"]]
    stale = client.get_run(runs["stale"])
    assert stale.info.status == "FAILED"
    assert "no heartbeat from process 1 on host another-host" in stale.data.tags[
        "sf.failure_reason"]
    assert client.get_run(runs["fresh"]).info.status == "RUNNING"
    assert client.get_run(foreign).info.status == "RUNNING"  # not a run of this pipeline


# ---- 3. a SIGKILLed tune worker ---------------------------------------------------------------

def test_a_sigkilled_tune_workers_trial_fails_and_is_retried(tmp_path):
    import optuna
    from optuna.trial import TrialState

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    raw = {**ENDLESS, "model": {"n_components": 2, "prior": "SVGP", "groups": False},
           "tuning": {"n_trials": 1, "num_inducing": {"low": 10, "high": 30},
                      "report_every": 1000}}
    path = write_config(tmp_path, raw)
    env = cli_env(store, SF_OPTUNA_HEARTBEAT_INTERVAL="1", SF_OPTUNA_GRACE_PERIOD="2")
    preprocess(tmp_path, path, env)
    study_args = ["--storage", storage, "--study-name", "killed-worker"]
    tune = Pipeline(tmp_path, ["tune", "-c", str(path), *study_args], env, "tune.log")
    tune.wait_for(lambda: "iter     3/100000" in tune.output(), "the trial's fit")
    assert tune.signal(signal.SIGKILL) == -signal.SIGKILL

    rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="killed-worker", storage=rdb)
    [trial] = study.get_trials()
    assert trial.state == TrialState.RUNNING  # the finding: it would count toward n_trials
    # (the dead worker's heartbeat has to grow older than the grace period first)
    deadline = time.monotonic() + PATIENCE
    while not rdb._get_stale_trial_ids(study._study_id):
        assert time.monotonic() < deadline, "the trial's heartbeat never went stale"
        time.sleep(0.2)

    again = subprocess.run(CLI + ["tune", "-c", str(path), *study_args,
                                  "--set", "training.max_iter=3"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "trial 0: its worker stopped sending heartbeats" in again.stdout
    trials = sorted(optuna.load_study(study_name="killed-worker", storage=storage).get_trials(),
                    key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params  # the same settings, tried once more
    assert trials[1].system_attrs["failed_trial"] == 0

    client = MlflowClient(store)
    assert_none_running(client)
    killed = [r for r in runs_of(client, "train") if r.data.tags.get("sf.pid") == str(
        tune.proc.pid)]
    assert [r.info.status for r in killed] == ["FAILED"]
    assert "is gone" in killed[0].data.tags["sf.failure_reason"]
    assert sorted(r.info.status for r in runs_of(client, "tune")) == ["FAILED", "FINISHED"]


# ---- 4. main resumes an interrupted fit -------------------------------------------------------

def test_main_resumes_a_train_run_interrupted_inside_main(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = {**ENDLESS, "training": {"max_iter": 400, "tol": 0, "device": "cpu", "log_every": 1,
                                   "batch_size": 100, "y_batch_size": 30}}
    path = write_config(tmp_path, raw)
    env = cli_env(store)
    main = Pipeline(tmp_path, ["main", "-c", str(path)], env, "main.log")
    main.wait_for(lambda: "iter    20/400" in main.output(), "the fit's iterations")
    code = main.signal(signal.SIGTERM)
    assert code == 130, main.output()[-3000:]

    client = MlflowClient(store)
    assert_none_running(client)
    [killed] = runs_of(client, "train")
    assert killed.info.status == "KILLED" and killed.data.tags["sf.interrupted"] == "true"
    assert [r.info.status for r in runs_of(client, "main")] == ["KILLED"]
    stopped_at = int(killed.data.metrics["interrupted_at_iteration"])
    assert 20 <= stopped_at < 400
    old = killed.info.run_id

    again = subprocess.run(CLI + ["main", "-c", str(path)], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert (f"[main] train: resuming the interrupted run {old}" in again.stdout
            and f"at iteration {stopped_at}" in again.stdout)
    assert f"resuming run {old} from iteration {stopped_at}" in again.stdout
    assert "train: running" not in again.stdout and "reusing" in again.stdout  # preprocess
    resumed = [r for r in runs_of(client, "train") if r.data.tags.get("sf.resumed_from") == old]
    assert len(resumed) == 1 and resumed[0].info.status == "FINISHED"
    assert len(client.get_metric_history(resumed[0].info.run_id, "elbo")) == 400
    new_main = [r for r in runs_of(client, "main") if r.info.status == "FINISHED"]
    assert new_main[0].data.tags["sf.chain.train_run_id"] == resumed[0].info.run_id

    # once a resumed fit finished, the next main reuses it and resumes nothing
    third = subprocess.run(CLI + ["main", "-c", str(path)], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resuming" not in third.stdout
    assert f"train: reusing {resumed[0].info.run_id}" in third.stdout
