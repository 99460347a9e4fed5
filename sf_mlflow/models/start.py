"""Where a fit starts: a spatial fit starts where PNMF ends.

A spatial model started from flat factors (q(v) = prior) must discover its factors through
the GP, and with a kernel that does not fit the data it settles worse than the non-spatial
model. So every fit with a spatial prior starts in five steps:

1. **KL-NMF** (:func:`~sf_mlflow.models.initialization.initial_state`, from NNDSVDa unless
   ``init="random"``): loadings W0 (D, L) and log-factors mu0 (L, N).
2. **PNMF**: the non-spatial model (Gaussian prior, Adam) is fitted from there to its
   stopping rule. It costs a small fraction of a spatial step per iteration and ends with
   loadings W and a posterior ``N(m_ln, v_ln)`` for every log-factor.
3. **Kernel hyperparameters from the data** (:func:`choose_hyperparameters`), for the
   settings left ``auto``: the PNMF posterior means m are treated as noisy observations of the
   GP field (noise variance v), and the exact GP evidence ``log N(m | 0, sigma^2 K + diag v)``
   on a seeded subsample of spots picks, per factor, the lengthscale, then the amplitude, then
   (multi-group kernel) the group difference from grids, and the lengthscale once more.
4. **Inducing points** (``num_inducing: auto``): one per square of side half the shortest
   chosen lengthscale that the spots (of each group) occupy
   (:func:`~sf_mlflow.models.inducing.auto_num_inducing`), placed by k-means.
5. **q(v) = the GP posterior given the PNMF sites** (:func:`conjugate_qv`): PNMF's posterior
   is its N(0, 1) prior times a Gaussian site per spot and factor, with precision
   ``lambda = 1 / v - 1`` and ``lambda y = m / v``; with those sites as the likelihood, the
   posterior of the whitened inducing values ``v_l ~ N(0, I)`` is exact and Gaussian:
   ``P = I + A diag(lambda) A^T``, ``P mu = A (lambda y)``, with ``A = Lzz^-1 Kzx``. One solve
   per factor. Site precisions are capped at :data:`SITE_PRECISION_MAX`, and lengthscales
   shorter than the M inducing points resolve are raised to what they resolve: held to very
   precise sites at a scale it cannot follow, a sparse GP overshoots between its points.

The spatial fit then opens where the non-spatial one closed: its first held-out check is
within a few percent of PNMF's (both are reported, ``pnmf_heldout_deviance`` and
``init_heldout_deviance``), and the natural-gradient steps only have to add what the GP
prior knows. A hybrid (``spatial_components``) does the same for its spatial factors and
keeps PNMF's posterior for the others.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from sf_mlflow.models.hybrid import HybridPrior, spatial_order
from sf_mlflow.models.inducing import (auto_max, auto_num_inducing, group_parts,
                                       occupied_cells)
from sf_mlflow.models.initialization import fixed_point_scale, initial_state
from sf_mlflow.models.kernels import make_kernel
from sf_mlflow.models.likelihood import CountBatch, poisson_deviance
from sf_mlflow.models.natural import _flipped_cholesky, _lu_from_flipped, _solve_flipped
from sf_mlflow.models.neighbours import nearest_neighbour_log_factors
from sf_mlflow.models.priors import FactorPrior, GaussianPrior
from sf_mlflow.models.progress import Progress, stopping
from sf_mlflow.models.settings import curvature_fraction

__all__ = ["initial_prior", "choose_hyperparameters", "conjugate_qv", "hyperparameter_bounds",
           "PNMF_START_MAX_ITER", "HYPER_SPOTS"]

#: Most iterations and the tol of the PNMF fit a spatial fit starts from (it usually stops by
#: tol first). Fixed, not the fit's own max_iter and tol: those may change when a fit is
#: resumed, and the resumed fit must rebuild the same start.
PNMF_START_MAX_ITER = 1000
PNMF_START_TOL = 1e-4

#: Learning rate of that PNMF fit's Adam steps (PNMF's own default).
PNMF_START_LR = 0.1

#: Spots of the seeded subsample on which the GP evidence picks the hyperparameters: the
#: exact evidence costs n^3 / 3 per factor and candidate, about 0.1 s at 1,000 spots.
HYPER_SPOTS = 1000

#: Candidate lengthscales: this many, geometrically spaced from the median nearest-neighbour
#: distance of the spots to the longest side of their bounding box.
N_LENGTHSCALES = 14

#: Candidate amplitudes, as multiples of the first guess (the variance of m left after noise).
SIGMA2_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)

#: Candidate nuggets, as shares of the variance of m: the spot-level variance of a log-factor
#: that no smooth field explains (in real tissue a cell's type and state change from one cell
#: to the next). Without one the evidence explains that variance by the field and picks a
#: lengthscale near the spot spacing: on osmFISH it chose 2-3.6 units, where an exact MGGP
#: (group difference 0.3) predicts held-out cells best at 32-64 (held-out deviance 152,648
#: at 32 against 179,664 at 2).
NUGGET_SHARES = (0.0, 0.1, 0.3, 0.6, 0.8)

#: Candidate group differences a of the multi-group kernel (cross-group correlation of
#: Matern-3/2 at r = 0: 0.98, 0.79, 0.52, 0.18, 0.03, 0.002).
GROUP_DIFFS = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0)

#: The conjugate start uses at most this many spots (evenly spaced, their sites scaled up).
CONJUGATE_SPOTS = 20000

#: Inducing points per lengthscale along each axis (``num_inducing: auto``): 2 puts them half a
#: shortest lengthscale apart. At one per lengthscale the planted-field benchmark lost 1.5 % of
#: held-out deviance (the Nystrom residual of a Matern-3/2 field is then ~10 % of its variance).
INDUCING_DENSITY = 2.0

#: Largest site precision of the conjugate start (a posterior sd of 0.1 in log-rate): PNMF's
#: sites at deep spots reach 1e4, and a sparse GP held to them at M < N overshoots between
#: its inducing points (osmFISH: held-out log-factors up to 13 where PNMF's reach 6.5).
SITE_PRECISION_MAX = 100.0

#: Spots per chunk of the conjugate start's accumulation.
CHUNK = 4096


# ---- the whole start -------------------------------------------------------------------------

def initial_prior(p: dict, Y, full: CountBatch, gen: torch.Generator, coords: Optional[Tensor],
                  groups: Optional[Tensor], validation=None,
                  say: Optional[Callable[[str], None]] = None) -> tuple[FactorPrior, Tensor, dict]:
    """The prior a fit starts from, the initial loadings W0 (D, L) and a report of the start.

    Parameters
    ----------
    p : dict
        The estimator's validated hyperparameters (``PNMF._validated``).
    Y : scipy.sparse.csr_matrix, (N, D)
    full : CountBatch of Y on the fit's device
    gen : torch.Generator
    coords : Tensor, (N, 2), or None; groups : LongTensor, (N,), or None
        The coordinates and the group codes the spatial prior uses.
    validation : tuple (Y_val (Nv, D), coordinates (Nv, 2), groups), optional
        Held-out spots, to report PNMF's held-out deviance (their groups are not used).
    say : callable, optional (receives the progress lines of every phase)

    Returns
    -------
    prior, W0, report
        ``report`` holds ``pnmf_iterations``, ``pnmf_seconds``, ``pnmf_heldout_deviance``
        (with validation), the chosen ``lengthscale``/``sigma``/``group_diff_param``,
        ``num_inducing`` and how it was chosen, and ``start_seconds``.
    """
    say = stopping(say or (lambda msg: None))    # a noted stop ends the start at its next line
    t0 = time.perf_counter()
    L, spatial, K = p["n_components"], p["spatial"], p["n_spatial"]
    device, dtype = full.device, full.values.dtype
    W0, mu0 = initial_state(full, L, gen, init=p["init"])
    report: dict = {}
    if spatial is None or K == 0:
        gaussian = GaussianPrior(full.n_spots, L, mean=mu0, scale=fixed_point_scale(mu0, W0),
                                 kl_weight=p["kl_weight"])
        prior = gaussian if not p["hybrid"] else HybridPrior(None, gaussian)
        return prior.to(device=device, dtype=dtype), W0, report

    W, m, v = _pnmf_start(p, Y, full, gen, W0, mu0, report, say)
    if validation is not None and coords is not None:
        report["pnmf_heldout_deviance"] = _pnmf_heldout(W, m, coords, validation)
        say(f"PNMF start: held-out deviance {report['pnmf_heldout_deviance']:.6g}")
    if 0 < K < L:
        order = torch.as_tensor(spatial_order(m, coords), device=device)
        W, m, v = W[:, order].contiguous(), m[order].contiguous(), v[order].contiguous()
    # Centre the spatial log-factors: the GP has mean zero and W absorbs the shift.
    shift = m[:K].mean(dim=1)
    m = torch.cat([m[:K] - shift[:, None], m[K:]])
    W = torch.cat([W[:, :K] * torch.exp(shift)[None, :], W[:, K:]], dim=1)

    t1 = time.perf_counter()
    hyper = choose_hyperparameters(m[:K], v[:K], coords, groups if spatial.groups else None,
                                   spatial, p["random_state"], say)
    report.update({k: hyper[k] for k in ("lengthscale", "sigma", "nugget", "group_diff_param")})
    report["hyperparameter_seconds"] = time.perf_counter() - t1
    if any(getattr(spatial, k) == "auto" for k in ("lengthscale", "sigma", "group_diff_param")):
        say(_describe(hyper, report["hyperparameter_seconds"], groups is not None and spatial.groups))
    settings = dataclasses.replace(spatial, lengthscale=float(np.min(hyper["lengthscale"])),
                                   sigma=float(np.mean(hyper["sigma"])),
                                   group_diff_param=hyper["group_diff_param"],
                                   train_lengthscale=spatial.learns_hyperparameters)
    used_groups = groups if spatial.groups else None
    if spatial.num_inducing == "auto":
        M, why = auto_num_inducing(coords.detach().cpu().numpy(),
                                   None if used_groups is None else used_groups.detach().cpu().numpy(),
                                   float(np.min(hyper["lengthscale"])) / INDUCING_DENSITY, explain=True,
                                   max_points=auto_max(coords.device))
        report["num_inducing_rule"] = why
        settings = dataclasses.replace(settings, num_inducing=M)
        floor = _resolvable_lengthscale(coords, used_groups, float(np.min(hyper["lengthscale"])), M)
        if spatial.lengthscale == "auto" and floor > float(np.min(hyper["lengthscale"])):
            # M points cannot resolve a shorter lengthscale: a sparse GP fitted to precise
            # sites at a scale its inducing points cannot follow overshoots between them
            hyper["lengthscale"] = np.maximum(hyper["lengthscale"], floor)
            report["lengthscale"] = hyper["lengthscale"]
            say(f"lengthscales raised to at least {floor:.3g}, the shortest {M} inducing "
                "points resolve")
    t2 = time.perf_counter()
    say(f"inducing points: M = {settings.num_inducing} ({report.get('num_inducing_rule', 'as set')})")
    gp = settings.build(coords, groups, K, kl_weight=p["kl_weight"],
                        seed=p["random_state"]).to(device=device, dtype=dtype)
    with torch.no_grad():
        kern = gp.kernel
        kern.raw_lengthscale.copy_(torch.log(_as(hyper["lengthscale"], kern.raw_lengthscale)))
        kern.raw_sigma.copy_(torch.log(_as(hyper["sigma"], kern.raw_sigma)))
        if kern.multigroup and hyper["group_diff_param"] > 0:
            kern.raw_group_diff.fill_(math.log(hyper["group_diff_param"]))
    gp.clear_cache()
    gp.bounds = hyperparameter_bounds(coords)
    say(f"conjugate start: q(v) of {K} factors at M = {gp.num_inducing}")
    conjugate_qv(gp, m[:K], v[:K], coords, groups,
                 nugget=torch.as_tensor(hyper["nugget"], dtype=torch.float64, device=device), say=say)
    report["num_inducing"] = gp.num_inducing
    report["conjugate_seconds"] = time.perf_counter() - t2
    gaussian = None
    if K < L:
        gaussian = GaussianPrior(full.n_spots, L - K, mean=m[K:], scale=torch.sqrt(v[K:]),
                                 kl_weight=p["kl_weight"])
    prior = HybridPrior(gp, gaussian) if p["hybrid"] else gp
    report["start_seconds"] = time.perf_counter() - t0
    say(f"spatial start ready in {report['start_seconds']:.1f} s (q(v) = the GP posterior given "
        f"the PNMF log-factors, {report['conjugate_seconds']:.1f} s)")
    return prior.to(device=device, dtype=dtype), W.contiguous(), report


def _resolvable_lengthscale(coords: Tensor, groups: Optional[Tensor], shortest: float, M: int) -> float:
    """The shortest lengthscale whose half-lengthscale squares number at most M (the squares
    of ``shortest / INDUCING_DENSITY`` scale as the inverse square of the side)."""
    parts = group_parts(coords.detach().cpu().double().numpy(),
                        None if groups is None else groups.detach().cpu().numpy())
    cells = sum(occupied_cells(part, shortest / INDUCING_DENSITY) for part in parts)
    return shortest * math.sqrt(max(cells, 1) / max(M, 1))


def _describe(hyper: dict, seconds: float, groups: bool) -> str:
    return (f"kernel hyperparameters from the data ({seconds:.1f} s): lengthscale "
            f"{_fmt(hyper['lengthscale'])}, sigma {_fmt(hyper['sigma'])}, nugget "
            f"{_fmt(hyper['nugget'])}"
            + (f", group difference {hyper['group_diff_param']:.3g}" if groups else ""))


def _fmt(values) -> str:
    values = np.atleast_1d(values)
    return ", ".join(f"{v:.3g}" for v in values) if values.size <= 12 else \
        f"{values.min():.3g}..{values.max():.3g}"


def _as(values, like: Tensor) -> Tensor:
    """Hyperparameter values (K,) or () shaped as the raw parameter ``like``."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=like.dtype, device=like.device)
    return t.reshape(like.shape) if t.numel() == like.numel() else t.mean().expand(like.shape)


def _pnmf_start(p: dict, Y, full: CountBatch, gen: torch.Generator, W0: Tensor, mu0: Tensor,
                report: dict, say) -> tuple[Tensor, Tensor, Tensor]:
    """Fit PNMF from the KL-NMF start; its loadings (D, L), means and variances (L, N)."""
    from sf_mlflow.models._training import Trainer   # the trainer builds on this module's kin

    t0 = time.perf_counter()
    q = dict(p, optimizer="Adam", learning_rate=PNMF_START_LR, adam_learning_rate=PNMF_START_LR,
             learning_rate_auto=False, validation_every=0, verbose=False, spatial=None,
             n_spatial=0, hybrid=False, prior="gaussian", distributed=False,
             tol=PNMF_START_TOL, max_iter=PNMF_START_MAX_ITER,
             # The batches are for the GP's costly step. PNMF's step is cheap, its full batch
             # is the counts already on the device (`full`) plus a few nnz-long temporaries,
             # and on mini-batches its tol rule stops it far from the optimum: at 41,786 spots
             # x 17,702 genes, B 7,000 and Db 2,000 stopped after 530 iterations (30 s) at
             # matched correlation 0.78, all spots and genes after 120 (37 s) at 0.94.
             batch_size=None, y_batch_size=None)
    if p.get("batch_size_rule", "as set") != "as set":
        report["batch_size_rule"] = p["batch_size_rule"]
        say(f"batch size: {p['batch_size_rule']}")
    share = curvature_fraction(p, full.n_spots) if p.get("optimizer") == "natural" else 1.0
    if share < 1.0:
        report["curvature_fraction"] = share
        say(f"natural steps: curvature from {share:.0%} of each batch's spots "
            "(training.curvature_fraction)")
    prior = GaussianPrior(full.n_spots, p["n_components"], mean=mu0,
                          scale=fixed_point_scale(mu0, W0), kl_weight=p["kl_weight"])
    prior = prior.to(device=full.device, dtype=full.values.dtype)
    say(f"PNMF start: fitting {p['n_components']} factors without the GP prior, on all spots "
        f"and genes (at most {PNMF_START_MAX_ITER} iterations)")
    progress = Progress(say, "PNMF start", PNMF_START_MAX_ITER, "iterations", bound=True)
    result = Trainer(q, prior, W0, Y, full, gen, None, None,
                     train_loadings=True).run(lambda it, value: progress.tick())
    report["pnmf_iterations"] = len(result.history)
    report["pnmf_seconds"] = time.perf_counter() - t0
    say(f"PNMF start: {len(result.history)} iterations in {report['pnmf_seconds']:.1f} s "
        f"({result.reason})")
    with torch.no_grad():
        return (result.loadings.detach(), prior.mu.detach().clone(),
                torch.exp(2.0 * prior.log_scale.detach()))


@torch.no_grad()
def _pnmf_heldout(W: Tensor, m: Tensor, coords: Tensor, validation) -> float:
    """PNMF's held-out deviance: held-out log-factors as the mean of the 6 nearest training
    spots' (the non-spatial model's prediction rule, :mod:`sf_mlflow.models.neighbours`)."""
    Yv, xv, _ = validation
    batch = CountBatch.from_scipy(Yv, device=W.device, dtype=W.dtype)
    F = nearest_neighbour_log_factors(coords.detach().cpu().double().numpy(),
                                      m.T.detach().cpu().double().numpy(),
                                      np.asarray(xv, dtype=np.float64), k=min(6, m.shape[1]))
    return poisson_deviance(batch, torch.as_tensor(F.T, dtype=W.dtype, device=W.device), W)


# ---- hyperparameters ------------------------------------------------------------------------

def _spacing(X: np.ndarray) -> float:
    """Median distance of a spot to its nearest other spot (0 if all coincide)."""
    if X.shape[0] < 2:
        return 0.0
    d, _ = cKDTree(X).query(X, k=2)
    positive = d[:, 1][d[:, 1] > 0]
    return float(np.median(positive)) if positive.size else 0.0


def hyperparameter_bounds(coords: Tensor) -> dict[str, tuple[float, float]]:
    """Bounds the trained hyperparameters are kept in, from the extent of the coordinates:
    lengthscale from half the median nearest-neighbour spacing to twice the longest side of
    the bounding box, sigma in [0.01, 20], the group difference in [1e-3, 1e3]."""
    X = coords.detach().cpu().double().numpy()
    side = float((X.max(axis=0) - X.min(axis=0)).max()) if X.shape[0] else 1.0
    side = side if side > 0 else 1.0
    spacing = _spacing(X) or side / max(X.shape[0], 1)
    return {"lengthscale": (0.5 * spacing, 2.0 * side), "sigma": (0.01, 20.0),
            "group_diff": (1e-3, 1e3)}


@torch.no_grad()
def _evidence(kernel_name: str, x: Tensor, g: Optional[Tensor], y: Tensor, noise: Tensor,
              lengthscale: Tensor, sigma2: Tensor, a: Optional[float]) -> Tensor:
    """Log evidence ``log N(y_k | 0, sigma2_k K_k + diag noise_k)`` of each factor, (K,).

    x (n, 2), g (n,) or None, y and noise (K, n), lengthscale and sigma2 (K,), float64.
    """
    K = y.shape[0]
    kern = make_kernel(kernel_name, lengthscale, 1.0, n_components=K, multigroup=g is not None,
                       group_diff_param=1.0 if a is None else a, dtype=torch.float64)
    C = kern(x, x, g, g) * sigma2[:, None, None]
    C.diagonal(dim1=-2, dim2=-1).add_(noise)
    Lc, info = torch.linalg.cholesky_ex(C)
    out = torch.full((K,), -math.inf, dtype=torch.float64)
    ok = info == 0
    if bool(ok.any()):
        alpha = torch.linalg.solve_triangular(Lc[ok], y[ok][:, :, None], upper=False)[..., 0]
        out[ok] = (-0.5 * alpha.square().sum(-1)
                   - torch.log(Lc[ok].diagonal(dim1=-2, dim2=-1)).sum(-1)
                   - 0.5 * y.shape[1] * math.log(2 * math.pi))
    return out


def _subsample(X: np.ndarray, groups: Optional[Tensor], m: Tensor, v: Tensor, seed: int):
    """Coordinates (n, 2), groups (n,) or None, means and variances (K, n) of the seeded
    subsample of at most :data:`HYPER_SPOTS` spots the evidence is taken on (float64, CPU)."""
    N = X.shape[0]
    rng = np.random.default_rng([int(seed), 2])
    idx = np.sort(rng.choice(N, HYPER_SPOTS, replace=False)) if N > HYPER_SPOTS else np.arange(N)
    g = None if groups is None else groups.detach().cpu()[torch.as_tensor(idx)]
    return (torch.as_tensor(X[idx]), g, m.detach().cpu().double()[:, idx],
            v.detach().cpu().double()[:, idx].clamp_min(1e-4))


def choose_hyperparameters(m: Tensor, v: Tensor, coords: Tensor, groups: Optional[Tensor],
                           spatial, seed: int, say: Optional[Callable[[str], None]] = None) -> dict:
    """Kernel hyperparameters of the K spatial factors from their PNMF posterior.

    Each factor's posterior means ``m (K, N)`` are taken as observations of its GP field with
    noise variances ``v (K, N)`` plus a nugget ``tau^2`` (the spot-level variance no smooth
    field explains, :data:`NUGGET_SHARES`). On a seeded subsample of at most
    :data:`HYPER_SPOTS` spots the exact GP evidence ``log N(m | 0, sigma^2 K + diag(v + tau^2))``
    picks, from grids, per factor: the nugget and the lengthscale jointly, the amplitude, then
    (``groups`` given) one group difference for all factors, then the lengthscale and the
    nugget once more, one after the other. Settings given as numbers
    (``spatial.lengthscale`` etc., a :class:`~sf_mlflow.models.settings.SVGP`) are kept; with
    ``per_factor_lengthscale`` off one lengthscale and amplitude serve all factors (the best
    summed evidence).

    Returns ``{"lengthscale": (K,), "sigma": (K,), "nugget": (K,), "group_diff_param": float}``
    (numpy/float). ``say`` receives progress lines (:class:`~sf_mlflow.models.progress.Progress`).
    """
    K, N = m.shape
    X = coords.detach().cpu().double().numpy()
    x, g, y, noise = _subsample(X, groups, m, v, seed)
    per_factor = bool(spatial.per_factor_lengthscale)
    var = y.var(dim=1).clamp_min(1e-6)

    def best(candidates: list, score, shared: bool = not per_factor) -> Tensor:
        """Per factor (or shared) the candidate of the highest evidence; candidates (C, K)."""
        scores = torch.stack([score(c) for c in candidates])          # (C, K)
        cand = torch.stack([torch.as_tensor(c, dtype=torch.float64).expand(K) for c in candidates])
        if not shared:
            return cand[scores.argmax(0), torch.arange(K)]
        return cand[int(scores.sum(1).argmax())]

    side = float((X.max(axis=0) - X.min(axis=0)).max()) if N else 1.0
    lo = max(_spacing(X), 1e-3 * side) if side > 0 else 1.0
    hi = max(side, lo * 1.01)
    grid = np.geomspace(lo, hi, N_LENGTHSCALES)
    fixed_ls, fixed_s2 = spatial.lengthscale != "auto", spatial.sigma != "auto"
    ls = torch.full((K,), float(spatial.lengthscale) if fixed_ls else float(np.sqrt(lo * hi)),
                    dtype=torch.float64)
    use_a = g is not None and int(torch.unique(g).numel()) > 1
    fixed_a = spatial.group_diff_param != "auto"
    a = float(spatial.group_diff_param) if fixed_a else 1.0

    def first_s2(tau2: Tensor) -> Tensor:
        """The amplitude's first guess: the variance of m left after noise and nugget."""
        if fixed_s2:
            return torch.full((K,), float(spatial.sigma) ** 2, dtype=torch.float64)
        return (var - noise.mean(dim=1) - tau2).clamp_min(0.05 * var)

    progress = _candidates_progress(say, x.shape[0], 0 if fixed_ls else len(grid), fixed_s2,
                                    use_a and not fixed_a)

    def evidence(ls, s2, a, tau2) -> Tensor:
        progress.tick()
        return _evidence(spatial.kernel, x, g if use_a else None, y, noise + tau2[:, None],
                         ls, s2, a)

    def pick_nugget_and_lengthscale(scale: Tensor):
        """Nugget and lengthscale jointly (the evidence has a ridge between the two), each
        candidate nugget with its first-guess amplitude times ``scale``."""
        pairs = [(f, float(c)) for f in NUGGET_SHARES for c in (ls[:1] if fixed_ls else grid)]
        scores = torch.stack([evidence(ls if fixed_ls else torch.full((K,), c, dtype=torch.float64),
                                       first_s2(f * var) * scale, a, f * var) for f, c in pairs])
        # the lengthscale may be shared across factors (per_factor_lengthscale off), the
        # nugget is each factor's own: the best nugget per factor for each lengthscale
        shares = torch.tensor([f for f, _ in pairs], dtype=torch.float64)
        lens = torch.tensor([c for _, c in pairs], dtype=torch.float64)
        if per_factor or fixed_ls:
            k = scores.argmax(0)
            return shares[k] * var, (ls if fixed_ls else lens[k])
        best_len, best_total, best_k = None, -math.inf, None
        for c in torch.unique(lens):
            rows = torch.nonzero(lens == c)[:, 0]
            k = rows[scores[rows].argmax(0)]
            total = float(scores[k, torch.arange(K)].sum())
            if total > best_total:
                best_len, best_total, best_k = c, total, k
        return shares[best_k] * var, torch.full((K,), float(best_len), dtype=torch.float64)

    scale = torch.ones(K, dtype=torch.float64)
    nug, ls = pick_nugget_and_lengthscale(scale)
    if not fixed_s2:
        scale = best([scale * f for f in SIGMA2_MULTIPLES],
                     lambda c: evidence(ls, first_s2(nug) * c, a, nug))
    if use_a and not fixed_a:
        s2 = first_s2(nug) * scale
        scores = [float(evidence(ls, s2, c, nug).sum()) for c in GROUP_DIFFS]
        a = float(GROUP_DIFFS[int(np.argmax(scores))])
    if not fixed_ls:
        ls = best([torch.full((K,), float(c), dtype=torch.float64) for c in grid],
                  lambda c: evidence(c, first_s2(nug) * scale, a, nug))
    nug = best([f * var for f in NUGGET_SHARES],
               lambda c: evidence(ls, first_s2(c) * scale, a, c), shared=False)
    s2 = first_s2(nug) * scale
    return {"lengthscale": ls.numpy(), "sigma": torch.sqrt(s2).numpy(), "nugget": nug.numpy(),
            "group_diff_param": float(a)}


def _candidates_progress(say, n_spots: int, n_grid: int, fixed_s2: bool, group_diff: bool) -> Progress:
    """The progress of :func:`choose_hyperparameters`: one step per evidence it takes (its
    grids: ``n_grid`` lengthscales, 0 when fixed)."""
    total = (len(NUGGET_SHARES) * (max(n_grid, 1) + 1) + (0 if fixed_s2 else len(SIGMA2_MULTIPLES))
             + (len(GROUP_DIFFS) if group_diff else 0) + n_grid)
    if say is not None:
        say(f"kernel hyperparameters: GP evidence of {total} candidates on {n_spots} spots")
    return Progress(say, "kernel hyperparameters", total, "candidates")


# ---- q(v) -------------------------------------------------------------------------------------

@torch.no_grad()
def conjugate_qv(gp, m: Tensor, v: Tensor, coords: Tensor, groups: Optional[Tensor],
                 nugget: Optional[Tensor] = None, say: Optional[Callable[[str], None]] = None) -> None:
    """Set the SVGP prior's q(v) to the GP posterior given Gaussian sites of the log-factors.

    ``m, v: (K, N)`` are the posterior means and variances of a model whose prior on each
    log-factor was N(0, 1) (PNMF): its sites have precision ``lambda = max(1 / v - 1, 0)``
    (capped at :data:`SITE_PRECISION_MAX`) and mean ``y = m / (v lambda)``. A ``nugget
    (K,)`` (:func:`choose_hyperparameters`) is spot-level variance the field does not carry:
    it adds to each site's variance, ``lambda <- 1 / (1 / lambda + tau^2)``, so the field
    follows what neighbouring spots share instead of every spot. With ``A = Lzz^-1 Kzx``
    (M, N) the whitened posterior is ``P_l = I + A diag(lambda_l) A^T``,
    ``mu_l = P_l^-1 A (lambda y)_l``, accumulated in float64 over chunks of spots (at most :data:`CONJUGATE_SPOTS`, evenly spaced, sites
    scaled by N / n so they carry the information of all N).
    """
    L, M = gp.mu.shape
    N = m.shape[1]
    step = max(1, -(-N // CONJUGATE_SPOTS))
    keep = torch.arange(0, N, step, device=m.device)
    scale = N / keep.numel()
    own = 1.0 / v.double() - 1.0                                         # sites' precision
    site_mean = m.double() / (v.double() * own.clamp_min(1e-12))         # y = m / (v lambda)
    lam = own.clamp(0.0, SITE_PRECISION_MAX)                             # (L, N), capped
    if nugget is not None:
        lam = lam / (1.0 + lam * nugget.to(lam)[:, None])                # 1 / (1/lam + tau^2)
    lam = lam * scale
    target = lam * site_mean                                             # lambda y
    f64 = torch.float64
    progress = Progress(say, "conjugate start", -(-keep.numel() // CHUNK) + L, "blocks")
    P = torch.eye(M, dtype=f64, device=gp.mu.device).repeat(L, 1, 1)
    b = torch.zeros(L, M, dtype=f64, device=gp.mu.device)
    for s in range(0, keep.numel(), CHUNK):
        sl = keep[s:s + CHUNK]
        x = coords[sl]
        g = None if groups is None or not gp.kernel.multigroup else groups[sl]
        At = gp._interp(*gp._inputs(x, g)).to(f64)
        At = At.expand(L, *At.shape) if At.dim() == 2 else At             # (L, B, M)
        P += torch.bmm((At * lam[:, sl, None]).mT, At)
        b += torch.bmm(target[:, None, sl], At)[:, 0]
        progress.tick()
    Lu = torch.empty(L, M, M, dtype=gp.mu.dtype, device=gp.mu.device)
    mu = torch.empty(L, M, dtype=f64, device=gp.mu.device)
    for l in range(L):
        Pl = 0.5 * (P[l] + P[l].mT)
        Lf = _flipped_cholesky(Pl)
        if Lf is None:     # rounding can only make P indefinite in theory (it is I + PSD)
            Pl = Pl + 1e-8 * torch.eye(M, dtype=f64, device=Pl.device)
            Lf = _flipped_cholesky(Pl)
        mu[l] = _solve_flipped(Lf, b[l])
        Lu[l] = _lu_from_flipped(Lf, gp.mu.dtype)
        progress.tick()
    gp.mu.copy_(mu.to(gp.mu.dtype))
    gp.set_lu(Lu)
