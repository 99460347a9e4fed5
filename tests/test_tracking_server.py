"""A real ``mlflow server`` (sqlite backend, on 127.0.0.1) that goes away: while it is down a
fit goes on and its ELBO curve waits in memory; the run's other writes wait for the server;
when it is back, the run is complete. Away for longer than SF_TRACKING_OUTAGE_S: the writes go
to a local folder that ``spatial_factorization sync`` uploads. A server that never answered
fails a stage in one line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

CONFIG = {"name": "server_outage", "seed": 0, "dataset": "synthetic", "output_dir": "outputs",
          "data": {"synthetic": {"n_spots": 800, "n_genes": 80, "n_components": 3,
                                 "n_groups": 2}},
          "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1},
          "model": {"n_components": 3, "prior": "Gaussian"},
          "training": {"max_iter": 1200, "tol": 0, "device": "cpu", "log_every": 100}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on a port of its own; stop() kills it, start() brings it back on the
    same store."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        import requests

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(self.uri + "/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, 9)
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    if s.proc.poll() is None:
        s.stop()


def _cli(tmp_path, uri, *args, **env):
    return [sys.executable, "-m", "sf_mlflow.cli", *args], {
        **os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", **env}


def test_the_server_killed_mid_train_costs_nothing(server, tmp_path):
    config = tmp_path / "outage.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    cmd, env = _cli(tmp_path, server.uri, "preprocess", "-c", str(config))
    assert subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True).returncode == 0
    cmd, env = _cli(tmp_path, server.uri, "train", "-c", str(config))
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        train = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while "iter   200/1200" not in log.read_text():
            assert train.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        server.stop()                               # mid-train: ~1,000 iterations to go
        while "unreachable since" not in log.read_text():
            assert train.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(5.0)
        server.start()
        code = train.wait(timeout=600)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "training goes on" in text
    assert "Traceback" not in text
    client = MlflowClient(server.uri)
    [exp] = [e for e in client.search_experiments() if e.name == "server_outage"]
    [run] = [r for r in client.search_runs([exp.experiment_id])
             if r.data.tags.get("sf.stage") == "train"]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "elbo")]
    assert sorted(set(steps)) == list(range(1, 1201))          # no iteration lost
    assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path == "model.pth"]


def test_a_server_that_never_answers_fails_the_stage_in_one_line_within_the_wait(tmp_path):
    config = tmp_path / "outage.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    uri = f"http://127.0.0.1:{_free_port()}"
    cmd, env = _cli(tmp_path, uri, "preprocess", "-c", str(config), SF_TRACKING_WAIT_S="3")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: the tracking server {uri} does not answer (no reply from "
                     f"{uri}/health for 3 s); start it (mlflow server ...) or point "
                     "MLFLOW_TRACKING_URI at a running one; SF_TRACKING_WAIT_S=<seconds> "
                     "waits longer"], proc.stderr[-3000:]


def _wait_for(log: Path, proc, text: str, deadline: float) -> None:
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def _train_run(client: MlflowClient, run_id: str):
    run = client.get_run(run_id)
    assert run.data.tags.get("sf.stage") == "train"
    return run


def test_a_server_gone_for_good_leaves_every_write_in_a_folder_that_sync_uploads(server,
                                                                                 tmp_path):
    """Server killed mid-train and not back within SF_TRACKING_OUTAGE_S: the fit finishes,
    its writes go to <output_dir>/train/<run>.unsent, the stage ends with one line naming it
    and the sync command. A second fit interrupted while the server is away keeps its
    checkpoint there too, within 2 s. Once the server is back, one sync uploads both; the
    interrupted run then resumes from its checkpoint."""
    config = tmp_path / "outage.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    cmd, env = _cli(tmp_path, server.uri, "preprocess", "-c", str(config))
    assert subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True).returncode == 0
    cmd, env = _cli(tmp_path, server.uri, "train", "-c", str(config), SF_TRACKING_OUTAGE_S="3")
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        train = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        _wait_for(log, train, "iter   200/1200", time.monotonic() + 300)
        server.stop()
        code = train.wait(timeout=600)
    text = log.read_text()
    assert code == 2 and "Traceback" not in text, text[-3000:]
    [kept] = sorted((tmp_path / "outputs" / "train").glob("*.unsent"))
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"error: the tracking server {server.uri} has not answered since "), last
    assert last.endswith(f"are kept in {kept}; upload them once the server is back: "
                         f"spatial_factorization sync {kept}"), last
    assert (tmp_path / "outputs" / "train" / kept.name[:-len(".unsent")] / "model.pth").is_file()

    server.start()
    cmd, env = _cli(tmp_path, server.uri, "train", "-c", str(config))
    log = tmp_path / "interrupted.log"
    with open(log, "w") as out:
        train = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        _wait_for(log, train, "iter   100/1200", time.monotonic() + 300)
        server.stop()
        _wait_for(log, train, "unreachable since", time.monotonic() + 300)
        train.send_signal(2)
        sent = time.monotonic()
        code = train.wait(timeout=60)
        took = time.monotonic() - sent
    text = log.read_text()
    assert code == 130 and "Traceback" not in text, text[-3000:]
    assert took < 2.0, (took, text[-3000:])     # one quick try, no waiting for the server
    second = [p for p in (tmp_path / "outputs" / "train").glob("*.unsent") if p != kept]
    assert len(second) == 1 and f"spatial_factorization sync {second[0]}" in text, text[-3000:]

    server.start()
    cmd, env = _cli(tmp_path, server.uri, "sync", str(kept), str(second[0]))
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not kept.exists() and not second[0].exists()
    client = MlflowClient(server.uri)
    done = _train_run(client, kept.name[:-len(".unsent")])
    assert done.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(done.info.run_id, "elbo")]
    assert sorted(set(steps)) == list(range(1, 1201))
    assert "final_elbo" in done.data.metrics and done.data.tags["sf.converged"] in ("true", "false")
    assert {a.path for a in client.list_artifacts(done.info.run_id)} >= {
        "model.pth", "training.json", "elbo_history.csv"}
    stopped = _train_run(client, second[0].name[:-len(".unsent")])
    assert stopped.info.status == "KILLED" and stopped.data.tags["sf.interrupted"] == "true"
    at = int(stopped.data.metrics["interrupted_at_iteration"])
    assert sorted(m.step for m in client.get_metric_history(stopped.info.run_id, "elbo")) == \
        list(range(1, at + 1))

    cmd, env = _cli(tmp_path, server.uri, "train", "-c", str(config), "--resume-from",
                    stopped.info.run_id)
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"resuming run {stopped.info.run_id} from iteration {at}" in proc.stdout, \
        proc.stdout[-3000:]
