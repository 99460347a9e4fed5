"""The training loop: natural-gradient or optimiser steps on the ELBO, stopping rules, state.

Training maximises the ELBO ``E_q[log p(Y | F, W)] - KL(q(F) || p(F))``:

* the variational parameters of the prior module take natural-gradient steps
  (:mod:`sf_mlflow.models.natural`, the SVGP default) or optimiser steps (Adam...) on
  ``-ELBO / N``, the per-spot loss, as is usual for variational GPs;
* the loadings either take a multiplicative minorise-maximise step every
  iteration (``loadings_mode="multiplicative"``), computed from the same factors
  (or Monte Carlo draws) as that iteration's ELBO, i.e. before the optimiser
  step, which lets both share one sparse evaluation of R; or are ``softplus`` of
  raw parameters optimised with the rest (``"gradient"``). On spot mini-batches
  the step goes through running averages of its statistics (online EM), see
  ``Trainer._init_statistics``;
* mini-batches of spots and genes are drawn in a fresh order every epoch; the likelihood
  is scaled by ``N/B * D/Db`` so the ELBO estimate is unbiased (A: :mod:`~.interp_cache`).

:class:`Trainer` is the explicit fit state. It knows nothing of the estimator
(:class:`sf_mlflow.models.pnmf.PNMF`), which builds it, reads its state and result,
and wraps its checkpoints. Its data-parallel variant
(:class:`~.distributed.DistributedTrainer`) fills the hooks that are identities here
(``_spots_in``, ``_kl``, ``_total``, ``_reduce_grads``, ``_agree``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from sf_mlflow.errors import ModelError
from sf_mlflow.models.batching import IndexStream, literal_state
from sf_mlflow.models.hybrid import validation_predictor
from sf_mlflow.models.interp_cache import InterpCache
from sf_mlflow.models.likelihood import CountBatch, expected_log_likelihood, likelihood_and_update
from sf_mlflow.models.priors import FactorPrior
from sf_mlflow.models.settings import curvature_fraction, resolve_batch_size
from sf_mlflow.models import progress
from sf_mlflow.models.progress import STEP, TRAINING, current_phase, duration_text, phase
from sf_mlflow.models.stopping import VALIDATION_MIN_DELTA, StoppingRules  # noqa: F401 (re-export)

__all__ = ["Trainer", "FitResult", "FitState", "ConvergenceWarning", "NonFiniteELBOError", "IndexStream"]

#: Spots of the subset the loadings' running statistics start from (see ``_init_statistics``).
INIT_STAT_SPOTS = 5000

#: ``learning_rate: auto`` of natural steps on spot mini-batches (``Trainer.natural_step_size``):
#: the first step, and the epochs and power of its decay.
NATURAL_MINIBATCH_START = 0.5
NATURAL_DECAY_EPOCHS = 1.0
NATURAL_DECAY_POWER = 0.6


class ConvergenceWarning(UserWarning):
    """A fit reached ``max_iter`` before its stopping rule was met."""


#: A step at least this long (seconds) makes the next one interruptible: the trainer then
#: snapshots its state before each step (a copy, small beside such a step), so that a signal
#: can end the fit within the step instead of after it (minutes at Slide-seq scale).
INTERRUPTIBLE_STEP_S = 0.5


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


@dataclass(frozen=True)
class FitState:
    """What a fit callback receives after every iteration.

    iteration : int
        1-based count of the iterations done.
    elbo : float
        That iteration's ELBO estimate.
    checkpoint : callable () -> dict
        The full training state now, for ``fit(..., resume=...)``.
    """

    iteration: int
    elbo: float
    checkpoint: Callable[[], dict]


# ---- the optimisation loop -------------------------------------------------------------------

class FitResult:
    """What a fit ended with; ``early_stopped_at`` is the iteration at which patience ran out
    (None otherwise) and ``kept_iteration`` the one rolled back to (0: the start); ``history``
    then ends at the kept iteration (the start's ELBO alone when it is 0)."""

    def __init__(self, loadings: Tensor, history: list[float], converged: bool, stopped: bool,
                 reason: str, validation: list, early_stopped_at: Optional[int] = None,
                 kept_iteration: Optional[int] = None):
        self.loadings, self.history, self.converged, self.stopped = loadings, history, converged, stopped
        self.reason, self.validation = reason, validation
        self.early_stopped_at, self.kept_iteration = early_stopped_at, kept_iteration


class Trainer(StoppingRules):
    """One optimisation run of a prior's variational parameters (and of W, if trained).

    Holds the explicit fit state: the prior and loadings, the optimisers (natural
    gradients for q(v) and/or a torch optimiser), the mini-batch streams, the ELBO
    history, the stopping rule's checks and the last state known to be finite.
    """

    #: Iterations between the in-memory snapshots a non-finite ELBO rolls back to.
    SNAPSHOT_EVERY = 10

    def __init__(self, p: dict, prior: FactorPrior, W0: Tensor, Y: sp.csr_matrix,
                 full: CountBatch, gen: torch.Generator, coords: Optional[Tensor],
                 groups: Optional[Tensor], train_loadings: bool, validation=None):
        self.p, self.prior, self.Y, self.full, self.gen = p, prior, Y, full, gen
        self.coords, self.groups = coords, groups
        self.N, self.D = Y.shape
        self.device, self.dtype = full.device, full.values.dtype
        if p["batch_size"] == "auto":    # callers other than PNMF.fit (which says why)
            self.p = p = dict(p)
            resolve_batch_size(p, self.N, self.device)
        self.train_loadings = train_loadings
        self.gradient_loadings = train_loadings and p["loadings_mode"] == "gradient"
        self.natural, self._frozen, self._kernel_params = None, [], []
        # a hybrid prior's non-spatial part: its marginals are optimised with the optimiser
        self._rest = getattr(prior, "gaussian", None)
        if p["optimizer"] == "natural":
            from sf_mlflow.models.natural import NaturalGradient

            gp = getattr(prior, "spatial", prior)   # the SVGP prior, alone or a hybrid's part
            self.natural = NaturalGradient(gp, p["learning_rate"], generator=gen,
                                           curvature_fraction=curvature_fraction(p, self.N))
            # q(v) moves by natural steps only; autograd then skips the costly backward
            # pass through the variance term (restored by close()).
            variational = [prm for name, prm in gp.named_parameters()
                           if not name.startswith("kernel.")]
            self._frozen = [prm for prm in variational if prm.requires_grad]
            for prm in self._frozen:
                prm.requires_grad_(False)
            self._kernel_params = [prm for prm in gp.kernel.parameters() if prm.requires_grad]
            self._interp = InterpCache(gp, self.N, enabled=not self._kernel_params)
            params = self._kernel_params + ([] if self._rest is None else list(self._rest.parameters()))
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
        self.optimizer = opt_cls(params, lr=self._optimizer_lr()) if params else None
        # spots and genes draw from one generator, in a fixed interleaving
        self.rng = np.random.default_rng(p["random_state"])
        self.spot_stream = IndexStream(self.N, p["batch_size"], p["shuffle"], self.rng)
        self.gene_stream = IndexStream(self.D, p["y_batch_size"], p["shuffle"], self.rng)
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
            self._predict_val = validation_predictor(prior, coords, self.validation[1])
        self._eval = None
        self._good: Optional[dict] = None      # last state whose ELBO was finite
        self._best: Optional[dict] = None      # best state by held-out deviance
        self._reason = "max_iter"
        self.early_stopped_at: Optional[int] = None
        self.kept_iteration: Optional[int] = None
        self.deadline: Optional[float] = None  # time.perf_counter() at which the budget ends

    def _optimizer_lr(self) -> float:
        """Step size of the torch optimiser: the learning rate, or beside natural steps the
        Adam step of the kernel hyperparameters and a hybrid's Gaussian part."""
        p = self.p
        return p.get("adam_learning_rate", p["learning_rate"]) if self.natural else p["learning_rate"]

    def natural_step_size(self, iteration: int) -> float:
        """The natural-gradient step gamma at ``iteration`` (1-based).

        A number: that number. ``auto``: 1 on full batches (the exact update of a conjugate
        model; the trust region keeps the Poisson steps safe). On spot mini-batches a full
        step would replace q(v) by one batch's estimate, so gamma decreases as
        ``max(rho, 1 / (1 + (t - 1) rho / NATURAL_DECAY_EPOCHS)^NATURAL_DECAY_POWER)`` scaled
        by NATURAL_MINIBATCH_START, with ``rho = B / N`` the batch's share: a running average
        whose memory grows from a few batches to about an epoch.
        """
        p = self.p
        if not p.get("learning_rate_auto"):
            return float(p["learning_rate"])
        rho = min(1.0, (p["batch_size"] or self.N) / self.N)
        if rho >= 1.0:
            return 1.0
        decay = (1.0 + (iteration - 1) * rho / NATURAL_DECAY_EPOCHS) ** (-NATURAL_DECAY_POWER)
        return float(max(rho, NATURAL_MINIBATCH_START * decay))

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
                group["lr"] = self._optimizer_lr()
        if self.natural is not None:
            if state.get("natural") is not None:
                self.natural.load_state_dict(state["natural"])
            else:
                self.natural.reset()
        self.gen.set_state(state["torch_generator"])
        self.rng.bit_generator.state = literal_state(state["numpy_generator"])
        self.spot_stream.load_state_dict(state["spot_stream"])
        self.gene_stream.load_state_dict(state["gene_stream"])
        if "stat_s" in state:
            self.stat_s, self.stat_t = state["stat_s"].to(dev, dt), state["stat_t"].to(dev, dt)
        elif hasattr(self, "stat_s"):
            del self.stat_s, self.stat_t
        self.history = [float(v) for v in state["history"]]
        self.checks = [float(v) for v in state.get("checks", [])]
        self.validation_history = [(int(i), float(v)) for i, v in state.get("validation", torch.empty(0, 2)).tolist()]

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
        return (self.N / self._spots_in(batch)) * (self.D / batch.n_genes)

    # ---- hooks of the data-parallel trainer (sf_mlflow.models.distributed): identities here --

    def _spots_in(self, batch: CountBatch) -> int:
        """Spots of the step's whole batch (all ranks' shares together)."""
        return batch.n_spots

    def _kl(self, module: FactorPrior, idx: Tensor) -> Tensor:
        """This process's share of ``module``'s KL term of the step."""
        return module.kl(idx)

    def _total(self, value: Tensor) -> Tensor:
        """A sum over the step's spots, completed over all ranks."""
        return value

    def _reduce_grads(self) -> None:
        """Complete the optimiser's gradients over all ranks (before its step)."""

    def _agree(self, stop: bool) -> bool:
        """Whether every rank stops (any rank asking stops all)."""
        return stop

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
        elbo = self._scale(batch) * ll - self._kl(prior, idx)
        total = self._total(elbo.detach())
        if not torch.isfinite(total):
            return float(total)     # no step from a non-finite state
        self.optimizer.zero_grad(set_to_none=True)
        (-elbo / self.N).backward()
        self._reduce_grads()
        self.optimizer.step()
        self._project()
        if new_W is not None:
            self._update_loadings(new_W, mean.detach(), var.detach(), gidx, self._spots_in(batch))
        return float(total)

    def _natural_step(self, batch: CountBatch, idx: Tensor, gidx: Optional[Tensor]) -> float:
        """Natural-gradient step of q(v); Adam on trained kernel hyperparameters, on a hybrid
        prior's non-spatial part (the factors after the spatial ones) and on raw W."""
        prior, rest, hyper = self.prior, self._rest, bool(self._kernel_params)
        coords, groups = self._at(idx)
        with torch.set_grad_enabled(hyper):
            mean, var, At = self._interp.marginals(idx, coords, groups)
        K = mean.shape[0]
        if rest is not None:
            mean_r, var_r = rest.marginals(idx)
            m = torch.cat([mean.detach(), mean_r.detach()]).requires_grad_(True)
            v = torch.cat([var.detach(), var_r.detach()]).requires_grad_(True)
        else:
            m = mean.detach().requires_grad_(True)
            v = var.detach().requires_grad_(True)
        ll, new_W = self._likelihood(batch, m, v, gidx)
        scaled = self._scale(batch) * ll
        with torch.no_grad():
            elbo = float(self._total(scaled.detach() - self._kl(prior, idx)))
        if not math.isfinite(elbo):
            return elbo
        leaves = [m, v] + ([self.raw_loadings] if self.gradient_loadings else [])
        grads = torch.autograd.grad(scaled, leaves)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if self.gradient_loadings:
                self.raw_loadings.grad = -grads[2] / self.N
            outputs, seeds = [], []
            if hyper:
                outputs += [mean, var]
                seeds += [-grads[0][:K] / self.N, -grads[1][:K] / self.N]
            if rest is not None:
                # d(-ELBO/N) of the Gaussian part: its likelihood gradients, plus its KL term
                outputs += [mean_r, var_r, self._kl(rest, idx)]
                seeds += [-grads[0][K:] / self.N, -grads[1][K:] / self.N,
                          torch.tensor(1.0 / self.N, dtype=self.dtype, device=self.device)]
            if outputs:
                torch.autograd.backward(outputs, seeds)
            self._reduce_grads()
            self.optimizer.step()
            self._project()
        # q(v) lives in whitened coordinates, so a kernel step leaves it (and the precision the
        # natural optimiser carries) valid: only A changes, and the next step uses the new one.
        self.natural.lr = self.natural_step_size(len(self.history) + 1)
        self.natural.step(At.detach(), grads[0][:K], grads[1][:K], self._spots_in(batch))
        if new_W is not None:
            self._update_loadings(new_W, m.detach(), v.detach(), gidx, self._spots_in(batch))
        return elbo

    def _project(self) -> None:
        """Keep trained kernel hyperparameters inside the bounds the fit's start set."""
        gp = getattr(self.prior, "spatial", self.prior)
        bounds = getattr(gp, "bounds", None)
        if bounds is not None and gp.kernel.trainable:
            gp.kernel.project(bounds["lengthscale"], bounds["sigma"], bounds["group_diff"])

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
        t_batch = self._total(torch.exp(mean + 0.5 * var).sum(dim=1)) / rho    # (L,), scaled to N
        rows = slice(None) if gidx is None else gidx
        s = (1 - rho) * self.stat_s[rows] + rho * (new_W * t_batch)
        t = (1 - rho) * self.stat_t[rows] + rho * t_batch
        self.stat_s[rows], self.stat_t[rows] = s, t
        self.W[rows] = s / t

    def result(self) -> FitResult:
        with torch.no_grad():
            W = self.loadings().detach().clone()
        converged = self._reason in ("tol", "validation")
        stopped = self._reason in ("callback", "interrupted")
        return FitResult(W, list(self.history), converged, stopped, self._reason,
                         list(self.validation_history), self.early_stopped_at, self.kept_iteration)

    def _roll_back(self, it: int, value: float) -> None:
        """Restore the last state with a finite ELBO and raise :class:`NonFiniteELBOError`."""
        p = self.p
        good = self._good
        if good is not None:
            self.load_state_dict(good)
        kept = len(self.history)
        hint = ("a smaller training.learning_rate (now " f"{p['learning_rate']:g})"
                + ("" if p["dtype"] == torch.float64 else " or training.dtype: float64"))
        raise NonFiniteELBOError(
            f"the ELBO became {value} at iteration {it}. The model keeps the last finite state "
            f"(iteration {kept}); resume from its checkpoint with {hint}", it, kept)

    def run(self, callback: Optional[Callable[[int, float], Optional[bool]]]) -> FitResult:
        """Iterate until a stopping rule, ``max_iter``, the ``deadline`` (``time.perf_counter``
        seconds; the fit's time budget) or ``callback(iteration, elbo)`` returning True."""
        p, verbose = self.p, self.p["verbose"]
        w = p["tol_window"]
        history = self.history    # non-empty when resuming from a checkpoint
        first = len(history) + 1
        batches = self._batches()
        self._clock = {"loop": time.perf_counter(), "printed": time.perf_counter(), "first": first}
        val_every = p["validation_every"] if self.validation is not None else 0
        self._reason = "max_iter"
        self.early_stopped_at = self.kept_iteration = None
        if val_every and not self.validation_history:
            # the start's held-out deviance (iteration 0), the baseline training must improve
            # on: early stopping rolls back to the start when no later check beats it
            self._validate(0)
            if verbose:
                print(f"iter     0/{p['max_iter']}  heldout dev {self.validation_history[0][1]:.5g} "
                      "(the start)", flush=True)
        slow = False             # the last step took INTERRUPTIBLE_STEP_S or more
        undoable = self.INTERRUPTIBLE and current_phase() == TRAINING   # (not the PNMF start)
        for it in range(first, p["max_iter"] + 1):
            pending, started = None, False
            try:
                t_step = time.perf_counter()
                # a slow step's phase covers its snapshot too: a signal then never waits for it
                with phase(STEP) if slow and undoable else contextlib.nullcontext():
                    if (slow and undoable) or self._good is None or it % self.SNAPSHOT_EVERY == 1:
                        pending = self.state_dict()
                    started = True
                    batch, idx, gidx = next(batches)
                    value = self._step(batch, idx, gidx)
                slow = time.perf_counter() - t_step >= INTERRUPTIBLE_STEP_S
            except KeyboardInterrupt:
                # a signal handler (or Ctrl-C) cut the step short: back to a whole state, the
                # iteration's start (or the last snapshot), which a checkpoint can then keep;
                # before the step started the state is still the last iteration's, whole
                if started:
                    self.load_state_dict(pending if pending is not None else self._good)
                self._reason = "interrupted"
                raise
            if not math.isfinite(value):
                self._roll_back(it, value)
            if pending is not None:
                self._good = pending     # its ELBO (this iteration's, before the step) is finite
            history.append(value)
            done = False
            # held-out check first: the tol rule reads it
            patience_out = bool(val_every and it % val_every == 0 and self._agree(self._validate(it)))
            if it % w == 0:
                check = self.evaluate_elbo() if self._eval_block()[0] is not self.full else \
                    sum(history[-w:]) / len(history[-w:])
                self.checks.append(check)
                if self._agree(self._converged()):
                    self._reason, done = "tol", True
            if patience_out:
                self._reason, done = "validation", True
            if self._agree(callback is not None and callback(it, value) is True):
                self._reason, done = "callback", True
            if not done and self.deadline is not None and \
                    self._agree(time.perf_counter() >= self.deadline):
                if val_every and self.validation_history[-1][0] != it:
                    self._validate(it)     # the state the budget ends with, beside the best
                self._reason, done = "time_budget", True
            if it == p["max_iter"]:
                done = True
            if verbose:
                self._progress(it, value, done)
            if done:
                break
        self._keep_best()
        self._good = self._best = None
        return self.result()

    #: Whether a signal may cut a slow step short (not where ranks wait for each other).
    INTERRUPTIBLE = True

    def _progress(self, it: int, value: float, done: bool) -> None:
        """The progress line of iteration ``it``: every ``log_every`` iterations, every
        :data:`~sf_mlflow.models.progress.PROGRESS_EVERY_S` seconds when they take longer, and at
        the end."""
        p, clock, now = self.p, self._clock, time.perf_counter()
        if not (it % p["log_every"] == 0 or done or now - clock["printed"] >= progress.PROGRESS_EVERY_S):
            return
        clock["printed"] = now
        rate = (it - clock["first"] + 1) / max(now - clock["loop"], 1e-9)
        rel = self.relative_change()
        change = "n/a    " if rel != rel else f"{rel:.1e}"  # undefined until 2 checks exist
        val = (f"  heldout dev {self.validation_history[-1][1]:.5g}"
               if self.validation_history else "")
        left = (p["max_iter"] - it) / rate
        if self.deadline is not None:
            left = min(left, max(self.deadline - now, 0.0))
        eta = "" if done else f"  ETA <= {duration_text(left)}"
        print(f"iter {it:>5d}/{p['max_iter']}  ELBO {value: .4e}  rel.change {change}"
              f"{val}  {rate:.2f} it/s{eta}", flush=True)
