"""PNMF: probabilistic non-negative matrix factorisation with a variational factor prior.

``Y_nd ~ Poisson(sum_l W_dl exp(F_ln))`` with non-negative loadings W (D, L) and
log-factors F (L, N) under a Gaussian (non-spatial) or SVGP (spatial) prior. The
estimator follows scikit-learn's conventions: ``__init__`` only stores the hyperparameters,
:meth:`PNMF.fit` validates them (through the constraint table of :mod:`sf_mlflow.models.settings`,
which the config shares), and learned attributes end in ``_``.

This module is the estimator's front; beside it: :mod:`~.inputs` (data checks), :mod:`~.start`
(the spatial start), :mod:`~._training` (the loop and its explicit state) and
:mod:`~.persistence` (save, load, checkpoints).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from sf_mlflow.constraints import checked_fields, param
from sf_mlflow.errors import ConfigError, DataError, ModelError
from sf_mlflow.models import persistence
from sf_mlflow.models._training import ConvergenceWarning, FitResult, FitState, NonFiniteELBOError, Trainer
from sf_mlflow.models.stopping import not_converged_message
from sf_mlflow.models.device import prepare_device, resolve_device
from sf_mlflow.models.distributed import Communicator, DistributedTrainer
from sf_mlflow.models.initialization import fixed_point_scale, initial_state
from sf_mlflow.models.inputs import (check_coordinates, check_counts, check_groups, check_validation,
                                     validated_dtype)
from sf_mlflow.models.likelihood import CountBatch
from sf_mlflow.models.prediction import predict_factors
from sf_mlflow.models.priors import GaussianPrior
from sf_mlflow.models.progress import TRAINING, phase
from sf_mlflow.models.start import initial_prior
from sf_mlflow.models.settings import (SVGP, ModelParams, TrainingParams, check_spatial_components,
                                       resolve_batch_size, resolve_optimizer, spatial_settings)

__all__ = ["PNMF", "FitState", "ConvergenceWarning", "NonFiniteELBOError"]

_M, _T = ModelParams(), TrainingParams()


@dataclass
class _EstimatorParams:
    """Hyperparameters of the estimator alone (the config has ``seed`` and its own cadence)."""

    random_state: int = param(0, 0, doc="seed of the initialisation, mini-batches and draws")
    verbose: bool = param(False, doc="print progress lines")


Callback = Callable[[FitState], Optional[bool]]


class PNMF:
    """Poisson factor model with non-negative loadings and a variational factor prior.

    Parameters
    ----------
    n_components : int
        Number of factors L.
    prior : "gaussian", "svgp" or SVGP
        Independent N(0, 1) log-factors (``"gaussian"``), or a multi-group sparse
        variational GP over the spot coordinates described by a settings object
        :class:`sf_mlflow.models.settings.SVGP` (kernel, inducing points, variational
        options; ``"svgp"`` is ``SVGP()``). ``set_params(prior__lengthscale=2.0)``
        changes one of its settings.
    mode : {"lower-bound", "expanded", "simple"}
        How ``E_q[log p(Y | F, W)]`` is computed, see
        :func:`sf_mlflow.models.likelihood.expected_log_likelihood`. The KL term is
        always analytic.
    num_samples : int
        Monte Carlo draws per iteration for the expanded and simple modes.
    loadings_mode : {"multiplicative", "gradient"}
        Multiplicative minorise-maximise updates of W, or ``W = softplus(raw)``
        optimised with the variational parameters.
    kl_weight : float
        Weight of the KL term for either prior; 1 (default) is the true ELBO.
    init : {"nndsvda", "random"}
        Where the KL-NMF start begins (:mod:`sf_mlflow.models.initialization`): the
        counts' leading singular vectors (default) or a random draw from ``random_state``.
    spatial_components : int or None
        With the SVGP prior, K in [0, L]: the first K factors are spatial (SVGP prior)
        and the other L - K non-spatial (Gaussian prior), fitted jointly with one W
        (the hybrid model NSFH, :mod:`sf_mlflow.models.hybrid`). None (default): all L
        factors follow ``prior``.
    max_iter : int
        Maximum number of iterations (one mini-batch each).
    learning_rate : float or "auto"
        Step size of the optimiser (``"auto"``: :func:`~sf_mlflow.models.settings.resolve_optimizer`).
        For ``"natural"`` it is the natural-gradient step
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
        fit has converged when two consecutive checks, ``tol_window`` iterations apart,
        each changed it by less than ``tol`` relative.
    tol_window : int
    validation_every : int
        With ``fit(..., validation=...)``: iterations between held-out Poisson
        deviance checks (0 = none). ``validation_history_`` records them.
    patience : int
        Stop (``stop_reason_ = "validation"``) once that many consecutive checks have
        not improved the best held-out deviance by ``VALIDATION_MIN_DELTA``
        relative; the model is rolled back to the best checked state.
    dtype : {"float32", "float64"}; device : {"cpu", "gpu", "cuda", "auto"}
    batch_size, y_batch_size : int, None or "auto" (batch_size only)
        Spots and genes per mini-batch; ``None`` uses all (auto: :func:`~.settings.resolve_batch_size`).
    curvature_fraction : float or "auto"
        With natural steps: the share of a batch's spots from which each step estimates
        the curvature (:class:`~sf_mlflow.models.natural.NaturalGradient`); auto: all on
        full batches, a quarter on spot mini-batches (:func:`~.settings.curvature_fraction`).
    shuffle : bool
        Draw mini-batches in a new random order every epoch.
    log_every : int
    time_budget : float or str or None
        Wall-clock limit of one :meth:`fit` (seconds, or e.g. ``"20m"``; initialisation counts):
        then it stops, not converged, keeping its best held-out check's state (if any).
    distributed : bool
        Data-parallel fit in a torchrun worker (:mod:`sf_mlflow.models.distributed`).
    random_state : int
        Seeds the initialisation, mini-batches, draws and inducing points (not the global RNGs).
    verbose : bool
        Print progress lines with an ETA: during initialisation and every ``log_every``
        iterations (at least every 10 s) and at the end.

    The defaults are those of :class:`~sf_mlflow.models.settings.ModelParams` and
    :class:`~sf_mlflow.models.settings.TrainingParams`, which the config shares.

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
    stop_reason_ : {"tol", "validation", "max_iter", "callback", "time_budget"}
    early_stopped_at_, kept_iteration_ : int or None
        With ``stop_reason_`` "validation" (or "time_budget"): the iteration at which patience
        (the budget) ran out, and the best held-out check's the model kept (0: the start).
    start_report_ : dict
        How a spatial fit started (:func:`sf_mlflow.models.start.initial_prior`); row 0 of
        ``validation_history_`` (iteration 0) is the start's held-out deviance.
    validation_history_ : ndarray, (n_checks, 2)
        Rows of (iteration, held-out Poisson deviance); empty without validation.
    num_inducing_ : int or None
        M of the fitted SVGP prior (None for the Gaussian prior).
    spatial_factors_ : ndarray of bool, (L,)
        Which factors follow the GP prior (a hybrid's first K; all or none otherwise).
    train_coordinates_ : ndarray, (N, 2), float64, or None
        The coordinates passed to :meth:`fit`.
    train_groups_ : ndarray of int, (N,), or None
        The group codes the fit used (None without groups or with ``SVGP(groups=False)``).
    inducing_points_, inducing_groups_ : ndarray, (M, 2) and (M,), or None
    fit_time_ : float
        Seconds spent in :meth:`fit`, initialisation included.
    batch_size_ : int or None
        Spots a step the fit used (None: all); ``batch_size_rule_`` says why.
    device_ : torch.device
    n_spots_, n_features_in_ : int
        N and D.
    """

    def __init__(self, n_components=_M.n_components, *, prior="gaussian", mode=_M.mode,
                 num_samples=_M.num_samples, loadings_mode=_M.loadings_mode, kl_weight=_M.kl_weight,
                 init=_M.init, spatial_components=_M.spatial_components, max_iter=_T.max_iter,
                 learning_rate=_T.learning_rate, optimizer=_T.optimizer,
                 tol=_T.tol, tol_window=_T.tol_window, validation_every=_T.validation_every,
                 patience=_T.patience, dtype=_T.dtype, device=_T.device, batch_size=_T.batch_size,
                 y_batch_size=_T.y_batch_size, curvature_fraction=_T.curvature_fraction,
                 shuffle=_T.shuffle, log_every=_T.log_every,
                 time_budget=_T.time_budget, distributed=_T.distributed, random_state=0, verbose=False):
        self.n_components = n_components
        self.prior = prior
        self.mode = mode
        self.num_samples = num_samples
        self.loadings_mode = loadings_mode
        self.kl_weight, self.init = kl_weight, init
        self.spatial_components = spatial_components
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.tol, self.tol_window = tol, tol_window
        self.validation_every, self.patience = validation_every, patience
        self.dtype, self.device = dtype, device
        self.batch_size, self.y_batch_size = batch_size, y_batch_size
        self.curvature_fraction = curvature_fraction
        self.shuffle, self.log_every = shuffle, log_every
        self.time_budget = time_budget
        self.distributed = distributed
        self.random_state, self.verbose = random_state, verbose

    # ---- scikit-learn parameter protocol -----------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyperparameters as a dict; with ``deep``, also ``prior__<name>`` for the SVGP settings."""
        params = {name: getattr(self, name) for name in self._param_names()}
        if deep and isinstance(self.prior, SVGP):
            params.update({f"prior__{k}": v for k, v in self.prior.to_dict().items()})
        return params

    def set_params(self, **params) -> "PNMF":
        """Set hyperparameters by name (``prior__<name>`` for one SVGP setting); unknown names raise."""
        valid = set(self._param_names())
        for key, value in params.items():
            if key.startswith("prior__"):
                spatial = spatial_settings(self.prior)
                name = key[len("prior__"):]
                if spatial is None or name not in spatial.to_dict():
                    raise ConfigError(f"PNMF has no hyperparameter {key!r}: prior__<name> needs a "
                                      "spatial prior and one of the SVGP settings "
                                      f"{', '.join(SVGP().to_dict())}")
                self.prior = SVGP(**{**spatial.to_dict(), name: value})
            elif key not in valid:
                raise ConfigError(f"PNMF has no hyperparameter {key!r}; valid: {', '.join(sorted(valid))}")
            else:
                setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        default = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{k}={v!r}" for k, v in self.get_params(deep=False).items() if v != default.get(k)]
        return f"{type(self).__name__}({', '.join(changed)})"

    # ---- validation --------------------------------------------------------------------------

    def _validated(self) -> dict[str, Any]:
        """Checked and normalised hyperparameters; raises ConfigError naming the bad one.

        ``spatial`` is the validated SVGP settings (None for the Gaussian prior), ``prior``
        ``"svgp"`` or ``"gaussian"`` and ``dtype`` a torch dtype.
        """
        dtype = validated_dtype(self.dtype)
        own = {}
        for table in (ModelParams, TrainingParams, _EstimatorParams):
            names = [f.name for f in dataclasses.fields(table)]
            values = {n: getattr(self, n) for n in names}
            if table is TrainingParams:
                values["dtype"] = str(dtype).replace("torch.", "")
            own.update(checked_fields(table(**values), "PNMF"))
        spatial = spatial_settings(self.prior)
        if spatial is not None:
            spatial = SVGP(**spatial.to_dict())   # validates settings changed after construction
        p = {**own, "dtype": dtype, "spatial": spatial, "prior": "gaussian" if spatial is None else "svgp"}
        L, K = p["n_components"], p["spatial_components"]
        check_spatial_components(L, spatial is not None, K, "PNMF: ")
        # n_spatial: factors under the GP prior; hybrid: the two priors are combined
        p.update(n_spatial=0 if spatial is None else L if K is None else K, hybrid=K is not None)
        resolve_optimizer(p, self.learning_rate)
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
            Spot positions; required by the spatial prior. The Gaussian prior ignores
            them in the fit but keeps them (``train_coordinates_``) for :meth:`predict_at`.
        groups : array-like of int, (N,), optional
            Group codes ``0..G-1`` for the multi-group kernel.
        callback : callable ``(state: FitState) -> bool | None``, optional
            Called after every iteration with the live :class:`FitState` (iteration,
            ELBO, ``checkpoint()``); ``prior_`` and ``loadings_`` are the live training
            state meanwhile. Returning True stops training (``stopped_early_``).
        resume : dict or path, optional
            A checkpoint (``FitState.checkpoint()``, :meth:`checkpoint`,
            :meth:`save_checkpoint`) of a fit of the same model on the same data:
            training continues from its iteration and, on the CPU, ends with the same
            result as a fit that was never interrupted. ``max_iter``, ``tol``, ``tol_window``,
            ``learning_rate``, ``validation_every``, ``patience``, ``verbose``, ``log_every`` may differ.
        validation : tuple ``(Y_val, coordinates_val, groups_val)``, optional
            Held-out spots (``groups_val`` may be None) scored every
            ``validation_every`` iterations by the Poisson deviance of the rates
            :meth:`predict_at` gives them (SVGP prior, hybrid too); with ``patience`` this
            is early stopping.

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
        Yc = check_counts(Y)
        n, d = Yc.shape
        X, g = check_coordinates(coordinates, n), check_groups(groups, n)
        if p["spatial"] is not None and X is None:
            raise DataError("coordinates = None, but prior = 'svgp' needs the spot coordinates: "
                            f"pass an array of shape (n_spots, 2) = ({n}, 2)")
        if validation is not None and p["spatial"] is None:
            raise ConfigError("validation needs prior = 'svgp': held-out spots are scored from "
                              "factors predicted at their coordinates (predict_at)")
        val = check_validation(validation, d, g is not None and p["spatial"] is not None
                               and p["spatial"].groups and p["n_spatial"] > 0)
        if callback is not None and not callable(callback):
            raise ConfigError(f"callback = {callback!r} is not callable; expected f(state) -> bool")
        with phase("initialisation"):
            trainer = self._start(p, Yc, X, g, val)
        trainer.deadline = None if p["time_budget"] is None else start + p["time_budget"]
        if resume is not None:
            trainer.load_state_dict(persistence.checked_checkpoint(self, resume, n, d)["trainer"])
            self._loadings_t = trainer.loadings().detach()
        try:
            with phase(TRAINING):
                result = trainer.run(self._on_iteration(trainer, callback))
        except (NonFiniteELBOError, KeyboardInterrupt):
            # The trainer rolled back to its last finite (or last whole) state: keep it as the
            # fitted model and as a checkpoint to resume from, instead of losing the work.
            self._stopped_state = trainer.state_dict()
            self._finish(trainer.result(), start)
            raise
        finally:
            trainer.close()
        # Kept only when the fit may be continued, so a finished model stays small.
        self._stopped_state = trainer.state_dict() if result.stopped else None
        self._finish(result, start)
        if message := not_converged_message(result, p, val is not None):
            warnings.warn(message, ConvergenceWarning, stacklevel=2)
        return self

    def _start(self, p: dict, Yc, X: Optional[np.ndarray], g: Optional[np.ndarray], val) -> Trainer:
        """Initialise the prior and loadings, set the learned attributes, build the trainer."""
        device, dtype = prepare_device(resolve_device(p["device"])), p["dtype"]
        comm = Communicator.join(device) if p["distributed"] else None   # cuda:LOCAL_RANK
        device = device if comm is None else comm.device
        self.batch_size_rule_ = p["batch_size_rule"] = resolve_batch_size(p, Yc.shape[0], device)
        self.batch_size_ = p["batch_size"]
        gen = torch.Generator(device=device).manual_seed(p["random_state"])
        full = CountBatch.from_scipy(Yc, device=device, dtype=dtype)
        spatial = p["spatial"]
        coords_t = None if X is None else torch.as_tensor(X, dtype=dtype, device=device)
        groups_t = None if g is None else torch.as_tensor(g, device=device)
        used_groups = groups_t if spatial is not None and spatial.groups and p["n_spatial"] else None
        say = (lambda msg: print(msg, flush=True)) if p["verbose"] else None
        prior, W0, self.start_report_ = initial_prior(p, Yc, full, gen, coords_t, used_groups, val, say)
        self.prior_ = prior
        self.device_ = device
        self.n_spots_, self.n_features_in_ = Yc.shape
        self._coordinates, self._groups = coords_t, used_groups
        self.train_coordinates_ = X
        self.train_groups_ = None if used_groups is None else g
        self._loadings_t = W0
        self.num_inducing_ = getattr(prior, "num_inducing", None)
        trainer = Trainer if comm is None else partial(DistributedTrainer, comm=comm)
        return trainer(p, self.prior_, W0, Yc, full, gen, coords_t, used_groups,
                       train_loadings=True, validation=val)

    def _on_iteration(self, trainer: Trainer, callback: Optional[Callback]):
        """The trainer's per-iteration hook: publish the live loadings, then call ``callback``."""
        def hook(iteration: int, elbo: float) -> Optional[bool]:
            self._loadings_t = trainer.loadings().detach()
            if callback is None:
                return None
            return callback(FitState(iteration, elbo,
                                     lambda: persistence.checkpoint_blob(self, trainer.state_dict())))
        return hook

    def _finish(self, result: FitResult, start: float) -> None:
        self._loadings_t = result.loadings
        self.elbo_history_ = np.asarray(result.history, dtype=np.float64)
        self.n_iter_ = len(result.history)
        self.converged_ = result.converged
        self.stopped_early_ = result.stopped
        self.stop_reason_ = result.reason
        self.validation_history_ = np.asarray(result.validation, dtype=np.float64).reshape(-1, 2)
        self.early_stopped_at_, self.kept_iteration_ = result.early_stopped_at, result.kept_iteration
        self.fit_time_ = time.perf_counter() - start

    # ---- results -----------------------------------------------------------------------------

    @property
    def is_spatial(self) -> bool:
        """True for the SVGP prior with all factors spatial: factors are a function of
        position, predictable anywhere (False for a hybrid, see ``spatial_factors_``)."""
        return spatial_settings(self.prior) is not None and self.spatial_components is None

    @property
    def spatial_factors_(self) -> np.ndarray:
        """Which of the L factors follow the GP prior, bool (L,): with ``spatial_components`` K
        the first K, else all (SVGP prior) or none (Gaussian prior)."""
        self._check_fitted("spatial_factors_")
        p = self._validated()
        return np.arange(p["n_components"]) < p["n_spatial"]

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

    def _chunks(self, chunk_size: int):
        """(idx, coordinates, groups) of the training spots, ``chunk_size`` at a time."""
        for s in range(0, self.n_spots_, chunk_size):
            idx = torch.arange(s, min(s + chunk_size, self.n_spots_), device=self.device_)
            yield (idx, None if self._coordinates is None else self._coordinates[idx],
                   None if self._groups is None else self._groups[idx])

    @torch.no_grad()
    def _marginals(self, chunk_size: int = 10000) -> tuple[Tensor, Tensor]:
        """q(F) of all training spots: mean (L, N), var (L, N)."""
        means, variances = zip(*(self.prior_.marginals(*c) for c in self._chunks(chunk_size)))
        return torch.cat(means, dim=1), torch.cat(variances, dim=1)

    @torch.no_grad()
    def _means(self, chunk_size: int = 10000) -> Tensor:
        """Mean of q(F) at all training spots, (L, N) (no variances computed)."""
        return torch.cat([self.prior_.means(*c) for c in self._chunks(chunk_size)], dim=1)

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
        Yc = check_counts(Y_new, "Y_new")
        if Yc.shape[1] != self.n_features_in_:
            raise DataError(f"Y_new has {Yc.shape[1]} genes, the model was fitted with "
                            f"{self.n_features_in_}; expected shape (n_spots, {self.n_features_in_})")
        if p["spatial"] is not None:
            if coordinates is None:
                raise DataError("coordinates = None, but the svgp prior predicts factors from "
                                f"coordinates: pass an array of shape ({Yc.shape[0]}, 2)")
            return self.predict_at(coordinates, groups)
        device, dtype = self.device_, p["dtype"]
        gen = torch.Generator(device=device).manual_seed(p["random_state"])
        full = CountBatch.from_scipy(Yc, device=device, dtype=dtype)
        W = self._loadings_t.to(device=device, dtype=dtype)
        _, mu0 = initial_state(full, p["n_components"], gen, W_fixed=W)
        prior = GaussianPrior(Yc.shape[0], p["n_components"], mean=mu0, scale=fixed_point_scale(mu0, W),
                              kl_weight=p["kl_weight"]).to(device=device, dtype=dtype)
        Trainer(p, prior, W, Yc, full, gen, None, None, train_loadings=False).run(None)
        with torch.no_grad():
            return torch.exp(prior.mu).T.cpu().double().numpy()

    def predict_at(self, coordinates, groups=None, *, neighbours: int = 6, return_std: bool = False,
                   exp_mean: bool = False, chunk_size: int = 10000):
        """Factors at positions, from the positions (and groups) alone, (M, L).

        This is the one place that decides how factors are predicted where the model
        has not seen counts (held-out spots, the registered model's queries):

        * spatial (SVGP) prior: the GP predictive ``exp(E[F])`` at ``coordinates`` and
          ``groups`` (groups are needed when ``uses_groups_``, ignored otherwise);
        * hybrid (``spatial_components``): the spatial factors as the SVGP prior's, the
          others as the Gaussian prior's (std NaN);
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
        X = check_coordinates(coordinates, None, "coordinates")
        return predict_factors(self, X, groups, neighbours=neighbours, return_std=return_std,
                               exp_mean=exp_mean, chunk_size=chunk_size)

    def elbo(self) -> float:
        """The last ELBO estimate of training (see ``elbo_history_``)."""
        self._check_fitted("elbo")
        return float(self.elbo_history_[-1])

    # ---- checkpoints and persistence ---------------------------------------------------------

    def checkpoint(self) -> dict:
        """The training state of a fit that stopped early, to continue it with ``fit(..., resume=...)``.

        After a fit the callback stopped, or one that raised :class:`NonFiniteELBOError`.
        Inside a callback use ``state.checkpoint()``. Holds tensors, numbers and strings only.
        """
        if self.__dict__.get("_stopped_state") is None:
            raise ModelError("PNMF.checkpoint() needs a fit that the callback stopped early (or "
                             "that diverged); inside a fit callback use state.checkpoint()")
        return persistence.checkpoint_blob(self, self._stopped_state)

    def save_checkpoint(self, path) -> None:
        """Write :meth:`checkpoint` to ``path`` (readable with ``weights_only=True``)."""
        torch.save(self.checkpoint(), Path(path))

    @staticmethod
    def load_checkpoint(path) -> dict:
        """Read a checkpoint written by :meth:`save_checkpoint`."""
        return persistence.read_checkpoint(path)

    def save(self, path) -> None:
        """Write hyperparameters, learned state and attributes (see :mod:`~sf_mlflow.models.persistence`)."""
        self._check_fitted("save")
        persistence.save_model(self, path)

    @classmethod
    def load(cls, path, device: str = "cpu") -> "PNMF":
        """Read a model written by :meth:`save` onto ``device``."""
        return persistence.load_model(cls, path, device)
