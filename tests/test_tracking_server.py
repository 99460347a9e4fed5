"""A real ``mlflow server`` (sqlite backend, on 127.0.0.1) that goes away: while it is down a
fit goes on and its ELBO curve waits in memory; the run's other writes wait for the server;
when it is back, the run is complete. A server that never answered fails a stage in one line.
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
