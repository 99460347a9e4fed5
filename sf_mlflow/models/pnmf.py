"""PNMF: probabilistic non-negative matrix factorisation with a variational prior.

``Y_nd ~ Poisson(sum_l W_dl exp(F_ln))`` with non-negative loadings W (D, L) and
log-factors F (L, N) under a Gaussian (non-spatial) or SVGP (spatial) prior. The
estimator follows scikit-learn's conventions: hyperparameters are only stored by
``__init__``, validated by :meth:`PNMF.fit`, and learned attributes end in ``_``.

Training maximises the ELBO ``E_q[log p(Y | F, W)] - KL(q(F) || p(F))``:

* the variational parameters of the prior module take optimiser steps (Adam by
  default) on ``-ELBO / N``, the per-spot loss, as is usual for variational GPs;
* the loadings either take a multiplicative minorise-maximise step every
  iteration (``loadings_mode="multiplicative"``), computed from the same factors
  (or Monte Carlo draws) as that iteration's ELBO, i.e. before the optimiser
  step, which lets both share one sparse evaluation of R; or are ``softplus`` of
  raw parameters optimised with the rest (``"gradient"``). On spot mini-batches
  the step goes through running averages of its statistics (online EM), see
  ``_Trainer._init_statistics``;
* mini-batches of spots and genes are drawn in a fresh order every epoch; the
  likelihood is scaled by ``N/B * D/Db`` so the ELBO estimate is unbiased.

Initialisation runs a few sparse KL-NMF multiplicative iterations (Lee & Seung)
from a seeded random start, then sets ``mu = log H`` shifted per factor to mean
zero (the shift moved into W, so ``W exp(mu)`` is unchanged), and the variances
to the fixed point of the lower bound, ``v = 1 / (1 + sum_d W_dl exp(mu_ln))``.
A spatial prior cannot take mu directly; its mean is regressed onto it instead
(``_warm_start``).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from sf_mlflow.errors import ConfigError, DataError, ModelError
from sf_mlflow.models.device import resolve_device
from sf_mlflow.models.likelihood import (
    MODES,
    CountBatch,
    _csr,
    expected_log_likelihood,
    likelihood_and_update,
    poisson_deviance,
)
from sf_mlflow.models.inducing import auto_num_inducing
from sf_mlflow.models.neighbours import nearest_neighbour_log_factors
from sf_mlflow.models.priors import FactorPrior, GaussianPrior

__all__ = ["PNMF"]

#: Version of the file layout written by :meth:`PNMF.save`.
FORMAT_VERSION = 1

#: KL-NMF multiplicative iterations of the initialisation. Each costs two sparse
#: sampled products and two sparse-dense products; 20 put W and H close enough that
#: the variational optimiser starts in the right basin.
INIT_ITER = 20

#: Floor on initial factors, relative to the factor's mean over spots, before the log:
#: spots where KL-NMF drove a factor to ~0 start at mean - 6.9 rather than -inf.
INIT_FLOOR = 1e-3

#: Warm start of a spatial prior: Adam steps, step size and spots per step of a
#: least-squares fit of its mean to the KL-NMF log-factors (see ``_warm_start``).
WARM_ITER = 100
WARM_LR = 0.05
WARM_BATCH = 2000

PRIORS = ("gaussian", "svgp")
LOADINGS_MODES = ("multiplicative", "gradient")
#: "auto" is natural gradients for the SVGP prior and Adam for the Gaussian prior.
OPTIMIZERS = {"auto": "auto", "natural": "natural", "adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}

#: Spots whose q(F) starts the running statistics of the loadings' mini-batch update.
INIT_STAT_SPOTS = 5000

#: Relative improvement a validation check must make over the best so far to count as one.
VALIDATION_MIN_DELTA = 1e-4
DTYPES = {"float32": torch.float32, "float64": torch.float64}

Callback = Callable[[int, float], Optional[bool]]


class ConvergenceWarning(UserWarning):
    """A fit reached ``max_iter`` before its stopping rule was met."""


class NonFiniteELBOError(ModelError):
    """The ELBO became NaN or infinite; the model holds the last finite state.

    Attributes
    ----------
    iteration : int
        The iteration whose ELBO was not finite.
    kept_iteration : int
        Iterations of the state the model was rolled back to (its ELBO was finite);
        :meth:`PNMF.checkpoint` returns that state, so the fit can be resumed from it
        (e.g. with a smaller ``learning_rate``).
    """

    def __init__(self, message: str, iteration: int, kept_iteration: int):
        super().__init__(message)
        self.iteration, self.kept_iteration = iteration, kept_iteration


# ---- input checking --------------------------------------------------------------------------

def _check_counts(Y: Any, name: str = "Y") -> sp.csr_matrix:
    """Non-negative integer counts (N, D) as CSR float64 without explicit zeros."""
    if sp.issparse(Y):
        if Y.ndim != 2:
            raise DataError(f"{name} must be 2-D (n_spots, n_genes), got shape {Y.shape}")
        X = sp.csr_matrix(Y, dtype=np.float64, copy=True)
    else:
        try:
            arr = np.asarray(Y, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{name} must be a numeric array or scipy sparse matrix of counts, "
                            f"got {type(Y).__name__}") from None
        if arr.ndim != 2:
            raise DataError(f"{name} must be 2-D (n_spots, n_genes), got an array of shape {arr.shape}")
        X = sp.csr_matrix(arr)
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise DataError(f"{name} is empty: shape {X.shape}, expected at least one spot and one gene")
    X.sum_duplicates()
    vals = X.data
    if vals.size:
        if not np.isfinite(vals).all():
            raise DataError(f"{name} contains NaN or infinite values; expected raw non-negative integer counts")
        if vals.min() < 0:
            raise DataError(f"{name} contains negative values (minimum {vals.min():g}); "
                            "expected raw non-negative integer counts")
        frac = vals != np.round(vals)
        if frac.any():
            raise DataError(f"{name} contains {int(frac.sum())} non-integer values (e.g. "
                            f"{vals[frac][0]:g}); expected raw integer counts, not normalised data")
    X.eliminate_zeros()
    X.sort_indices()
    return X


def _check_coordinates(coordinates: Any, n: Optional[int], name: str = "coordinates") -> Optional[np.ndarray]:
    """Coordinates as float64 (n, 2); ``n = None`` accepts any number of rows."""
    if coordinates is None:
        return None
    X = np.asarray(coordinates, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 2 or (n is not None and X.shape[0] != n):
        rows = "n_spots" if n is None else f"(n_spots, 2) = ({n}"
        want = "(n_spots, 2)" if n is None else f"{rows}, 2)"
        raise DataError(f"{name} must have shape {want}, got {X.shape}")
    if not np.isfinite(X).all():
        raise DataError(f"{name} contain NaN or infinite values")
    return X


def _check_groups(groups: Any, n: int, name: str = "groups") -> Optional[np.ndarray]:
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.shape != (n,):
        raise DataError(f"{name} must have shape (n_spots,) = ({n},), got {g.shape}")
    if g.size and not (np.issubdtype(g.dtype, np.integer)
                       or (np.issubdtype(g.dtype, np.floating) and np.all(g == np.round(g)))):
        raise DataError(f"{name} must be integer group codes 0..G-1, got dtype {g.dtype}")
    g = g.astype(np.int64)
    if g.size and g.min() < 0:
        raise DataError(f"{name} must be integer group codes 0..G-1, got a minimum of {g.min()}")
    return g


def _choice(name: str, value: Any, allowed) -> str:
    key = str(value).lower() if isinstance(value, str) else value
    if key not in allowed:
        raise ConfigError(f"{name} = {value!r} is not recognised; expected one of "
                          + ", ".join(repr(a) for a in allowed))
    return key


def _integer(name: str, value: Any, lo: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"{name} = {value!r} is invalid; expected an integer >= {lo}"
                          + (" or None" if allow_none else ""))
    return int(value)


def _number(name: str, value: Any, lo: float, lo_open: bool) -> float:
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{name} = {value!r} is invalid; expected a number {'>' if lo_open else '>='} {lo:g}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} = {value!r} is invalid; expected True or False")
    return bool(value)


# ---- batching --------------------------------------------------------------------------------

def _literal_state(text: str) -> dict:
    """Parse a numpy bit-generator state saved with ``repr`` (a dict of str and int)."""
    import ast

    return ast.literal_eval(text)


class _IndexStream:
    """Endless stream of index batches covering 0..n-1 once per epoch, with savable state.

    Batches of one epoch differ in size by at most one (``array_split``), so every
    batch of a shuffled epoch is a uniformly random subset and the N/B scaling
    keeps the ELBO estimate unbiased. The state (the current epoch's order and the
    position in it) is saved in checkpoints so a resumed fit draws the same batches.
    """

    def __init__(self, n: int, size: Optional[int], shuffle: bool, rng: np.random.Generator):
        self.n, self.shuffle, self.rng = n, shuffle, rng
        self.full = size is None or size >= n
        self.n_batches = 1 if self.full else -(-n // size)
        self.order: Optional[np.ndarray] = None
        self.pos = self.n_batches   # forces a new epoch on the first draw

    def __iter__(self) -> "_IndexStream":
        return self

    def __next__(self) -> np.ndarray:
        if self.full:
            return np.arange(self.n)
        if self.pos >= self.n_batches:
            self.order = self.rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self.pos = 0
        part = np.array_split(self.order, self.n_batches)[self.pos]
        self.pos += 1
        return np.sort(part)   # sorted indices make the CSR row gather contiguous-ish

    def state_dict(self) -> dict:
        return {"order": None if self.order is None else torch.tensor(self.order),
                "pos": int(self.pos)}

    def load_state_dict(self, state: dict) -> None:
        self.order = None if state["order"] is None else state["order"].numpy()
        self.pos = int(state["pos"])


# ---- initialisation --------------------------------------------------------------------------

@torch.no_grad()
def _kl_nmf(batch: CountBatch, H: Tensor, W: Tensor, n_iter: int, update_w: bool = True,
            eps: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Lee-Seung multiplicative updates for KL-NMF, ``Y ~= H W^T``, sparse throughout.

    H: (N, L) and W: (D, L) positive, updated in place and returned.
    """
    crow_t, col_t, perm = batch.csr_t_structure()
    y = batch.values
    pattern = _csr(*batch.csr_structure(), y, (batch.n_spots, batch.n_genes))

    def ratio() -> Tensor:  # y / (H W^T) at the non-zeros
        rate = torch.sparse.sampled_addmm(pattern, H, W.T, beta=0.0).values()
        return y / rate.clamp_min(eps)

    for _ in range(n_iter):
        s = ratio()
        H.mul_((_csr(*batch.csr_structure(), s, pattern.shape) @ W) / W.sum(0).clamp_min(eps))
        if update_w:
            s = ratio()
            W.mul_((_csr(crow_t, col_t, torch.index_select(s, 0, perm), (batch.n_genes, batch.n_spots)) @ H)
                   / H.sum(0).clamp_min(eps))
    return H, W


def _log_factors_from_nmf(H: Tensor) -> Tensor:
    """log H with a relative floor, (L, N)."""
    floor = INIT_FLOOR * H.mean(dim=0, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)
    return torch.log(torch.maximum(H, floor)).T.contiguous()


def _fixed_point_scale(mu: Tensor, W: Tensor) -> Tensor:
    """Posterior sd where the lower bound is stationary in v for small v: (L, N)."""
    return torch.rsqrt(1.0 + W.sum(0)[:, None] * torch.exp(mu))


def _warm_start(prior: FactorPrior, mu0: Tensor, coords: Tensor, groups: Optional[Tensor],
                gen: torch.Generator) -> None:
    """Fit the prior's inducing means ``mu`` so its q(F) mean matches mu0 (L, N), least squares.

    A spatial prior starts at mean zero, i.e. flat factors, and the ELBO optimiser
    then has to discover the factors from scratch, which is slow and often ends in a
    poor local optimum (a factor that never separates). Regressing the GP mean on
    the KL-NMF log-factors first hands it the factors the initial W was fitted to.
    Only ``mu`` moves (the mean is linear in it, so this is a convex problem); kernel
    hyperparameters stay put so they cannot shrink to fit noise. Priors without a
    ``mu`` parameter are left as they are.
    """
    params = [p for name, p in prior.named_parameters() if name == "mu"]
    if not params:
        return
    n = mu0.shape[1]
    opt = torch.optim.Adam(params, lr=WARM_LR)
    for _ in range(WARM_ITER):
        idx = (torch.randperm(n, generator=gen, device=mu0.device)[:WARM_BATCH] if n > WARM_BATCH
               else torch.arange(n, device=mu0.device))
        mean = prior.means(idx, coords[idx], None if groups is None else groups[idx])
        loss = (mean - mu0[:, idx]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    if hasattr(prior, "clear_cache"):
        prior.clear_cache()


# ---- the estimator ---------------------------------------------------------------------------

class PNMF:
    """Poisson factor model with non-negative loadings and a variational factor prior.

    Parameters
    ----------
    n_components : int
        Number of factors L.
    prior : {"gaussian", "svgp"}
        Independent N(0, 1) log-factors, or a multi-group sparse variational GP over
        the spot coordinates (:class:`sf_mlflow.models.svgp.SVGPPrior`).
    mode : {"lower-bound", "expanded", "simple"}
        How ``E_q[log p(Y | F, W)]`` is computed, see
        :func:`sf_mlflow.models.likelihood.expected_log_likelihood`. The KL term is
        always analytic.
    num_samples : int
        Monte Carlo draws per iteration for the expanded and simple modes.
    loadings_mode : {"multiplicative", "gradient"}
        Multiplicative minorise-maximise updates of W, or ``W = softplus(raw)``
        optimised with the variational parameters.
    kernel, num_inducing, lengthscale, sigma, group_diff_param, use_groups,
    train_lengthscale, per_factor_lengthscale, cholesky_mode, diagonal_only,
    inducing_allocation, jitter
        Settings of the spatial prior, passed to ``SVGPPrior`` when
        ``prior="svgp"`` (``use_groups=False`` ignores the groups). Ignored otherwise.
        ``num_inducing="auto"`` picks M from the number of distinct spot locations
        (:func:`sf_mlflow.models.inducing.auto_num_inducing`); the value used is
        ``num_inducing_``.
    kl_weight : float
        Weight of the KL term for either prior; 1 (default) is the true ELBO.
    max_iter : int
        Maximum number of iterations (one mini-batch each).
    learning_rate : float
        Step size of the optimiser. For ``"natural"`` it is the natural-gradient step
        gamma in (0, 1] of q(v) (1 = the exact update of a conjugate model), and the
        Adam step of any trained kernel hyperparameters. For the gradient optimisers
        the loss is ``-ELBO / N``; SGD steps scale with it, Adam's do not.
    optimizer : {"auto", "natural", "Adam", "AdamW", "SGD"}
        How q(F) is optimised. ``"natural"``: natural-gradient steps on the SVGP
        prior's q(v) (:mod:`sf_mlflow.models.natural`), stable at any step in (0, 1]
        and converging in far fewer iterations than Adam. ``"auto"`` (default):
        natural for the SVGP prior, Adam for the Gaussian prior.
    tol : float
        Relative-change threshold of the stopping rule (0 disables it). Every
        ``tol_window`` iterations the ELBO is evaluated on a fixed evaluation block
        (the whole data for full-batch fits, a fixed spot x gene block of the
        mini-batch size otherwise; deterministic in the lower-bound mode, common
        random numbers otherwise), so mini-batch noise cannot fake a flat curve. The
        fit has converged when two consecutive checks each changed it by less than
        ``tol`` relative.
    tol_window : int
        Iterations between two checks of the stopping rule.
    validation_every : int
        With ``fit(..., validation=...)``: iterations between held-out Poisson
        deviance checks (0 = none). ``validation_history_`` records them.
    patience : int
        Stop (``stop_reason_ = "validation"``) once that many consecutive checks have
        not improved the best held-out deviance by ``VALIDATION_MIN_DELTA``
        relative; the model is rolled back to the best checked state.
    batch_size, y_batch_size : int or None
        Spots and genes per mini-batch; ``None`` uses all.
    shuffle : bool
        Draw mini-batches in a new random order every epoch.
    device : {"cpu", "gpu", "cuda", "auto"}
    dtype : {"float32", "float64"}
    random_state : int
        Seeds the initialisation, mini-batch order, Monte Carlo draws and inducing
        points. Torch's and numpy's global generators are not touched.
    verbose : bool
        Print a progress line every ``log_every`` iterations and at the end.
    log_every : int

    Attributes
    ----------
    loadings_ : ndarray, (D, L)
    prior_ : FactorPrior
        The fitted prior module, holding q(F) of the training spots.
    elbo_history_ : ndarray, (n_iter_,)
        ELBO estimate at every iteration, scaled to the full data and including
        ``-sum lgamma(Y + 1)``, so it bounds the log marginal likelihood.
    n_iter_ : int
    converged_ : bool
        The stopping rule (tolerance, or held-out deviance with patience) was met.
        A fit that reaches ``max_iter`` first warns with :class:`ConvergenceWarning`.
    stopped_early_ : bool
        The callback asked to stop.
    stop_reason_ : {"tol", "validation", "max_iter", "callback"}
    validation_history_ : ndarray, (n_checks, 2)
        Rows of (iteration, held-out Poisson deviance); empty without validation.
    num_inducing_ : int or None
        M of the fitted SVGP prior (None for the Gaussian prior).
    fit_time_ : float
        Seconds spent in :meth:`fit`, initialisation included.
    device_ : torch.device
    n_features_in_ : int
        D.
    n_spots_ : int
        N.
    """

    def __init__(self, n_components=10, *, prior="gaussian", mode="lower-bound", num_samples=8,
                 loadings_mode="multiplicative",
                 kernel="Matern32", num_inducing="auto", lengthscale=4.0, sigma=1.0,
                 group_diff_param=10.0, use_groups=True, train_lengthscale=False,
                 per_factor_lengthscale=False, cholesky_mode="exp", diagonal_only=False,
                 inducing_allocation="proportional", jitter=1e-5, kl_weight=1.0,
                 max_iter=1000, learning_rate=0.1, optimizer="auto", tol=1e-4, tol_window=10,
                 validation_every=0, patience=5,
                 batch_size=None, y_batch_size=None, shuffle=True,
                 device="cpu", dtype="float32", random_state=0, verbose=False, log_every=50):
        self.n_components = n_components
        self.prior = prior
        self.mode = mode
        self.num_samples = num_samples
        self.loadings_mode = loadings_mode
        self.kernel = kernel
        self.num_inducing = num_inducing
        self.lengthscale = lengthscale
        self.sigma = sigma
        self.group_diff_param = group_diff_param
        self.use_groups = use_groups
        self.train_lengthscale = train_lengthscale
        self.per_factor_lengthscale = per_factor_lengthscale
        self.cholesky_mode = cholesky_mode
        self.diagonal_only = diagonal_only
        self.inducing_allocation = inducing_allocation
        self.jitter = jitter
        self.kl_weight = kl_weight
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.tol = tol
        self.tol_window = tol_window
        self.validation_every = validation_every
        self.patience = patience
        self.batch_size = batch_size
        self.y_batch_size = y_batch_size
        self.shuffle = shuffle
        self.device = device
        self.dtype = dtype
        self.random_state = random_state
        self.verbose = verbose
        self.log_every = log_every

    # ---- scikit-learn parameter protocol -----------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyperparameters as a dict (``deep`` is accepted for scikit-learn compatibility)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> "PNMF":
        """Set hyperparameters by name; unknown names raise ConfigError."""
        valid = set(self._param_names())
        for key, value in params.items():
            if key not in valid:
                raise ConfigError(f"PNMF has no hyperparameter {key!r}; valid: {', '.join(sorted(valid))}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        default = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if v != default.get(k)]
        return f"{type(self).__name__}({', '.join(changed)})"

    # ---- validation --------------------------------------------------------------------------

    def _validated(self) -> dict[str, Any]:
        """Checked and normalised hyperparameters; raises ConfigError naming the bad one."""
        p = {
            "n_components": _integer("n_components", self.n_components, 1),
            "prior": _choice("prior", self.prior, PRIORS),
            "mode": _choice("mode", self.mode, MODES),
            "num_samples": _integer("num_samples", self.num_samples, 1),
            "loadings_mode": _choice("loadings_mode", self.loadings_mode, LOADINGS_MODES),
            "max_iter": _integer("max_iter", self.max_iter, 1),
            "learning_rate": _number("learning_rate", self.learning_rate, 0.0, True),
            "optimizer": OPTIMIZERS[_choice("optimizer", self.optimizer, tuple(OPTIMIZERS))],
            "tol": _number("tol", self.tol, 0.0, False),
            "tol_window": _integer("tol_window", self.tol_window, 1),
            "validation_every": _integer("validation_every", self.validation_every, 0),
            "patience": _integer("patience", self.patience, 1),
            "batch_size": _integer("batch_size", self.batch_size, 1, allow_none=True),
            "y_batch_size": _integer("y_batch_size", self.y_batch_size, 1, allow_none=True),
            "log_every": _integer("log_every", self.log_every, 1),
            "random_state": _integer("random_state", self.random_state, 0),
            "kl_weight": _number("kl_weight", self.kl_weight, 0.0, False),
            "shuffle": _flag("shuffle", self.shuffle),
            "verbose": _flag("verbose", self.verbose),
        }
        p["dtype"] = _validated_dtype(self.dtype)
        if p["optimizer"] == "auto":
            p["optimizer"] = "natural" if p["prior"] == "svgp" else "Adam"
        if p["optimizer"] == "natural":
            if p["prior"] != "svgp":
                raise ConfigError("optimizer = 'natural' needs prior = 'svgp' (natural-gradient steps "
                                  "act on the GP's q(v)); use optimizer = 'Adam' for the Gaussian prior")
            if p["learning_rate"] > 1.0:
                raise ConfigError(f"learning_rate = {self.learning_rate!r} is invalid with optimizer "
                                  "'natural': it is the natural-gradient step, expected a number in "
                                  "(0, 1] (1 = exact for a Gaussian likelihood; 0.1-0.5 for mini-batches)")
        if not (isinstance(self.num_inducing, str) and self.num_inducing == "auto"):
            _integer("num_inducing", self.num_inducing, 1)
        return p

    # ---- fitting -----------------------------------------------------------------------------

    def fit(self, Y, coordinates=None, groups=None, callback: Optional[Callback] = None,
            resume: Any = None, validation: Optional[tuple] = None) -> "PNMF":
        """Fit the model to counts.

        Parameters
        ----------
        Y : scipy sparse matrix or array-like, (N, D)
            Raw non-negative integer counts, spots in rows.
        coordinates : array-like, (N, 2), optional
            Spot positions; required by ``prior="svgp"``.
        groups : array-like of int, (N,), optional
            Group codes ``0..G-1`` for the multi-group kernel.
        callback : callable ``(iteration, elbo) -> bool | None``, optional
            Called after every iteration with the 1-based iteration count and that
            iteration's ELBO estimate; returning True stops training
            (``stopped_early_`` is then True).
        resume : dict or path, optional
            A checkpoint from :meth:`checkpoint` / :meth:`save_checkpoint` of a fit of the
            same model on the same data: training continues from its iteration and, on the
            CPU, ends with the same result as a fit that was never interrupted.
            ``max_iter``, ``tol``, ``verbose`` and ``log_every`` may differ from the
            checkpoint's; every other hyperparameter must match.
        validation : tuple ``(Y_val, coordinates_val, groups_val)``, optional
            Held-out spots (``groups_val`` may be None) scored every
            ``validation_every`` iterations by the Poisson deviance of the GP's
            predicted rates (svgp prior only); with ``patience`` this is early stopping.

        Returns
        -------
        self

        Raises
        ------
        NonFiniteELBOError
            The ELBO became NaN or infinite. The model is left fitted with the last state
            whose ELBO was finite, and :meth:`checkpoint` resumes from it.
        """
        start = time.perf_counter()
        p = self._validated()
        Yc = _check_counts(Y)
        n, d = Yc.shape
        X = _check_coordinates(coordinates, n)
        g = _check_groups(groups, n)
        if p["prior"] == "svgp" and X is None:
            raise DataError("coordinates = None, but prior = 'svgp' needs the spot coordinates: "
                            f"pass an array of shape (n_spots, 2) = ({n}, 2)")
        val = self._checked_validation(validation, p, d, g is not None)
        if callback is not None and not callable(callback):
            raise ConfigError(f"callback = {callback!r} is not callable; expected f(iteration, elbo) -> bool")
        device = resolve_device(self.device)
        dtype = p["dtype"]
        gen = torch.Generator(device=device).manual_seed(p["random_state"])

        full = CountBatch.from_scipy(Yc, device=device, dtype=dtype)
        L = p["n_components"]
        W0, mu0 = self._initial_state(full, L, gen, dtype, device)
        coords_t = None if X is None else torch.as_tensor(X, dtype=dtype, device=device)
        groups_t = None if g is None else torch.as_tensor(g, device=device)
        if p["prior"] == "gaussian":
            prior = GaussianPrior(n, L, mean=mu0, scale=_fixed_point_scale(mu0, W0),
                                  kl_weight=p["kl_weight"])
        else:
            prior = self._build_svgp(coords_t, groups_t, L, p["random_state"]).to(device=device, dtype=dtype)
            _warm_start(prior, mu0, coords_t, groups_t if self.use_groups else None, gen)
        prior = prior.to(device=device, dtype=dtype)

        # The model is usable from inside ``callback``: prior_ and loadings_ are the
        # live training state (e.g. for checkpoints or a validation score).
        self.device_ = device
        self.n_spots_, self.n_features_in_ = n, d
        self._coordinates = coords_t
        self._groups = groups_t if self.use_groups else None
        self.train_coordinates_ = X
        self.train_groups_ = g if self.use_groups else None
        self.prior_ = prior
        self._loadings_t = W0
        self.num_inducing_ = getattr(prior, "num_inducing", None)
        trainer = _Trainer(self, p, prior, W0, Yc, full, gen, coords_t, self._groups,
                           train_loadings=True, validation=val)
        if resume is not None:
            trainer.load_state_dict(self._checked_checkpoint(resume, n, d)["trainer"])
        self._trainer = trainer
        try:
            result = trainer.run(callback, start)
        except NonFiniteELBOError:
            # The trainer rolled back to its last finite state: keep it as the fitted
            # model and as a checkpoint to resume from, instead of losing the work.
            self._stopped_state = trainer.state_dict()
            self._finish(trainer.result(), start)
            raise
        finally:
            trainer.close()
            del self._trainer
        # Kept only when the fit may be continued, so a finished model stays small.
        self._stopped_state = trainer.state_dict() if result.stopped else None
        self._finish(result, start)
        if result.reason == "max_iter" and (p["tol"] > 0 or val is not None):
            warnings.warn(f"PNMF did not converge: max_iter = {p['max_iter']} reached before the "
                          f"stopping rule was met (tol = {p['tol']:g}); raise training.max_iter or "
                          f"resume the fit", ConvergenceWarning, stacklevel=2)
        return self

    def _finish(self, result: "_Result", start: float) -> None:
        self._loadings_t = result.loadings
        self.elbo_history_ = np.asarray(result.history, dtype=np.float64)
        self.n_iter_ = len(result.history)
        self.converged_ = result.converged
        self.stopped_early_ = result.stopped
        self.stop_reason_ = result.reason
        self.validation_history_ = np.asarray(result.validation, dtype=np.float64).reshape(-1, 2)
        self.fit_time_ = time.perf_counter() - start

    def _checked_validation(self, validation, p: dict, d: int, grouped: bool):
        """``(CountBatch, coordinates (Nv, 2), groups (Nv,) or None)`` of held-out spots, or None."""
        if validation is None:
            return None
        if p["prior"] != "svgp":
            raise ConfigError("validation needs prior = 'svgp': held-out spots are scored from "
                              "factors predicted at their coordinates")
        if not isinstance(validation, (tuple, list)) or len(validation) != 3:
            raise ConfigError("validation must be a tuple (Y_val, coordinates_val, groups_val); "
                              f"got {type(validation).__name__}")
        Yv = _check_counts(validation[0], "validation Y_val")
        if Yv.shape[1] != d:
            raise DataError(f"validation Y_val has {Yv.shape[1]} genes, Y has {d}; expected "
                            f"shape (n_val, {d})")
        Xv = _check_coordinates(validation[1], Yv.shape[0], "validation coordinates_val")
        gv = _check_groups(validation[2], Yv.shape[0], "validation groups_val")
        if grouped and self.use_groups and gv is None:
            raise DataError("validation groups_val = None, but the model is fitted with groups; "
                            "pass the held-out spots' group codes")
        return Yv, Xv, gv

    def _initial_state(self, full: CountBatch, L: int, gen: torch.Generator, dtype, device,
                       W_fixed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """KL-NMF start: loadings W (D, L) and log-factors mu (L, N) with per-factor mean 0.

        With ``W_fixed`` (transform) only the factors are fitted and W is kept.
        """
        N, D = full.n_spots, full.n_genes
        # sklearn's "random" NMF init scale: entries of H W^T average the data mean
        scale = math.sqrt(max(float(full.values.sum()) / (N * D), 1e-12) / L)
        H = scale * (0.5 + torch.rand((N, L), generator=gen, device=device, dtype=dtype))
        if W_fixed is None:
            W = scale * (0.5 + torch.rand((D, L), generator=gen, device=device, dtype=dtype))
        else:
            W = W_fixed.clone()
            H.fill_(1.0)
        H, W = _kl_nmf(full, H, W, INIT_ITER, update_w=W_fixed is None)
        mu = _log_factors_from_nmf(H)
        if W_fixed is None:
            # Centre each factor: the prior N(0, 1) sees mean-zero log-factors and W
            # absorbs the shift, leaving the rates W exp(mu) unchanged.
            shift = mu.mean(dim=1)
            mu = mu - shift[:, None]
            W = W * torch.exp(shift)[None, :]
        return W, mu

    def _build_svgp(self, coords: Tensor, groups: Optional[Tensor], L: int, seed: int,
                    inducing_points: Optional[Tensor] = None,
                    inducing_groups: Optional[Tensor] = None) -> FactorPrior:
        from sf_mlflow.models.svgp import SVGPPrior  # optional module, imported on use

        use = groups if self.use_groups else None
        n_groups = None if use is None else int(use.max().item()) + 1
        num_inducing = self.num_inducing
        if inducing_points is None and num_inducing == "auto":
            num_inducing = auto_num_inducing(coords.detach().cpu().numpy())
        return SVGPPrior(coords, use, L, num_inducing=num_inducing, kernel=self.kernel,
                         lengthscale=self.lengthscale, sigma=self.sigma,
                         group_diff_param=self.group_diff_param, n_groups=n_groups,
                         train_lengthscale=self.train_lengthscale,
                         per_factor_lengthscale=self.per_factor_lengthscale,
                         cholesky_mode=self.cholesky_mode, diagonal_only=self.diagonal_only,
                         inducing_allocation=self.inducing_allocation, jitter=self.jitter,
                         kl_weight=self.kl_weight, seed=seed, inducing_points=inducing_points,
                         inducing_groups=inducing_groups)

    # ---- results -----------------------------------------------------------------------------

    @property
    def is_spatial(self) -> bool:
        """True for the SVGP prior: factors are a function of position, predictable anywhere."""
        return _choice("prior", self.prior, PRIORS) == "svgp"

    @property
    def uses_groups_(self) -> bool:
        """Fitted with group codes for the multi-group kernel (predictions then need groups)."""
        return self.__dict__.get("train_groups_") is not None

    @property
    def inducing_points_(self) -> Optional[np.ndarray]:
        """Inducing point positions Z, (M, 2), of the SVGP prior (None for the Gaussian prior)."""
        Z = getattr(self.__dict__.get("prior_"), "Z", None)
        return None if Z is None else Z.detach().cpu().double().numpy()

    @property
    def inducing_groups_(self) -> Optional[np.ndarray]:
        """Group code of every inducing point, (M,) (None without groups or spatial prior)."""
        if not self.uses_groups_:
            return None
        return self.prior_.g_Z.detach().cpu().numpy()

    @property
    def loadings_(self) -> np.ndarray:
        """Loadings W, (D, L), non-negative."""
        if "_loadings_t" not in self.__dict__:
            raise AttributeError("loadings_ is set by fit()")
        return self._loadings_t.detach().cpu().numpy()

    def _check_fitted(self, what: str) -> None:
        if not hasattr(self, "prior_"):
            raise ModelError(f"PNMF.{what}() needs a fitted model; call fit(Y) first")

    @torch.no_grad()
    def _marginals(self, chunk_size: int = 10000) -> tuple[Tensor, Tensor]:
        """q(F) of all training spots: mean (L, N), var (L, N)."""
        means, variances = [], []
        for s in range(0, self.n_spots_, chunk_size):
            idx = torch.arange(s, min(s + chunk_size, self.n_spots_), device=self.device_)
            c = None if self._coordinates is None else self._coordinates[idx]
            g = None if self._groups is None else self._groups[idx]
            m, v = self.prior_.marginals(idx, c, g)
            means.append(m)
            variances.append(v)
        return torch.cat(means, dim=1), torch.cat(variances, dim=1)

    @torch.no_grad()
    def _means(self, chunk_size: int = 10000) -> Tensor:
        """Mean of q(F) at all training spots, (L, N) (no variances computed)."""
        means = []
        for s in range(0, self.n_spots_, chunk_size):
            idx = torch.arange(s, min(s + chunk_size, self.n_spots_), device=self.device_)
            c = None if self._coordinates is None else self._coordinates[idx]
            g = None if self._groups is None else self._groups[idx]
            means.append(self.prior_.means(idx, c, g))
        return torch.cat(means, dim=1)

    def get_factors(self, exp_mean: bool = False) -> np.ndarray:
        """Factors of the training spots, (N, L).

        ``exp(E[F])`` (the posterior median of the log-normal factor) by default;
        with ``exp_mean=True`` the posterior mean ``E[exp F] = exp(m + v / 2)``.
        """
        self._check_fitted("get_factors")
        if not exp_mean:
            return torch.exp(self._means()).T.cpu().double().numpy()
        m, v = self._marginals()
        return torch.exp(m + 0.5 * v).T.cpu().double().numpy()

    def get_factor_scales(self) -> np.ndarray:
        """Posterior standard deviation of the log-factors F, (N, L)."""
        self._check_fitted("get_factor_scales")
        _, v = self._marginals()
        return torch.sqrt(v).T.cpu().double().numpy()

    def expected_counts(self, genes=None) -> np.ndarray:
        """Posterior mean rates ``E[R] = exp(m + v/2) W^T`` of the training spots, (N, Dsel).

        ``genes``: indices or a boolean mask of the genes to return (default all);
        the result is dense, so select genes for large data.
        """
        self._check_fitted("expected_counts")
        W = self.loadings_ if genes is None else self.loadings_[np.asarray(genes)]
        return self.get_factors(exp_mean=True) @ W.T

    def transform(self, Y_new, coordinates=None, groups=None) -> np.ndarray:
        """Factors ``exp(E[F])`` of new spots with the loadings fixed, (N_new, L).

        Gaussian prior: q(F) of the new spots is fitted from scratch to ``Y_new``
        with the same mode, optimiser and stopping rule, W frozen. SVGP prior: the
        GP predictive at ``coordinates`` (``Y_new`` only checked for its width).
        """
        self._check_fitted("transform")
        p = self._validated()
        Yc = _check_counts(Y_new, "Y_new")
        if Yc.shape[1] != self.n_features_in_:
            raise DataError(f"Y_new has {Yc.shape[1]} genes, the model was fitted with "
                            f"{self.n_features_in_}; expected shape (n_spots, {self.n_features_in_})")
        if p["prior"] == "svgp":
            if coordinates is None:
                raise DataError("coordinates = None, but the svgp prior predicts factors from "
                                f"coordinates: pass an array of shape ({Yc.shape[0]}, 2)")
            return self.predict_at(coordinates, groups)
        device, dtype = self.device_, p["dtype"]
        gen = torch.Generator(device=device).manual_seed(p["random_state"])
        full = CountBatch.from_scipy(Yc, device=device, dtype=dtype)
        W = self._loadings_t.to(device=device, dtype=dtype)
        _, mu0 = self._initial_state(full, self.n_components, gen, dtype, device, W_fixed=W)
        prior = GaussianPrior(Yc.shape[0], p["n_components"], mean=mu0, scale=_fixed_point_scale(mu0, W),
                              kl_weight=p["kl_weight"]).to(device=device, dtype=dtype)
        _Trainer(self, p, prior, W, Yc, full, gen, None, None, train_loadings=False).run(None, time.perf_counter())
        with torch.no_grad():
            return torch.exp(prior.mu).T.cpu().double().numpy()

    def predict_at(self, coordinates, groups=None, *, neighbours: int = 6, return_std: bool = False,
                   exp_mean: bool = False, chunk_size: int = 10000):
        """Factors at positions, from the positions (and groups) alone, (M, L).

        This is the one place that decides how factors are predicted where the model
        has not seen counts (held-out spots, the registered model's queries):

        * spatial (SVGP) prior: the GP predictive ``exp(E[F])`` at ``coordinates`` and
          ``groups`` (groups are needed when ``uses_groups_``, ignored otherwise);
        * Gaussian prior: its posterior at an unseen spot is the prior, the same for every
          spot, so the prediction is the mean posterior log-factor of the ``neighbours``
          nearest training spots (:mod:`sf_mlflow.models.neighbours`); it needs a fit
          with ``coordinates``.

        Parameters
        ----------
        coordinates : array-like, (M, 2)
            Positions in the units the model was fitted in.
        groups : array-like of int, (M,), optional
        neighbours : int
            k of the nearest-neighbour rule (Gaussian prior only).
        return_std : bool
            Also return the GP predictive standard deviation of F, (M, L) (SVGP only).
        exp_mean : bool
            The posterior mean ``E[exp F]`` instead of the median ``exp(E[F])``.
        """
        self._check_fitted("predict_at")
        if coordinates is None:
            raise DataError("coordinates = None; predict_at needs the positions, shape (n_spots, 2)")
        X = _check_coordinates(coordinates, None, "coordinates")
        if not self.is_spatial:
            if return_std:
                raise ModelError("predict_at(return_std=True) needs prior = 'svgp'; the "
                                 "nearest-neighbour prediction of the Gaussian prior has no std")
            if self.train_coordinates_ is None:
                raise ModelError("predict_at() of a Gaussian-prior model needs the training "
                                 "coordinates: fit(Y, coordinates=X) stores them")
            train_log = np.log(self.get_factors(exp_mean=exp_mean))
            return np.exp(nearest_neighbour_log_factors(self.train_coordinates_, train_log, X,
                                                        k=neighbours))
        g = _check_groups(groups, X.shape[0]) if self.uses_groups_ else None
        if self.uses_groups_ and g is None:
            raise DataError(f"groups = None, but the model was fitted with groups: pass the "
                            f"group code (0..{int(self.train_groups_.max())}) of each of the "
                            f"{X.shape[0]} positions")
        c = torch.as_tensor(X, dtype=_validated_dtype(self.dtype), device=self.device_)
        gg = None if g is None else torch.as_tensor(g, device=self.device_)
        with torch.no_grad():
            if not (return_std or exp_mean):
                m = self.prior_.predict(c, gg, chunk_size=chunk_size, return_var=False)
                return torch.exp(m).T.cpu().double().numpy()
            m, v = self.prior_.predict(c, gg, chunk_size=chunk_size)
        f = torch.exp(m + 0.5 * v) if exp_mean else torch.exp(m)
        f = f.T.cpu().double().numpy()
        return (f, torch.sqrt(v).T.cpu().double().numpy()) if return_std else f

    def elbo(self) -> float:
        """The last ELBO estimate of training (see ``elbo_history_``)."""
        self._check_fitted("elbo")
        return float(self.elbo_history_[-1])

    # ---- checkpoints -------------------------------------------------------------------------

    #: Hyperparameters that may change between a checkpoint and the fit resuming from it.
    _RESUMABLE_CHANGES = ("max_iter", "tol", "tol_window", "verbose", "log_every", "learning_rate",
                          "validation_every", "patience")

    def checkpoint(self) -> dict:
        """The full training state, to continue this fit later with ``fit(..., resume=...)``.

        Call it from inside a fit ``callback`` (the live state after that iteration) or
        after a fit the callback stopped. Holds tensors, numbers and strings only.
        """
        trainer = self.__dict__.get("_trainer")
        if trainer is not None:
            state = trainer.state_dict()
        elif self.__dict__.get("_stopped_state") is not None:
            state = self._stopped_state
        else:
            raise ModelError("PNMF.checkpoint() needs a fit in progress (call it from the fit "
                             "callback) or a fit that the callback stopped early")
        return {"format_version": FORMAT_VERSION, "kind": "pnmf-checkpoint",
                "hyperparameters": self._portable_params(), "n_spots": int(self.n_spots_),
                "n_features": int(self.n_features_in_), "trainer": state}

    def save_checkpoint(self, path) -> None:
        """Write :meth:`checkpoint` to ``path`` (readable with ``weights_only=True``)."""
        torch.save(self.checkpoint(), Path(path))

    @staticmethod
    def load_checkpoint(path) -> dict:
        """Read a checkpoint written by :meth:`save_checkpoint`."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("kind") != "pnmf-checkpoint":
            raise ModelError(f"{path} is not a PNMF checkpoint (written by save_checkpoint)")
        return blob

    def _checked_checkpoint(self, resume: Any, n: int, d: int) -> dict:
        blob = resume if isinstance(resume, dict) else self.load_checkpoint(resume)
        if blob.get("kind") != "pnmf-checkpoint" or blob.get("format_version") != FORMAT_VERSION:
            raise ModelError("resume is not a PNMF checkpoint of this format version "
                             f"({FORMAT_VERSION}); pass the output of PNMF.checkpoint()")
        if (blob["n_spots"], blob["n_features"]) != (n, d):
            raise DataError(f"the checkpoint was taken on Y of shape ({blob['n_spots']}, "
                            f"{blob['n_features']}), but Y has shape ({n}, {d}); resume on "
                            "the same data")
        mine = self._portable_params()
        diff = {k: (v, mine.get(k)) for k, v in blob["hyperparameters"].items()
                if k not in self._RESUMABLE_CHANGES and mine.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ConfigError(f"cannot resume: hyperparameters differ from the checkpoint's ({detail})")
        return blob

    def _portable_params(self) -> dict[str, Any]:
        params = self.get_params()
        if isinstance(params["dtype"], torch.dtype):
            params["dtype"] = str(params["dtype"]).replace("torch.", "")
        return params

    # ---- persistence -------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write hyperparameters, learned state and attributes with ``torch.save``.

        Only tensors, numbers, strings, lists and dicts are stored, so
        :meth:`load` can read the file with ``weights_only=True``.
        """
        self._check_fitted("save")
        params = self._portable_params()
        state = {
            "prior": {k: v.detach().cpu() for k, v in self.prior_.state_dict().items()},
            "loadings": self._loadings_t.detach().cpu(),
            "coordinates": None if self._coordinates is None else self._coordinates.cpu(),
            "groups": None if self._groups is None else self._groups.cpu(),
            "train_coordinates": (None if self.train_coordinates_ is None
                                  else torch.as_tensor(self.train_coordinates_, dtype=torch.float64)),
        }
        # The SVGP prior's inducing points (buffers Z, g_Z) are passed back to its
        # constructor at load time, so loading does not rerun k-means.
        for name, attr in (("inducing_points", "Z"), ("inducing_groups", "g_Z")):
            value = getattr(self.prior_, attr, None)
            state[name] = value.detach().cpu() if isinstance(value, Tensor) else None
        attributes = {
            "elbo_history_": torch.as_tensor(self.elbo_history_, dtype=torch.float64),
            "n_iter_": int(self.n_iter_), "converged_": bool(self.converged_),
            "stopped_early_": bool(self.stopped_early_), "fit_time_": float(self.fit_time_),
            "stop_reason_": str(self.stop_reason_),
            "validation_history_": torch.as_tensor(self.validation_history_, dtype=torch.float64),
            "n_features_in_": int(self.n_features_in_), "n_spots_": int(self.n_spots_),
        }
        torch.save({"format_version": FORMAT_VERSION, "hyperparameters": params,
                    "state": state, "attributes": attributes}, Path(path))

    @classmethod
    def load(cls, path, device: str = "cpu") -> "PNMF":
        """Read a model written by :meth:`save` onto ``device``."""
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        version = blob.get("format_version") if isinstance(blob, dict) else None
        if version != FORMAT_VERSION:
            raise ModelError(f"{path}: format_version = {version!r}, expected {FORMAT_VERSION} "
                             "(not a PNMF file, or written by an incompatible version)")
        model = cls(**blob["hyperparameters"])
        model.device = device
        p = model._validated()
        dev = resolve_device(device)
        dtype = p["dtype"]
        st, at = blob["state"], blob["attributes"]
        n, L = int(at["n_spots_"]), p["n_components"]
        model._coordinates = None if st["coordinates"] is None else st["coordinates"].to(dev, dtype)
        model._groups = None if st["groups"] is None else st["groups"].to(dev)
        # float64 coordinates from files that have them (older files: the model's dtype)
        X = st.get("train_coordinates", st["coordinates"])
        model.train_coordinates_ = None if X is None else X.double().numpy()
        model.train_groups_ = None if st["groups"] is None else st["groups"].numpy()
        if p["prior"] == "gaussian":
            prior = GaussianPrior(n, L, dtype=dtype, kl_weight=p["kl_weight"])
        else:
            ip, ig = st.get("inducing_points"), st.get("inducing_groups")
            prior = model._build_svgp(model._coordinates, model._groups, L, p["random_state"],
                                      inducing_points=None if ip is None else ip.to(dev, dtype),
                                      inducing_groups=None if ig is None else ig.to(dev))
        prior = prior.to(device=dev, dtype=dtype)
        prior.load_state_dict(st["prior"])
        model.prior_ = prior
        model._loadings_t = st["loadings"].to(dev, dtype)
        model.device_ = dev
        model.elbo_history_ = at["elbo_history_"].numpy()
        for key in ("n_iter_", "converged_", "stopped_early_", "fit_time_", "n_features_in_", "n_spots_"):
            setattr(model, key, at[key])
        model.stop_reason_ = at.get("stop_reason_", "tol" if model.converged_ else "max_iter")
        vh = at.get("validation_history_")
        model.validation_history_ = (np.empty((0, 2)) if vh is None else vh.numpy().reshape(-1, 2))
        model.num_inducing_ = getattr(prior, "num_inducing", None)
        return model


def _validated_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    return DTYPES[_choice("dtype", value, tuple(DTYPES))]


# ---- the optimisation loop -------------------------------------------------------------------

class _Result:
    def __init__(self, loadings: Tensor, history: list[float], converged: bool, stopped: bool,
                 reason: str, validation: list):
        self.loadings, self.history, self.converged, self.stopped = loadings, history, converged, stopped
        self.reason, self.validation = reason, validation


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _Trainer:
    """One optimisation run of a prior's variational parameters (and of W, if trained).

    Holds the explicit fit state: the prior and loadings, the optimisers (natural
    gradients for q(v) and/or a torch optimiser), the mini-batch streams, the ELBO
    history, the stopping rule's checks and the last state known to be finite.
    """

    #: Iterations between the in-memory snapshots a non-finite ELBO rolls back to.
    SNAPSHOT_EVERY = 10

    def __init__(self, model: PNMF, p: dict, prior: FactorPrior, W0: Tensor, Y: sp.csr_matrix,
                 full: CountBatch, gen: torch.Generator, coords: Optional[Tensor],
                 groups: Optional[Tensor], train_loadings: bool, validation=None):
        self.model, self.p, self.prior, self.Y, self.full, self.gen = model, p, prior, Y, full, gen
        self.coords, self.groups = coords, groups
        self.N, self.D = Y.shape
        self.device, self.dtype = full.device, full.values.dtype
        self.train_loadings = train_loadings
        self.gradient_loadings = train_loadings and p["loadings_mode"] == "gradient"
        self.natural = None
        self._frozen: list[Tensor] = []
        if p["optimizer"] == "natural":
            from sf_mlflow.models.natural import NaturalGradient

            self.natural = NaturalGradient(prior, p["learning_rate"])
            # q(v) moves by natural steps only; autograd then skips the costly backward
            # pass through the variance term (restored by close()).
            variational = [prm for name, prm in prior.named_parameters()
                           if not name.startswith("kernel.")]
            self._frozen = [prm for prm in variational if prm.requires_grad]
            for prm in self._frozen:
                prm.requires_grad_(False)
            params = [prm for prm in prior.kernel.parameters() if prm.requires_grad]
        else:
            params = list(prior.parameters())
        if self.gradient_loadings:
            # softplus^{-1}(W) = W + log(1 - exp(-W)), written stably
            W0 = W0.clamp_min(1e-6)
            self.raw_loadings = torch.nn.Parameter(W0 + torch.log(-torch.expm1(-W0)))
            params.append(self.raw_loadings)
        else:
            self.W = W0.detach().clone()
        self.params = params
        opt_cls = getattr(torch.optim, "Adam" if p["optimizer"] == "natural" else p["optimizer"])
        self.optimizer = opt_cls(params, lr=p["learning_rate"]) if params else None
        # spots and genes draw from one generator, in a fixed interleaving
        self.rng = np.random.default_rng(p["random_state"])
        self.spot_stream = _IndexStream(self.N, p["batch_size"], p["shuffle"], self.rng)
        self.gene_stream = _IndexStream(self.D, p["y_batch_size"], p["shuffle"], self.rng)
        self.history: list[float] = []
        self.checks: list[float] = []          # ELBO on the fixed evaluation block
        self.validation_history: list[tuple[int, float]] = []
        self.validation = None
        if validation is not None:
            Yv, Xv, gv = validation
            self.validation = (
                CountBatch.from_scipy(Yv, device=self.device, dtype=self.dtype),
                torch.as_tensor(Xv, dtype=self.dtype, device=self.device),
                None if gv is None or groups is None else torch.as_tensor(gv, device=self.device))
        self._eval = None
        self._good: Optional[dict] = None      # last state whose ELBO was finite
        self._best: Optional[dict] = None      # best state by held-out deviance
        self._reason = "max_iter"

    def close(self) -> None:
        """Give the prior's variational parameters back their gradients."""
        for prm in self._frozen:
            prm.requires_grad_(True)
        self._frozen = []

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue this optimisation exactly where it stands.

        Variational parameters (the prior's state), loadings, the optimisers' state, the
        loadings' running statistics, both random generators, the mini-batch position,
        the ELBO history and the stopping rule's checks: a fit resumed from it takes the
        same steps as one that was never interrupted.
        """
        state = {
            "iteration": len(self.history),
            "history": torch.as_tensor(self.history, dtype=torch.float64),
            "checks": torch.as_tensor(self.checks, dtype=torch.float64),
            "validation": torch.as_tensor(self.validation_history, dtype=torch.float64).reshape(-1, 2),
            "prior": {k: v.detach().cpu().clone() for k, v in self.prior.state_dict().items()},
            # deep copy: the optimiser's state dict references its live moment tensors
            "optimizer": None if self.optimizer is None else copy.deepcopy(self.optimizer.state_dict()),
            "natural": None if self.natural is None else self.natural.state_dict(),
            "torch_generator": self.gen.get_state(),
            # PCG64's 128-bit state words do not fit a tensor; a decimal string keeps them exact
            "numpy_generator": repr(self.rng.bit_generator.state),
            "spot_stream": self.spot_stream.state_dict(),
            "gene_stream": self.gene_stream.state_dict(),
        }
        if self.gradient_loadings:
            state["raw_loadings"] = self.raw_loadings.detach().cpu().clone()
        else:
            state["loadings"] = self.W.detach().cpu().clone()
        if hasattr(self, "stat_s"):
            state["stat_s"], state["stat_t"] = self.stat_s.cpu().clone(), self.stat_t.cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        dev, dt = self.device, self.dtype
        self.prior.load_state_dict(state["prior"])
        if self.gradient_loadings:
            with torch.no_grad():
                self.raw_loadings.copy_(state["raw_loadings"].to(dev, dt))
        else:
            self.W = state["loadings"].to(dev, dt)
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            for group in self.optimizer.param_groups:   # learning_rate may change on resume
                group["lr"] = self.p["learning_rate"]
        if self.natural is not None:
            if state.get("natural") is not None:
                self.natural.load_state_dict(state["natural"])
            else:
                self.natural.reset()
        self.gen.set_state(state["torch_generator"])
        self.rng.bit_generator.state = _literal_state(state["numpy_generator"])
        self.spot_stream.load_state_dict(state["spot_stream"])
        self.gene_stream.load_state_dict(state["gene_stream"])
        if "stat_s" in state:
            self.stat_s, self.stat_t = state["stat_s"].to(dev, dt), state["stat_t"].to(dev, dt)
        elif hasattr(self, "stat_s"):
            del self.stat_s, self.stat_t
        self.history = [float(v) for v in state["history"]]
        self.checks = [float(v) for v in state.get("checks", [])]
        self.validation_history = [(int(i), float(v)) for i, v in state.get("validation", torch.empty(0, 2)).tolist()]
        if self.train_loadings:
            self.model._loadings_t = self.loadings().detach()

    def loadings(self) -> Tensor:
        """Current W, (D, L)."""
        if self.gradient_loadings:
            return torch.nn.functional.softplus(self.raw_loadings)
        return self.W

    def _batches(self) -> Iterator[tuple[CountBatch, Tensor, Optional[Tensor]]]:
        """(counts block, spot index (B,), gene index (Db,) or None for all genes)."""
        p = self.p
        spots, genes = self.spot_stream, self.gene_stream
        all_spots = p["batch_size"] is None or p["batch_size"] >= self.N
        all_genes = p["y_batch_size"] is None or p["y_batch_size"] >= self.D
        if all_spots and all_genes:
            idx = torch.arange(self.N, device=self.device)
            while True:
                yield self.full, idx, None
        while True:
            si, gi = next(spots), next(genes)
            yield self._block(si, None if all_genes else gi)

    def _block(self, si: np.ndarray, gi: Optional[np.ndarray]):
        block = self.Y[si]
        if gi is not None:
            block = block[:, gi]
        batch = CountBatch.from_scipy(block, device=self.device, dtype=self.dtype)
        return (batch, torch.as_tensor(si, device=self.device),
                None if gi is None else torch.as_tensor(gi, device=self.device))

    def _at(self, idx: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return (None if self.coords is None else self.coords[idx],
                None if self.groups is None else self.groups[idx])

    def _scale(self, batch: CountBatch) -> float:
        return (self.N / batch.n_spots) * (self.D / batch.n_genes)

    def _likelihood(self, batch: CountBatch, mean: Tensor, var: Tensor,
                    gidx: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Expected log-likelihood of the block and, with multiplicative loadings, their
        new values for its genes (else None), from one evaluation of R."""
        p = self.p
        W_all = self.loadings()
        W = W_all if gidx is None else W_all[gidx]
        if self.train_loadings and not self.gradient_loadings:
            return likelihood_and_update(batch, mean, var, W, mode=p["mode"],
                                         num_samples=p["num_samples"], generator=self.gen)
        return expected_log_likelihood(batch, mean, var, W, mode=p["mode"],
                                       num_samples=p["num_samples"], generator=self.gen), None

    def _step(self, batch: CountBatch, idx: Tensor, gidx: Optional[Tensor]) -> float:
        if self.natural is not None:
            return self._natural_step(batch, idx, gidx)
        prior = self.prior
        coords, groups = self._at(idx)
        mean, var = prior.marginals(idx, coords, groups)
        ll, new_W = self._likelihood(batch, mean, var, gidx)
        elbo = self._scale(batch) * ll - prior.kl(idx)
        if not torch.isfinite(elbo):
            return float(elbo.detach())     # no step from a non-finite state
        self.optimizer.zero_grad(set_to_none=True)
        (-elbo / self.N).backward()
        self.optimizer.step()
        if new_W is not None:
            self._update_loadings(new_W, mean.detach(), var.detach(), gidx, batch.n_spots)
        self._publish_loadings()
        return float(elbo.detach())

    def _natural_step(self, batch: CountBatch, idx: Tensor, gidx: Optional[Tensor]) -> float:
        """Natural-gradient step of q(v); Adam on trained kernel hyperparameters (and raw W)."""
        prior = self.prior
        coords, groups = self._at(idx)
        hyper = self.optimizer is not None and any(
            prm is not getattr(self, "raw_loadings", None) for prm in self.params)
        with torch.set_grad_enabled(hyper):
            mean, var, At = prior.marginals_and_interp(coords, groups)
        m = mean.detach().requires_grad_(True)
        v = var.detach().requires_grad_(True)
        ll, new_W = self._likelihood(batch, m, v, gidx)
        scaled = self._scale(batch) * ll
        with torch.no_grad():
            elbo = float(scaled.detach() - prior.kl(idx))
        if not math.isfinite(elbo):
            return elbo
        leaves = [m, v] + ([self.raw_loadings] if self.gradient_loadings else [])
        grads = torch.autograd.grad(scaled, leaves)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if self.gradient_loadings:
                self.raw_loadings.grad = -grads[2] / self.N
            if hyper:
                torch.autograd.backward([mean, var], [-grads[0] / self.N, -grads[1] / self.N])
            self.optimizer.step()
        self.natural.step(At.detach(), grads[0], grads[1])
        if hyper:
            self.natural.reset()    # the kernel moved: Lzz and A change under q(v)
        if new_W is not None:
            self._update_loadings(new_W, m.detach(), v.detach(), gidx, batch.n_spots)
        self._publish_loadings()
        return elbo

    def _publish_loadings(self) -> None:
        if self.train_loadings:
            with torch.no_grad():
                self.model._loadings_t = self.loadings().detach()

    @torch.no_grad()
    def _init_statistics(self) -> None:
        """Running sufficient statistics of the loadings' update, for spot mini-batches.

        The update is ``W = s / t`` with ``s_dl = W_dl sum_n (Y_dn / R_dn) exp(m_ln)``
        (counts of gene d attributed to factor l) and ``t_dl = sum_n exp(m_ln + v_ln/2)``.
        On a full batch this is the exact minorise-maximise step. On a spot batch
        alone it is degenerate: a gene without counts in the batch would get W_d = 0
        (and then NaN once it has counts again). So, as in online EM, s and t are
        exponential moving averages of their N/B-scaled batch values with weight
        ``rho = B / N``, i.e. a memory of about one epoch; ``rho = 1`` on a full batch.
        """
        # t starts at its value for the current q(F), estimated from an evenly spaced subset
        # of at most INIT_STAT_SPOTS spots: the exact sum needs the variances at all N
        # spots (an O(L M^2 N) pass, minutes at Slide-seq size), and the running average
        # replaces the start within about an epoch anyway.
        step = max(1, self.N // INIT_STAT_SPOTS)
        idx = torch.arange(0, self.N, step, device=self.device)
        c, g = self._at(idx)
        m, v = self.prior.marginals(idx, c, g)
        sums = torch.exp(m + 0.5 * v).sum(dim=1) * (self.N / idx.shape[0])
        self.stat_t = sums.expand(self.D, -1).clone()            # (D, L)
        self.stat_s = self.W * self.stat_t                        # (D, L)

    @torch.no_grad()
    def _update_loadings(self, new_W: Tensor, mean: Tensor, var: Tensor, gidx: Optional[Tensor],
                         n_batch: int) -> None:
        """Apply the multiplicative step to the gene batch's rows (all rows when gidx is None)."""
        rho = n_batch / self.N
        if rho >= 1.0:
            # Full spot batch: the exact maximiser for the factors this ELBO was evaluated at.
            if gidx is None:
                self.W = new_W
            else:
                self.W[gidx] = new_W
            return
        if not hasattr(self, "stat_s"):
            self._init_statistics()
        t_batch = torch.exp(mean + 0.5 * var).sum(dim=1) / rho    # (L,), scaled to N spots
        rows = slice(None) if gidx is None else gidx
        s = (1 - rho) * self.stat_s[rows] + rho * (new_W * t_batch)
        t = (1 - rho) * self.stat_t[rows] + rho * t_batch
        self.stat_s[rows], self.stat_t[rows] = s, t
        self.W[rows] = s / t

    # ---- stopping rules ------------------------------------------------------------------------

    def _eval_block(self):
        """The fixed block the stopping rule evaluates the ELBO on (drawn once, seeded)."""
        if self._eval is None:
            p = self.p
            if (p["batch_size"] is None or p["batch_size"] >= self.N) and \
                    (p["y_batch_size"] is None or p["y_batch_size"] >= self.D):
                self._eval = (self.full, torch.arange(self.N, device=self.device), None)
            else:
                rng = np.random.default_rng([p["random_state"], 1])
                si = np.sort(rng.permutation(self.N)[:min(p["batch_size"] or self.N, self.N)])
                gi = (None if p["y_batch_size"] is None or p["y_batch_size"] >= self.D
                      else np.sort(rng.permutation(self.D)[:p["y_batch_size"]]))
                self._eval = self._block(si, gi)
        return self._eval

    @torch.no_grad()
    def evaluate_elbo(self) -> float:
        """ELBO estimate on the fixed evaluation block, scaled to the whole data.

        Deterministic in the lower-bound mode; the Monte Carlo modes draw from a generator
        seeded the same at every check (common random numbers).
        """
        p = self.p
        batch, idx, gidx = self._eval_block()
        coords, groups = self._at(idx)
        mean, var = self.prior.marginals(idx, coords, groups)
        W = self.loadings() if gidx is None else self.loadings()[gidx]
        gen = torch.Generator(device=self.device).manual_seed(p["random_state"] + 1)
        ll = expected_log_likelihood(batch, mean, var, W, mode=p["mode"],
                                     num_samples=p["num_samples"], generator=gen)
        return float(self._scale(batch) * ll - self.prior.kl(idx))

    def _converged(self) -> bool:
        """Two consecutive checks each changed the evaluation ELBO by less than tol, relative."""
        tol = self.p["tol"]
        return tol > 0 and all(self.relative_change(back) < tol for back in (0, 1))

    def relative_change(self, back: int = 0) -> float:
        """Relative change between checks ``-2 - back`` and ``-1 - back`` (NaN if too few)."""
        c = self.checks
        if len(c) < 2 + back:
            return float("nan")
        new, old = c[-1 - back], c[-2 - back]
        return abs(new - old) / max(abs(old), 1e-300)

    @torch.no_grad()
    def heldout_deviance(self) -> float:
        """Poisson deviance of the validation spots under the GP's predicted mean factors."""
        batch, x, g = self.validation
        F = self.prior.predict(x, g, return_var=False)
        return poisson_deviance(batch, F, self.loadings())

    def _patience_used(self) -> int:
        """Checks since the last one that improved the best deviance by the minimum delta."""
        best, since = math.inf, 0
        for _, dev in self.validation_history:
            if dev < best * (1 - VALIDATION_MIN_DELTA):
                best, since = dev, 0
            else:
                since += 1
        return since

    def _validate(self, it: int) -> bool:
        """Record a held-out check; True when patience has run out."""
        self.validation_history.append((it, self.heldout_deviance()))
        since = self._patience_used()
        if since == 0:
            self._best = self.state_dict()
        return since >= self.p["patience"]

    def result(self) -> _Result:
        with torch.no_grad():
            W = self.loadings().detach().clone()
        converged = self._reason in ("tol", "validation")
        return _Result(W, list(self.history), converged, self._reason == "callback", self._reason,
                       list(self.validation_history))

    def _roll_back(self, it: int, value: float) -> None:
        """Restore the last state with a finite ELBO and raise :class:`NonFiniteELBOError`."""
        p = self.p
        good = self._good
        if good is not None:
            self.load_state_dict(good)
        kept = len(self.history)
        self._publish_loadings()
        hint = ("a smaller training.learning_rate (now " f"{p['learning_rate']:g})"
                + ("" if p["dtype"] == torch.float64 else " or training.dtype: float64"))
        raise NonFiniteELBOError(
            f"the ELBO became {value} at iteration {it}. The model keeps the last finite state "
            f"(iteration {kept}); resume from its checkpoint with {hint}", it, kept)

    def run(self, callback: Optional[Callback], start: float) -> _Result:
        p, verbose = self.p, self.p["verbose"]
        w = p["tol_window"]
        history = self.history    # non-empty when resuming from a checkpoint
        first = len(history) + 1
        batches = self._batches()
        t_loop = time.perf_counter()
        val_every = p["validation_every"] if self.validation is not None else 0
        self._reason = "max_iter"
        for it in range(first, p["max_iter"] + 1):
            if self._good is None or it % self.SNAPSHOT_EVERY == 1:
                pending = self.state_dict()
            else:
                pending = None
            batch, idx, gidx = next(batches)
            value = self._step(batch, idx, gidx)
            if not math.isfinite(value):
                self._roll_back(it, value)
            if pending is not None:
                self._good = pending     # its ELBO (this iteration's, before the step) is finite
            history.append(value)
            done = False
            if it % w == 0:
                check = self.evaluate_elbo() if self._eval_block()[0] is not self.full else \
                    sum(history[-w:]) / len(history[-w:])
                self.checks.append(check)
                if self._converged():
                    self._reason, done = "tol", True
            if val_every and it % val_every == 0 and self._validate(it):
                self._reason, done = "validation", True
            if callback is not None and callback(it, value) is True:
                self._reason, done = "callback", True
            if it == p["max_iter"]:
                done = True
            if verbose and (it % p["log_every"] == 0 or done):
                elapsed = time.perf_counter() - t_loop
                rate = (it - first + 1) / max(elapsed, 1e-9)
                rel = self.relative_change()
                change = "n/a    " if rel != rel else f"{rel:.1e}"  # undefined until 2 checks exist
                val = (f"  heldout dev {self.validation_history[-1][1]:.5g}"
                       if self.validation_history else "")
                eta = "" if done else f"  ETA <= {_duration((p['max_iter'] - it) / rate)}"
                print(f"iter {it:>5d}/{p['max_iter']}  ELBO {value: .4e}  rel.change {change}"
                      f"{val}  {rate:.2f} it/s{eta}", flush=True)
            if done:
                break
        if self._reason == "validation" and self._best is not None:
            # early stopping keeps the best checked state (and the ELBO history up to it)
            validation = self.validation_history
            self.load_state_dict(self._best)
            self.validation_history = validation
        self._good = self._best = None
        return self.result()
