"""Fault injection: run each known fault against a fresh store and report what it left behind.

Usage::

    python benchmarks/faults.py                 # every fault
    python benchmarks/faults.py --only sigkill_fit register_bad_name
    python benchmarks/faults.py --list

Each fault gets a fresh folder with its own sqlite MLflow store, outputs and config (a small
copy of ``configs/quickstart.yaml``, one model), runs the pipeline's command line in real
subprocesses, injects the fault (a real signal, a damaged artifact file, a locked, read-only or
full file system ...) and prints one JSON line:

``{"fault", "exit_code", "runs": {run_name: status}, "running", "complete_outputs_of_failed_runs",
"error_line", "traceback", "ok", ...}``

``running`` counts runs left RUNNING; ``complete_outputs_of_failed_runs`` lists output folders
``<output_dir>/<stage>/<run_id>`` (not ``.partial``) whose run did not finish. The goal is zero
of both for every fault, and an ``error:`` line without a traceback where the fault is the
user's or the store's. ``ok`` states whether the fault's own expectation held (each fault
says what it expects in ``expect``). The read-only and full-disk faults mount a file system
(tmpfs or a read-only bind mount) and are reported ``skipped`` where mounting is not allowed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: A small copy of the quickstart: one MGGP-SVGP model, a few seconds per stage.
SMALL = {"data.synthetic.n_spots": 300, "data.synthetic.n_genes": 40,
         "model.num_inducing": 30, "training.max_iter": 30, "training.log_every": 10}
#: Settings that keep a fit running until it is stopped from outside.
ENDLESS = {"training.max_iter": 1_000_000, "training.tol": 0.0,
           "training.validation_every": 0, "training.log_every": 1}


class Workspace:
    """One fault's folder: config, store, outputs, and the commands run in it."""

    def __init__(self, root: Path, overrides: dict | None = None):
        self.root = root
        self.db = root / "mlflow.db"
        self.uri = f"sqlite:///{self.db}"
        config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
        config.pop("models", None)
        config["output_dir"] = str(root / "outputs")
        for key, value in {**SMALL, **(overrides or {})}.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        self.config = root / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri,
                    "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "SF_HEARTBEAT_INTERVAL": "1", "PYTHONUNBUFFERED": "1"}
        self.last: subprocess.CompletedProcess | None = None

    def command(self, stage: str, *args: str, config: Path | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "sf_mlflow.cli", stage]
        if stage not in ("export", "sync"):
            cmd += ["-c", str(config or self.config)]
        return cmd + list(args)

    def run(self, stage: str, *args: str, config: Path | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
        self.last = subprocess.run(self.command(stage, *args, config=config), cwd=self.root,
                                   env=self.env, capture_output=True, text=True, timeout=timeout)
        return self.last

    def start(self, stage: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(stage, *args), cwd=self.root, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self, proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
        out, err = proc.communicate(timeout=timeout)
        self.last = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return self.last

    # ---- the store, read directly (never through the package under test) --------------------

    def runs(self) -> list[dict]:
        if not self.db.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as con:
            rows = con.execute("SELECT run_uuid, name, status, artifact_uri FROM runs "
                               "ORDER BY start_time").fetchall()
            tags = con.execute("SELECT run_uuid, key, value FROM tags").fetchall()
        by_run: dict[str, dict] = {r[0]: {} for r in rows}
        for run_id, key, value in tags:
            by_run.setdefault(run_id, {})[key] = value
        return [{"run_id": r[0], "name": r[1], "status": r[2], "artifact_uri": r[3],
                 "tags": by_run.get(r[0], {})} for r in rows]

    def run_of(self, stage: str, status: str | None = None) -> dict | None:
        found = [r for r in self.runs() if r["tags"].get("sf.stage") == stage
                 and (status is None or r["status"] == status)]
        return found[-1] if found else None

    def wait_for(self, test: Callable[[], object], proc: subprocess.Popen | None = None,
                 timeout: float = 300, what: str = "") -> object:
        """Poll ``test()`` until it is truthy; fail if ``proc`` ends first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                value = test()
            except sqlite3.OperationalError:  # the store is being written: try again
                value = None
            if value:
                return value
            if proc is not None and proc.poll() is not None:
                out, err = proc.communicate()
                raise RuntimeError(f"the command ended (rc {proc.returncode}) before {what}:\n"
                                   f"{out[-2000:]}\n{err[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}")

    def artifact(self, run: dict, path: str) -> Path:
        uri = run["artifact_uri"]
        base = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        return base / path

    def complete_outputs_of_failed_runs(self) -> list[str]:
        status = {r["run_id"]: r["status"] for r in self.runs()}
        bad = []
        for folder in (self.root / "outputs").glob("*/*"):
            if folder.is_dir() and not folder.name.endswith((".partial", ".unsent")) \
                    and status.get(folder.name) != "FINISHED":
                bad.append(str(folder.relative_to(self.root)))
        return sorted(bad)


def elbo_steps(ws: Workspace, run_id: str) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{ws.db}?mode=ro", uri=True)) as con:
        row = con.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid = ? AND key = 'elbo'",
                          (run_id,)).fetchone()
    return int(row[0])


def running_fit(ws: Workspace, proc: subprocess.Popen, min_steps: int = 3) -> dict:
    """The RUNNING train run of ``proc`` once it has logged ``min_steps`` ELBO values."""
    def ready():
        run = ws.run_of("train", "RUNNING")
        return run if run and elbo_steps(ws, run["run_id"]) >= min_steps else None
    return ws.wait_for(ready, proc, what="a train run logging its ELBO")


def endless(ws: Workspace) -> list[str]:
    return [f"--set={k}={v}" for k, v in ENDLESS.items()]


def mounted(kind: str, path: Path, size: str = "1m") -> contextlib.AbstractContextManager:
    """A tmpfs of ``size`` (kind "full") or a read-only bind of ``path`` onto itself ("ro")."""
    @contextlib.contextmanager
    def ctx():
        if kind == "full":
            cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
            steps = [cmd]
        else:
            steps = [["mount", "--bind", str(path), str(path)],
                     ["mount", "-o", "remount,ro,bind", str(path)]]
        for step in steps:
            if subprocess.run(step, capture_output=True).returncode != 0:
                raise PermissionError(f"cannot run {' '.join(step)} (needs CAP_SYS_ADMIN)")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
    return ctx()


# ---- the faults ---------------------------------------------------------------------------------
# Each takes a fresh Workspace, returns (exit code of the command the fault hit, expectation met,
# extra facts). The expectation is the behaviour the integrity issue asks for.

def fault_wrong_lineage(ws):
    """train on a preprocess run made with other settings (another data set)."""
    ws.run("preprocess", "--set", "data.synthetic.n_spots=200")
    other = ws.run_of("preprocess", "FINISHED")["run_id"]
    before = len(ws.runs())
    rc = ws.run("train", "--preprocess-run-id", other).returncode
    created = len(ws.runs()) - before
    return rc, rc == 2 and created == 0, {"runs_created": created,
                                           "expect": "refused before any run is created"}


def fault_sigterm_analyze_in_main(ws):
    """SIGTERM while main's analyze stage runs."""
    proc = ws.start("main", "--set", "analysis.group_loadings_iter=100000")
    ws.wait_for(lambda: ws.run_of("analyze", "RUNNING"), proc, what="the analyze run")
    proc.send_signal(signal.SIGTERM)
    rc = ws.finish(proc).returncode
    left = [r for r in ws.runs() if r["status"] == "RUNNING"]
    return rc, rc != 0 and not left, {"expect": "main and analyze runs end KILLED/FAILED"}


def fault_sigterm_train_then_main(ws):
    """SIGTERM during main's fit, then the same main again: it resumes from the checkpoint."""
    long_fit = [f"--set={k}={v}" for k, v in {**ENDLESS, "training.max_iter": 400}.items()]
    proc = ws.start("main", *long_fit)
    killed = running_fit(ws, proc)["run_id"]
    proc.send_signal(signal.SIGTERM)
    rc = ws.finish(proc).returncode
    again = ws.run("main", *long_fit)
    resumed = [r for r in ws.runs() if r["tags"].get("sf.resumed_from") == killed]
    ok = rc != 0 and again.returncode == 0 and bool(resumed)
    return rc, ok, {"second_main_exit_code": again.returncode,
                    "resumed_from_checkpoint": bool(resumed),
                    "expect": "the second main resumes the interrupted train run"}


def fault_sigkill_fit(ws):
    """kill -9 during a fit; a later command's lookup marks the dead run FAILED."""
    ws.run("preprocess")
    proc = ws.start("train", *endless(ws))
    dead = running_fit(ws, proc)["run_id"]
    proc.kill()
    ws.finish(proc)
    ws.run("analyze")  # a lookup: no finished train run exists, but it sweeps the dead one
    run = next(r for r in ws.runs() if r["run_id"] == dead)
    return -9, run["status"] == "FAILED", {
        "killed_run_status_after_lookup": run["status"],
        "reason": run["tags"].get("sf.failure_reason"),
        "expect": "the next lookup marks the dead run FAILED with a reason"}


def fault_sigkill_tune_worker(ws):
    """kill -9 of a tune worker mid-trial; the next worker fails and retries that trial."""
    storage = f"sqlite:///{ws.root / 'optuna.db'}"
    config = yaml.safe_load(ws.config.read_text())
    config["tuning"] = {"n_trials": 2, "lengthscale": {"low": 5.0, "high": 20.0, "log": True},
                        "num_inducing": {"low": 20, "high": 60, "step": 10}}
    ws.config.write_text(yaml.safe_dump(config))
    ws.run("preprocess")
    tune = ["--storage", storage, "--n-trials", "2", "--study-name", "faults"]
    env_fast = {"SF_OPTUNA_HEARTBEAT_INTERVAL": "1", "SF_OPTUNA_GRACE_PERIOD": "3"}
    ws.env.update(env_fast)
    proc = ws.start("tune", *tune, *endless(ws))
    running_fit(ws, proc)
    proc.kill()
    ws.finish(proc)
    time.sleep(5)  # let the dead worker's Optuna heartbeat go stale
    rc = ws.run("tune", *tune, "--set", "training.max_iter=20").returncode
    import optuna

    study = optuna.load_study(study_name="faults", storage=storage)
    states = [t.state.name for t in study.trials]
    ok = rc == 0 and "RUNNING" not in states and "FAIL" in states
    return rc, ok, {"optuna_trials": states,
                    "expect": "the dead trial is FAILED (and retried), not counted"}


def fault_register_bad_name(ws):
    """--register-as a/b: MLflow refuses the name; refused before the fit."""
    ws.run("preprocess")
    rc = ws.run("train", "--register-as", "a/b").returncode
    fits = [r for r in ws.runs() if r["tags"].get("sf.stage") == "train"]
    return rc, rc == 2 and not fits, {"train_runs_created": len(fits),
                                       "expect": "refused before the fit"}


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "deleted":
        path.unlink()
    elif how == "tampered":
        import torch

        # a valid torch archive whose pickle names a callable: weights-only loading refuses it
        torch.save({"state": os.getcwd, "format": 2}, path)


def fault_truncated_counts(ws):
    """A truncated data/Y.npz artifact of the preprocess run; train reads it."""
    ws.run("preprocess")
    pre = ws.run_of("preprocess", "FINISHED")
    _damage(ws.artifact(pre, "data/Y.npz"), "truncated")
    rc = ws.run("train", "--preprocess-run-id", pre["run_id"]).returncode
    return rc, rc == 2, {"expect": "one error line naming the run and data/Y.npz"}


def _damaged_model(how):
    def fault(ws):
        ws.run("preprocess")
        ws.run("train")
        train = ws.run_of("train", "FINISHED")
        _damage(ws.artifact(train, "model.pth"), how)
        rc = ws.run("analyze", "--train-run-id", train["run_id"]).returncode
        text = ws.last.stderr
        ok = rc == 2 and "weights_only=False" not in text
        return rc, ok, {"expect": f"{how} model.pth: one error line naming the run"}
    fault.__doc__ = f"A {how} model.pth of the train run; analyze reads it."
    return fault


def fault_locked_store(ws):
    """The store is locked by another writer for the whole command."""
    ws.run("preprocess")
    con = sqlite3.connect(ws.db, timeout=60, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        rc = ws.run("train", timeout=600).returncode
    finally:
        con.execute("ROLLBACK")
        con.close()
    return rc, rc == 2, {"expect": "one error line: the store is locked; wait or use another"}


def fault_readonly_store(ws):
    """The store's folder is read-only: reading works, writing stages say so."""
    ws.run("main")
    analyze = ws.run_of("analyze", "FINISHED")
    elsewhere = Path(tempfile.mkdtemp(prefix="sf-fault-export-"))   # outside the read-only folder
    try:
        with mounted("ro", ws.root):
            read = subprocess.run(ws.command("export", "--run-id", analyze["run_id"], "-o",
                                             str(elsewhere / "readonly.h5ad")),
                                  cwd=elsewhere, env=ws.env, capture_output=True, text=True)
            rc = ws.run("train").returncode
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
    return rc, read.returncode == 0 and rc == 2, {
        "read_exit_code": read.returncode, "read_stderr": read.stderr.strip()[-300:],
        "expect": "export (a read) works; train says the store is read-only"}


def fault_full_disk(ws):
    """The output folder's file system is full (a 64 KiB tmpfs)."""
    out = ws.root / "outputs"
    out.mkdir()
    with mounted("full", out, size="64k"):
        rc = ws.run("preprocess").returncode
    return rc, rc == 2, {"expect": "one error line naming the full path"}


def _h5ad(ws, name: str, n_obs: int, groups: list[str] | None, live: int | None = None) -> Path:
    """An h5ad of Poisson counts; with ``live``, only the first ``live`` spots have counts."""
    import anndata
    import numpy as np

    rng = np.random.default_rng(0)
    X = rng.poisson(5.0, size=(n_obs, 30)).astype(np.float32)
    if live is not None:
        X[live:] = 0
    adata = anndata.AnnData(X)
    adata.obsm["spatial"] = rng.uniform(0, 10, size=(n_obs, 2))
    if groups is not None:
        import pandas as pd

        adata.obs["cell_type"] = pd.Categorical([groups[i % len(groups)] for i in range(n_obs)])
    path = ws.root / name
    adata.write_h5ad(path)
    return path


def _h5ad_config(ws, path: Path, group_key: str | None) -> Path:
    config = yaml.safe_load(ws.config.read_text())
    config["dataset"] = "h5ad"
    config["data"] = {"path": str(path), "group_key": group_key}
    config["model"]["groups"] = group_key is not None
    out = ws.root / f"{path.stem}.yaml"
    out.write_text(yaml.safe_dump(config))
    return out


def fault_empty_h5ad(ws):
    """An h5ad file with no spots."""
    config = _h5ad_config(ws, _h5ad(ws, "empty.h5ad", 0, ["a"]), "cell_type")
    rc = ws.run("preprocess", config=config).returncode
    text = ws.last.stderr.lower()
    return rc, rc == 2 and ("no spots" in text or "0 spots" in text), {
        "expect": "says the file has no spots (not a group-label problem)"}


def fault_one_spot(ws):
    """Filters that leave a single spot: refused by preprocess, not by analyze."""
    path = _h5ad(ws, "one_spot.h5ad", 50, None, live=1)
    config = _h5ad_config(ws, path, None)
    rc = ws.run("preprocess", "--set", "preprocessing.min_cells=1",
                "--set", "preprocessing.holdout_fraction=0.0", config=config).returncode
    return rc, rc == 2 and not ws.run_of("preprocess", "FINISHED"), {
        "expect": "preprocess refuses fewer than moran_k + 1 spots"}


def fault_figures_wrong_stage(ws):
    """figures given a train run's ID as an analyze run ID."""
    ws.run("preprocess")
    ws.run("train")
    train = ws.run_of("train", "FINISHED")["run_id"]
    before = len(ws.runs())
    rc = ws.run("figures", "--analyze-run-ids", train).returncode
    created = len(ws.runs()) - before
    return rc, rc == 2 and created == 0, {"runs_created": created,
                                           "expect": "refused before a run is created"}


def fault_group_name_collision(ws):
    """Two group names that sanitise to the same file name ('L2/3' and 'L2_3')."""
    config = _h5ad_config(ws, _h5ad(ws, "groups.h5ad", 400, ["L2/3", "L2_3", "L5"]),
                          "cell_type")
    ws.run("preprocess", config=config)
    ws.run("train", config=config)
    rc = ws.run("analyze", config=config).returncode
    analyze = ws.run_of("analyze", "FINISHED")
    files = sorted(p.name for p in ws.artifact(analyze, "").glob("loadings_group_*.npy")) \
        if analyze else []
    return rc, rc == 0 and len(files) == 3, {"group_loading_files": files,
                                             "expect": "three distinct loadings files"}


FAULTS: dict[str, Callable] = {
    "wrong_lineage": fault_wrong_lineage,
    "sigterm_analyze_in_main": fault_sigterm_analyze_in_main,
    "sigterm_train_then_main": fault_sigterm_train_then_main,
    "sigkill_fit": fault_sigkill_fit,
    "sigkill_tune_worker": fault_sigkill_tune_worker,
    "register_bad_name": fault_register_bad_name,
    "truncated_counts": fault_truncated_counts,
    "truncated_model": _damaged_model("truncated"),
    "empty_model": _damaged_model("empty"),
    "deleted_model": _damaged_model("deleted"),
    "tampered_model": _damaged_model("tampered"),
    "locked_store": fault_locked_store,
    "readonly_store": fault_readonly_store,
    "full_disk": fault_full_disk,
    "empty_h5ad": fault_empty_h5ad,
    "one_spot": fault_one_spot,
    "figures_wrong_stage": fault_figures_wrong_stage,
    "group_name_collision": fault_group_name_collision,
}


def all_faults() -> dict[str, Callable]:
    """:data:`FAULTS` and those of ``faults_more.py`` (issue 22: inputs, store, concurrency)."""
    from faults_more import MORE

    return {**FAULTS, **MORE}


def run_fault(name: str, keep: Path | None) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"sf-fault-{name}-", dir=keep))
    ws = Workspace(root)
    record: dict = {"fault": name}
    try:
        rc, ok, extra = all_faults()[name](ws)
        record.update(exit_code=rc, ok=bool(ok), **extra)
    except PermissionError as err:
        record.update(skipped=str(err))
    except Exception as err:  # the harness itself failed: report it, go on with the next
        record.update(harness_error=f"{type(err).__name__}: {err}"[:500], ok=False)
    runs = ws.runs()
    record["runs"] = {f"{r['tags'].get('sf.stage', '?')}:{r['run_id'][:8]}": r["status"]
                      for r in runs}
    record["running"] = sum(r["status"] == "RUNNING" for r in runs)
    record["complete_outputs_of_failed_runs"] = ws.complete_outputs_of_failed_runs()
    if ws.last is not None:
        err_lines = [ln for ln in ws.last.stderr.splitlines() if ln.startswith("error:")]
        record["error_line"] = err_lines[-1][:400] if err_lines else None
        record["traceback"] = "Traceback" in ws.last.stderr
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        record["folder"] = str(root)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(all_faults()), help="faults to run")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep each fault's folder under this directory")
    args = parser.parse_args(argv)
    if args.list:
        for name, fn in all_faults().items():
            print(f"{name:28s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    bad = 0
    for name in args.only or all_faults():
        record = run_fault(name, args.keep)
        bad += bool(record["running"] or record["complete_outputs_of_failed_runs"]
                    or record.get("ok") is False)
        print(json.dumps(record), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
