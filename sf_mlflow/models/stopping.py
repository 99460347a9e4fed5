"""The stopping rules of a fit: ELBO checks on a fixed block, held-out deviance, patience.

A mixin of :class:`sf_mlflow.models._training.Trainer`, which owns the state it reads (the
ELBO checks, the held-out history, the best state) and calls these at its cadence.

* **tol**: every ``tol_window`` iterations the ELBO is evaluated on a fixed evaluation block
  (deterministic in the lower-bound mode), and the fit has converged when two consecutive
  checks changed it by less than ``tol``, relative, and, with held-out spots, the last
  held-out check did not improve on the one before by more than ``tol`` either: a flat
  ELBO does not end a fit whose held-out deviance still falls.
* **patience**: every ``validation_every`` iterations the held-out spots are scored; after
  ``patience`` checks without an improvement of the best by ``VALIDATION_MIN_DELTA`` the fit
  stops and is rolled back to the best check, which may be the start's (iteration 0: the
  fit then keeps its start, and its ELBO history is the start's ELBO alone).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sf_mlflow.models.likelihood import expected_log_likelihood, poisson_deviance

__all__ = ["StoppingRules", "VALIDATION_MIN_DELTA", "not_converged_message", "describe_stop"]

#: Relative improvement of the best held-out deviance that resets the patience count.
VALIDATION_MIN_DELTA = 1e-4


class StoppingRules:
    """The stopping-rule methods of the trainer (see the module docstring)."""

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
        """Two consecutive checks each changed the evaluation ELBO by less than tol, relative,
        and (with held-out spots) the held-out deviance no longer improves by more than tol."""
        tol = self.p["tol"]
        if not (tol > 0 and all(self.relative_change(back) < tol for back in (0, 1))):
            return False
        return not self.heldout_improving()

    def heldout_improving(self) -> bool:
        """With held-out checks: the last one improved on the one before by more than ``tol``,
        relative (or there are fewer than two yet). A flat ELBO then does not end the fit."""
        if self.validation is None or not self.p["validation_every"]:
            return False
        h = self.validation_history
        if len(h) < 2:
            return True
        prev, last = h[-2][1], h[-1][1]
        return (prev - last) > self.p["tol"] * abs(prev)

    def relative_change(self, back: int = 0) -> float:
        """Relative change between checks ``-2 - back`` and ``-1 - back`` (NaN if too few)."""
        c = self.checks
        if len(c) < 2 + back:
            return float("nan")
        new, old = c[-1 - back], c[-2 - back]
        return abs(new - old) / max(abs(old), 1e-300)

    @torch.no_grad()
    def heldout_deviance(self) -> float:
        """Poisson deviance of the validation spots under their predicted mean factors (GP
        predictive; a hybrid's non-spatial factors: the nearest training spots')."""
        batch, _, g = self.validation
        F = self._predict_val(g)
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
            self._best, self._best_iteration = self.state_dict(), it
        return since >= self.p["patience"]

    def _keep_best(self) -> None:
        """After patience ran out, or the time budget with held-out checks: keep the best
        checked state (and the ELBO history up to it)."""
        if self._reason not in ("validation", "time_budget") or self._best is None:
            return
        last = len(self.history)
        if self._reason == "time_budget" and self._best_iteration == last:
            return                       # the state the budget ended with is the best
        self.early_stopped_at, self.kept_iteration = last, self._best_iteration
        validation = self.validation_history
        self.load_state_dict(self._best)
        self.validation_history = validation
        if not self.history:      # the start was best: its ELBO stands for the history
            self.history = [self.evaluate_elbo()]
        if self.p["verbose"] and self._reason == "validation":
            print(f"{describe_stop(self._reason, last, self.kept_iteration)}: the held-out deviance "
                  f"did not improve for {self.p['patience']} checks", flush=True)
        elif self.p["verbose"]:
            print(describe_stop(self._reason, last, self.kept_iteration), flush=True)


def not_converged_message(result, p: dict, validated: bool) -> str | None:
    """The ConvergenceWarning of a fit that ended before its stopping rule was met (None if it
    was met, or if it has no rule: ``tol = 0`` without held-out spots)."""
    if result.reason == "time_budget":
        at = len(result.history) if result.kept_iteration is None else result.early_stopped_at
        kept = "" if result.kept_iteration is None else f", kept iteration {result.kept_iteration}"
        return (f"PNMF did not converge: the time budget ({p['time_budget']:g} s) ran out at "
                f"iteration {at}{kept}; raise training.time_budget or resume the fit")
    if result.reason == "max_iter" and (p["tol"] > 0 or validated):
        return (f"PNMF did not converge: max_iter = {p['max_iter']} reached before the stopping "
                f"rule was met (tol = {p['tol']:g}); raise training.max_iter or resume the fit")
    return None


def describe_stop(reason: str, stopped_at=None, kept=None) -> str | None:
    """How a fit that stopped before its end ended, in words (console, figures, report); None
    unless patience or the time budget ended it."""
    if reason == "validation" and stopped_at is not None:
        return f"early-stopped at iteration {int(stopped_at)}, kept iteration {int(kept)}"
    if reason == "time_budget":
        if stopped_at is None:
            return "stopped by the time budget"
        return (f"stopped by the time budget at iteration {int(stopped_at)}, kept iteration "
                f"{int(kept)}")
    return None
