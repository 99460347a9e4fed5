"""Time PNMF against scikit-learn's KL-NMF on a Slide-seq-sized synthetic matrix.

Both fit the same CSR count matrix (default 41,786 spots x 4,000 genes, ~3% non-zeros,
10 factors, 14 groups). Each is scored by the Poisson deviance of its fitted rates:
scikit-learn's ``W H``; PNMF's posterior mean rates ``E[R] = exp(m + v/2) W^T`` (the
plug-in ``exp(m) W^T`` is reported too). Deviances are computed blockwise on the
non-zeros, never as a dense N x D matrix.

To time how long PNMF takes to reach scikit-learn's final deviance, its callback
evaluates the deviance every ``--eval-every`` iterations; that evaluation time is
subtracted from every PNMF timing reported. The trajectory is reported too, with the
first time PNMF came within 1%, 0.5%, 0.2% and 0.1% of scikit-learn's final deviance.

Training deviance rewards overfitting: an unregularised maximum-likelihood fit spends
its (N + D) L free parameters on noise and ends below the deviance of the true rates,
while PNMF's N(0, 1) prior on the log-factors holds it back. So each fit is also scored
against the truth by ``heldout_excess_deviance``, ``2 sum KL(Poisson(mu) || Poisson(nu))``
over all N x D entries (blockwise), mu the true and nu the fitted rates: the expected
deviance on a fresh replicate of the counts, minus that of the true rates. Fitted rates
are floored at ``RATE_FLOOR`` (a zero rate where the truth is positive would make it
infinite, and KL-NMF drives many rates to zero).

Output: one JSON line per case, then one with the ratios::

    {"case": "sklearn", "wall_s": ..., "deviance": ..., "iterations": ...}
    {"case": "pnmf", "wall_s": ..., "deviance": ..., "iterations": ..., ...}
    {"case": "ratio", "time": ours / sklearn, "deviance": ours / sklearn, ...}

Run ``python benchmarks/bench_pnmf.py --quick`` for a small smoke run. On a machine
shared with other jobs, pass ``--threads 1``: a busy core stalls every multi-threaded
parallel region (torch's OpenMP, numpy's BLAS), which can slow either library by 5x.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from sf_mlflow.data.synthetic import make_synthetic
from sf_mlflow.models.pnmf import PNMF

try:
    from sf_mlflow.analysis.deviance import poisson_deviance as _poisson_deviance

    def deviance(Y, factors, loadings) -> float:
        return _poisson_deviance(Y, factors=factors, loadings=loadings)["total"]
except ImportError:  # the helper is optional; the same formula, blockwise over non-zeros
    def deviance(Y, factors, loadings) -> float:
        F, W = np.asarray(factors, np.float64), np.asarray(loadings, np.float64)
        total = float(W.sum(0) @ F.sum(0) - Y.sum())
        for s in range(0, Y.shape[0], 4096):
            B = Y[s:s + 4096].tocoo()
            mu = np.einsum("kl,kl->k", F[s + B.row], W[B.col])
            total += float((B.data * np.log(B.data / mu)).sum())
        return 2.0 * total


#: Floor on fitted rates in :func:`heldout_excess_deviance`.
RATE_FLOOR = 1e-8


def heldout_excess_deviance(true_factors, true_loadings, factors, loadings, block: int = 2000) -> float:
    """2 sum over all entries of KL(Poisson(mu) || Poisson(nu)) = 2 (mu log(mu / nu) - mu + nu)."""
    Wt, W = np.asarray(true_loadings, np.float64).T, np.asarray(loadings, np.float64).T
    total = 0.0
    for s in range(0, true_factors.shape[0], block):
        mu = true_factors[s:s + block] @ Wt
        nu = np.maximum(np.asarray(factors[s:s + block], np.float64) @ W, RATE_FLOOR)
        total += float((mu * (np.log(mu) - np.log(nu)) - mu + nu).sum())
    return 2.0 * total


def run_sklearn(Y, n_components: int, max_iter: int, init: str, truth: dict) -> dict:
    from sklearn.decomposition import NMF

    nmf = NMF(n_components=n_components, beta_loss="kullback-leibler", solver="mu", init=init,
              max_iter=max_iter, random_state=0)
    t0 = time.perf_counter()
    H = nmf.fit_transform(Y)
    wall = time.perf_counter() - t0
    return {"case": "sklearn", "wall_s": round(wall, 3),
            "deviance": deviance(Y, H, nmf.components_.T), "iterations": int(nmf.n_iter_),
            "heldout_excess_deviance": heldout_excess_deviance(truth["factors"], truth["loadings"], H, nmf.components_.T),
            "init": init}


THRESHOLDS = (0.01, 0.005, 0.002, 0.001, 0.0)


def run_pnmf(Y, n_components: int, max_iter: int, target: float, eval_every: int, truth: dict,
             **params) -> dict:
    model = PNMF(n_components, max_iter=max_iter, random_state=0, **params)
    state = {"eval_s": 0.0, "trajectory": []}

    def callback(fit_state):
        iteration = fit_state.iteration
        if iteration % eval_every:
            return None
        t0 = time.perf_counter()
        dev = deviance(Y, model.get_factors(exp_mean=True), model.loadings_)
        now = time.perf_counter()
        # time since fit() was called, minus all deviance evaluations so far
        state["trajectory"].append((iteration, round(t0 - fit_start - state["eval_s"], 3), dev))
        state["eval_s"] += now - t0
        return None

    fit_start = time.perf_counter()
    model.fit(Y, callback=callback)
    wall = time.perf_counter() - fit_start - state["eval_s"]
    factors = model.get_factors(exp_mean=True)
    dev_mean = deviance(Y, factors, model.loadings_)
    dev_plugin = deviance(Y, model.get_factors(), model.loadings_)
    reached = {}
    for frac in THRESHOLDS:
        hit = next(((it, t) for it, t, dev in state["trajectory"] if dev <= target * (1 + frac)), None)
        reached[f"{100 * frac:g}%"] = None if hit is None else {"iter": hit[0], "s": hit[1]}
    return {"case": "pnmf", "wall_s": round(wall, 3), "deviance": dev_mean,
            "deviance_plugin": dev_plugin, "iterations": int(model.n_iter_),
            "converged": bool(model.converged_),
            "heldout_excess_deviance": heldout_excess_deviance(truth["factors"], truth["loadings"], factors, model.loadings_),
            "reached_sklearn_deviance_s": None if reached["0%"] is None else reached["0%"]["s"],
            "first_within_of_sklearn_deviance": reached,
            "trajectory": [[it, t, round(dev, 1)] for it, t, dev in state["trajectory"]],
            "params": params}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-spots", type=int, default=41786)
    ap.add_argument("--n-genes", type=int, default=4000)
    ap.add_argument("--n-components", type=int, default=10)
    ap.add_argument("--n-groups", type=int, default=14)
    ap.add_argument("--mean-counts", type=float, default=130.0,
                    help="expected counts per spot; 130 gives ~3%% non-zeros at 4,000 genes")
    ap.add_argument("--max-iter", type=int, default=1000, help="PNMF iterations (at most)")
    ap.add_argument("--sklearn-max-iter", type=int, default=200)
    ap.add_argument("--sklearn-init", default="nndsvda")
    ap.add_argument("--learning-rate", type=float, default=0.1)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--kl-weight", type=float, default=1.0,
                    help="PNMF's KL weight (1 = the true ELBO; the headline figures use 1)")
    ap.add_argument("--eval-every", type=int, default=10,
                    help="PNMF iterations between deviance checks against sklearn's final deviance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="limit torch and BLAS/OpenMP thread pools of both libraries (default: as is)")
    ap.add_argument("--quick", action="store_true", help="small smoke run (2,000 x 500)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    if args.quick:
        args.n_spots, args.n_genes, args.max_iter, args.sklearn_max_iter = 2000, 500, 300, 200
        args.mean_counts = 0.03 * 500 * 130 / 120  # keep ~3% non-zeros at 500 genes

    t0 = time.perf_counter()
    data = make_synthetic(n_spots=args.n_spots, n_genes=args.n_genes, n_components=args.n_components,
                          n_groups=args.n_groups, mean_counts=args.mean_counts, seed=args.seed)
    Y = data.counts
    info = {"case": "data", "n_spots": Y.shape[0], "n_genes": Y.shape[1], "nnz": int(Y.nnz),
            "density": round(Y.nnz / (Y.shape[0] * Y.shape[1]), 4),
            "true_deviance": deviance(Y, data.truth["factors"], data.truth["loadings"]),
            "generate_s": round(time.perf_counter() - t0, 2), "torch_threads": torch.get_num_threads()}
    print(json.dumps(info), flush=True)

    truth = data.truth
    sk = run_sklearn(Y, args.n_components, args.sklearn_max_iter, args.sklearn_init, truth)
    print(json.dumps(sk), flush=True)
    ours = run_pnmf(Y, args.n_components, args.max_iter, sk["deviance"], args.eval_every, truth,
                    learning_rate=args.learning_rate, tol=args.tol, kl_weight=args.kl_weight)
    print(json.dumps(ours), flush=True)
    ratio = {"case": "ratio", "time": round(ours["wall_s"] / sk["wall_s"], 4),
             "deviance": ours["deviance"] / sk["deviance"],
             "heldout_excess_deviance": ours["heldout_excess_deviance"] / sk["heldout_excess_deviance"],
             "time_to_sklearn_deviance": (None if ours["reached_sklearn_deviance_s"] is None
                                          else round(ours["reached_sklearn_deviance_s"] / sk["wall_s"], 4))}
    print(json.dumps(ratio), flush=True)


if __name__ == "__main__":
    main()
