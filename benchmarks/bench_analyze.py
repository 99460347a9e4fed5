"""Time and peak memory of ``analyze_model`` on Slide-seq-sized generated data, both models.

Data: ``make_synthetic`` (default 41,786 spots x 4,000 genes, L = 10, 14 groups, ~3%
non-zeros), generated once and seeded; coordinates rescaled as the preprocess stage does
(the plan's rule: mean centre, geometric-mean side 4 x 50 = 200, as on the Slide-seq puck, so
lengthscale 4 spans 2 % of the side as it does there); a group-stratified 5% of spots held out
(``heldout_split``) for the held-out deviance. ``analyze_model`` sees the other 95%.

Models (``--models``): ``pnmf`` = Gaussian prior (non-spatial), ``svgp`` = MGGP-SVGP with
``--num-inducing`` (default 3,000) k-means inducing points, 14 groups, Matern-3/2,
lengthscale 4, as ``configs/slideseq/svgp.yaml``. Fitting is NOT what is measured: each
model is fitted cheaply, ``--fit-iter`` mini-batch iterations (B = 7,000 spots x 2,000
genes, the Slide-seq config) after the usual KL-NMF initialisation, and for the SVGP a
PNMF start cut from up to 1,000 to ``--warm-iter`` iterations
(``sf_mlflow.models.start.PNMF_START_MAX_ITER`` is set in the fitting subprocess only) and a learning rate of 0.01 instead of 0.1 (with the
short warm start, 0.1 overflowed the float32 ELBO at iteration 3 at full size). The model
is saved with ``PNMF.save`` and the analysis worker loads it with ``PNMF.load``, as the
analyze stage does. Analysis cost does not depend
on how well the model fits, except that the per-group refits of the loadings stop early
once their loss settles (the iterations each used are reported).

Every fit and every analysis runs in a fresh subprocess, so memory is per case: the peak
resident set (``VmHWM``) of the analysis worker, its baseline (``VmRSS`` once the data and
the model are loaded, after ``gc.collect`` and ``malloc_trim``), and the peak above that
baseline. Per phase of ``analyze_model``
(factors, factor scales, Moran graph and statistic, reconstruction error, train and
held-out deviance, held-out prediction, group loadings, enrichment, groupwise factors) the
wall time and peak are taken by wrapping the functions ``analyze_model`` calls (names in
``sf_mlflow.analysis.summary``, the model's ``get_factors``/``get_factor_scales``, the
prior's ``groupwise``) and resetting the peak between phases (``/proc/self/clear_refs``);
``other`` is the rest (reordering, exp, GP facts). Wrapping costs a few microseconds.
``kzz_cholesky_s`` is the time spent in the SVGP prior's ``chol_kzz`` (cached after the
first call; it is included in the phase that first needs it, normally ``factors``).

Baselines, measured in the same run:

* ``analyze / training iteration``: the median time of one training iteration of the same
  model on the same machine (iterations 2.. of the cheap fit; the first one also seeds the
  loadings' running statistics), and from it analyze time in spot epochs (ceil(N / B)
  iterations) and as a fraction of a full ``--max-iter`` (2,000) iteration training run,
  an upper bound on the configured training (the tolerance may stop it earlier);
* Moran's I: ``sf_mlflow.analysis.moran.morans_i`` against ``squidpy.gr.spatial_autocorr``
  (analytic p-values, ``n_perms=None``) on the same row-normalised 6-NN graph and the same
  factors; squidpy's first call (cold, includes its numba compilation) and the median of
  three more are reported, with the largest difference of the statistics.

Each worker also times a 2048^3 float32 GEMM before and after, and the 1-minute load
average is recorded: on a shared machine these show how much of the CPU the case had.

Output: JSON lines ``{"case": "data"}``, then per model ``{"case": "fit"}``,
``{"case": "analyze"}`` (wall time, phases, memory) and ``{"case": "ratio"}``.
``--quick`` runs a small smoke version. On a machine shared with other jobs pass
``--threads 1``: with 2 threads on 2 busy cores, torch's parallel regions stall (a PNMF
training iteration went from 0.03 s to 0.8 s), which distorts the ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("pnmf", "svgp")
#: Iterations of a full training run in the Slide-seq configs (training.max_iter).
CONFIG_MAX_ITER = 2000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ---- memory ----------------------------------------------------------------------------------

def _status_mb(key: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) / 1024.0 if m else None


def rss_mb() -> float | None:
    return _status_mb("VmRSS")


def settle_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so VmRSS is a fair baseline."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMeter:
    """Peak RSS per phase, by resetting the kernel's high-water mark between phases.

    Falls back to ``ru_maxrss`` (whole-process peak only) where ``/proc/self/clear_refs``
    cannot be written.
    """

    def __init__(self):
        self.overall = 0.0
        self.can_reset = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    def _hwm(self) -> float:
        v = _status_mb("VmHWM")
        if v is None:
            import resource

            v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return v

    def start(self) -> None:
        """Begin a window: fold the peak so far into ``overall`` and reset the mark."""
        self.overall = max(self.overall, self._hwm())
        if self.can_reset:
            self._reset()

    def stop(self) -> float | None:
        """Peak of the window since :meth:`start` (None if the mark cannot be reset)."""
        peak = self._hwm()
        self.overall = max(self.overall, peak)
        if self.can_reset:
            self._reset()
            return peak
        return None

    def total(self) -> float:
        self.overall = max(self.overall, self._hwm())
        return self.overall


# ---- helpers run in the workers ------------------------------------------------------------

def set_threads(n: int) -> None:
    if n:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(n)
        threadpool_limits(n)


def gemm_gflops(reps: int = 3, n: int = 2048) -> float:
    """Median float32 GEMM speed (GFLOP/s) of an n x n x n product, on the current threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return round(2.0 * n ** 3 / float(np.median(times)) / 1e9, 1)


def load_data(path: str):
    """Train and held-out ``SpatialCounts`` from the driver's npz."""
    import scipy.sparse as sp

    from sf_mlflow.data.counts import SpatialCounts

    z = np.load(path, allow_pickle=False)
    Y = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
    X, g, held = z["coordinates"], z["groups"], z["heldout"]
    n_groups = int(z["n_groups"])
    genes = np.array([f"gene{j}" for j in range(Y.shape[1])], dtype=object)
    names = [f"group{k}" for k in range(n_groups)]

    def part(mask):
        idx = np.flatnonzero(mask)
        return SpatialCounts(counts=Y[idx].tocsr(), coordinates=X[idx], gene_names=genes,
                             spot_names=np.array([f"spot{i}" for i in idx], dtype=object),
                             groups=g[idx], group_names=names)

    return part(~held), part(held)


def model_params(args, kind: str) -> dict:
    """PNMF hyperparameters as ``configs/slideseq/{pnmf,svgp}.yaml`` (iterations aside)."""
    from sf_mlflow.models.settings import SVGP  # torch-free; the worker sets threads first

    spatial = SVGP(kernel="Matern32", num_inducing=args.num_inducing, lengthscale=4.0, sigma=1.0,
                   group_diff_param=10.0, groups=True, cholesky_mode="exp",
                   inducing_allocation="proportional")
    return dict(prior="gaussian" if kind == "pnmf" else spatial, mode="lower-bound",
                loadings_mode="multiplicative", learning_rate=args.fit_lr if args.fit_lr else (0.1 if kind == "pnmf" else 0.01),
                optimizer="Adam", tol=0.0, batch_size=args.batch_size,
                y_batch_size=args.y_batch_size, shuffle=True, device="cpu", dtype="float32",
                random_state=args.seed)


# ---- fit worker ------------------------------------------------------------------------------

def fit_worker(args) -> None:
    set_threads(args.threads)
    import torch  # noqa: F401

    import sf_mlflow  # noqa: F401  (flush denormals)
    import sf_mlflow.models.start as start_mod
    from sf_mlflow.models.pnmf import PNMF

    train, _ = load_data(args.data_path)
    if args.model == "svgp":
        start_mod.PNMF_START_MAX_ITER = args.warm_iter
    gflops_before = gemm_gflops()
    load_before = os.getloadavg()[0]
    model = PNMF(args.n_components, max_iter=args.fit_iter, **model_params(args, args.model))
    stamps = []

    def callback(state):
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    model.fit(train.counts, coordinates=train.coordinates, groups=train.groups, callback=callback)
    fit_s = time.perf_counter() - t0
    model.save(args.model_path)
    iters = np.diff(stamps)  # iterations 2..K; the first also initialises running statistics
    rec = {
        "model": args.model, "threads": torch.get_num_threads(),
        "fit_iterations": int(model.n_iter_), "batch_size": args.batch_size,
        "y_batch_size": args.y_batch_size,
        "warm_start_iter": args.warm_iter if args.model == "svgp" else None,
        "learning_rate": model.learning_rate,
        "fit_s": round(fit_s, 2),
        "first_iteration_end_s": round(stamps[0] - t0, 2) if stamps else None,
        "train_iteration_s": float(np.median(iters)) if len(iters) else None,
        "train_iteration_s_all": [round(float(v), 3) for v in iters],
        "final_elbo": float(model.elbo_history_[-1]),
        "gemm_gflops_before": gflops_before, "gemm_gflops_after": gemm_gflops(),
        "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }
    if args.model == "svgp":
        rec["num_inducing"] = int(model.prior_.num_inducing)
    print(json.dumps(rec), flush=True)


# ---- analysis worker -------------------------------------------------------------------------

class Phases:
    """Wall time and peak RSS of each phase of ``analyze_model``, by wrapping what it calls."""

    def __init__(self, meter: PeakMeter, baseline: float):
        self.meter, self.baseline = meter, baseline
        self.time: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.depth = 0
        self.kzz_s, self.kzz_calls = 0.0, 0

    def wrap(self, fn, name):
        def wrapper(*a, **k):
            if self.depth:  # nested inside another phase: counted there
                return fn(*a, **k)
            phase = name(*a, **k) if callable(name) else name
            self.depth += 1
            self.meter.start()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                peak = self.meter.stop()
                self.depth -= 1
                self.time[phase] = self.time.get(phase, 0.0) + dt
                self.calls[phase] = self.calls.get(phase, 0) + 1
                if peak is not None:
                    self.peak[phase] = max(self.peak.get(phase, 0.0), peak)
        return wrapper

    def install(self, model) -> None:
        import sf_mlflow.analysis.summary as S

        named = {"knn_weights": "moran_graph", "morans_i": "moran_i",
                 "reconstruction_error": "reconstruction_error",
                 "_deviance_metrics": lambda prefix, *a, **k: f"{prefix}_deviance",
                 "heldout_factors": "heldout_prediction", "group_loadings": "group_loadings",
                 "relative_enrichment": "enrichment", "relevant_genes": "enrichment",
                 "enrichment_summary": "enrichment"}
        for attr, phase in named.items():
            setattr(S, attr, self.wrap(getattr(S, attr), phase))
        model.get_factors = self.wrap(model.get_factors, "factors")
        model.get_factor_scales = self.wrap(model.get_factor_scales, "factor_scales")
        if hasattr(model.prior_, "groupwise"):
            model.prior_.groupwise = self.wrap(model.prior_.groupwise, "groupwise_factors")
        if hasattr(model.prior_, "chol_kzz"):  # timed wherever it runs (inside a phase)
            chol = model.prior_.chol_kzz

            def chol_timed(*a, **k):
                t = time.perf_counter()
                try:
                    return chol(*a, **k)
                finally:
                    self.kzz_s += time.perf_counter() - t
                    self.kzz_calls += 1
            model.prior_.chol_kzz = chol_timed


def count_group_iterations():
    """Count the multiplicative updates each per-group refit of the loadings takes."""
    import sf_mlflow.analysis.group_loadings as G

    counts: list[int] = []
    kl_time = [0.0]
    refit, step = G.refit_loadings, G._kl_step

    def refit_counted(*a, **k):
        counts.append(0)
        return refit(*a, **k)

    def step_counted(*a, **k):
        if counts:
            counts[-1] += 1
        t = time.perf_counter()
        try:
            return step(*a, **k)
        finally:
            kl_time[0] += time.perf_counter() - t

    G.refit_loadings, G._kl_step = refit_counted, step_counted
    return counts, kl_time


def squidpy_moran(factors: np.ndarray, weights, ours: np.ndarray, reps: int = 3) -> dict:
    """Our Moran's I against squidpy's on the same graph and values."""
    import warnings

    from sf_mlflow.analysis.moran import morans_i

    t_ours = []
    for _ in range(reps):
        t = time.perf_counter()
        mine = morans_i(factors, weights=weights)
        t_ours.append(time.perf_counter() - t)
    out = {"ours_moran_i_s": float(np.median(t_ours))}
    try:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import anndata
            import squidpy as sq
        out["squidpy_import_s"] = round(time.perf_counter() - t, 2)
    except Exception as exc:  # noqa: BLE001
        out["squidpy_error"] = f"{type(exc).__name__}: {exc}"
        return out
    adata = anndata.AnnData(obs={"i": np.arange(factors.shape[0])})
    adata.obsm["factors"] = np.ascontiguousarray(factors)
    adata.obsp["knn"] = weights.tocsr()

    def call():
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            df = sq.gr.spatial_autocorr(adata, connectivity_key="knn", mode="moran", attr="obsm",
                                        layer="factors", transformation=True, n_perms=None,
                                        copy=True, n_jobs=1, show_progress_bar=False)
        return time.perf_counter() - t, df

    cold, df = call()
    warm = [call()[0] for _ in range(reps)]
    theirs = df.sort_index()["I"].to_numpy()
    out.update({"squidpy_cold_s": round(cold, 4), "squidpy_s": float(np.median(warm)),
                "max_abs_diff_vs_squidpy": float(np.max(np.abs(theirs - mine))),
                "max_abs_diff_vs_analyze": float(np.max(np.abs(mine - ours)))})
    out["ours_over_squidpy"] = round(out["ours_moran_i_s"] / out["squidpy_s"], 4)
    return out


def analyze_worker(args) -> None:
    set_threads(args.threads)
    import torch

    import sf_mlflow  # noqa: F401  (flush denormals)
    from sf_mlflow.analysis.moran import knn_weights
    from sf_mlflow.analysis.summary import analyze_model
    from sf_mlflow.models.pnmf import PNMF

    rss_imports = rss_mb()
    t = time.perf_counter()
    train, held = load_data(args.data_path)
    model = PNMF.load(args.model_path)
    load_s = time.perf_counter() - t
    gflops_before = gemm_gflops()
    load_before = os.getloadavg()[0]
    settle_memory()
    baseline = rss_mb()
    meter = PeakMeter()
    phases = Phases(meter, baseline)
    phases.install(model)
    group_iters, kl_time = count_group_iterations()

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    meter.start()
    t = time.perf_counter()
    result = analyze_model(model, train, held, moran_k=args.moran_k,
                           group_loadings_iter=args.group_loadings_iter)
    analyze_s = time.perf_counter() - t
    peak = meter.total()
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(args.profile)
        log(f"---- cProfile of analyze_model ({args.model}), top {args.profile} by tottime ----")
        log(buf.getvalue())
    rss_after = rss_mb()
    gflops_after = gemm_gflops()

    accounted = sum(phases.time.values())
    rec = {
        "model": args.model, "threads": torch.get_num_threads(),
        "n_train": int(train.n_spots), "n_heldout": int(held.n_spots),
        "n_genes": int(train.n_genes), "n_components": int(result.order.size),
        "n_groups": int(train.n_groups),
        "analyze_s": round(analyze_s, 3),
        "phases_s": {k: round(v, 3) for k, v in sorted(phases.time.items(), key=lambda kv: -kv[1])},
        "other_s": round(analyze_s - accounted, 3),
        "kzz_cholesky_s": round(phases.kzz_s, 3) if phases.kzz_calls else None,
        "load_s": round(load_s, 2),
        "rss_after_imports_mb": round(rss_imports, 1),
        "rss_baseline_mb": round(baseline, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_above_baseline_mb": round(peak - baseline, 1),
        "rss_after_analyze_mb": round(rss_after, 1),
        "phase_peak_above_baseline_mb": ({k: round(v - baseline, 1) for k, v in phases.peak.items()}
                                         if meter.can_reset else None),
        "group_loadings_iterations": group_iters,
        "group_loadings_kl_step_s": round(kl_time[0], 3),
        "gemm_gflops_before": gflops_before, "gemm_gflops_after": gflops_after,
        "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "metrics": {k: v for k, v in result.metrics.items()
                    if k in ("moran_i_mean", "train_deviance_mean", "heldout_deviance_mean",
                             "reconstruction_error", "num_inducing")},
    }
    if not args.no_squidpy:
        weights = knn_weights(train.coordinates, k=args.moran_k)
        rec["moran_vs_squidpy"] = squidpy_moran(result.arrays["factors"], weights, result.moran)
    print(json.dumps(rec), flush=True)


# ---- driver ----------------------------------------------------------------------------------

def prepare(args, workdir: Path) -> Path:
    from sf_mlflow.data.preprocess import heldout_split, rescale_coordinates
    from sf_mlflow.data.synthetic import make_synthetic

    t0 = time.perf_counter()
    data = make_synthetic(n_spots=args.n_spots, n_genes=args.n_genes, n_components=args.n_components,
                          n_groups=args.n_groups, mean_counts=args.mean_counts, seed=args.seed)
    X, _, _ = rescale_coordinates(data.coordinates, 50.0, "geometric_mean")  # as preprocess
    held = heldout_split(X.shape[0], args.holdout_fraction, args.seed, data.groups)
    Y = data.counts.tocsr()
    path = workdir / "data.npz"
    np.savez(path, data=Y.data, indices=Y.indices, indptr=Y.indptr, shape=np.array(Y.shape),
             coordinates=X, groups=data.groups, heldout=held, n_groups=args.n_groups)
    emit({"case": "data", "n_spots": Y.shape[0], "n_train": int((~held).sum()),
          "n_heldout": int(held.sum()), "n_genes": Y.shape[1], "nnz": int(Y.nnz),
          "density": round(Y.nnz / (Y.shape[0] * Y.shape[1]), 4),
          "n_components": args.n_components, "n_groups": args.n_groups,
          "mean_counts": args.mean_counts, "seed": args.seed,
          "generate_s": round(time.perf_counter() - t0, 2), "cpus": os.cpu_count(),
          "loadavg_1m": round(os.getloadavg()[0], 2)})
    return path


def run_worker(args, role: str, model: str, data_path: Path, model_path: Path) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", role, "--model", model,
           "--data-path", str(data_path), "--model-path", str(model_path),
           "--n-components", str(args.n_components), "--num-inducing", str(args.num_inducing),
           "--batch-size", str(args.batch_size), "--y-batch-size", str(args.y_batch_size),
           "--fit-iter", str(args.fit_iter), "--warm-iter", str(args.warm_iter),
           "--fit-lr", str(args.fit_lr),
           "--moran-k", str(args.moran_k), "--group-loadings-iter", str(args.group_loadings_iter),
           "--threads", str(args.threads), "--seed", str(args.seed), "--profile", str(args.profile)]
    if args.no_squidpy:
        cmd.append("--no-squidpy")
    env = dict(os.environ)
    if args.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
            env[var] = str(args.threads)
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr passes through
    if proc.returncode != 0 or not proc.stdout.strip():
        emit({"case": role, "model": model, "error": f"worker exited with {proc.returncode}"})
        return None
    rec = {"case": role, **json.loads(proc.stdout.strip().splitlines()[-1])}
    rec["worker_wall_s"] = round(time.perf_counter() - t, 1)
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-spots", type=int, default=41786)
    ap.add_argument("--n-genes", type=int, default=4000)
    ap.add_argument("--n-components", type=int, default=10)
    ap.add_argument("--n-groups", type=int, default=14)
    ap.add_argument("--num-inducing", type=int, default=3000)
    ap.add_argument("--mean-counts", type=float, default=None,
                    help="expected counts per spot (default 130 x n_genes / 4000: ~3%% non-zeros)")
    ap.add_argument("--holdout-fraction", type=float, default=0.05)
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of pnmf, svgp")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch and BLAS/OpenMP threads of the workers (0 = as is)")
    ap.add_argument("--batch-size", type=int, default=7000, help="training spots per iteration")
    ap.add_argument("--y-batch-size", type=int, default=2000, help="training genes per iteration")
    ap.add_argument("--fit-iter", type=int, default=4,
                    help="training iterations of the cheap fit (>= 2 to time one)")
    ap.add_argument("--warm-iter", type=int, default=5,
                    help="SVGP warm-start steps of the cheap fit (the library uses 100)")
    ap.add_argument("--fit-lr", type=float, default=0.0,
                    help="learning rate of the cheap fit (0 = 0.1 for pnmf as the Slide-seq config, "
                         "0.01 for svgp: with its warm start cut short, 0.1 overflows the ELBO "
                         "within a few iterations)")
    ap.add_argument("--moran-k", type=int, default=6)
    ap.add_argument("--group-loadings-iter", type=int, default=100,
                    help="analysis.group_loadings_iter (the config default is 100)")
    ap.add_argument("--max-iter", type=int, default=CONFIG_MAX_ITER,
                    help="iterations of a full training run, for the analyze / training ratio")
    ap.add_argument("--no-squidpy", action="store_true", help="skip the squidpy Moran's I baseline")
    ap.add_argument("--profile", type=int, default=0,
                    help="print the top N functions of a cProfile of analyze_model to stderr "
                         "(adds overhead; timings of that run are not clean)")
    ap.add_argument("--workdir", default=None, help="keep data and models here (default: a temp dir)")
    ap.add_argument("--reuse-fits", action="store_true",
                    help="with --workdir: reuse data.npz and model files from an earlier run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="small smoke run (3,000 x 400, M = 200, B = 1,000 x 200)")
    ap.add_argument("--worker", choices=("fit", "analyze"), help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data-path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "fit":
        fit_worker(args)
        return
    if args.worker == "analyze":
        analyze_worker(args)
        return
    if args.quick:
        args.n_spots, args.n_genes, args.num_inducing = 3000, 400, 200
        args.batch_size, args.y_batch_size, args.fit_iter, args.warm_iter = 1000, 200, 3, 5
    if args.mean_counts is None:
        args.mean_counts = 130.0 * args.n_genes / 4000
    models = [m for m in args.models.split(",") if m]
    bad = set(models) - set(MODELS)
    if bad:
        raise SystemExit(f"--models: unknown {sorted(bad)}; choose from {', '.join(MODELS)}")

    with tempfile.TemporaryDirectory(prefix="bench_analyze_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data_path = workdir / "data.npz"
        if not (args.reuse_fits and data_path.exists()):
            data_path = prepare(args, workdir)
        for model in models:
            model_path = workdir / f"{model}.pth"
            fit = None
            fit_json = workdir / f"{model}_fit.json"
            if args.reuse_fits and model_path.exists() and fit_json.exists():
                fit = json.loads(fit_json.read_text())
                fit["reused"] = True
            else:
                fit = run_worker(args, "fit", model, data_path, model_path)
                if fit is not None:
                    fit["note"] = ("cheap fit, not measured: a stand-in for a trained model; "
                                   "analysis cost does not depend on convergence except the "
                                   "early stop of the per-group loadings refits")
                    fit_json.write_text(json.dumps(fit))
            emit(fit if fit is not None else {"case": "fit", "model": model, "error": "failed"})
            if fit is None:
                continue
            rec = run_worker(args, "analyze", model, data_path, model_path)
            if rec is None:
                continue
            emit(rec)
            ratio = {"case": "ratio", "model": model, "analyze_s": rec["analyze_s"],
                     "peak_above_baseline_mb": rec["peak_above_baseline_mb"],
                     "slowest_phase": next(iter(rec["phases_s"]), None)}
            it_s = fit.get("train_iteration_s")
            if it_s:
                per_epoch = math.ceil(rec["n_train"] / args.batch_size)
                ratio.update({
                    "baseline": f"one training iteration of the same model (B = {args.batch_size} "
                                f"spots x {args.y_batch_size} genes), median of the cheap fit",
                    "train_iteration_s": round(it_s, 4),
                    "analyze_over_train_iteration": round(rec["analyze_s"] / it_s, 2),
                    "analyze_in_spot_epochs": round(rec["analyze_s"] / (it_s * per_epoch), 3),
                    "iterations_per_spot_epoch": per_epoch,
                    "analyze_over_full_training": round(rec["analyze_s"] / (it_s * args.max_iter), 4),
                    "full_training_iterations": args.max_iter,
                })
            mq = rec.get("moran_vs_squidpy") or {}
            if "ours_over_squidpy" in mq:
                ratio["moran_i_ours_over_squidpy"] = mq["ours_over_squidpy"]
                ratio["moran_i_max_abs_diff_vs_squidpy"] = mq["max_abs_diff_vs_squidpy"]
            emit(ratio)


if __name__ == "__main__":
    main()
