"""Broken artifacts and unusable stores end a command with one ``error:`` line.

One real sqlite store with a preprocess, a train and an analyze run is made per module;
each test damages a real file of it (and puts it back), locks the store from this process,
mounts it read-only or writes to a full device, then runs the command line in a
subprocess and checks: exit status 2, exactly one stderr line, starting ``error:``, naming
the run and the artifact and what to do, no traceback and never torch's advice to turn
off weights-only loading.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from sf_mlflow.cli import main
from sf_mlflow.errors import ArtifactError
from sf_mlflow.models.pnmf import PNMF

REPO = Path(__file__).resolve().parents[1]

CONFIG = {
    "name": "artifact_faults",
    "seed": 3,
    "dataset": "synthetic",
    "output_dir": "outputs",
    "data": {"synthetic": {"n_spots": 200, "n_genes": 40, "n_components": 2, "n_groups": 2,
                           "mean_counts": 200}},
    "preprocessing": {"min_counts": 5, "min_cells": 3, "holdout_fraction": 0.1,
                      "spatial_scale": 10.0},
    "model": {"n_components": 2, "prior": "Gaussian"},
    "training": {"max_iter": 5, "device": "cpu", "log_every": 5},
}


class Tampered:
    """Any class: a pickle naming it is not a file of tensors and plain values."""


def _runs(client, stage):
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(exps) if r.data.tags.get("sf.stage") == stage]


@pytest.fixture(scope="module")
def store():
    """A store (in a world-readable temp folder) with preprocess, train and analyze runs."""
    base = Path(tempfile.mkdtemp(prefix="sf-artifact-faults-"))
    os.chmod(base, 0o755)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(base)
        client = MlflowClient(uri)
        assert main(["preprocess", "-c", str(config)]) == 0
        (pre,) = _runs(client, "preprocess")
        assert main(["train", "-c", str(config), "--preprocess-run-id", pre.info.run_id]) == 0
        (train,) = _runs(client, "train")
        assert main(["analyze", "-c", str(config), "--train-run-id", train.info.run_id]) == 0
        (analyze,) = _runs(client, "analyze")
    yield SimpleNamespace(base=base, uri=uri, config=config, client=client, pre=pre, train=train,
                          analyze=analyze)
    shutil.rmtree(base, ignore_errors=True)


def artifact_file(run, name: str) -> Path:
    uri = run.info.artifact_uri
    root = Path(urlparse(uri).path if uri.startswith("file:") else uri)
    path = root / name
    assert path.is_file(), path
    return path


@contextlib.contextmanager
def damaged(path: Path, how: str, payload: bytes | None = None):
    """``path`` truncated, emptied, deleted or replaced by ``payload``; put back afterwards."""
    original = path.read_bytes()
    try:
        if how == "truncated":
            path.write_bytes(original[: len(original) // 2])
        elif how == "empty":
            path.write_bytes(b"")
        elif how == "deleted":
            path.unlink()
        else:
            path.write_bytes(payload)
        yield
    finally:
        path.write_bytes(original)


def cli(store, *args, cwd=None, prefix=()):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri, "PYTHONPATH": str(REPO)}
    return subprocess.run([*prefix, sys.executable, "-m", "sf_mlflow.cli", *args],
                          capture_output=True, text=True, env=env, cwd=cwd or store.base)


def error_line(proc) -> str:
    """The one stderr line of a command that failed cleanly."""
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-4000:]
    return lines[0]


def no_run_left_running(store):
    exps = [e.experiment_id for e in store.client.search_experiments()]
    assert not [r for r in store.client.search_runs(exps) if r.info.status == "RUNNING"]


# ---- damaged artifacts -------------------------------------------------------------------------

def test_truncated_counts_of_a_preprocess_run(store):
    pre_id = store.pre.info.run_id
    with damaged(artifact_file(store.pre, "data/Y.npz"), "truncated"):
        proc = cli(store, "train", "-c", str(store.config), "--preprocess-run-id", pre_id)
    line = error_line(proc)
    assert f"artifact data/Y.npz of preprocess run {pre_id} is damaged (not a valid .npz" in line
    assert "re-run the preprocess stage (mlflow run . -e preprocess" in line
    # the train stage reads its inputs before it opens a run: a damaged input makes none
    before = {r.info.run_id for r in _runs(store.client, "train")}
    with damaged(artifact_file(store.pre, "data/Y.npz"), "truncated"):
        cli(store, "train", "-c", str(store.config), "--preprocess-run-id", pre_id)
    assert {r.info.run_id for r in _runs(store.client, "train")} == before
    no_run_left_running(store)


@pytest.mark.parametrize("how", ["truncated", "empty", "deleted"])
def test_broken_model_of_a_train_run(store, how):
    train_id = store.train.info.run_id
    with damaged(artifact_file(store.train, "model.pth"), how):
        proc = cli(store, "analyze", "-c", str(store.config), "--train-run-id", train_id)
    line = error_line(proc)
    assert f"artifact model.pth of train run {train_id} is " in line
    assert ("missing from its artifact store" if how == "deleted" else "damaged") in line
    assert "re-run the train stage (mlflow run . -e train" in line
    no_run_left_running(store)


def test_tampered_model_is_not_a_valid_model(store, tmp_path):
    train_id = store.train.info.run_id
    tampered = tmp_path / "tampered.pth"
    torch.save({"format_version": 2, "hyperparameters": Tampered()}, tampered)
    with damaged(artifact_file(store.train, "model.pth"), "replaced", tampered.read_bytes()):
        proc = cli(store, "analyze", "-c", str(store.config), "--train-run-id", train_id)
    line = error_line(proc)
    assert (f"artifact model.pth of train run {train_id} is damaged (not a valid sf_mlflow "
            "model: it holds Python objects") in line
    assert "Tampered" in line and "re-run the train stage" in line
    assert "weights_only" not in line

    # the library call says the same, as an ArtifactError
    with pytest.raises(ArtifactError, match="is not a valid sf_mlflow model") as info:
        PNMF.load(tampered)
    assert "weights_only" not in str(info.value) and info.value.path == tampered
    for how in ("truncated", "empty"):
        copy = tmp_path / f"{how}.pth"
        shutil.copy(artifact_file(store.train, "model.pth"), copy)
        with damaged(copy, how), pytest.raises(ArtifactError, match=f"the file is {how}"):
            PNMF.load(copy)


# ---- the store ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lock", ["EXCLUSIVE", "IMMEDIATE"])
def test_store_locked_by_another_writer(store, lock):
    """EXCLUSIVE: even reading waits; IMMEDIATE (a writer mid-transaction): the first write.

    sqlite waits MLflow's busy timeout (20 s, fixed in MLflow) before giving up."""
    holder = sqlite3.connect(store.base / "mlflow.db", isolation_level=None)
    try:
        holder.execute(f"BEGIN {lock}")
        proc = cli(store, "preprocess", "-c", str(store.config))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    line = error_line(proc)
    assert line == (f"error: the tracking store {store.uri} is locked by another writer (sqlite "
                    "gave up after waiting 20 s); wait for it to finish or point "
                    "MLFLOW_TRACKING_URI at another store")
    no_run_left_running(store)


def _read_only_mount_prefix(folder: Path) -> tuple[str, ...] | None:
    """A command prefix running the rest with ``folder`` mounted read-only, or None."""
    script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"')
    prefix = ("unshare", "-rm", "sh", "-c", script, str(folder))
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run([*prefix, "sh", "-c", f'touch "{folder}/probe"'], capture_output=True,
                           text=True)
    if probe.returncode == 0 or "Read-only file system" not in probe.stderr:
        (folder / "probe").unlink(missing_ok=True)
        return None
    return prefix


@contextlib.contextmanager
def read_only(folder: Path):
    """Run commands with ``folder`` read-only: a read-only mount (works as root), else chmod."""
    prefix = _read_only_mount_prefix(folder)
    if prefix is not None:
        yield prefix
        return
    if os.geteuid() == 0:
        pytest.skip("no read-only mount (unshare -rm) here, and chmod does not stop root")
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    try:
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        yield ()
    finally:
        for p, mode in reversed(list(modes.items())):
            p.chmod(mode)


def test_read_only_store_reads_but_refuses_to_write(store, tmp_path):
    analyze_id = store.analyze.info.run_id
    (store.base / "mlflow.db.init-lock").unlink(missing_ok=True)  # as on a fresh copy
    with read_only(store.base) as prefix:
        out = tmp_path / "results.h5ad"
        exported = cli(store, "export", "--run-id", analyze_id, "-o", str(out), cwd=tmp_path,
                       prefix=prefix)
        assert exported.returncode == 0, exported.stderr[-4000:]
        assert out.is_file()
        proc = cli(store, "preprocess", "-c", str(store.config), cwd=tmp_path, prefix=prefix)
    line = error_line(proc)
    assert line.startswith(f"error: the tracking store {store.uri} is read-only")
    assert "point MLFLOW_TRACKING_URI at the copy" in line
    no_run_left_running(store)


# ---- the disk ----------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_full_disk_names_the_path(store, tmp_path):
    from sf_mlflow.tracking.store import explain_failure

    with pytest.raises(OSError) as info:
        with open("/dev/full", "wb") as fh:
            fh.write(b"x" * 65536)
            fh.flush()
    assert info.value.errno == errno.ENOSPC
    line = explain_failure(info.value)
    assert line.startswith("no space left on the device writing ")
    assert line.endswith("free space or set output_dir (or the artifact location) elsewhere")
    # (export writes beside its target and renames: its failed writes are tested in
    # test_export.py, with a file size limit)


def test_a_damaged_store_is_one_line_that_says_how_to_go_on(store, tmp_path):
    import mlflow.store.db.utils  # noqa: F401  (its logger's filter is what keeps the line one)

    copy = tmp_path / "mlflow.db"
    shutil.copy(store.base / "mlflow.db", copy)
    with open(copy, "r+b") as fh:          # pages of the tables overwritten, the header kept
        fh.seek(4096 * 3)
        fh.write(bytes(range(256)) * 16 * 6)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 200)
    # sqlite's quick_check finds the damage before a run is made (one could not be ended)
    for db, problem in ((copy, r"(quick_check found .+|database disk image is malformed)"),
                        (garbage, "file is not a database")):
        damaged_store = SimpleNamespace(uri=f"sqlite:///{db}", base=store.base)
        before = db.read_bytes()
        line = error_line(cli(damaged_store, "preprocess", "-c", str(store.config), cwd=tmp_path))
        assert re.fullmatch(
            re.escape(f"error: the tracking store sqlite:///{db} is damaged (sqlite: ")
            + problem + re.escape(f"); restore {db} from a backup, or point MLFLOW_TRACKING_URI "
                                  "at a new store (e.g. sqlite:///mlflow-new.db); the runs' "
                                  "artifacts beside it are untouched"), line), line
        assert db.read_bytes() == before           # nothing written into it


@pytest.mark.parametrize("where", ["/proc", "/proc/self/fd", "/dev/full", "a file"])
def test_an_output_dir_that_is_no_writable_folder_is_refused_before_a_run_opens(store, tmp_path,
                                                                                where):
    if where == "a file":
        where = str(tmp_path / "notes.txt")
        Path(where).write_text("mine")
    if not Path(where).exists():
        pytest.skip(f"no {where} on this system")
    before = len(_runs(store.client, "preprocess"))
    line = error_line(cli(store, "preprocess", "-c", str(store.config), "--set",
                          f"output_dir={where}", cwd=tmp_path))
    assert line.startswith(f"error: {store.config}: output_dir '{where}' ")
    assert line.endswith("set output_dir to a folder you can write")
    assert len(_runs(store.client, "preprocess")) == before      # no run was opened


def test_a_data_path_that_is_no_file_says_what_it_is(store, tmp_path):
    for path, what in (("/dev/zero", "not a regular file (a device, pipe or socket)"),
                       (str(tmp_path), "a folder")):
        line = error_line(cli(store, "preprocess", "-c", str(store.config), "--set",
                              "dataset=h5ad", "--set", f"data.path={path}", cwd=tmp_path))
        assert line == f"error: data.path '{path}' is {what}; set data.path to an .h5ad file"


def test_a_full_disk_inside_a_stage_names_its_output_folder(tmp_path):
    """numpy raises ENOSPC without a file name; the staging folder supplies one."""
    import numpy as np

    from sf_mlflow.config import load_config
    from sf_mlflow.stages._common import staging_dir
    from sf_mlflow.tracking.store import explain_failure

    config = load_config(REPO / "configs" / "quickstart.yaml",
                         [f"output_dir={tmp_path / 'outputs'}"])
    with pytest.raises(OSError) as caught:
        with staging_dir(config, "analyze", "run123"):
            with open("/dev/full", "wb") as fh:
                np.save(fh, np.zeros(100_000))
                fh.flush()
    line = explain_failure(caught.value)
    assert line.startswith("no space left on the device writing ")
    assert line.split("writing ", 1)[1].startswith(str(tmp_path / "outputs" / "analyze" / "run123.partial"))
    assert not (tmp_path / "outputs" / "analyze" / "run123.partial").exists()
    assert not (tmp_path / "outputs" / "analyze" / "run123").exists()


def test_any_os_error_that_names_its_path_is_one_line():
    from sf_mlflow.tracking.store import explain_failure

    try:
        open("/proc/self/fd/no-such-entry", "rb")
    except OSError as err:
        line = explain_failure(err)
    assert line == ("cannot use /proc/self/fd/no-such-entry (No such file or directory); check "
                    "the path, or set output_dir (or the artifact location) elsewhere")
    assert explain_failure(OSError(errno.EINVAL, "unnamed")) is None   # a bug keeps its traceback
