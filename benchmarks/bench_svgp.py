"""Time one SVGP training step against its FLOP floor and against gpytorch.

Data: a Slide-seq-sized synthetic matrix (default 41,786 spots x 4,000 genes, L = 10, 14
groups), coordinates rescaled as the preprocess stage does (the plan's rule: mean centre,
geometric-mean side 4 x 50 = 200, as on the Slide-seq puck). A training step is: marginals of q(F) for a batch of B spots, the lower-bound expected
log-likelihood of its B x Db count block (``sf_mlflow.models.likelihood``), the KL, backward,
and an Adam step on the variational parameters. Kernel hyperparameters are fixed, inducing
points are fixed k-means centres (the same ones for every implementation of a case).

Cases: (B, Db, M) = (2000, 1000, {500, 1000, 2000}) and (7000, 2000, 3000). For each:

* ``ours``: ``SVGPPrior``, single-group Matern-3/2;
* ``ours_mggp``: the same with 14 groups (multi-group kernel, proportional allocation);
* ``ours_natural``, ``ours_mggp_natural``: the same priors, but q(v) moved by the trainer's
  natural-gradient step (:class:`sf_mlflow.models.natural.NaturalGradient`, step 0.5): the
  marginals without autograd, gradients of the expected log-likelihood in them, the step
  (curvature, Cholesky of the precision, new Lu). Their FLOP floor is the Adam step's of the
  same prior (the goal of issue 20: a natural step within 1.25 x that floor). The curvature
  takes the trainer's ``curvature_fraction: auto`` of the batch (a quarter of a mini-batch's
  spots; ``--curvature-fraction`` sets another share);
* ``gpytorch``: ``ApproximateGP`` with ``CholeskyVariationalDistribution(batch_shape=[L])``,
  whitened ``VariationalStrategy`` (fixed inducing points), ``ScaleKernel(MaternKernel(1.5))``
  with frozen hyperparameters, and the same likelihood on its marginals.

Workers keep freed memory in the process as a CPU fit does
(:func:`sf_mlflow.models.device.keep_freed_memory`; ``SF_MLFLOW_KEEP_FREED_MEMORY=0`` turns
it off). Every (case, implementation) runs in a fresh subprocess, so its peak memory is its own: on
CPU the maximum resident set size (``ru_maxrss``) of the worker, and its growth from the
moment the inputs were loaded; on CUDA ``torch.cuda.max_memory_allocated``. Each worker
also times a large float32 GEMM (4096^2 on CPU, 8192^2 on CUDA) just before its steps, so
the FLOP floor uses the matmul speed of the same moment (the CPU may be shared).

FLOPs of our step are counted from the shapes (see :func:`count_flops`): the kernel matrix,
the triangular solve (M^2 B), the variance term (L M^2 B: the triangular minimum; forward and
backward each), means, likelihood, KL and Adam. ``floor_s`` = FLOPs / GEMM speed; the goal is
``step_s <= 1.25 floor_s`` and ``ours / gpytorch <= 0.35`` at M >= 1000.
``--per-factor-lengthscale`` gives every factor its own kernel (the model's default): the
kernel matrix and the triangular solve are then computed per factor (L times the flops).

Output: JSON lines: ``{"case": "data", ...}``, one line per (case, impl) (step time, GEMM
speed before and after, memory, FLOPs, floor) and one ``"summary"`` line per case with the
ratios. ``--quick`` runs a small
smoke version; ``--device cuda`` runs on the GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES_FULL = [(2000, 1000, 500), (2000, 1000, 1000), (2000, 1000, 2000), (7000, 2000, 3000)]
CASES_QUICK = [(300, 200, 100), (300, 200, 200)]
IMPLS = ("ours", "ours_mggp", "ours_natural", "ours_mggp_natural", "gpytorch")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ---- FLOP model ------------------------------------------------------------------------------

#: Elementwise operations per kernel entry: distance (2 sub, 2 mul, 1 add), sqrt, scale,
#: neg, exp, add, mul, amplitude; the multi-group kernel adds compare, 2 selects, 2 mul.
KERNEL_OPS = 12
MGGP_EXTRA_OPS = 5
#: Adam: ~12 operations per parameter (two moment updates, bias corrections, sqrt, division).
ADAM_OPS = 12


def count_flops(B: int, M: int, L: int, nnz: int, Db: int, mggp: bool, n_params: int,
                per_factor: bool = False) -> dict:
    """Floating-point operations of one training step, from the shapes.

    Returns a dict with the total and its parts. The variance term counts the triangular
    minimum: ``colsum((Lu^T A)^2)`` touches the M (M + 1) / 2 entries of each Lu once per
    spot (a multiply-add each) forward, and as many for ``dLu`` backward.
    """
    tri = L * M * (M + 1) * B                      # 2 flops x L x M(M+1)/2 x B
    kernels = L if per_factor else 1
    parts = {
        "kernel": kernels * B * M * (KERNEL_OPS + (MGGP_EXTRA_OPS if mggp else 0)),
        "trsm": kernels * M * M * B,                # forward substitution, M^2 B per kernel
        "var_fwd": tri + 2 * L * M * B + 2 * M * B,  # + the squared norms of Q and of A
        "var_bwd": tri + L * M * B,                 # dLu (triangular) + 2 g * Q
        "mean_fwd_bwd": 4 * L * M * B,              # A^T mu and dmu = A dmean
        # SDDMM at the non-zeros, two sparse-dense products backward, exp/rate terms
        "likelihood": 6 * nnz * L + 12 * L * B + 2 * L * Db,
        "kl": 4 * n_params,
        "adam": ADAM_OPS * n_params,
    }
    parts["total"] = sum(parts.values())
    # what the same step costs with a dense Lu (2 L M^2 B each way), for comparison
    parts["total_if_dense_lu"] = parts["total"] - 2 * tri + 4 * L * M * M * B
    return parts


# ---- data ------------------------------------------------------------------------------------

def prepare(args, workdir: Path) -> list[dict]:
    """Generate the data, choose inducing points and write one input file per case."""
    import torch  # noqa: F401
    from sf_mlflow.data.preprocess import rescale_coordinates
    from sf_mlflow.data.synthetic import make_synthetic
    from sf_mlflow.models.inducing import select_inducing_points

    t0 = time.perf_counter()
    data = make_synthetic(n_spots=args.n_spots, n_genes=args.n_genes, n_components=args.n_components,
                          n_groups=args.n_groups, mean_counts=args.mean_counts, seed=args.seed)
    X, _, _ = rescale_coordinates(data.coordinates, 50.0, "geometric_mean")  # as preprocess
    Y = data.counts.tocsr()
    emit({"case": "data", "n_spots": Y.shape[0], "n_genes": Y.shape[1], "nnz": int(Y.nnz),
          "n_components": args.n_components, "n_groups": args.n_groups,
          "generate_s": round(time.perf_counter() - t0, 2)})
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(Y.shape[0])
    genes = rng.permutation(Y.shape[1])
    inducing = {}
    files = []
    for B, Db, M in args.cases:
        if M not in inducing:
            t = time.perf_counter()
            Z, _ = select_inducing_points(X, None, M, seed=args.seed)
            Zg, gZ = select_inducing_points(X, data.groups, M, "proportional", seed=args.seed)
            inducing[M] = (Z, Zg, gZ)
            log(f"k-means M={M}: {time.perf_counter() - t:.1f}s")
        Z, Zg, gZ = inducing[M]
        idx, cols = order[:B], np.sort(genes[:Db])
        block = Y[idx][:, cols].tocsr()
        path = workdir / f"case_B{B}_Db{Db}_M{M}.npz"
        np.savez(path, x=X[idx], g=data.groups[idx], Z=Z, Zg=Zg, gZ=gZ,
                 data=block.data, indices=block.indices, indptr=block.indptr,
                 shape=np.array(block.shape), n_spots=Y.shape[0],
                 loadings=rng.gamma(1.0, 1.0, size=(Db, args.n_components)))
        files.append({"B": B, "Db": Db, "M": M, "path": str(path), "nnz": int(block.nnz)})
    return files


# ---- worker ----------------------------------------------------------------------------------

def gemm_gflops(torch, device, reps: int = 5) -> float:
    """Median float32 GEMM speed (GFLOP/s) of an n x n x n product, n = 4096 (8192 on CUDA)."""
    n = 8192 if device.type == "cuda" else 4096
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = []
    for _ in range(reps + 1):
        sync(torch, device)
        t = time.perf_counter()
        a @ b
        sync(torch, device)
        times.append(time.perf_counter() - t)
    return 2.0 * n ** 3 / float(np.median(times[1:])) / 1e9


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_gpytorch(torch, Z, L, lengthscale, device):
    import gpytorch
    from gpytorch.variational import CholeskyVariationalDistribution, VariationalStrategy

    class BatchSVGP(gpytorch.models.ApproximateGP):
        def __init__(self):
            dist = CholeskyVariationalDistribution(Z.shape[0], batch_shape=torch.Size([L]))
            strategy = VariationalStrategy(self, Z, dist, learn_inducing_locations=False)
            super().__init__(strategy)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    model = BatchSVGP().to(device)
    model.covar_module.base_kernel.lengthscale = lengthscale
    model.covar_module.outputscale = 1.0
    for p in model.covar_module.parameters():
        p.requires_grad_(False)
    model.train()

    def marginals(x):
        out = model(x)
        return out.mean, out.variance

    def kl():
        return model.variational_strategy.kl_divergence().sum()

    return model, marginals, kl


def _fraction(text: str):
    """``--curvature-fraction``: ``auto`` or a number in (0, 1]."""
    return text if text == "auto" else float(text)


def worker(args) -> None:
    import torch

    import sf_mlflow  # noqa: F401  (flush denormals)
    from sf_mlflow.models.device import keep_freed_memory
    from sf_mlflow.models.likelihood import CountBatch, expected_log_likelihood
    from sf_mlflow.models.svgp import SVGPPrior
    import scipy.sparse as sp

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # as a fit does (SF_MLFLOW_KEEP_FREED_MEMORY=0 measures glibc's default instead)
    kept = keep_freed_memory() if device.type == "cpu" else False
    inp = np.load(args.worker_input)
    L = int(inp["loadings"].shape[1])
    B, M = int(inp["x"].shape[0]), int(inp["Z"].shape[0])
    block = sp.csr_matrix((inp["data"], inp["indices"], inp["indptr"]), shape=tuple(inp["shape"]))
    batch = CountBatch.from_scipy(block, device=device, dtype=torch.float32)
    x = torch.tensor(inp["x"], dtype=torch.float32, device=device)
    g = torch.tensor(inp["g"], device=device)
    W = torch.tensor(inp["loadings"], dtype=torch.float32, device=device)
    N = int(inp["n_spots"])
    impl = args.impl
    gflops = gemm_gflops(torch, device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    if impl == "gpytorch":
        Z = torch.tensor(inp["Z"], dtype=torch.float32, device=device)
        model, marginals, kl = build_gpytorch(torch, Z, L, args.lengthscale, device)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        mggp = impl.startswith("ours_mggp")
        Z = inp["Zg"] if mggp else inp["Z"]
        prior = SVGPPrior(x, g if mggp else None, L, kernel="Matern32", lengthscale=args.lengthscale,
                          per_factor_lengthscale=args.per_factor_lengthscale,
                          inducing_points=torch.tensor(Z, dtype=torch.float32, device=device),
                          inducing_groups=torch.tensor(inp["gZ"], device=device) if mggp else None)
        idx = torch.arange(B, device=device)

        def marginals(xx):
            return prior.marginals(idx, xx, g if mggp else None)

        def kl():
            return prior.kl(idx)

        params = [p for p in prior.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)

    def adam_step():
        mean, var = marginals(x)
        ell = expected_log_likelihood(batch, mean, var, W, mode="lower-bound")
        loss = -(ell * (N / B) - kl()) / N
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step, fraction = adam_step, None
    if impl.endswith("_natural"):
        from sf_mlflow.models.natural import NaturalGradient
        from sf_mlflow.models.settings import curvature_fraction

        for p in params:             # q(v) moves by natural steps only, as in the trainer
            p.requires_grad_(False)
        # the trainer's rule for a batch of B of the data's N spots (auto: a quarter of a
        # mini-batch's spots, all of a full batch)
        fraction = curvature_fraction({"batch_size": B,
                                       "curvature_fraction": args.curvature_fraction}, N)
        natural = NaturalGradient(prior, 0.5, curvature_fraction=fraction)

        def natural_step():
            with torch.no_grad():
                mean, var, At = prior.marginals_and_interp(x, g if mggp else None)
            m, v = mean.requires_grad_(True), var.requires_grad_(True)
            ell = expected_log_likelihood(batch, m, v, W, mode="lower-bound") * (N / B)
            g_mean, g_var = torch.autograd.grad(ell, [m, v])
            natural.step(At, g_mean, g_var)
            return -(ell.detach() - kl()) / N

        step = natural_step

    times = []
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.iters):
        sync(torch, device)
        t = time.perf_counter()
        loss = step()
        sync(torch, device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        # a budget caps very slow cases; at least 3 timed steps are always taken
        if (time.perf_counter() - t_start > args.budget_s and len(times) >= 3):
            break
    gflops_after = gemm_gflops(torch, device)
    n_params = sum(p.numel() for p in params)
    rec = {
        "impl": impl, "B": B, "Db": int(block.shape[1]), "M": M, "L": L, "nnz": int(block.nnz),
        "device": str(device), "threads": torch.get_num_threads(), "kept_freed_memory": kept,
        "curvature_fraction": fraction if impl.endswith("_natural") else None,
        "step_s": float(np.median(times)), "step_s_min": float(np.min(times)),
        "iters": len(times), "reduced_iterations": len(times) < args.iters,
        "loss": float(loss.detach()), "n_params": int(n_params),
        "gemm_gflops_before": round(gflops, 1), "gemm_gflops_after": round(gflops_after, 1),
    }
    if device.type == "cuda":
        rec["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        rec["peak_rss_mb"] = round(peak, 1)
        rec["peak_rss_growth_mb"] = round(peak - base_rss, 1)
    print(json.dumps(rec), flush=True)


# ---- driver ----------------------------------------------------------------------------------

def run_case(args, case: dict, impl: str) -> dict | None:
    cmd = [sys.executable, __file__, "--worker-input", case["path"], "--impl", impl,
           "--device", args.device, "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--budget-s", str(args.budget_s), "--lengthscale", str(args.lengthscale),
           "--threads", str(args.threads), "--curvature-fraction", str(args.curvature_fraction)
           ] + (["--per-factor-lengthscale"] if args.per_factor_lengthscale else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        emit({"case": f"B{case['B']}_Db{case['Db']}_M{case['M']}", "impl": impl,
              "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"})
        return None
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["case"] = f"B{case['B']}_Db{case['Db']}_M{case['M']}"
    rec["worker_wall_s"] = round(time.perf_counter() - t, 1)
    if impl != "gpytorch":
        # a natural step is held to the FLOP floor of the Adam step of the same prior
        fl = count_flops(rec["B"], rec["M"], rec["L"], rec["nnz"], rec["Db"],
                         impl.startswith("ours_mggp"), rec["n_params"], args.per_factor_lengthscale)
        gemm = 0.5 * (rec["gemm_gflops_before"] + rec["gemm_gflops_after"]) * 1e9
        rec["gflop"] = round(fl["total"] / 1e9, 2)
        rec["gflop_if_dense_lu"] = round(fl["total_if_dense_lu"] / 1e9, 2)
        rec["flop_parts_gflop"] = {k: round(v / 1e9, 3) for k, v in fl.items()
                                   if k not in ("total", "total_if_dense_lu")}
        rec["floor_s"] = fl["total"] / gemm
        rec["achieved_gflops"] = round(fl["total"] / rec["step_s"] / 1e9, 1)
        rec["step_over_floor"] = round(rec["step_s"] / rec["floor_s"], 3)
    emit(rec)
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="small smoke run (3,000 x 400, M <= 200)")
    ap.add_argument("--n-spots", type=int, default=41786)
    ap.add_argument("--n-genes", type=int, default=4000)
    ap.add_argument("--n-components", type=int, default=10)
    ap.add_argument("--n-groups", type=int, default=14)
    ap.add_argument("--mean-counts", type=float, default=130.0)
    ap.add_argument("--lengthscale", type=float, default=4.0)
    ap.add_argument("--per-factor-lengthscale", action="store_true",
                    help="one kernel per factor (the model's default), as a fit with them steps")
    ap.add_argument("--iters", type=int, default=10, help="timed steps per case (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--curvature-fraction", type=_fraction, default="auto",
                    help="the natural impls' share of a batch's spots in the curvature (auto: "
                         "the trainer's training.curvature_fraction: auto for the batch)")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="stop a case's timed steps after this long (at least 3 are taken)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--cases", default=None, help="e.g. 2000:1000:500,7000:2000:3000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker-input", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_input:
        worker(args)
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available on this machine")
    if args.quick:
        args.n_spots, args.n_genes, args.iters, args.warmup = 3000, 400, 3, 1
        args.cases = CASES_QUICK
    elif args.cases:
        args.cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",")]
    else:
        args.cases = CASES_FULL
    impls = [i for i in args.impls.split(",") if i]
    with tempfile.TemporaryDirectory(prefix="bench_svgp_") as tmp:
        cases = prepare(args, Path(tmp))
        for case in cases:
            recs = {impl: run_case(args, case, impl) for impl in impls}
            ours, gp, mg = recs.get("ours"), recs.get("gpytorch"), recs.get("ours_mggp")
            summary = {"case": "summary", "B": case["B"], "Db": case["Db"], "M": case["M"],
                       "threads": next((r["threads"] for r in recs.values() if r), None)}
            if ours:
                summary["ours_step_s"] = round(ours["step_s"], 4)
                summary["ours_over_floor"] = ours["step_over_floor"]
                summary["goal_floor_met"] = ours["step_over_floor"] <= 1.25
            if ours and gp:
                summary["gpytorch_step_s"] = round(gp["step_s"], 4)
                summary["ours_over_gpytorch"] = round(ours["step_s"] / gp["step_s"], 3)
                if case["M"] >= 1000:
                    summary["goal_gpytorch_met"] = summary["ours_over_gpytorch"] <= 0.35
            if mg:
                summary["mggp_step_s"] = round(mg["step_s"], 4)
                summary["mggp_over_floor"] = mg["step_over_floor"]
            for name, adam in (("natural", ours), ("mggp_natural", mg)):
                nat = recs.get(f"ours_{name}")
                if nat:
                    summary[f"{name}_step_s"] = round(nat["step_s"], 4)
                    summary[f"{name}_over_floor"] = nat["step_over_floor"]
                    summary[f"goal_{name}_floor_met"] = nat["step_over_floor"] <= 1.25
                    if adam:
                        summary[f"{name}_over_adam"] = round(nat["step_s"] / adam["step_s"], 3)
            emit(summary)


if __name__ == "__main__":
    main()
