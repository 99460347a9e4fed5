"""Time to quality: held-out deviance against wall-clock time, four trainers, one budget.

Data: Slide-seq-sized generated counts with planted factor fields that differ by group
(default N 41,786 spots x D 17,702 genes as the plan's filtered Slide-seq, L 10, 14 groups,
``group_effect`` 0.5, fields of lengthscale 0.15 of the square), coordinates rescaled as the
preprocess stage does (``sf_mlflow.data.preprocess.rescale_coordinates``, spatial_scale 50, so
the square is 200 units wide and the fields' lengthscale is 30 units, which the kernel uses),
5 % of the spots held out (``heldout_split``, stratified by group). Every fit sees the training
spots only; every clock includes the trainer's own initialisation (k-means, KL-NMF start).

Trainers (each in its own subprocess, the same wall-clock budget each):

* ``default``: ``PNMF(prior="svgp")`` as shipped: natural-gradient steps on q(v), the
  multiplicative loadings update, MGGP kernel with the groups;
* ``adam``: the same model with ``optimizer="Adam"`` (today's trainer before the natural
  optimiser) at ``--adam-lr``;
* ``gpytorch``: a gpytorch ``ApproximateGP`` with the same whitened q(v)
  (``CholeskyVariationalDistribution`` per factor, ``VariationalStrategy`` with the same fixed
  inducing points and groups), the same MGGP kernel (ours, wrapped as a gpytorch kernel whose
  inputs carry the group code as a third column), the same lower-bound likelihood, and every
  parameter, loadings included (softplus), trained by Adam at ``--adam-lr``, as a gpytorch
  user would; it starts from q(v) = N(0, I) and the same KL-NMF loadings;
* ``pnmf``: the non-spatial model (Gaussian prior, Adam), held-out spots predicted by the
  mean log-factors of their 6 nearest training spots (``models.neighbours``).

Every ``--eval-every`` iterations the clock is paused and the held-out Poisson deviance of the
predicted mean rates ``exp(E F) W^T`` is recorded. Per case the driver prints, for each
trainer, the time to come within 1 % of the best held-out deviance any trainer reached
("> budget" when it never did; ratios are then lower bounds) and its final matched
correlation with the planted log-factors (training spots; factors matched one to one by the
Hungarian method on |correlation|).

Output: JSON lines: ``{"case": "data", ...}``, one line per (case, trainer) with its curve,
and one ``"summary"`` line per case with times to quality and ratios to the gpytorch loop.
``--quick`` runs a small smoke version; ``--device cuda`` runs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: (B, Db, M): the M = 1,000 case and the plan case.
CASES_FULL = [(2000, 1000, 1000), (7000, 2000, 3000)]
CASES_QUICK = [(300, 100, 100)]
TRAINERS = ("default", "adam", "gpytorch", "pnmf")
WITHIN = 0.01


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ---- data ------------------------------------------------------------------------------------

def prepare(args, workdir: Path) -> Path:
    from sf_mlflow.data.preprocess import heldout_split, rescale_coordinates
    from sf_mlflow.data.synthetic import make_synthetic

    t0 = time.perf_counter()
    data = make_synthetic(n_spots=args.n_spots, n_genes=args.n_genes, n_components=args.n_components,
                          n_groups=args.n_groups, group_effect=args.group_effect,
                          lengthscale=args.truth_lengthscale, mean_counts=args.mean_counts,
                          seed=args.seed)
    X = rescale_coordinates(data.coordinates, args.spatial_scale)[0]
    held = heldout_split(data.counts.shape[0], 0.05, args.seed, data.groups)
    Y = data.counts.tocsr()
    emit({"case": "data", "n_spots": Y.shape[0], "n_genes": Y.shape[1], "nnz": int(Y.nnz),
          "n_components": args.n_components, "n_groups": args.n_groups,
          "n_heldout": int(held.sum()), "generate_s": round(time.perf_counter() - t0, 1)})
    path = workdir / "data.npz"
    np.savez(path, data=Y.data, indices=Y.indices, indptr=Y.indptr, shape=np.array(Y.shape),
             x=X, g=data.groups, held=held, truth=data.truth["log_factors"])
    return path


def load(path: str):
    import scipy.sparse as sp

    z = np.load(path)
    Y = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
    held = z["held"]
    tr, te = np.flatnonzero(~held), np.flatnonzero(held)
    return (Y[tr], z["x"][tr], z["g"][tr], z["truth"][tr]), (Y[te], z["x"][te], z["g"][te])


def matched_correlation(estimated: np.ndarray, truth: np.ndarray) -> float:
    """Mean |correlation| of estimated and true log-factors (N, L) after one-to-one matching."""
    from scipy.optimize import linear_sum_assignment

    L = truth.shape[1]
    C = np.corrcoef(estimated.T, truth.T)[:L, L:]
    C = np.nan_to_num(np.abs(C))
    r, c = linear_sum_assignment(-C)
    return float(C[r, c].mean())


# ---- worker ----------------------------------------------------------------------------------

class Clock:
    """Wall-clock time of training alone: evaluations pause it."""

    def __init__(self, torch, device):
        self.torch, self.device, self.spent, self.t = torch, device, 0.0, time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def pause(self) -> float:
        self._sync()
        self.spent += time.perf_counter() - self.t
        return self.spent

    def resume(self) -> None:
        self.t = time.perf_counter()


def mggp_gpytorch_kernel(torch, ours):
    """Our (frozen) MGGP kernel as a gpytorch kernel over inputs (x, y, group)."""
    import gpytorch

    class MGGP(gpytorch.kernels.Kernel):
        def forward(self, x1, x2, diag=False, **params):
            g1, g2 = x1[..., 2].round().long(), x2[..., 2].round().long()
            if diag:
                return ours.outputscale.expand(x1.shape[:-1]).to(x1.dtype)
            return ours(x1[..., :2], x2[..., :2], g1, g2)

    return MGGP()


def worker(args) -> None:
    import torch

    import sf_mlflow  # noqa: F401  (flush denormals)
    from sf_mlflow.models.likelihood import CountBatch, expected_log_likelihood, poisson_deviance
    from sf_mlflow.models.pnmf import PNMF
    from sf_mlflow.models.settings import SVGP

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    (Y, X, g, truth), (Yv, Xv, gv) = load(args.worker_input)
    B, Db, M = args.B, args.Db, args.M
    L = truth.shape[1]
    val = CountBatch.from_scipy(Yv, device=device, dtype=torch.float32)
    clock = Clock(torch, device)
    curve: list[tuple[float, int, float]] = []
    status = "ok"

    def record(it: int, log_factors_val, W) -> bool:
        """Pause the clock, score the held-out spots; True once the budget is spent."""
        spent = clock.pause()
        dev = poisson_deviance(val, log_factors_val.to(device, torch.float32), W.to(device, torch.float32))
        curve.append((round(spent, 2), it, dev))
        log(f"{args.trainer} B{B} M{M}: iter {it} t {spent:.0f}s heldout {dev:.6g}")
        clock.resume()
        return spent > args.budget_s

    if args.trainer in ("default", "adam", "pnmf"):
        spatial = args.trainer != "pnmf"
        kw = dict(prior=SVGP(num_inducing=M, lengthscale=args.lengthscale), batch_size=B,
                  y_batch_size=Db) if spatial else dict(prior="gaussian", batch_size=B, y_batch_size=Db)
        if args.trainer == "adam":
            kw.update(optimizer="Adam", learning_rate=args.adam_lr)
        elif spatial and args.natural_lr is not None:
            kw.update(learning_rate=args.natural_lr)
        model = PNMF(L, max_iter=10 ** 6, tol=0, device=args.device, random_state=args.seed, **kw)
        xv_t = torch.as_tensor(Xv, dtype=torch.float32, device=device)
        gv_t = torch.as_tensor(gv, device=device)

        def callback(state):
            it = state.iteration
            if it % args.eval_every:
                return None
            with torch.no_grad():
                if spatial:
                    F = model.prior_.predict(xv_t, gv_t, return_var=False)
                else:
                    from sf_mlflow.models.neighbours import nearest_neighbour_log_factors

                    mtr = model.prior_.mu.detach().cpu().numpy().T
                    F = torch.as_tensor(nearest_neighbour_log_factors(X, mtr, Xv, k=6).T)
            return record(it, F, torch.as_tensor(model.loadings_))

        clock.resume()
        try:
            model.fit(Y, coordinates=X, groups=g, callback=callback)
        except Exception as err:   # a diverged fit is a result, not a crash
            status = f"failed: {err}"
            log(status)
        clock.pause()
        with torch.no_grad():
            est = np.log(model.get_factors()) if hasattr(model, "prior_") else None
    else:
        import gpytorch
        from gpytorch.variational import CholeskyVariationalDistribution, VariationalStrategy

        from sf_mlflow.models.inducing import select_inducing_points
        from sf_mlflow.models.initialization import initial_state
        from sf_mlflow.models.kernels import make_kernel

        # inducing points and KL-NMF loadings as our trainer chooses them (timed, as ours are)
        clock.resume()
        Z, gZ = select_inducing_points(X, g, M, "proportional", seed=args.seed)
        ours = make_kernel("Matern32", args.lengthscale, 1.0, multigroup=True, group_diff_param=10.0,
                           trainable=False, dtype=torch.float32, device=device)
        full = CountBatch.from_scipy(Y, device=device, dtype=torch.float32)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        W0, _ = initial_state(full, L, gen)
        del full
        Zt = torch.as_tensor(np.c_[Z, gZ], dtype=torch.float32, device=device)

        class BatchSVGP(gpytorch.models.ApproximateGP):
            def __init__(self):
                dist = CholeskyVariationalDistribution(M, batch_shape=torch.Size([L]))
                strategy = VariationalStrategy(self, Zt, dist, learn_inducing_locations=False)
                super().__init__(strategy)
                self.mean_module = gpytorch.means.ZeroMean()
                self.covar_module = mggp_gpytorch_kernel(torch, ours)

            def forward(self, x):
                return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

        model = BatchSVGP().to(device)
        raw_W = torch.nn.Parameter(W0.clamp_min(1e-6) + torch.log(-torch.expm1(-W0.clamp_min(1e-6))))
        opt = torch.optim.Adam([*model.parameters(), raw_W], lr=args.adam_lr)
        inputs = torch.as_tensor(np.c_[X, g], dtype=torch.float32, device=device)
        inputs_v = torch.as_tensor(np.c_[Xv, gv], dtype=torch.float32, device=device)
        rng = np.random.default_rng(args.seed)
        N, D = Y.shape
        it = 0
        try:
            while True:
                it += 1
                si = np.sort(rng.choice(N, size=min(B, N), replace=False))
                gi = np.sort(rng.choice(D, size=min(Db, D), replace=False))
                batch = CountBatch.from_scipy(Y[si][:, gi], device=device, dtype=torch.float32)
                out = model(inputs[torch.as_tensor(si, device=device)])
                W = torch.nn.functional.softplus(raw_W)[torch.as_tensor(gi, device=device)]
                ell = expected_log_likelihood(batch, out.mean, out.variance, W, mode="lower-bound")
                elbo = ell * (N / len(si)) * (D / len(gi)) - model.variational_strategy.kl_divergence().sum()
                if not torch.isfinite(elbo):
                    raise FloatingPointError(f"ELBO {float(elbo)} at iteration {it}")
                opt.zero_grad(set_to_none=True)
                (-elbo / N).backward()
                opt.step()
                if it % args.eval_every == 0:
                    model.eval()
                    with torch.no_grad():
                        F = torch.cat([model(inputs_v[s:s + 5000]).mean for s in range(0, len(Xv), 5000)], -1)
                    model.train()
                    if record(it, F, torch.nn.functional.softplus(raw_W).detach()):
                        break
        except Exception as err:
            status = f"failed: {err}"
            log(status)
        clock.pause()
        model.eval()
        with torch.no_grad():
            est = torch.cat([model(inputs[s:s + 5000]).mean for s in range(0, N, 5000)], -1).T.cpu().numpy()
    rec = {"trainer": args.trainer, "B": B, "Db": Db, "M": M, "device": str(device),
           "threads": torch.get_num_threads(), "status": status, "budget_s": args.budget_s,
           "train_s": round(clock.spent, 1), "curve": curve,
           "matched_correlation": None if est is None or not np.isfinite(est).all()
           else round(matched_correlation(est, truth), 4)}
    print(json.dumps(rec), flush=True)


# ---- driver ----------------------------------------------------------------------------------

def time_to(curve: list, target: float):
    for t, _, dev in curve:
        if dev <= target:
            return t
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small smoke version")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=1800.0, help="training seconds per fit")
    ap.add_argument("--cases", default=None, help="e.g. '2000,1000,1000;7000,2000,3000' (B,Db,M)")
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--n-spots", type=int, default=41786)
    ap.add_argument("--n-genes", type=int, default=17702)
    ap.add_argument("--n-components", type=int, default=10)
    ap.add_argument("--n-groups", type=int, default=14)
    ap.add_argument("--group-effect", type=float, default=0.5)
    ap.add_argument("--mean-counts", type=float, default=500.0)
    ap.add_argument("--spatial-scale", type=float, default=50.0)
    ap.add_argument("--truth-lengthscale", type=float, default=0.15,
                    help="lengthscale of the planted fields, in units of the unit square")
    ap.add_argument("--lengthscale", type=float, default=None,
                    help="the kernel's, in model units; default: the planted fields' after the "
                         "preprocess rescale (geometric-mean side 4 x spatial_scale)")
    ap.add_argument("--adam-lr", type=float, default=0.01)
    ap.add_argument("--natural-lr", type=float, default=None,
                    help="step of the default trainer (default: PNMF's own default)")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trainer", help=argparse.SUPPRESS)
    ap.add_argument("--worker-input", help=argparse.SUPPRESS)
    ap.add_argument("--B", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--Db", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--M", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_input:
        worker(args)
        return
    if args.quick:
        args.n_spots, args.n_genes, args.budget_s = 2000, 300, min(args.budget_s, 20.0)
        cases = CASES_QUICK
    elif args.cases:
        cases = [tuple(int(v) for v in c.split(",")) for c in args.cases.split(";")]
    else:
        cases = CASES_FULL
    trainers = [t for t in args.trainers.split(",") if t]
    if args.lengthscale is None:
        # the unit square's geometric-mean side becomes 4 x spatial_scale model units
        args.lengthscale = args.truth_lengthscale * 4.0 * args.spatial_scale
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(args, Path(tmp))
        for B, Db, M in cases:
            eval_every = args.eval_every or (5 if M >= 3000 else 10)
            recs = {}
            for trainer in trainers:
                cmd = [sys.executable, __file__, "--worker-input", str(data), "--trainer", trainer,
                       "--B", str(B), "--Db", str(Db), "--M", str(M), "--device", args.device,
                       "--threads", str(args.threads), "--budget-s", str(args.budget_s),
                       "--lengthscale", str(args.lengthscale), "--adam-lr", str(args.adam_lr),
                       *(["--natural-lr", str(args.natural_lr)] if args.natural_lr else []),
                       "--eval-every", str(eval_every), "--seed", str(args.seed)]
                log(f"case B={B} Db={Db} M={M}: {trainer}")
                out = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                if out.returncode != 0 or not lines:
                    log(out.stderr[-3000:])
                    emit({"case": f"B{B}_Db{Db}_M{M}", "trainer": trainer, "status": "crashed",
                          "returncode": out.returncode})
                    continue
                rec = json.loads(lines[-1])
                rec["case"] = f"B{B}_Db{Db}_M{M}"
                recs[trainer] = rec
                emit(rec)
            devs = [d for r in recs.values() for _, _, d in r["curve"]]
            if not devs:
                continue
            best = min(devs)
            summary = {"case": "summary", "B": B, "Db": Db, "M": M, "budget_s": args.budget_s,
                       "best_heldout_deviance": best, "within": WITHIN}
            for name, r in recs.items():
                t = time_to(r["curve"], best * (1 + WITHIN))
                summary[f"{name}_time_to_quality_s"] = t if t is not None else f"> {r['train_s']}"
                summary[f"{name}_matched_correlation"] = r["matched_correlation"]
            ref = recs.get("gpytorch")
            if ref is not None:
                t_ref = time_to(ref["curve"], best * (1 + WITHIN))
                for name, r in recs.items():
                    t = time_to(r["curve"], best * (1 + WITHIN))
                    if t is None:
                        continue
                    summary[f"{name}_over_gpytorch"] = (round(t / t_ref, 3) if t_ref is not None
                                                        else f"< {round(t / ref['train_s'], 3)}")
            emit(summary)


if __name__ == "__main__":
    main()
