"""Shared fixtures: the real data folder and a throw-away MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:
    # One torch thread per test worker (and its subprocesses, which inherit the variable):
    # the workers already use every core, and oversubscribed threads only slow them down.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The folder of real .h5ad files; see ../shared/data/README.md.
SHARED_DATA_ENV = "SF_SHARED_DATA"


def shared_data_dir() -> Path:
    return Path(os.environ.get(SHARED_DATA_ENV, REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture
def shared_file():
    """Return a function giving the path of a file in the shared data folder, or skip."""

    def get(name: str) -> Path:
        path = shared_data_dir() / name
        if not path.is_file():
            pytest.skip(f"{path} not found: set {SHARED_DATA_ENV} to the folder holding {name}")
        return path

    return get


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store in a temp dir, made the current tracking URI.

    Yields the tracking URI. The working directory moves to the temp dir so
    nothing lands in the repository.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None) if hasattr(mlflow, "set_tracking_uri") else None


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's many small torch ops on one thread, restoring the setting after.

    On a shared machine a busy core stalls every OpenMP parallel region, which can make
    thousands of tiny ops 10-30x slower with two threads than with one. A module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- nothing written into the checkout ------------------------------------------------------

#: What a stage writes relative to the working directory when nothing points it elsewhere
#: (the default store and its artifacts, stage outputs, the tune stage's Optuna file).
_WRITTEN_BY_DEFAULT = ("mlflow.db", "mlruns", "mlartifacts", "outputs", "optuna.db")


@pytest.fixture(autouse=True)
def _store_and_outputs_in_tmp(tmp_path_factory, monkeypatch):
    """Every test gets a throw-away tracking store unless it sets its own (``mlflow_store``
    does, and so do the subprocess tests), so no test can write runs into the checkout."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        folder = tmp_path_factory.mktemp("store")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")


def pytest_sessionstart(session):
    session.config._sf_present = {p for p in _WRITTEN_BY_DEFAULT if (REPO_ROOT / p).exists()}


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a test left a store or outputs inside the checkout."""
    if hasattr(session.config, "workerinput"):  # xdist workers: the controller checks once
        return
    before = getattr(session.config, "_sf_present", set())
    left = [p for p in _WRITTEN_BY_DEFAULT if (REPO_ROOT / p).exists() and p not in before]
    if left:
        print(f"\nerror: the tests wrote {', '.join(left)} into the checkout {REPO_ROOT}; "
              "point every store and output_dir at a temporary folder", flush=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
