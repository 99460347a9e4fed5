"""Time and peak memory of every pipeline stage at N = 10^4, 10^5, 10^6 spots.

Issue #12, item 1: a million spots end to end on one 24 GiB machine. The stages are run
as library calls (no MLflow tracking), each in its own subprocess so its peak resident set
is its own:

* ``generate``: :func:`sf_mlflow.data.synthetic.make_synthetic` (uniform layout, D genes,
  L true factors, G groups, planted smooth fields), written as a raw CSR npz;
* ``preprocess``: :func:`sf_mlflow.data.preprocess.preprocess` with the shipped defaults
  (all genes kept, 5% group-stratified held-out split) but ``min_counts`` = 20 and
  :func:`sf_mlflow.data.io.write_preprocessed`;
* ``train``: ``PNMF`` with the MGGP-SVGP prior (Matern-3/2, ``--num-inducing`` k-means
  inducing points, groups, lengthscale 4), KL-NMF initialisation and GP warm start as
  always, then a FIXED ``--iters`` mini-batch steps of ``--batch-size`` spots (tol = 0):
  convergence time is not what is measured, only the cost of the machinery;
  ``PNMF.save``;
* ``analyze``: ``PNMF.load``, :func:`sf_mlflow.analysis.summary.analyze_model` (factors,
  scales, Moran's I, reconstruction error, train and held-out deviance, held-out factors,
  group loadings, enrichment, groupwise factors) and the analyze stage's
  ``write_outputs``;
* ``figures``: the figures stage's ``single_figures`` on those outputs (every PNG of one
  analyze run).

Peak memory: ``VmHWM`` of the stage's process read when the stage ends (the driver also
records ``ru_maxrss`` of the finished child as a cross-check). Times are wall clock, on
whatever share of the CPU the machine gives: on a shared machine the load average at the
start and end of each stage is recorded with it.

Output: one JSON line per (stage, N), then one ``{"case": "growth"}`` line per stage with
the slope of log time and of log peak memory against log N, fitted over the sizes run
(1 = linear; peak memory includes the ~300 MB of an interpreter with torch, so its slope
reads low at small N). Usage::

    python benchmarks/bench_scale.py --sizes 10000 100000 [1000000] [--threads 1]
    python benchmarks/bench_scale.py --summarize run1.jsonl run2.jsonl   # growth only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STAGES = ("generate", "preprocess", "train", "analyze", "figures")


def _status_mb(key: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M).group(1)) / 1024.0


# ---- stage workers (each runs in its own process) -------------------------------------------

def stage_generate(args, work: Path) -> dict:
    import scipy.sparse as sp

    from sf_mlflow.data.synthetic import make_synthetic

    d = make_synthetic(n_spots=args.n, n_genes=args.genes, n_components=args.components,
                       n_groups=args.groups, lengthscale=0.05, group_effect=0.5,
                       mean_counts=args.mean_counts, layout="uniform", seed=args.seed)
    Y = d.counts
    np.savez(work / "raw.npz", data=Y.data, indices=Y.indices, indptr=Y.indptr,
             shape=np.array(Y.shape), coordinates=d.coordinates, groups=d.groups)
    return {"nnz": int(Y.nnz), "nnz_per_spot": round(Y.nnz / Y.shape[0], 1),
            "is_csr": bool(sp.isspmatrix_csr(Y))}


def stage_preprocess(args, work: Path) -> dict:
    import scipy.sparse as sp

    from sf_mlflow.config import PreprocessingConfig
    from sf_mlflow.data.counts import SpatialCounts
    from sf_mlflow.data.io import write_preprocessed
    from sf_mlflow.data.preprocess import preprocess

    with np.load(work / "raw.npz") as z:
        Y = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        X, g = z["coordinates"], z["groups"]
    n, d = Y.shape
    data = SpatialCounts(counts=Y, coordinates=X,
                         gene_names=np.array([f"gene{j}" for j in range(d)], dtype=object),
                         spot_names=np.array([f"spot{i}" for i in range(n)], dtype=object),
                         groups=g, group_names=[f"group{k}" for k in range(args.groups)])
    # min_counts lowered from the default 100: at mean_counts ~100 it would drop half the spots
    res = preprocess(data, PreprocessingConfig(min_counts=args.min_counts), seed=args.seed)
    write_preprocessed(work / "pre", res)
    return {"n_spots_kept": int(res.data.n_spots), "n_genes_kept": int(res.data.n_genes),
            "n_heldout": int(res.heldout.sum())}


def stage_train(args, work: Path) -> dict:
    from sf_mlflow.data.io import read_preprocessed
    from sf_mlflow.models.pnmf import PNMF
    from sf_mlflow.models.settings import SVGP

    train = read_preprocessed(work / "pre").training_spots()
    prior = SVGP(kernel="Matern32", num_inducing=args.num_inducing, lengthscale=4.0,
                 sigma=1.0, group_diff_param=10.0, groups=True,
                 inducing_allocation="proportional")
    model = PNMF(args.components, prior=prior, max_iter=args.iters, tol=0.0,
                 batch_size=args.batch_size, shuffle=True, learning_rate=0.01,
                 device="cpu", dtype="float32", random_state=args.seed)
    model.fit(train.counts, coordinates=train.coordinates, groups=train.groups)
    model.save(work / "model.pth")
    np.savetxt(work / "elbo.csv", np.asarray(model.elbo_history_, dtype=float))
    return {"iterations": int(model.n_iter_), "batch_size": args.batch_size,
            "num_inducing": int(model.prior_.num_inducing),
            "final_elbo": float(model.elbo_history_[-1])}


def stage_analyze(args, work: Path) -> dict:
    from sf_mlflow.analysis.summary import analyze_model
    from sf_mlflow.data.io import read_preprocessed
    from sf_mlflow.models.pnmf import PNMF
    from sf_mlflow.stages.analyze import write_outputs

    pre = read_preprocessed(work / "pre")
    train, held = pre.training_spots(), pre.heldout_spots()
    model = PNMF.load(work / "model.pth")
    res = analyze_model(model, train, held, group_loadings_iter=args.group_iter)
    out = work / "analysis"
    out.mkdir(exist_ok=True)
    write_outputs(out, res, train, pre)
    return {k: round(v, 4) for k, v in res.metrics.items()
            if k in ("moran_i_mean", "train_deviance_mean", "heldout_deviance_mean")}


def stage_figures(args, work: Path) -> dict:
    from sf_mlflow.data.io import read_preprocessed
    from sf_mlflow.stages import figures as F

    pre = read_preprocessed(work / "pre")
    a = work / "analysis"
    mask, complete = F._spot_layout(a, pre)
    order_rows = np.genfromtxt(a / "moran_i.csv", delimiter=",", names=True)
    loadings = np.load(a / "loadings.npy")
    with np.load(a / "groupwise_factors.npz") as z:
        gw = F._expand(z["factors"], ~pre.heldout, axis=2)
    an = F.Analysis(
        run_id="bench", model="svgp", preprocess_run_id="-", preprocess_hash="-",
        data=pre.data, heldout=pre.heldout.astype(bool),
        spots=np.asarray(pre.data.spot_names).astype(str),
        factors=F._expand(np.load(a / "factors.npy"), mask),
        scales=F._expand(np.load(a / "scales.npy"), mask), loadings=loadings,
        moran=np.atleast_1d(order_rows["moran_i"]),
        order=np.atleast_1d(order_rows["original_factor"]).astype(int),
        elbo=np.loadtxt(work / "elbo.csv"), lfc=F._enrichment(a, pre, loadings), groupwise=gw)
    out = work / "figures"
    save = F._Saver(out, work)
    times = {}

    def timed(draw, name):
        t = time.perf_counter()
        save(draw, name)
        import matplotlib.pyplot as plt

        plt.close("all")
        times[name] = round(time.perf_counter() - t, 2)

    F.single_figures(an, timed)
    slow = sorted(times.items(), key=lambda kv: -kv[1])[:4]
    return {"n_figures": len(times), "slowest_figures_s": dict(slow)}


def worker(args) -> None:
    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    import sf_mlflow  # noqa: F401

    work = Path(args.work)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    extra = globals()[f"stage_{args.worker}"](args, work)
    rec = {"seconds": round(time.perf_counter() - t0, 2), "peak_mb": round(_status_mb("VmHWM"), 1),
           "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)], **extra}
    print("RESULT " + json.dumps(rec), flush=True)


# ---- driver ------------------------------------------------------------------------------------

def run_stage(args, stage: str, n: int, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", stage, "--n", str(n), "--work", str(work)]
    for k in ("genes", "components", "groups", "mean_counts", "min_counts", "num_inducing", "iters",
              "batch_size", "group_iter", "threads", "seed"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rec = {"case": "stage", "stage": stage, "n_spots": n}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        rec["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return rec
    rec.update(json.loads(line[-1][7:]))
    # ru_maxrss of all children so far: a lower bound on this one unless it set a new high
    rec["children_maxrss_mb"] = round(after / 1024.0, 1) if after > before else None
    return rec


def slope(xs, ys) -> float | None:
    pts = [(np.log(x), np.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    a, b = np.array(pts).T
    return round(float(np.polyfit(a, b, 1)[0]), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--components", type=int, default=10)
    p.add_argument("--groups", type=int, default=20)
    p.add_argument("--mean-counts", type=float, default=100.0,
                   help="expected total count per spot (Slide-seq-like)")
    p.add_argument("--min-counts", type=int, default=20, help="preprocessing.min_counts")
    p.add_argument("--num-inducing", type=int, default=2000)
    p.add_argument("--iters", type=int, default=20, help="fixed mini-batch steps of train")
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--group-iter", type=int, default=100, help="group loadings refit iterations")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--keep", default=None, help="keep the work folders under this folder")
    p.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--summarize", nargs="+", metavar="JSONL",
                   help="only print the growth lines of the stage lines in these outputs "
                        "(e.g. sizes run in separate invocations)")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.summarize:
        results: dict[str, list[dict]] = {}
        for path in args.summarize:
            for line in Path(path).read_text().splitlines():
                rec = json.loads(line)
                if rec.get("case") == "stage":
                    results.setdefault(rec["stage"], []).append(rec)
        return print_growth(results)

    print(json.dumps({"case": "settings", "genes": args.genes, "components": args.components,
                      "groups": args.groups, "mean_counts": args.mean_counts,
                      "num_inducing": args.num_inducing, "train_iters": args.iters,
                      "batch_size": args.batch_size, "threads": args.threads,
                      "note": "train runs a fixed number of mini-batch steps (tol=0); "
                              "convergence time is not measured"}), flush=True)
    results: dict[str, list[dict]] = {s: [] for s in args.stages}
    for n in args.sizes:
        root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_scale_"))
        work = root / f"n{n}"
        work.mkdir(parents=True, exist_ok=True)
        for stage in args.stages:
            rec = run_stage(args, stage, n, work)
            print(json.dumps(rec), flush=True)
            results[stage].append(rec)
            if "error" in rec:
                break
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_growth(results)


def print_growth(results: dict[str, list[dict]]) -> None:
    """One ``{"case": "growth"}`` line per stage: log-log slopes over the sizes run."""
    for stage, recs in results.items():
        ok = sorted((r for r in recs if "error" not in r), key=lambda r: r["n_spots"])
        ns = [r["n_spots"] for r in ok]
        print(json.dumps({"case": "growth", "stage": stage, "sizes": ns,
                          "time_exponent": slope(ns, [r["seconds"] for r in ok]),
                          "peak_memory_exponent": slope(ns, [r["peak_mb"] for r in ok])}),
              flush=True)


if __name__ == "__main__":
    main()
