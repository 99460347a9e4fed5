"""Time to quality: held-out deviance and factor recovery against wall-clock time.

Data: Slide-seq-sized generated counts with planted factor fields that differ by group
(N 41,786 spots, 14 groups, L 10, ``group_effect`` 0.5, fields of lengthscale 0.15 of the
square), one data set per gene count in ``--genes`` (default 2,000 and 17,702, the plan's
filtered Slide-seq), coordinates rescaled as the preprocess stage does (spatial_scale 50: the
square is 200 units wide, the fields' lengthscale 30 units), 5 % of the spots held out
(``heldout_split``, stratified by group). Every fit sees the training spots only; every clock
includes the trainer's own initialisation (PNMF start, kernel hyperparameters, k-means).

The target: PNMF (the non-spatial baseline, Gaussian prior, Adam, at its defaults) run on each
data set until its own stopping rule says it converged; its held-out deviance then (held-out
spots predicted by the mean log-factors of their 6 nearest training spots) is the CONVERGED
PNMF deviance a spatial fit must beat.

Settings (``--settings``):

* ``defaults``: every model and training setting as shipped (``num_inducing``, ``batch_size``,
  ``lengthscale``: auto; all genes per step);
* ``plan``: the plan's M 3,000 inducing points, B 7,000 spots and Db 2,000 genes a step.

Trainers (each in its own subprocess, with the settings' budget):

* ``default``: ``PNMF(prior="svgp")``: natural-gradient steps on q(v), the multiplicative
  loadings update, the MGGP kernel with the groups;
* ``adam``: the same model with ``optimizer="Adam"`` at ``--adam-lr``;
* ``gpytorch``: a gpytorch ``ApproximateGP`` with the same whitened q(v)
  (``CholeskyVariationalDistribution`` per factor, ``VariationalStrategy`` on fixed inducing
  points and groups), the same MGGP kernel (ours, frozen at the planted lengthscale: an
  advantage), the same lower-bound likelihood, every parameter (loadings too, softplus) trained
  by Adam at ``--adam-lr`` from q(v) = N(0, I) and KL-NMF loadings, at the M and B the default
  trainer chose.

The spatial trainers run until the budget (``tol`` 0). Every ``--eval-every-s`` seconds of
training (and at the end) the clock is paused and two things are recorded: the held-out
Poisson deviance of the predicted rates ``exp(E F) W^T``, and the matched correlation of the
fitted log-factors at the training spots with the planted ones (factors matched one to one by
the Hungarian method on |correlation|). The criteria: the time to beat the converged PNMF
deviance and the time to matched correlation >= 0.9; the goals: within 300 s and 600 s for the
default trainer at the defaults, within 1,800 s each at the plan's settings.

Output: JSON lines: ``{"case": "data", ...}`` per data set, ``{"case": "target", ...}`` with
PNMF's converged fit, one line per (data set, settings, trainer) with its curve and times, one
``"summary"`` line per (data set, settings), and ``{"case": "figure", "path": ...}``: one PNG
of every curve (``--png``, default in the temporary folder). ``--quick`` runs a small smoke
version; ``--device cuda`` runs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

#: Per settings: (B, Db, M), 0 = auto / all; the quick versions; the goals in seconds
#: (beat the converged PNMF deviance, matched correlation >= 0.9).
SETTINGS = {"defaults": (0, 0, 0), "plan": (7000, 2000, 3000)}
SETTINGS_QUICK = {"defaults": (0, 0, 0), "plan": (300, 100, 100)}
GOALS = {"defaults": (300.0, 600.0), "plan": (1800.0, 1800.0)}
TRAINERS = ("default", "adam", "gpytorch")
CORRELATION_GOAL = 0.9


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

    def running(self) -> float:
        """Training seconds so far, the clock running."""
        return self.spent + time.perf_counter() - self.t


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


class Recorder:
    """The curve of one fit: every ``eval_every_s`` seconds of training, the clock paused, the
    held-out deviance and the matched correlation at the training spots."""

    def __init__(self, args, torch, device, Yv, truth):
        from sf_mlflow.models.likelihood import CountBatch

        self.args, self.torch, self.device, self.truth = args, torch, device, truth
        self.val = CountBatch.from_scipy(Yv, device=device, dtype=torch.float32)
        self.clock = Clock(torch, device)
        self.curve: list[tuple[float, int, float, float]] = []
        self.last = -float("inf")

    def due(self) -> bool:
        return self.clock.running() - self.last >= self.args.eval_every_s

    def record(self, it: int, heldout_log_factors, W, train_log_factors) -> bool:
        """Pause the clock and score; True once the budget is spent."""
        from sf_mlflow.models.likelihood import poisson_deviance

        torch = self.torch
        spent = self.clock.pause()
        self.last = spent
        dev = poisson_deviance(self.val, heldout_log_factors.to(self.device, torch.float32),
                               W.to(self.device, torch.float32))
        est = np.asarray(train_log_factors, dtype=np.float64)
        corr = matched_correlation(est, self.truth) if np.isfinite(est).all() else float("nan")
        self.curve.append((round(spent, 2), it, dev, round(corr, 4)))
        log(f"{self.args.trainer} {self.args.settings}: iter {it} t {spent:.0f}s heldout {dev:.6g} "
            f"corr {corr:.3f}")
        self.clock.resume()
        return spent > self.args.budget_s


def fit_ours(args, torch, device, rec: Recorder, data) -> dict:
    """The default, Adam and PNMF trainers: our estimator, scored from its callback."""
    from sf_mlflow.models.neighbours import nearest_neighbour_log_factors
    from sf_mlflow.models.pnmf import PNMF
    from sf_mlflow.models.settings import SVGP

    (Y, X, g, _), (_, Xv, gv) = data
    spatial = args.trainer != "pnmf"
    kw = dict(prior=SVGP(num_inducing=args.M or "auto") if spatial else "gaussian",
              batch_size=args.B or "auto", y_batch_size=args.Db or None)
    if spatial and args.curvature_fraction is not None:
        kw["curvature_fraction"] = args.curvature_fraction
    if args.trainer == "adam":
        kw.update(optimizer="Adam", learning_rate=args.adam_lr)
    # the spatial trainers run until the budget; PNMF until its own stopping rule
    if spatial:
        kw["tol"] = 0
    model = PNMF(args.n_components, max_iter=10 ** 6, device=args.device, random_state=args.seed,
                 verbose=args.verbose, **kw)
    xt, xv = (torch.as_tensor(a, dtype=torch.float32, device=device) for a in (X, Xv))
    gt, gvt = (torch.as_tensor(a, device=device) for a in (g, gv))

    def score(it: int) -> bool:
        with torch.no_grad():
            if spatial:
                Fv = model.prior_.predict(xv, gvt, return_var=False)
                Ft = model.prior_.predict(xt, gt, return_var=False)
                Ft = Ft.cpu().numpy().T
            else:
                Ft = model.prior_.mu.detach().cpu().numpy().T
                Fv = torch.as_tensor(nearest_neighbour_log_factors(X, Ft, Xv, k=6).T)
        return rec.record(it, Fv, torch.as_tensor(model.loadings_), Ft)

    status = "ok"
    rec.clock.resume()
    try:
        model.fit(Y, coordinates=X, groups=g,
                  callback=lambda s: score(s.iteration) if rec.due() else None)
    except Exception as err:   # a diverged fit is a result, not a crash
        status = f"failed: {err}"
        log(status)
    rec.clock.pause()
    if status == "ok" and (not rec.curve or rec.curve[-1][1] != model.n_iter_):
        rec.clock.resume()
        score(model.n_iter_)
    return {"status": status, "M": model.num_inducing_, "B": model.batch_size_,
            "n_iter": model.n_iter_, "stop_reason": model.stop_reason_}


def fit_gpytorch(args, torch, device, rec: Recorder, data) -> dict:
    """A gpytorch ApproximateGP loop with our q(v), kernel and likelihood, trained by Adam."""
    import gpytorch
    from gpytorch.variational import CholeskyVariationalDistribution, VariationalStrategy

    from sf_mlflow.models.inducing import select_inducing_points
    from sf_mlflow.models.initialization import initial_state
    from sf_mlflow.models.kernels import make_kernel
    from sf_mlflow.models.likelihood import CountBatch, expected_log_likelihood

    (Y, X, g, _), (_, Xv, gv) = data
    N, D = Y.shape
    B, Db, M, L = args.B or N, args.Db or D, args.M, args.n_components
    # inducing points and KL-NMF loadings as our trainer chooses them (timed, as ours are)
    rec.clock.resume()
    Z, gZ = select_inducing_points(X, g, M, "proportional", seed=args.seed)
    ours = make_kernel("Matern32", args.lengthscale, 1.0, multigroup=True, group_diff_param=10.0,
                       trainable=False, dtype=torch.float32, device=device)
    full = CountBatch.from_scipy(Y, device=device, dtype=torch.float32)
    W0, _ = initial_state(full, L, torch.Generator(device=device).manual_seed(args.seed))
    del full
    Zt = torch.as_tensor(np.c_[Z, gZ], dtype=torch.float32, device=device)

    class BatchSVGP(gpytorch.models.ApproximateGP):
        def __init__(self):
            dist = CholeskyVariationalDistribution(M, batch_shape=torch.Size([L]))
            super().__init__(VariationalStrategy(self, Zt, dist, learn_inducing_locations=False))
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = mggp_gpytorch_kernel(torch, ours)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    model = BatchSVGP().to(device)
    raw_W = torch.nn.Parameter(W0.clamp_min(1e-6) + torch.log(-torch.expm1(-W0.clamp_min(1e-6))))
    opt = torch.optim.Adam([*model.parameters(), raw_W], lr=args.adam_lr)
    inputs = torch.as_tensor(np.c_[X, g], dtype=torch.float32, device=device)
    inputs_v = torch.as_tensor(np.c_[Xv, gv], dtype=torch.float32, device=device)

    def means(x):
        model.eval()
        with torch.no_grad():
            F = torch.cat([model(x[s:s + 5000]).mean for s in range(0, len(x), 5000)], -1)
        model.train()
        return F

    rng, it, status = np.random.default_rng(args.seed), 0, "ok"
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
            if rec.due() and rec.record(it, means(inputs_v), torch.nn.functional.softplus(raw_W).detach(),
                                        means(inputs).T.cpu().numpy()):
                break
    except Exception as err:
        status = f"failed: {err}"
        log(status)
    rec.clock.pause()
    return {"status": status, "M": M, "B": B, "n_iter": it, "stop_reason": "budget"}


def worker(args) -> None:
    import torch

    import sf_mlflow  # noqa: F401  (flush denormals)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load(args.worker_input)
    rec = Recorder(args, torch, device, data[1][0], data[0][3])
    out = (fit_gpytorch if args.trainer == "gpytorch" else fit_ours)(args, torch, device, rec, data)
    print(json.dumps({"trainer": args.trainer, "settings": args.settings, **out, "device": str(device),
                      "threads": torch.get_num_threads(), "budget_s": args.budget_s,
                      "train_s": round(rec.clock.spent, 1), "curve": rec.curve}), flush=True)


# ---- driver ----------------------------------------------------------------------------------

def first_time(curve: list, ok) -> Optional[float]:
    """Training seconds of the first check of ``curve`` that satisfies ``ok(check)``."""
    return next((c[0] for c in curve if ok(c)), None)


def run_worker(args, data: Path, genes: int, trainer: str, settings: str, B: int, Db: int, M: int,
               budget: float) -> Optional[dict]:
    cmd = [sys.executable, __file__, "--worker-input", str(data), "--trainer", trainer,
           "--settings", settings, "--B", str(B), "--Db", str(Db), "--M", str(M),
           "--device", args.device, "--threads", str(args.threads), "--budget-s", str(budget),
           "--lengthscale", str(args.lengthscale), "--adam-lr", str(args.adam_lr),
           "--eval-every-s", str(args.eval_every_s), "--seed", str(args.seed),
           "--n-components", str(args.n_components), *(["--verbose"] if args.verbose else []),
           *([] if args.curvature_fraction is None
             else ["--curvature-fraction", str(args.curvature_fraction)])]
    log(f"{genes} genes, {settings}: {trainer}")
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        emit({"case": f"D{genes}_{settings}", "trainer": trainer, "status": "crashed",
              "returncode": out.returncode})
        return None
    return {"case": f"D{genes}_{settings}", "n_genes": genes, **json.loads(lines[-1])}


def plot(records: list[dict], targets: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    genes = sorted(targets)
    fig, axes = plt.subplots(len(genes), 2, figsize=(12, 4.2 * len(genes)), squeeze=False)
    for row, d in zip(axes, genes):
        for r in (r for r in records if r["n_genes"] == d and r["curve"]):
            t = [c[0] for c in r["curve"]]
            style = "-" if r["settings"] == "defaults" else "--"
            label = (f"{r['trainer']} ({r['settings']}, M {r['M']}, B {r['B'] or 'all'})"
                     if r["trainer"] != "pnmf" else "pnmf (defaults)")
            row[0].plot(t, [c[2] for c in r["curve"]], style, marker=".", label=label)
            row[1].plot(t, [c[3] for c in r["curve"]], style, marker=".", label=label)
        row[0].axhline(targets[d], color="k", lw=0.8, ls=":", label="PNMF, converged")
        row[1].axhline(CORRELATION_GOAL, color="k", lw=0.8, ls=":")
        for ax, what in zip(row, ("held-out Poisson deviance", "matched correlation")):
            for goal in (300, 600):
                ax.axvline(goal, color="0.7", lw=0.6)
            ax.set(xlabel="training seconds (initialisation included)", ylabel=what,
                   title=f"{d:,} genes: {what}")
        # from the best value to the worst final one (PNMF's first checks would flatten the rest)
        devs = [c[2] for r in records if r["n_genes"] == d for c in r["curve"]]
        finals = [r["curve"][-1][2] for r in records if r["n_genes"] == d and r["curve"]]
        if devs:
            row[0].set_ylim(min(devs + [targets[d]]) * 0.995, max(finals + [targets[d]]) * 1.02)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small smoke version")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--genes", default="2000,17702", help="gene counts: one data set each")
    ap.add_argument("--settings", default="defaults,plan")
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="training seconds per fit (default: the settings' later goal)")
    ap.add_argument("--pnmf-budget-s", type=float, default=3600.0,
                    help="training seconds PNMF may take to converge")
    ap.add_argument("--n-spots", type=int, default=41786)
    ap.add_argument("--n-components", type=int, default=10)
    ap.add_argument("--n-groups", type=int, default=14)
    ap.add_argument("--group-effect", type=float, default=0.5)
    ap.add_argument("--mean-counts", type=float, default=500.0)
    ap.add_argument("--spatial-scale", type=float, default=50.0)
    ap.add_argument("--truth-lengthscale", type=float, default=0.15,
                    help="lengthscale of the planted fields, in units of the unit square")
    ap.add_argument("--lengthscale", type=float, default=None,
                    help="the gpytorch loop's kernel lengthscale in model units; default: the "
                         "planted fields' after the preprocess rescale (4 x spatial_scale a square)")
    ap.add_argument("--adam-lr", type=float, default=0.01)
    ap.add_argument("--curvature-fraction", type=float, default=None,
                    help="the default and Adam trainers' training.curvature_fraction (default: auto)")
    ap.add_argument("--eval-every-s", type=float, default=15.0)
    ap.add_argument("--png", default=None, help="the figure (default: in the temporary folder)")
    ap.add_argument("--verbose", action="store_true", help="the trainers' own progress lines")
    ap.add_argument("--plot-from", nargs="+", metavar="JSONL",
                    help="only draw the figure of earlier runs' output (one PNG of all their curves)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trainer", help=argparse.SUPPRESS)
    ap.add_argument("--worker-input", help=argparse.SUPPRESS)
    for hidden in ("--B", "--Db", "--M"):
        ap.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.lengthscale is None:
        args.lengthscale = args.truth_lengthscale * 4.0 * args.spatial_scale
    if args.worker_input:
        args.budget_s = args.budget_s or 0.0
        worker(args)
        return
    if args.plot_from:
        lines = [json.loads(ln) for f in args.plot_from for ln in Path(f).read_text().splitlines()
                 if ln.startswith("{")]
        png = Path(args.png or Path(tempfile.gettempdir()) / "bench_convergence.png")
        # every file holds its own PNMF target fit: one curve per gene count and trainer setting
        # (the first file's), so combined files do not draw the same PNMF twice
        curves, seen = [], set()
        for r in (r for r in lines if "curve" in r):
            if r["trainer"] == "pnmf":
                if (r["n_genes"], r["settings"]) in seen:
                    continue
                seen.add((r["n_genes"], r["settings"]))
            curves.append(r)
        plot(curves,
             {r["n_genes"]: r["converged_heldout_deviance"] for r in lines if r.get("case") == "target"}, png)
        emit({"case": "figure", "path": str(png)})
        return
    table = SETTINGS
    if args.quick:
        args.n_spots, args.genes, table = 2000, "300", SETTINGS_QUICK
        args.budget_s, args.pnmf_budget_s, args.eval_every_s = args.budget_s or 20.0, 60.0, 2.0
    png = Path(args.png or Path(tempfile.gettempdir()) / "bench_convergence.png")
    records, targets = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for genes in (int(d) for d in args.genes.split(",")):
            args.n_genes = genes
            data = prepare(args, Path(tmp))
            pnmf = run_worker(args, data, genes, "pnmf", "defaults", 0, 0, 0, args.pnmf_budget_s)
            if pnmf is None or not pnmf["curve"]:
                continue
            target = targets[genes] = pnmf["curve"][-1][2]
            pnmf.update(time_to_beat_pnmf_s=None,
                        time_to_correlation_s=first_time(pnmf["curve"], lambda c: c[3] >= CORRELATION_GOAL))
            records.append(pnmf)
            emit({**pnmf, "case": "target", "converged_heldout_deviance": target,
                  "matched_correlation": pnmf["curve"][-1][3]})
            for settings in args.settings.split(","):
                B, Db, M = table[settings]
                budget = args.budget_s or GOALS[settings][1]
                chosen = {}
                for trainer in args.trainers.split(","):
                    b, m = (chosen.get("B") or 0, chosen.get("M") or M) if trainer == "gpytorch" else (B, M)
                    r = run_worker(args, data, genes, trainer, settings, b or B, Db, m, budget)
                    if r is None:
                        continue
                    chosen = chosen or {"B": r["B"], "M": r["M"]}
                    r["time_to_beat_pnmf_s"] = first_time(r["curve"], lambda c: c[2] < target)
                    r["time_to_correlation_s"] = first_time(r["curve"], lambda c: c[3] >= CORRELATION_GOAL)
                    records.append(r)
                    emit(r)
                summary = {"case": "summary", "n_genes": genes, "settings": settings,
                           "pnmf_converged_heldout_deviance": target, "goals_s": GOALS[settings]}
                for r in (r for r in records if r["n_genes"] == genes and r["settings"] == settings
                          and r["trainer"] != "pnmf"):
                    last = r["curve"][-1] if r["curve"] else (None, None, None, None)
                    summary[r["trainer"]] = {
                        "M": r["M"], "B": r["B"], "n_iter": r["n_iter"], "train_s": r["train_s"],
                        "final_heldout_deviance": last[2], "final_over_pnmf": None if last[2] is None
                        else round(last[2] / target, 5), "final_matched_correlation": last[3],
                        "time_to_beat_pnmf_s": r["time_to_beat_pnmf_s"],
                        "time_to_correlation_s": r["time_to_correlation_s"],
                        "meets_goals": all(t is not None and t <= goal for t, goal in zip(
                            (r["time_to_beat_pnmf_s"], r["time_to_correlation_s"]), GOALS[settings]))}
                emit(summary)
    if records:
        plot(records, targets, png)
        emit({"case": "figure", "path": str(png)})


if __name__ == "__main__":
    main()
