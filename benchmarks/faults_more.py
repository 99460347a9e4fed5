"""The faults of issue 22 for ``benchmarks/faults.py``: a user's inputs, the store, two
processes at once. Each takes a fresh :class:`faults.Workspace` and returns
``(exit code, ok, extra)`` as the faults there do; ``faults.py`` runs and reports them.
"""

from __future__ import annotations

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


MORE = {
    "repeated_gene_names": fault_repeated_gene_names,
    "export_over_a_file": fault_export_over_a_file,
    "yaml_alias_bomb": fault_yaml_alias_bomb,
    "damaged_store": fault_damaged_store,
    "output_dir_is_a_device": fault_output_dir_is_a_device,
    "data_path_is_a_device": fault_data_path_is_a_device,
    "spots_at_one_position": fault_spots_at_one_position,
    "two_mains_at_once": fault_two_mains_at_once,
}
