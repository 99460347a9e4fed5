"""The faults of issue 22 for ``benchmarks/faults.py``: a user's inputs, the store, two
processes at once, a tracking server that goes away. Each takes a fresh
:class:`faults.Workspace` and returns ``(exit code, ok, extra)`` as the faults there do;
``faults.py`` runs and reports them. The server faults run a real ``mlflow server`` on
127.0.0.1 over the workspace's sqlite store (so the harness still reads the store directly);
the README shows the same with PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from faults import Workspace, _h5ad, _h5ad_config


def fault_repeated_gene_names(ws: Workspace):
    """An h5ad whose genes 0 and 1 share a name: refused; made unique on request."""
    import anndata

    path = _h5ad(ws, "repeats.h5ad", 200, ["a", "b"])
    adata = anndata.read_h5ad(path)
    adata.var_names = ["g0", "g0"] + [f"g{j}" for j in range(2, adata.n_vars)]
    adata.write_h5ad(path)
    config = _h5ad_config(ws, path, "cell_type")
    refused = ws.run("preprocess", config=config)
    named = "'g0' x2" in refused.stderr and "data.make_unique: true" in refused.stderr
    made = ws.run("preprocess", "--set", "data.make_unique=true", config=config).returncode
    return refused.returncode, refused.returncode == 2 and named and made == 0, {
        "made_unique_exit_code": made,
        "expect": "refused naming 'g0' and data.make_unique; accepted with it"}


def fault_export_over_a_file(ws: Workspace):
    """export onto an existing file without --force: refused, the file untouched."""
    for stage in ("preprocess", "train", "analyze"):
        ws.run(stage)
    analyze = ws.run_of("analyze", "FINISHED")["run_id"]
    target = ws.root / "mine.h5ad"
    target.write_bytes(b"a file the user keeps")
    rc = ws.run("export", "--run-id", analyze, "-o", str(target)).returncode
    kept = target.read_bytes() == b"a file the user keeps"
    forced = ws.run("export", "--run-id", analyze, "-o", str(target), "--force").returncode
    leftovers = sorted(p.name for p in ws.root.glob(".mine*"))
    return rc, rc == 2 and kept and forced == 0 and not leftovers, {
        "forced_exit_code": forced, "temporary_files_left": leftovers,
        "expect": "refused without --force, file kept; replaced with it, nothing left over"}


def fault_yaml_alias_bomb(ws: Workspace):
    """A config of nested YAML aliases that would expand to 10^10 entries."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = ws.root / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: bomb\n")
    started = time.monotonic()
    rc = ws.run("preprocess", config=bomb).returncode
    return rc, rc == 2 and "alias" in ws.last.stderr.lower(), {
        "seconds": round(time.monotonic() - started, 2),
        "expect": "refused before anything is expanded"}


def fault_damaged_store(ws: Workspace):
    """The sqlite store's pages overwritten (its header kept)."""
    ws.run("preprocess")
    with open(ws.db, "r+b") as fh:
        fh.seek(4096 * 3)
        fh.write(bytes(range(256)) * 16 * 6)
    rc = ws.run("preprocess").returncode
    return rc, rc == 2 and "is damaged" in ws.last.stderr, {
        "expect": "one line: the store is damaged, restore it or use a new one"}


def fault_output_dir_is_a_device(ws: Workspace):
    """output_dir set to /dev/full (and /proc): refused before a run opens."""
    codes = {where: ws.run("preprocess", "--set", f"output_dir={where}").returncode
             for where in ("/dev/full", "/proc") if Path(where).exists()}
    return max(codes.values()), set(codes.values()) == {2} and not ws.runs(), {
        "exit_codes": codes, "expect": "refused, no run opened"}


def fault_data_path_is_a_device(ws: Workspace):
    """data.path set to /dev/zero."""
    config = _h5ad_config(ws, Path("/dev/zero"), None)
    rc = ws.run("preprocess", config=config).returncode
    return rc, rc == 2 and "is not a regular file" in ws.last.stderr, {
        "expect": "says what the path is"}


def fault_spots_at_one_position(ws: Workspace):
    """Every spot at one position: preprocess warns, a spatial fit is refused."""
    import anndata
    import numpy as np

    path = _h5ad(ws, "one_place.h5ad", 300, ["a", "b"])
    adata = anndata.read_h5ad(path)
    adata.obsm["spatial"] = np.zeros((adata.n_obs, 2))
    adata.write_h5ad(path)
    config = _h5ad_config(ws, path, "cell_type")
    warned = "distinct position" in ws.run("preprocess", config=config).stdout
    rc = ws.run("train", config=config).returncode
    return rc, warned and rc == 2 and ws.run_of("train") is None, {
        "expect": "a warning at preprocess; train refused before a run opens"}


def fault_two_mains_at_once(ws: Workspace):
    """Two identical main runs started together on one store."""
    procs = [ws.start("main") for _ in range(2)]
    done = [ws.finish(p, timeout=900) for p in procs]
    stages = sorted(r["tags"].get("sf.stage", "?") for r in ws.runs())
    one_each = stages == ["analyze", "figures", "main", "main", "preprocess", "train"]
    rc = max(d.returncode for d in done)
    return rc, rc == 0 and one_each, {"stages": stages, "expect": "one run per stage"}


class Server:
    """``mlflow server`` over the workspace's store; stop() kills it (SIGKILL, as a crash),
    start() brings it back on the same port."""

    def __init__(self, ws: Workspace):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.ws, self.uri, self.proc = ws, f"http://127.0.0.1:{self.port}", None
        ws.env = {**ws.env, "MLFLOW_TRACKING_URI": self.uri}

    def start(self) -> "Server":
        import requests

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1", "--backend-store-uri", self.ws.uri,
             "--artifacts-destination", str(self.ws.root / "artifacts")],
            cwd=self.ws.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.uri + "/health", timeout=1).ok:
                    return self
            time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


#: A fit long enough to lose its server in the middle, the same every time (seeded, tol 0).
LONG_FIT = ("--set", "training.max_iter=1500", "--set", "training.tol=0",
            "--set", "training.log_every=100", "--set", "training.validation_every=0")


def _elbo_of(ws: Workspace, run_id: str) -> tuple[int, float | None]:
    """(number of ELBO values logged, final_elbo) of a run, read from the store directly."""
    with contextlib.closing(sqlite3.connect(f"file:{ws.db}?mode=ro", uri=True)) as con:
        n = con.execute("SELECT COUNT(DISTINCT step) FROM metrics WHERE run_uuid = ? AND "
                        "key = 'elbo'", (run_id,)).fetchone()[0]
        final = con.execute("SELECT value FROM latest_metrics WHERE run_uuid = ? AND "
                            "key = 'final_elbo'", (run_id,)).fetchone()
    return int(n), (float(final[0]) if final else None)


def _fit_with_outage(ws: Workspace, server: Server, away_s: float | None, **env):
    """Train once undisturbed, then again with the server killed at iteration ~300 and back
    after ``away_s`` seconds (None: after the train command ended). Returns the two train
    runs' (ELBO values, final ELBO) and the disturbed command's result."""
    ws.run("preprocess")
    ws.run("train", *LONG_FIT)
    calm = ws.run_of("train", "FINISHED")["run_id"]
    ws.env = {**ws.env, **env}
    proc = ws.start("train", *LONG_FIT)
    run = ws.wait_for(lambda: [r for r in ws.runs() if r["tags"].get("sf.stage") == "train"
                               and r["run_id"] != calm and _elbo_of(ws, r["run_id"])[0] >= 300],
                      proc, what="300 logged iterations")[0]
    server.stop()
    if away_s is not None:
        time.sleep(away_s)
        server.start()
    done = ws.finish(proc, timeout=900)
    return calm, run["run_id"], done


def fault_server_down_at_start(ws: Workspace):
    """MLFLOW_TRACKING_URI on a server that does not answer: one line within the wait."""
    server = Server(ws)         # never started
    ws.env["SF_TRACKING_WAIT_S"] = "5"
    started = time.monotonic()
    rc = ws.run("preprocess").returncode
    seconds = time.monotonic() - started
    return rc, rc == 2 and seconds < 30 and "does not answer" in ws.last.stderr, {
        "seconds": round(seconds, 1), "uri": server.uri,
        "expect": "one line within SF_TRACKING_WAIT_S (5 s here), no run"}


def fault_server_away_mid_train(ws: Workspace):
    """The server killed at iteration ~300 of 1,500 and back 20 s later."""
    server = Server(ws).start()
    try:
        calm, hit, done = _fit_with_outage(ws, server, 20.0)
    finally:
        server.stop()
    (n_calm, e_calm), (n_hit, e_hit) = _elbo_of(ws, calm), _elbo_of(ws, hit)
    same = e_calm is not None and e_hit == e_calm
    return done.returncode, done.returncode == 0 and n_hit == n_calm == 1500 and same, {
        "elbo_values": n_hit, "final_elbo": e_hit, "undisturbed_final_elbo": e_calm,
        "expect": "the fit finishes, every iteration logged, results equal an undisturbed fit's"}


def fault_server_gone_for_good(ws: Workspace):
    """The server killed mid-train and back only after the stage gave up on it
    (SF_TRACKING_OUTAGE_S=5): the stage's writes wait in a folder; sync uploads them."""
    server = Server(ws).start()
    try:
        calm, hit, done = _fit_with_outage(ws, server, None, SF_TRACKING_OUTAGE_S="5")
        kept = sorted((ws.root / "outputs" / "train").glob("*.unsent"))
        named = bool(kept) and f"spatial_factorization sync {kept[0]}" in done.stderr
        server.start()
        synced = ws.run("sync", *map(str, kept)).returncode if kept else None
        ws.last = done          # the report's error line is the stage's
    finally:
        server.stop()
    (n_calm, e_calm), (n_hit, e_hit) = _elbo_of(ws, calm), _elbo_of(ws, hit)
    ok = (done.returncode == 2 and named and synced == 0 and n_hit == n_calm == 1500
          and e_calm is not None and e_hit == e_calm and not any(p.exists() for p in kept))
    return done.returncode, ok, {
        "sync_exit_code": synced, "elbo_values": n_hit, "final_elbo": e_hit,
        "undisturbed_final_elbo": e_calm,
        "expect": "one line naming the folder and the sync command; after sync the run is "
                  "whole and equal to an undisturbed fit"}


MORE = {
    "repeated_gene_names": fault_repeated_gene_names,
    "export_over_a_file": fault_export_over_a_file,
    "yaml_alias_bomb": fault_yaml_alias_bomb,
    "damaged_store": fault_damaged_store,
    "output_dir_is_a_device": fault_output_dir_is_a_device,
    "data_path_is_a_device": fault_data_path_is_a_device,
    "spots_at_one_position": fault_spots_at_one_position,
    "two_mains_at_once": fault_two_mains_at_once,
    "server_down_at_start": fault_server_down_at_start,
    "server_away_mid_train": fault_server_away_mid_train,
    "server_gone_for_good": fault_server_gone_for_good,
}
