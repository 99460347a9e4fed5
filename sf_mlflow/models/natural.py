"""Natural-gradient steps for the whitened variational distribution q(v) of the SVGP prior.

The prior over the whitened inducing values is ``p(v_l) = N(0, I)`` and the variational
distribution ``q(v_l) = N(mu_l, S_l)`` with ``S_l = Lu_l Lu_l^T`` (see
:mod:`sf_mlflow.models.svgp`). In the natural parameters of a Gaussian,
``theta_1 = S^{-1} mu`` and ``theta_2 = -S^{-1} / 2``, a natural-gradient step of size
``gamma`` on the ELBO ``E_q[log p(Y | F)] - w KL(q || p)`` is (Hensman, Fusi & Lawrence
2013; Salimbeni, Eleftheriadis & Hensman 2018)

    theta <- theta + gamma * dELBO / d eta,      eta = (mu, S + mu mu^T),

because the Fisher information of an exponential family maps gradients in the
expectation parameters ``eta`` to natural gradients in ``theta``. With
``g_mu = dE/dmu`` and ``g_S = dE/dS`` of the expected log-likelihood E and the KL's
gradient ``w (theta - theta_prior)``, writing ``P = S^{-1}``:

    P_new         = (1 - gamma w) P + gamma (w I - 2 g_S)
    (P mu)_new    = (1 - gamma w) P mu + gamma (g_mu - 2 g_S mu)

E depends on q(v) only through the marginals of q(F) at the batch's spots,
``mean_b = a_b^T mu`` and ``var_b = k_bb - a_b^T a_b + a_b^T S a_b`` with
``A = Lzz^{-1} Kzx (M, B)``, so ``g_mu = A g_mean`` and ``g_S = A diag(g_var) A^T`` from
the gradients of E in the marginals (L x B numbers, from autograd). A step of size 1 on a
conjugate (Gaussian) likelihood lands on the exact posterior. For the Poisson likelihood
the expected rate ``exp(m + v / 2)`` makes ``g_var < 0``, so ``-2 g_S`` is positive
semi-definite and P stays positive definite for any ``gamma <= 1 / w``: a step can never
produce an invalid covariance, unlike an Adam step on the ~M^2 / 2 entries of Lu, each
moved by about the learning rate whatever its gradient (which is what made the Adam fit
of the grouped model blow up). Monte Carlo ELBO modes can give ``g_var > 0`` by chance; a
step whose precision is not positive definite is halved until it is.

The Poisson likelihood is not conjugate: a full step is a Newton step on the log-rate,
``delta m ~ y / mu - 1`` where the model under-predicts, which overshoots (to
``exp(30)`` rates on osmFISH at gamma = 1) when ``y / mu`` is large. So each step is also
held inside a trust region: if it would move a factor's marginal mean at some spot of the
batch by more than :data:`MAX_MEAN_STEP` (in log-rate units), that factor's step of the
mean is shortened so that it does not (the precision takes its full step, which is safe:
it only adds curvature). Far from the optimum the fit then moves at most e-fold per step and
per factor; near it the full step is taken.

Cost per step, per factor: ``g_S`` is a symmetric (M, B) x (B, M) product of which only the
upper triangle is formed (blocks on and above the diagonal: 7/6 M^2 B flops at six blocks,
against the 2 M^2 B of the backward pass through the variance term that Adam needs); the
new mean is ``mu + gamma P_new^{-1} (g_mu - w mu)``, the same update written without products
with P or g_S; the Cholesky and the triangular inverse are M^3 / 3 each. P is kept in float64
because its eigenvalues span 1 to the largest count rate times the kernel variance; a float32
model factors it in float32 (a quarter of the time) while the factor's diagonal shows it is
conditioned well enough (:data:`FLOAT32_MAX_SPREAD`), else in float64, which also decides a
step's positive definiteness; the inverse of the factor (whose condition number is the square
root of P's) runs in the model's dtype. On spot mini-batches ``g_S`` may be estimated from a uniform sample of the
batch's spots, scaled by the inverse share (``curvature_fraction``): unbiased, and its noise
is of the kind the mini-batch already brings; g_mu always uses every spot, so the mean's fixed
point is unchanged.

The precision P is kept as optimiser state, so ``S`` never has to be inverted; after each
step ``Lu`` is recomputed from P. With ``J`` the flip permutation and
``J P J = Lf Lf^T`` (lower Cholesky), ``Lu = J Lf^{-T} J`` is lower triangular and
``Lu Lu^T = P^{-1}``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sf_mlflow.errors import ModelError

__all__ = ["NaturalGradient", "MAX_HALVINGS", "MAX_MEAN_STEP"]

#: A step whose new precision is not positive definite is halved at most this many times
#: before the factor's update is skipped for this iteration.
MAX_HALVINGS = 10

#: Trust region: the largest change of a factor's marginal mean (log-rate units) at any spot
#: of the batch that one step may make; a larger step is shrunk (see the module docstring).
MAX_MEAN_STEP = 1.0

_F64 = torch.float64


def _flip(X: Tensor) -> Tensor:
    return torch.flip(X, dims=(-2, -1))


#: A float32 factor of a precision is kept while its diagonal's spread (largest over smallest)
#: stays within this bound; squared it bounds P's condition number from below (it was 1/50 to
#: 1/250 of it in fits at Slide-seq size, condition numbers 5e4-4e5). Measured there and on
#: precisions scaled to a condition number of 5e6: the float32 factor's covariance
#: ``(Lf Lf^T)^{-1}`` is within 2e-5 of the exact one (2e-4 on its diagonal), against 5e-7
#: for the float64 factor rounded to float32, at a quarter of the time (0.085 s against 0.31 s
#: at M 3,000 on two cores).
FLOAT32_MAX_SPREAD = 1e3


def _flipped_cholesky(P: Tensor, dtype: torch.dtype = _F64) -> Optional[Tensor]:
    """Lower Cholesky factor Lf of ``J P J`` for a (M, M) precision, from P's upper triangle,
    or None if P is not positive definite.

    ``dtype`` float32 factors P in float32 first and keeps that factor when it exists and its
    diagonal's spread is within :data:`FLOAT32_MAX_SPREAD`; otherwise (and for float64) P is
    factored in float64, which alone decides whether P is positive definite.
    """
    if dtype == torch.float32:
        Lf, info = torch.linalg.cholesky_ex(_flip(P.to(dtype)))   # the cast first: half the bytes to flip
        d = Lf.diagonal()
        if int(info) == 0 and bool(torch.isfinite(d).all()) and \
                float(d.max()) <= FLOAT32_MAX_SPREAD * float(d.min()):
            return Lf
    Lf, info = torch.linalg.cholesky_ex(_flip(P.to(_F64)))
    if int(info) != 0 or not bool(torch.isfinite(Lf.diagonal()).all()):
        return None
    return Lf


def _lu_from_flipped(Lf: Tensor, dtype: torch.dtype) -> Tensor:
    """Lower-triangular ``Lu = J Lf^{-T} J`` (so ``Lu Lu^T = P^{-1}``) in ``dtype``.

    The triangular inverse (:func:`_lower_inverse`, M^3 / 3 flops) runs in the
    model's dtype: Lf's condition number is only the square root of P's, well within float32.
    (SciPy's LAPACK trtri would take a third of the flops, but its OpenBLAS threads, left
    spinning after each call, competed with torch's on two cores: fits took up to twice as
    long.)
    """
    return _flip(_lower_inverse(Lf.to(dtype)).mT)


#: Column width of the blocks of :func:`_lower_inverse` (measured at M 3,000 on two cores:
#: 0.08 s at widths 190-375 against 0.17-0.22 s for one solve against the identity).
INVERSE_BLOCK = 256


def _lower_inverse(Lf: Tensor) -> Tensor:
    """``Lf^{-1}`` of a lower-triangular (M, M) matrix, by column blocks.

    The inverse is lower triangular, so column block ``[lo, hi)`` is zero above row ``lo``
    and below it solves only with ``Lf[lo:, lo:]``: about M^3 / 3 flops in all, where one
    solve against the identity does M^3.
    """
    M = Lf.shape[-1]
    out = torch.zeros_like(Lf)
    for lo in range(0, M, INVERSE_BLOCK):
        hi = min(lo + INVERSE_BLOCK, M)
        rhs = torch.zeros(M - lo, hi - lo, dtype=Lf.dtype, device=Lf.device)
        rhs.diagonal().fill_(1.0)
        out[lo:, lo:hi] = torch.linalg.solve_triangular(Lf[lo:, lo:], rhs, upper=False)
    return out


def _solve_flipped(Lf: Tensor, theta: Tensor) -> Tensor:
    """``P^{-1} theta`` for ``J P J = Lf Lf^T``, theta: (M,), in theta's dtype."""
    rhs = torch.flip(theta, (0,))[:, None].to(Lf.dtype)
    return torch.flip(torch.cholesky_solve(rhs, Lf)[:, 0], (0,)).to(theta.dtype)


#: The curvature ``g_S`` is computed in row blocks of about this many rows (3 to 8 blocks),
#: each only from its diagonal block rightwards: (k + 1) / 2k of the full product's flops for k
#: blocks (measured on two cores at M 3,000, B 7,000: 0.42-0.44 s at 6 blocks, 0.46-0.60 s at 3,
#: 0.73-0.81 s for the full product; at M 1,000 three and six blocks take the same time).
CURVATURE_BLOCK_ROWS = 500


def _upper_curvature(A: Tensor, g: Tensor) -> Tensor:
    """The upper triangle of ``g_S = A^T diag(g) A`` in float64, A: (B, M), g: (B,).

    Only the upper triangle of a precision is ever read (:func:`_flipped_cholesky` factors
    ``J P J`` from its lower triangle), so the blocks below the diagonal ones are left zero.
    """
    M = A.shape[-1]
    Ag = A * g[:, None]
    out = torch.zeros(M, M, dtype=_F64, device=A.device)
    k = min(8, max(3, M // CURVATURE_BLOCK_ROWS)) if M >= 256 else 1
    edges = [i * M // k for i in range(k + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        out[lo:hi, lo:] = Ag[:, lo:hi].mT @ A[:, lo:]
    return out


def _symmetric(P: Tensor) -> Tensor:
    """The symmetric matrix whose upper triangle is P's (..., M, M)."""
    return torch.triu(P) + torch.triu(P, 1).mT


def _precision_from_lu(Lu: Tensor) -> Tensor:
    """``(Lu Lu^T)^{-1}`` for lower-triangular Lu (..., M, M)."""
    eye = torch.eye(Lu.shape[-1], dtype=Lu.dtype, device=Lu.device)
    inv = torch.linalg.solve_triangular(Lu, eye.expand_as(Lu), upper=False)
    return inv.mT @ inv


class NaturalGradient:
    """Natural-gradient optimiser of an :class:`~sf_mlflow.models.svgp.SVGPPrior`'s q(v).

    Parameters
    ----------
    prior : SVGPPrior
        Its ``mu`` and Lu (``Lu_diag_raw``, ``Lu_lower``) are overwritten by :meth:`step`.
    lr : float
        The step size gamma, in (0, 1]; 1 is the exact update for a Gaussian likelihood.
    max_mean_step : float or None
        Trust region on the change of the marginal means per step (log-rate units); None
        turns it off (exact conjugate steps, for tests and Gaussian likelihoods).
    curvature_fraction : float
        Share of a batch's spots, in (0, 1], from which ``g_S`` is estimated: a uniform
        sample without replacement, drawn afresh every step and scaled by the inverse share
        (unbiased). 1 uses every spot (exact). The curvature is the largest cost of a step
        (7/6 M^2 B per factor at six row blocks), so 0.5 saves half of that; the estimate's
        noise is averaged by the precision's running mean on mini-batches (gamma < 1).
    generator : torch.Generator, optional
        Draws the curvature's spots (on the prior's device); None uses torch's global one.

    Attributes
    ----------
    precision : Tensor, (L, M, M) float64, or (L, M) with ``diagonal_only``
        ``S^{-1}`` of each factor (only the upper triangles are kept up to date;
        :meth:`state_dict` gives the symmetric matrices); derived from the prior's Lu on the
        first step (or after :meth:`reset`) and carried from step to step.
    halvings : int
        How many times a step was halved to keep a precision positive definite (all steps).
    shrinks : int
        How many factor steps of the mean were shortened to stay in the trust region.
    skipped : int
        Factor updates skipped because no halving gave a positive-definite precision.
    """

    def __init__(self, prior, lr: float, max_mean_step: Optional[float] = MAX_MEAN_STEP,
                 curvature_fraction: float = 1.0, generator: Optional[torch.Generator] = None):
        if not (0.0 < float(lr) <= 1.0):
            raise ModelError(f"natural-gradient step lr = {lr!r} must be in (0, 1]")
        if not (0.0 < float(curvature_fraction) <= 1.0):
            raise ModelError(f"curvature_fraction = {curvature_fraction!r} must be in (0, 1]")
        self.prior, self.lr = prior, float(lr)
        self.curvature_fraction = float(curvature_fraction)
        self.generator = generator
        self.max_mean_step = None if max_mean_step is None else float(max_mean_step)
        self.precision: Optional[Tensor] = None
        self.halvings = 0
        self.shrinks = 0
        self.skipped = 0
        #: Data-parallel fits (:mod:`sf_mlflow.models.distributed`) set a communicator: each
        #: rank then holds a share of the batch's spots, and the sums over spots (g_mu, g_S)
        #: and the trust region's largest move are completed over all ranks.
        self.comm = None

    # ---- state -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the carried precision (re-derived from the prior's Lu on the next step)."""
        self.precision = None

    def state_dict(self) -> dict:
        P = self.precision
        if P is not None and not self.prior.diagonal_only:
            P = _symmetric(P)           # steps keep only its upper triangle up to date
        return {"precision": None if P is None else P.detach().cpu().clone(),
                "halvings": self.halvings, "shrinks": self.shrinks, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        P = state.get("precision")
        self.precision = None if P is None else P.to(device=self.prior.mu.device, dtype=_F64)
        self.halvings, self.skipped = int(state.get("halvings", 0)), int(state.get("skipped", 0))
        self.shrinks = int(state.get("shrinks", 0))

    @torch.no_grad()
    def _current_precision(self) -> Tensor:
        if self.precision is None:
            d = self.prior.lu_diagonal().to(_F64)
            if self.prior.diagonal_only:
                self.precision = 1.0 / (d * d)
            elif not bool(self.prior.Lu_lower.any()):
                # a diagonal Lu (the prior's initial 0.1 I): skip the O(L M^3) inversion
                self.precision = torch.diag_embed(1.0 / (d * d))
            else:
                self.precision = _precision_from_lu(self.prior.lu().to(_F64))
        return self.precision

    # ---- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, At: Tensor, g_mean: Tensor, g_var: Tensor,
             batch_spots: Optional[int] = None) -> None:
        """One natural-gradient step from the gradients of E at a batch's marginals.

        Parameters
        ----------
        At : Tensor, (B, M), or (L, B, M) with per-factor lengthscales
            ``A^T = Kxz Lzz^{-T}`` at the batch's spots (as used for the marginals).
        g_mean, g_var : Tensor, (L, B)
            Gradients of the (batch-scaled) expected log-likelihood in the marginal means
            and variances of q(F).
        batch_spots : int, optional
            Spots of the whole batch when this process holds only a share of it (``comm``):
            the curvature's sample is drawn from the whole batch, as one process would draw
            it, and each share uses its part. None: At's B.
        """
        prior = self.prior
        w = prior.kl_weight
        P_all = self._current_precision()
        mu_all = prior.mu.detach().to(_F64)
        L, M = mu_all.shape
        if prior.diagonal_only:
            self._step_diagonal(At, g_mean, g_var, P_all, mu_all, w)
            return
        Lu_new = torch.empty(L, M, M, dtype=prior.mu.dtype, device=prior.mu.device)
        mu_new = torch.empty_like(mu_all)
        sample, scale = self._curvature_sample(At.shape[-2] if batch_spots is None else batch_spots)
        for l in range(L):
            A_l = At if At.dim() == 2 else At[l]                               # (B, M)
            if sample is None:
                g_S = _upper_curvature(A_l, g_var[l])                          # (M, M)
            else:
                g_S = _upper_curvature(A_l[sample], g_var[l][sample] * scale)
            g_mu = (g_mean[l] @ A_l).to(_F64)                                  # (M,)
            if self.comm is not None:
                g_S, g_mu = self.comm.sum_all(g_S, g_mu)
            P, mu = P_all[l], mu_all[l]
            P_new, Lf = self._positive_definite(P, g_S, self.lr, w)
            if Lf is None:
                self.skipped += 1
                Lf = _flipped_cholesky(P, prior.mu.dtype)
                P_new, m_new = P, mu
            else:
                # theta1_new = (1 - gamma w) P mu + gamma (g_mu - 2 g_S mu) = P_new mu +
                # gamma (g_mu - w mu), so the new mean needs only the new precision's factor
                # (no products with P or g_S)
                gamma = self._gamma_used
                m_new = mu + gamma * _solve_flipped(Lf, g_mu - w * mu)
                m_new = mu + self._trust(A_l, m_new - mu)
            Lu = _lu_from_flipped(Lf, Lu_new.dtype)
            P_all[l] = P_new
            mu_new[l] = m_new
            Lu_new[l] = Lu
        prior.mu.copy_(mu_new.to(prior.mu.dtype))
        prior.set_lu(Lu_new)

    def _curvature_sample(self, B: int) -> tuple[Optional[Tensor], float]:
        """The rows (sorted) of this process's batch whose curvature estimates ``g_S``, and
        the estimate's scale, for a batch of B spots in all; ``(None, 1.0)``: all rows."""
        n = max(1, int(round(self.curvature_fraction * B)))
        if n >= B:
            return None, 1.0
        draw = torch.randperm(B, generator=self.generator, device=self.prior.mu.device)[:n]
        if self.comm is not None:       # this process holds a contiguous share of the B spots
            share = self.comm.share(B)
            draw = draw[(draw >= share.start) & (draw < share.stop)] - share.start
        return torch.sort(draw).values, B / n

    def _trust(self, A: Tensor, step: Tensor) -> Tensor:
        """``step`` (.., M) of whitened means, shrunk so that ``A step`` (the change of the
        marginal means at the batch's spots, A: (B, M)) stays within ``max_mean_step``."""
        bound = self.max_mean_step
        if A.shape[0] == 0 or bound is None:
            return step
        moved = (step.to(A.dtype) @ A.mT).abs().amax(dim=-1, keepdim=True).to(step.dtype)
        if self.comm is not None:
            moved = self.comm.max(moved)
        factor = torch.where(moved > bound, bound / moved, torch.ones_like(moved))
        self.shrinks += int((moved > bound).sum())
        return step * torch.nan_to_num(factor, nan=0.0)

    def _positive_definite(self, P: Tensor, g_S: Tensor, gamma: float, w: float):
        """``(P_new, Lf)`` for the largest ``gamma / 2^k`` whose precision is positive definite
        (Lf: :func:`_flipped_cholesky` of it), or ``(P, None)``; the gamma used is left in
        ``_gamma_used``. Only the upper triangles of P, g_S and P_new are read or meaningful."""
        for _ in range(MAX_HALVINGS + 1):
            # (1 - gamma w) P + gamma (w I - 2 g_S), in two passes over the (M, M) matrix
            P_new = P.mul(1.0 - gamma * w).add_(g_S, alpha=-2.0 * gamma)
            P_new.diagonal().add_(gamma * w)
            Lf = _flipped_cholesky(P_new, self.prior.mu.dtype)
            if Lf is not None:
                self._gamma_used = gamma
                return P_new, Lf
            gamma *= 0.5
            self.halvings += 1
        return P, None

    def _step_diagonal(self, At: Tensor, g_mean: Tensor, g_var: Tensor, p: Tensor,
                       mu: Tensor, w: float) -> None:
        """The same step for a diagonal q(v) (mean-field natural parameters), p: (L, M)."""
        A2 = At * At
        if At.dim() == 2:
            g_s = (g_var @ A2).to(_F64)                                       # (L, M)
            g_mu = (g_mean @ At).to(_F64)
        else:
            g_s = torch.bmm(g_var[:, None, :], A2).squeeze(1).to(_F64)
            g_mu = torch.bmm(g_mean[:, None, :], At).squeeze(1).to(_F64)
        if self.comm is not None:
            g_s, g_mu = self.comm.sum_all(g_s, g_mu)
        theta1 = p * mu
        gamma = torch.full((p.shape[0], 1), self.lr, dtype=_F64, device=p.device)
        for _ in range(MAX_HALVINGS + 1):
            p_new = (1.0 - gamma * w) * p + gamma * (w - 2.0 * g_s)
            bad = ~(torch.isfinite(p_new) & (p_new > 0)).all(dim=1, keepdim=True)
            if not bool(bad.any()):
                break
            gamma = torch.where(bad, 0.5 * gamma, gamma)
            self.halvings += int(bad.sum())
        bad = ~(torch.isfinite(p_new) & (p_new > 0)).all(dim=1, keepdim=True)
        self.skipped += int(bad.sum())
        theta1_new = (1.0 - gamma * w) * theta1 + gamma * (g_mu - 2.0 * g_s * mu)
        p_new = torch.where(bad, p, p_new)
        theta1_new = torch.where(bad, theta1, theta1_new)
        p.copy_(p_new)
        prior = self.prior
        step = theta1_new / p_new - mu
        if At.dim() == 2:
            step = self._trust(At, step)
        else:
            step = torch.stack([self._trust(At[l], step[l:l + 1])[0] for l in range(step.shape[0])])
        prior.mu.copy_((mu + step).to(prior.mu.dtype))
        prior.set_lu_diagonal(torch.rsqrt(p_new).to(prior.mu.dtype))
