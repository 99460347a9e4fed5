"""Quality at the defaults: held-out deviance of PNMF, SVGP and MGGP on planted and real data.

Every model is trained AT ITS DEFAULTS through the console script, as a user would run it:
``spatial_factorization preprocess -c case.yaml`` once per case, then
``spatial_factorization train -c case.yaml --set model.prior=... --set model.groups=...``
for each model (``pnmf``: Gaussian prior; ``svgp``: SVGP without groups; ``mggp``: SVGP
with the groups). The case config sets only the data, ``model.n_components`` and, for
generated data, ``preprocessing.min_counts: 10`` (the default 100 would drop most spots of
the 100-count cases) and ``holdout_fraction: 0.1``; the model and training sections are the
defaults.

Each trained model (``model.pth`` of the train run) is then scored on the preprocess run's
held-out spots, predicted from their positions (and groups) alone: the Poisson deviance of
``predict_at``'s rates (the analyze stage's ``heldout_deviance``), its ratio to PNMF's,
and, for generated data, the matched correlation of the training spots' log-factors with
the planted ones (one-to-one Hungarian matching on |correlation|) and the deviance of the
planted rates themselves (``oracle``: the floor no model can beat on average).

Generated cases vary N (1,000-10,000; ``--large`` adds 40,000), L (5-12), groups (1-14), the
group effect (0-1), the fields' lengthscale (0.05 / 0.15 / 0.4 of the square: short, medium,
long) and depth (100-1,000 counts a spot). Real cases: the three data sets of
``$SF_SHARED_DATA`` (default ``../shared/data``), held-out deviance only.

Output: one JSON line per case and model::

    {"case": ..., "model": "mggp", "heldout_deviance": ..., "ratio_to_pnmf": ...,
     "matched_correlation": ..., "oracle_deviance": ..., "iterations": ..., "stop": ...,
     "seconds": ..., "num_inducing": ..., ...}

``--cases NAME ...`` runs some cases only; ``--quick`` the two smallest. Everything is
written under a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]

#: name -> (N, D, L, G, lengthscale, group_effect, depth)
GENERATED = {
    "planted": (3000, 300, 5, 4, 0.15, 0.5, 300),
    "short_fields": (3000, 300, 5, 4, 0.05, 0.5, 300),
    "long_fields": (3000, 300, 5, 4, 0.4, 0.5, 300),
    "no_groups": (2000, 200, 5, 1, 0.15, 0.0, 300),
    "shared_fields": (3000, 300, 5, 4, 0.15, 0.0, 300),
    "independent_fields": (3000, 300, 5, 4, 0.15, 1.0, 300),
    "small": (1000, 200, 5, 3, 0.15, 0.5, 200),
    "deep_L12": (2000, 400, 12, 6, 0.2, 0.7, 1000),
    "14_groups_shallow": (5000, 300, 10, 14, 0.15, 0.5, 100),
    "10k": (10000, 300, 8, 8, 0.1, 0.5, 300),
}
LARGE = {"40k": (40000, 300, 10, 14, 0.15, 0.5, 300)}

#: name -> (file, group key, n_components, extra preprocessing)
REAL = {
    "osmfish": ("osmfish_sscortex.h5ad", "cluster", 6, {"filter_mt": False, "min_counts": 10}),
    "olfactory_bulb": ("st_mouse_olfactory_bulb.h5ad", "layer", 5, {"min_counts": 100}),
    "slideseq_window": ("slideseqv2_hippocampus_window.h5ad", None, 10,
                        {"min_counts": 100, "n_top_genes": 2000}),
}

MODELS = {"pnmf": {"model.prior": "Gaussian"},
          "svgp": {"model.prior": "SVGP", "model.groups": "false"},
          "mggp": {"model.prior": "SVGP", "model.groups": "true"}}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def case_config(name: str, work: Path, shared: Path) -> dict:
    if name in REAL:
        file, key, L, pre = REAL[name]
        return {"name": f"quality_{name}", "seed": 0, "dataset": "h5ad", "output_dir": str(work / "out"),
                "data": {"path": str(shared / file), "group_key": key},
                "preprocessing": {"holdout_fraction": 0.1, **pre},
                "model": {"n_components": L}}
    n, d, L, G, ls, ge, depth = {**GENERATED, **LARGE}[name]
    return {"name": f"quality_{name}", "seed": 0, "dataset": "synthetic", "output_dir": str(work / "out"),
            "data": {"synthetic": {"n_spots": n, "n_genes": d, "n_components": L, "n_groups": G,
                                   "lengthscale": ls, "group_effect": ge, "mean_counts": depth}},
            "preprocessing": {"min_counts": 10, "min_cells": 5, "holdout_fraction": 0.1},
            "model": {"n_components": L}}


def console(args: list[str], work: Path, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sf_mlflow.cli", *args], cwd=work, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"spatial_factorization {' '.join(args)} failed:\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def newest_run(client, experiment: str, stage: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`sf.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0]


def matched_correlation(estimated: np.ndarray, truth: np.ndarray) -> float:
    from scipy.optimize import linear_sum_assignment

    L = truth.shape[1]
    C = np.nan_to_num(np.abs(np.corrcoef(estimated.T, truth.T)[:estimated.shape[1], estimated.shape[1]:]))
    r, c = linear_sum_assignment(-C)
    return float(C[r, c].sum() / L)


def score(name: str, model_name: str, train_run, pre, work: Path, seconds: float, cfg: dict) -> dict:
    from sf_mlflow.analysis.deviance import poisson_deviance
    from sf_mlflow.analysis.summary import heldout_deviance
    from sf_mlflow.models.pnmf import PNMF

    out = Path(cfg["output_dir"]) / "train" / train_run.info.run_id
    model = PNMF.load(out / "model.pth")
    train, held = pre.training_spots(), pre.heldout_spots()
    summary = json.loads((out / "training.json").read_text())
    row = {"case": name, "model": model_name,
           "heldout_deviance": heldout_deviance(model, train.coordinates, held)["total"],
           "iterations": summary["n_iter"], "stop": summary["stop_reason"],
           "early_stopped_at": summary.get("early_stopped_at"),
           "kept_iteration": summary.get("kept_iteration"),
           "seconds": round(seconds, 1), "n_spots": int(pre.data.n_spots),
           "n_genes": int(pre.data.n_genes), "n_components": cfg["model"]["n_components"]}
    for key in ("num_inducing", "lengthscale", "group_diff_param", "pnmf_heldout_deviance",
                "init_heldout_deviance"):
        if key in summary:
            row[key] = summary[key]
    if pre.truth:
        truth_log = np.asarray(pre.truth["log_factors"])
        row["matched_correlation"] = matched_correlation(np.log(model.get_factors()),
                                                         truth_log[~pre.heldout])
        row["oracle_deviance"] = poisson_deviance(
            held.counts, factors=np.asarray(pre.truth["factors"])[pre.heldout],
            loadings=np.asarray(pre.truth["loadings"]))["total"]
    return row


def run_case(name: str, work: Path, shared: Path) -> list[dict]:
    from mlflow.tracking import MlflowClient

    from sf_mlflow.data.io import read_preprocessed

    work.mkdir(parents=True)
    cfg = case_config(name, work, shared)
    path = work / "case.yaml"
    path.write_text(yaml.safe_dump(cfg))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    console(["preprocess", "-c", str(path)], work, env)
    client = MlflowClient(uri)
    pre_run = newest_run(client, cfg["name"], "preprocess")
    pre = read_preprocessed(Path(cfg["output_dir"]) / "preprocess" / pre_run.info.run_id)
    rows = []
    for model_name, sets in MODELS.items():
        if model_name == "mggp" and pre.data.groups is None:
            continue        # no groups: MGGP is the SVGP
        args = ["train", "-c", str(path)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        seconds = console(args, work, env)
        rows.append(score(name, model_name, newest_run(client, cfg["name"], "train"), pre, work,
                          seconds, cfg))
    base = next(r["heldout_deviance"] for r in rows if r["model"] == "pnmf")
    for r in rows:
        r["ratio_to_pnmf"] = r["heldout_deviance"] / base
        emit(r)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", help="case names (default: all generated and real)")
    ap.add_argument("--quick", action="store_true", help="the two smallest cases only")
    ap.add_argument("--large", action="store_true", help="add the 40,000-spot case")
    ap.add_argument("--keep", help="work in this folder instead of a temporary one")
    args = ap.parse_args(argv)
    shared = Path(os.environ.get("SF_SHARED_DATA", REPO.parent / "shared" / "data"))
    names = args.cases or (["small", "olfactory_bulb"] if args.quick else
                           list(GENERATED) + (list(LARGE) if args.large else []) + list(REAL))
    unknown = [n for n in names if n not in {**GENERATED, **LARGE, **REAL}]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join({**GENERATED, **LARGE, **REAL})}")
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for name in names:
            if name in REAL and not (shared / REAL[name][0]).is_file():
                emit({"case": name, "skipped": f"{shared / REAL[name][0]} not found (set SF_SHARED_DATA)"})
                continue
            run_case(name, root / name, shared)


if __name__ == "__main__":
    main()
