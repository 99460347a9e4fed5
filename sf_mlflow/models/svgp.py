"""Sparse variational GP prior over the L log-factors, on fixed inducing points.

Model
-----
For factor l, ``F_l(x, g)`` is a GP with kernel ``k`` (see :mod:`sf_mlflow.models.kernels`)
over coordinates x and, for a multi-group kernel, group g. The inducing values at the M fixed
inducing points ``(Z, g_Z)`` are whitened, ``u_l = Lzz v_l`` with ``Kzz = Lzz Lzz^T``, and

    p(v_l) = N(0, I),        q(v_l) = N(mu_l, Lu_l Lu_l^T)

with ``mu: (L, M)`` and ``Lu: (L, M, M)`` lower triangular with a positive diagonal. At spots
x (B of them), with ``A = Lzz^{-1} Kzx  (M, B)``, the marginals of q(F_l) are

    mean_l = A^T mu_l,    var_l = k(x, x) - colsum(A * A) + colsum((Lu_l^T A)^2)   (clamped >= 0)

and ``KL_l = 0.5 (||Lu_l||_F^2 + ||mu_l||^2 - M - 2 sum_m log Lu_l[m, m])``. The total KL is
summed over factors and multiplied by ``kl_weight``; it lives on the inducing points, so it
is not rescaled by the mini-batch. ``kl_weight = 1`` is the true ELBO; the reference
implementation of nonnegative spatial factorisation weights the KL by N / M, which users can
reproduce by setting ``kl_weight = N / M``.

Initialisation: ``mu = 0`` and ``Lu = 0.1 I``, so q(v) starts ten times tighter than the prior
(factor variances start near ``0.01 sigma^2`` at the inducing points instead of ``sigma^2``,
which keeps ``E[exp F] = exp(m + v / 2)`` from swamping the first likelihood gradients).

Cost per mini-batch of B spots (shared lengthscale)
---------------------------------------------------
* ``Kzx`` elementwise, O(M B); ``Lzz`` is factorised once per fit when the kernel is fixed
  (cached; the cache follows the hyperparameters' versions), else once per step;
* one triangular solve for A, M^2 B flops, shared by all L factors;
* the variance term ``colsum((Lu^T A)^2)`` for all factors, by
  :func:`sf_mlflow.models.blocktri.triangular_quad`: Lu's strict lower triangles are stored
  in column blocks that are GEMM operands as they lie, so forward and backward each cost
  ~1.06 L M^2 B flops (a dense ``Lu^T A`` would be 2 L M^2 B each way) with no copies of
  M^2-sized arrays; with ``diagonal_only`` it is one (L, M) x (M, B) product.
The Kzz Cholesky is computed in float64 (then cast): a Matern Gram matrix of 3,000 points at
a lengthscale of several spot spacings has a condition number far beyond float32's 1e7, and
the factorisation runs once per fit.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sf_mlflow.errors import ModelError
from sf_mlflow.models.blocktri import (BlockLayout, default_block_size, strict_lower_sq_norm,
                                      triangular_quad)
from sf_mlflow.models.inducing import place_inducing
from sf_mlflow.models.kernels import StationaryKernel, make_kernel, squared_distances
from sf_mlflow.models.positive import from_positive, log_positive, to_positive
from sf_mlflow.models.priors import FactorPrior
from sf_mlflow.models.settings import SVGP

__all__ = ["SVGPPrior", "CHOLESKY_MODES", "INIT_SCALE", "MAX_JITTER"]

#: Maps from the raw diagonal of Lu to a positive one.
CHOLESKY_MODES = ("exp", "softplus")

#: Initial ``Lu = INIT_SCALE * I``: q(v) tighter than the prior N(0, I).
INIT_SCALE = 0.1

#: Largest jitter, relative to sigma^2, the Kzz Cholesky escalates to (by factors of 10).
#: Beyond 1% the "inducing" prior is no longer the kernel's.
MAX_JITTER = 1e-2

#: Dtype of the Kzz Cholesky (see the module docstring).
CHOLESKY_DTYPE = torch.float64


# ---- positive diagonal maps ------------------------------------------------------------------

def _weighted(Kxz: Tensor, weights: Tensor) -> Tensor:
    """``Kxz w``: the predictive mean (L, B) from a kernel matrix (B, M) and weights (M, L),
    or per factor from (L, B, M) and (L, M, 1)."""
    if Kxz.dim() == 2:
        return (Kxz @ weights).T
    return torch.bmm(Kxz, weights).squeeze(-1)


# ---- the prior -------------------------------------------------------------------------------

class SVGPPrior(FactorPrior):
    """Whitened sparse variational GP prior over L factors (optionally multi-group).

    Parameters
    ----------
    coordinates : Tensor, (N, 2)
        Training spot coordinates; their dtype (if floating) and device become the model's.
        Used only to place the inducing points.
    groups : LongTensor, (N,), or None
        Group code of each spot; None means the plain (single-group) kernel.
    n_components : int
        L.
    num_inducing : int
        M (ignored when ``inducing_points`` is given).
    kernel : {"Matern32", "Matern12", "Matern52", "RBF"}
    lengthscale, sigma : float
        Kernel hyperparameters (coordinates' units).
    group_diff_param : float
        MGGP ``a >= 0``; see :mod:`sf_mlflow.models.kernels`.
    n_groups : int, optional
        G, the number of group codes (default ``max(code) + 1``).
    train_lengthscale : bool
        Learn lengthscale and sigma (Kzz is then refactorised every step).
    per_factor_lengthscale : bool
        One lengthscale per factor: kernel matrices and ``Lzz`` get a leading L dimension.
    cholesky_mode : {"exp", "softplus"}
        Map from the raw diagonal of Lu to a positive one.
    diagonal_only : bool
        Keep only the diagonal of Lu (no ``Lu_lower``): the variance term is then one
        (L, M) x (M, B) product.
    inducing_allocation : {"proportional", "equal", "derived"}
        See :mod:`sf_mlflow.models.inducing`.
    jitter : float
        Diagonal added to Kzz, relative to sigma^2; escalated x10 up to :data:`MAX_JITTER`
        when the Cholesky fails. The value used is in :attr:`jitter_used`.
    kl_weight : float
        Multiplier of the KL term (1 = true ELBO; the reference code's choice is N / M).
    seed : int
        Seed of the k-means placement.
    inducing_points : Tensor or ndarray, (M, 2), optional
        Use these instead of k-means (e.g. to load a saved model).
    inducing_groups : LongTensor or ndarray, (M,), optional
        Their groups (default all 0).

    Attributes
    ----------
    Z : buffer, (M, 2)
    g_Z : buffer, (M,) int64
    mu : Parameter, (L, M)
    Lu_diag_raw : Parameter, (L, M)
        Raw diagonal of Lu; ``diag(Lu) = exp(raw)`` or ``softplus(raw)``.
    Lu_lower : Parameter, (layout.size,); absent when ``diagonal_only``
        Strict lower triangles of the Lu_l in column blocks (:class:`BlockLayout`): about
        half of an (L, M, M) tensor, laid out so the variance term reads it without copies.
        :meth:`lu` / :meth:`set_lu` convert from / to dense (L, M, M).
    Lu_block : buffer, ()
        The block width of that layout (saved, so states load across layouts).
    kernel : StationaryKernel
    jitter_used_ : float or None
        Relative jitter of the last Kzz factorisation (None before the first).
    """

    def __init__(self, coordinates: Tensor, groups: Optional[Tensor], n_components: int, *,
                 num_inducing: int = 3000, kernel: str = "Matern32", lengthscale: float = 4.0,
                 sigma: float = 1.0, group_diff_param: float = 10.0, n_groups: Optional[int] = None,
                 train_lengthscale: bool = False, per_factor_lengthscale: bool = False,
                 cholesky_mode: str = "exp", diagonal_only: bool = False,
                 inducing_allocation: str = "proportional", jitter: float = 1e-5,
                 kl_weight: float = 1.0, seed: int = 0,
                 inducing_points: Optional[Tensor | np.ndarray] = None,
                 inducing_groups: Optional[Tensor | np.ndarray] = None):
        super().__init__()
        coordinates = torch.as_tensor(coordinates)
        if coordinates.dim() != 2 or coordinates.shape[1] != 2:
            raise ModelError(f"coordinates must have shape (N, 2), got {tuple(coordinates.shape)}")
        dtype = coordinates.dtype if coordinates.is_floating_point() else torch.float32
        device = coordinates.device
        L = int(n_components)
        if L < 1:
            raise ModelError(f"n_components = {n_components!r} must be a positive integer")
        # the settings table checks kernel, amplitude, jitter, allocation and Cholesky map
        SVGP(kernel=kernel, num_inducing=num_inducing, sigma=sigma, group_diff_param=group_diff_param,
             cholesky_mode=cholesky_mode, inducing_allocation=inducing_allocation, jitter=jitter)
        if not (math.isfinite(kl_weight) and kl_weight >= 0):
            raise ModelError(f"kl_weight = {kl_weight!r} must be a finite number >= 0")
        if groups is not None:
            groups = torch.as_tensor(groups)
            if groups.shape != (coordinates.shape[0],) or groups.is_floating_point():
                raise ModelError(f"groups must be integer codes of shape (N,) = "
                                 f"({coordinates.shape[0]},), got {tuple(groups.shape)} {groups.dtype}")
            if groups.numel() and int(groups.min()) < 0:
                raise ModelError(f"groups must be codes >= 0, got minimum {int(groups.min())}")

        Z, gZ = place_inducing(coordinates, groups, num_inducing, inducing_allocation, seed,
                                     inducing_points, inducing_groups)
        M = Z.shape[0]
        self.n_components = L
        self.cholesky_mode = cholesky_mode
        self.diagonal_only = bool(diagonal_only)
        self.jitter = float(jitter)
        self.kl_weight = float(kl_weight)
        max_code = max([int(gZ.max()) if M else -1] + ([int(groups.max())] if groups is not None
                                                       and groups.numel() else []))
        self.n_groups = int(n_groups) if n_groups is not None else max(max_code + 1, 1)
        if max_code >= self.n_groups:
            raise ModelError(f"n_groups = {n_groups!r} but group codes go up to {max_code}")
        self.register_buffer("Z", Z.to(dtype=dtype, device=device))
        self.register_buffer("g_Z", gZ.to(dtype=torch.int64, device=device))
        # Saved with the state so a plain model's state cannot be loaded into an MGGP one.
        self.register_buffer("multigroup", torch.tensor(groups is not None, device=device))
        self.kernel: StationaryKernel = make_kernel(
            kernel, lengthscale, sigma, n_components=L if per_factor_lengthscale else None,
            multigroup=groups is not None, group_diff_param=group_diff_param,
            trainable=train_lengthscale, dtype=dtype, device=device)

        self.mu = nn.Parameter(torch.zeros(L, M, dtype=dtype, device=device))
        raw_diag = from_positive(INIT_SCALE, cholesky_mode)
        self.Lu_diag_raw = nn.Parameter(torch.full((L, M), raw_diag, dtype=dtype, device=device))
        self.layout = BlockLayout(M, L, default_block_size(M))
        self.register_buffer("Lu_block", torch.tensor(self.layout.block, device=device))
        if not self.diagonal_only:
            self.Lu_lower = nn.Parameter(torch.zeros(self.layout.size, dtype=dtype, device=device))
        self.jitter_used_: Optional[float] = None
        #: Bounds the trainer keeps trained hyperparameters in (:meth:`StationaryKernel.project`),
        #: set by the fit's start from the extent of the coordinates; None: unbounded.
        self.bounds: Optional[dict] = None
        self._lzz_cache: Optional[Tensor] = None
        self._lzz_key: Optional[tuple] = None

    # ---- logging properties --------------------------------------------------------------
    @property
    def num_inducing(self) -> int:
        return int(self.Z.shape[0])

    @property
    def lengthscale(self) -> float | list[float]:
        ls = self.kernel.lengthscale.detach().cpu()
        return ls.tolist() if ls.dim() else float(ls)

    @property
    def sigma(self) -> float | list[float]:
        sg = self.kernel.sigma.detach().cpu()
        return sg.tolist() if sg.dim() else float(sg)

    @property
    def group_diff_param(self) -> float:
        return float(self.kernel.group_diff_param.detach().cpu())

    @property
    def jitter_used(self) -> Optional[float]:
        """Relative jitter of the last Kzz Cholesky (>= ``jitter``; None before the first)."""
        return self.jitter_used_

    # ---- Kzz ----------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget the cached Cholesky factor of Kzz (it is also invalidated automatically)."""
        self._lzz_cache, self._lzz_key = None, None

    def _cache_key(self) -> tuple:
        # The few hyperparameter values themselves (one small host copy per step) catch every
        # change, even writes through .data that bypass version counters; the inducing points
        # are never trained and are tracked by identity and version (bumped by in-place
        # writes such as load_state_dict; .to() changes data_ptr).
        k = self.kernel
        hyper = torch.cat([k.raw_lengthscale.detach().reshape(-1), k.raw_sigma.detach().reshape(-1),
                           k.raw_group_diff.detach().reshape(1)])
        ids = tuple((t.data_ptr(), t._version, t.dtype, str(t.device)) for t in (self.Z, self.g_Z))
        return (tuple(hyper.cpu().tolist()), ids, self.jitter)

    def chol_kzz(self) -> Tensor:
        """Lower Cholesky factor of ``Kzz + jitter sigma^2 I`` in the model's dtype.

        Returns
        -------
        Tensor, (M, M), or (L, M, M) with per-factor lengthscales.

        Reused from a cache while the hyperparameters are unchanged and no gradient is
        wanted for them; computed (differentiably) on every call while they train.
        """
        tracked = self.kernel.trainable and torch.is_grad_enabled()
        if not tracked:
            key = self._cache_key()
            if self._lzz_cache is not None and self._lzz_key == key:
                return self._lzz_cache
        Kzz = self.kernel(self.Z, self.Z, self.g_Z, self.g_Z, dtype=CHOLESKY_DTYPE)
        Lzz = self._jittered_cholesky(Kzz).to(self.mu.dtype)
        if not tracked:
            Lzz = Lzz.detach()
            self._lzz_cache, self._lzz_key = Lzz, key
        return Lzz

    def _jittered_cholesky(self, K: Tensor) -> Tensor:
        """Cholesky of ``K + j sigma^2 I`` for j = jitter, 10 jitter, ... up to MAX_JITTER.

        ``K``: (M, M) or (L, M, M). The jitter scales with sigma^2 (and is differentiated
        with it), so it is the same relative perturbation whatever the amplitude.
        """
        M = K.shape[-1]
        scale = self.kernel.amplitude(K.dim() - 1, K.dtype)       # () or (L, 1)
        j = self.jitter
        while True:
            Kj = K.clone()
            Kj.diagonal(dim1=-2, dim2=-1).add_(j * scale)
            Lc, info = torch.linalg.cholesky_ex(Kj)
            # One host sync per attempt; NaN inputs can pass LAPACK and come out as NaN.
            if bool((info == 0).all() & torch.isfinite(Lc.diagonal(dim1=-2, dim2=-1)).all()):
                break
            if j * 10.0 > MAX_JITTER * (1.0 + 1e-9) or not bool(torch.isfinite(scale).all()):
                raise ModelError(self._cholesky_failure(j))
            j *= 10.0
        if j > self.jitter and self.jitter_used_ != j:
            warnings.warn(f"SVGPPrior: Cholesky of Kzz needed jitter {j:.3g} (relative to sigma^2; "
                          f"configured {self.jitter:.3g}); lengthscale = {self.lengthscale}, "
                          f"M = {M}", RuntimeWarning, stacklevel=3)
        self.jitter_used_ = j
        return Lc

    def _cholesky_failure(self, j: float) -> str:
        with torch.no_grad():
            Z = self.Z.double()
            r2 = squared_distances(Z, Z)
            r2.fill_diagonal_(float("inf"))
            dmin = float(torch.sqrt(r2.min())) if Z.shape[0] > 1 else float("nan")
        return (f"Cholesky of the inducing-point kernel matrix Kzz failed even with jitter {j:.3g} "
                f"x sigma^2 (sigma = {self.sigma}): lengthscale = {self.lengthscale}, "
                f"M = {self.num_inducing} inducing points, minimum distance between inducing "
                f"points = {dmin:.4g}. Check that lengthscale and sigma are finite and positive "
                f"and of the order of the spot spacing or larger, use fewer inducing points, or "
                f"raise model.jitter")

    # ---- q(F) ----------------------------------------------------------------------------
    def lu_diagonal(self) -> Tensor:
        """Positive diagonal of Lu, (L, M)."""
        return to_positive(self.Lu_diag_raw, self.cholesky_mode)

    def lu(self) -> Tensor:
        """Lu as a dense lower-triangular (L, M, M) tensor (for inspection and tests)."""
        if self.diagonal_only:
            return torch.diag_embed(self.lu_diagonal())
        return self.layout.to_dense(self.Lu_lower, self.lu_diagonal())

    @torch.no_grad()
    def set_lu(self, Lu: Tensor) -> None:
        """Set the variational Cholesky factors from a dense ``Lu: (L, M, M)``.

        The diagonal must be positive; the upper triangle is ignored (and, with
        ``diagonal_only``, so is the strict lower triangle).
        """
        Lu = torch.as_tensor(Lu, dtype=self.mu.dtype, device=self.mu.device)
        L, M = self.mu.shape
        if Lu.shape != (L, M, M):
            raise ModelError(f"Lu has shape {tuple(Lu.shape)}, expected (L, M, M) = {(L, M, M)}")
        d = Lu.diagonal(dim1=1, dim2=2)
        if not bool((d > 0).all()):
            raise ModelError("Lu must have a positive diagonal")
        raw = torch.log(d) if self.cholesky_mode == "exp" else torch.log(torch.expm1(d))
        self.Lu_diag_raw.copy_(raw)
        if not self.diagonal_only:
            self.Lu_lower.copy_(self.layout.from_dense(Lu))

    @torch.no_grad()
    def set_lu_diagonal(self, d: Tensor) -> None:
        """Set the positive diagonal of Lu, ``d: (L, M)``, leaving its strict lower part."""
        d = torch.as_tensor(d, dtype=self.mu.dtype, device=self.mu.device)
        if d.shape != self.mu.shape or not bool((d > 0).all()):
            raise ModelError(f"the diagonal of Lu must be positive with shape (L, M) = "
                             f"{tuple(self.mu.shape)}, got {tuple(d.shape)}")
        self.Lu_diag_raw.copy_(torch.log(d) if self.cholesky_mode == "exp" else torch.log(torch.expm1(d)))

    def _inputs(self, coordinates: Optional[Tensor], groups: Optional[Tensor],
                need_groups: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """Coordinates (B, 2) and, for a multi-group model, groups (B,) on the model's device."""
        if coordinates is None:
            raise ModelError("SVGPPrior needs the spots' coordinates (B, 2)")
        x = torch.as_tensor(coordinates).to(dtype=self.mu.dtype, device=self.mu.device)
        if x.dim() != 2 or x.shape[1] != 2:
            raise ModelError(f"coordinates must have shape (B, 2), got {tuple(x.shape)}")
        g = None
        if self.kernel.multigroup and need_groups:
            if groups is None:
                raise ModelError("this SVGPPrior has a multi-group kernel: pass the spots' groups (B,)")
            g = torch.as_tensor(groups).to(device=self.mu.device, dtype=torch.int64)
            if g.shape != (x.shape[0],):
                raise ModelError(f"groups must have shape (B,) = ({x.shape[0]},), got {tuple(g.shape)}")
        return x, g

    def _interp(self, x: Tensor, g: Optional[Tensor]) -> Tensor:
        """``A^T = Kxz Lzz^{-T}``: (B, M), or (L, B, M) with per-factor lengthscales."""
        Lzz = self.chol_kzz()
        Kxz = self.kernel(x, self.Z, g, self.g_Z)
        # Kxz.mT is column-major, the layout LAPACK's trsm works in, so no copy is made,
        # and the result is (M, B) column-major, i.e. A^T row-major.
        return torch.linalg.solve_triangular(Lzz, Kxz.mT, upper=False).mT

    def _mean(self, At: Tensor) -> Tensor:
        if At.dim() == 2:
            return (At @ self.mu.T).T                                     # (L, B)
        return torch.bmm(At, self.mu[:, :, None]).squeeze(-1)

    def _mean_weights(self) -> Tensor:
        """``Lzz^{-T} mu^T``: (M, L), or (L, M, 1) with per-factor lengthscales.

        The predictive mean ``A^T mu = Kxz Lzz^{-T} mu`` then costs O(B M L) per batch
        instead of the O(B M^2) triangular solve for A. Solved in float64: it is
        small (M x L) and its rounding would otherwise reach every prediction.
        """
        Lzz = self.chol_kzz().to(torch.float64)
        mu = self.mu.to(torch.float64)
        if Lzz.dim() == 2:
            w = torch.linalg.solve_triangular(Lzz.mT, mu.T, upper=True)        # (M, L)
        else:
            w = torch.linalg.solve_triangular(Lzz.mT, mu[:, :, None], upper=True)  # (L, M, 1)
        return w.to(self.mu.dtype)

    def _mean_only(self, x: Tensor, g: Optional[Tensor], weights: Tensor) -> Tensor:
        """Predictive mean (L, B) from precomputed :meth:`_mean_weights`."""
        return _weighted(self.kernel(x, self.Z, g, self.g_Z), weights)

    def means(self, index: Tensor, coordinates: Optional[Tensor] = None,
              groups: Optional[Tensor] = None) -> Tensor:
        """Mean of q(F) alone at a batch of spots, (L, B); inputs as :meth:`marginals`."""
        x, g = self._inputs(coordinates, groups)
        return self._mean_only(x, g, self._mean_weights())

    def _marginals(self, x: Tensor, g: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return self._marginals_from(self._interp(x, g))

    def _marginals_from(self, At: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance (L, B) of q(F) from ``A^T`` (B, M) or (L, B, M)."""
        mean = self._mean(At)
        d = self.lu_diagonal()
        if self.diagonal_only:
            A2 = At * At
            explained = A2.sum(-1)                                         # (B,) or (L, B)
            if At.dim() == 2:
                extra = (A2 @ (d * d).T).T                                 # (L, B)
            else:
                extra = torch.bmm(A2, (d * d)[:, :, None]).squeeze(-1)
        else:
            explained = torch.linalg.vecdot(At, At)
            extra = triangular_quad(At, self.Lu_lower, d, self.layout)
        var = (self.kernel.amplitude(2) - explained + extra).clamp_min(0.0)
        return mean, var

    def marginals_from_interp(self, At: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance (L, B) of q(F) from the ``A^T`` :meth:`marginals_and_interp` gave."""
        return self._marginals_from(At)

    def marginals(self, index: Tensor, coordinates: Optional[Tensor] = None,
                  groups: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(F) at a batch of spots; ``index`` is ignored.

        Parameters
        ----------
        index : LongTensor, (B,)
            Unused (the GP prior is a function of position, not of spot identity).
        coordinates : Tensor, (B, 2)
        groups : LongTensor, (B,)
            Required by a multi-group model, ignored otherwise.

        Returns
        -------
        mean : Tensor, (L, B)
        var : Tensor, (L, B), >= 0
        """
        x, g = self._inputs(coordinates, groups)
        return self._marginals(x, g)

    def marginals_and_interp(self, coordinates: Tensor, groups: Optional[Tensor] = None
                             ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`marginals` and the ``A^T = Kxz Lzz^{-T}`` they were computed from.

        Returns
        -------
        mean, var : Tensor, (L, B)
        At : Tensor, (B, M), or (L, B, M) with per-factor lengthscales
            What a natural-gradient step (:mod:`sf_mlflow.models.natural`) needs to map
            gradients in the marginals to gradients in q(v).
        """
        x, g = self._inputs(coordinates, groups)
        At = self._interp(x, g)
        mean, var = self._marginals_from(At)
        return mean, var, At

    def kl(self, index: Optional[Tensor] = None) -> Tensor:
        """``kl_weight * sum_l KL(q(v_l) || N(0, I))``, a scalar (not scaled by the batch)."""
        d = self.lu_diagonal()
        fro2 = (d * d).sum()
        if not self.diagonal_only:
            fro2 = fro2 + strict_lower_sq_norm(self.Lu_lower, self.layout)
        logdet = log_positive(self.Lu_diag_raw, self.cholesky_mode).sum()
        L, M = self.mu.shape
        kl = 0.5 * (fro2 + self.mu.square().sum() - L * M) - logdet
        return self.kl_weight * kl

    # ---- prediction ---------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, coordinates: Tensor, groups: Optional[Tensor] = None,
                chunk_size: int = 10000, return_var: bool = True):
        """Marginals of q(F) at new spots, in chunks of ``chunk_size`` (bounded memory).

        With ``return_var=False`` only the mean is computed and returned (much cheaper:
        no (B, M) triangular solve).

        Parameters
        ----------
        coordinates : Tensor, (N*, 2)
        groups : LongTensor, (N*,), optional (required by a multi-group model)
        chunk_size : int
            Spots per chunk; memory is O(chunk_size * M * L) (or O(chunk_size * M) with
            ``diagonal_only``).

        Returns
        -------
        mean : Tensor, (L, N*)
        var : Tensor, (L, N*)
        """
        x, g = self._inputs(coordinates, groups)
        if int(chunk_size) < 1:
            raise ModelError(f"chunk_size = {chunk_size!r} must be a positive integer")
        means, vars_ = [], []
        weights = None if return_var else self._mean_weights()
        for s in range(0, x.shape[0], int(chunk_size)):
            sl = slice(s, s + int(chunk_size))
            gs = None if g is None else g[sl]
            if return_var:
                m, v = self._marginals(x[sl], gs)
                vars_.append(v)
            else:
                m = self._mean_only(x[sl], gs, weights)
            means.append(m)
        if not means:
            empty = x.new_zeros(self.n_components, 0)
            return (empty, empty.clone()) if return_var else empty
        mean = torch.cat(means, dim=1)
        return (mean, torch.cat(vars_, dim=1)) if return_var else mean

    @torch.no_grad()
    def groupwise(self, coordinates: Tensor, group_codes: Optional[Sequence[int]] = None,
                  chunk_size: int = 10000) -> Tensor:
        """Mean of q(F) at every spot as if it belonged to group g, for each g.

        Parameters
        ----------
        coordinates : Tensor, (N*, 2)
        group_codes : sequence of int, optional
            Default ``range(n_groups)``.
        chunk_size : int

        Returns
        -------
        Tensor, (G, L, N*)
            For a single-group model every slice is the same (groups play no role).
        """
        x, _ = self._inputs(coordinates, None, need_groups=False)
        codes = list(range(self.n_groups)) if group_codes is None else [int(c) for c in group_codes]
        if int(chunk_size) < 1:
            raise ModelError(f"chunk_size = {chunk_size!r} must be a positive integer")
        out = x.new_empty(len(codes), self.n_components, x.shape[0])
        weights = self._mean_weights()
        per_factor = weights.dim() == 3
        # The kernel between a spot of group g and inducing point j is the within-group
        # value where j is in g and the across-group value elsewhere, so
        #   mean_g = K_across w + (K_within - K_across)[:, Z_g] w[Z_g]:
        # two kernel evaluations per chunk for all G groups, not G.
        columns = [torch.nonzero(self.g_Z == c).squeeze(1) if self.kernel.multigroup else None
                   for c in codes]
        for s in range(0, x.shape[0], int(chunk_size)):
            xs = x[s:s + int(chunk_size)]
            sl = slice(s, s + xs.shape[0])
            if not self.kernel.multigroup:       # groups play no role: one field for all
                out[:, :, sl] = self._mean_only(xs, None, weights)
                continue
            within, across = self.kernel.within_and_across(xs, self.Z)
            base = _weighted(across, weights)                       # (L, B)
            diff = within.sub_(across)
            for i, cols in enumerate(columns):
                w = weights[:, cols] if per_factor else weights[cols]
                out[i, :, sl] = base + _weighted(diff[..., cols], w)
        return out

    # ---- state ----------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "multigroup"
        if key in state_dict and bool(state_dict[key]) != bool(self.multigroup):
            raise ModelError(f"cannot load a {'multi' if bool(state_dict[key]) else 'single'}-group "
                             f"SVGP state into a {'multi' if bool(self.multigroup) else 'single'}-"
                             f"group model: construct it with groups "
                             f"{'given' if bool(state_dict[key]) else '= None'}")
        # A state written with another block width is re-laid out through dense (L, M, M).
        bkey, lkey = prefix + "Lu_block", prefix + "Lu_lower"
        if bkey in state_dict and lkey in state_dict and int(state_dict[bkey]) != self.layout.block:
            theirs = BlockLayout(self.num_inducing, self.n_components, int(state_dict[bkey]))
            if tuple(state_dict[lkey].shape) == (theirs.size,):
                dense = theirs.to_dense(state_dict[lkey].to(self.mu.device))
                state_dict[lkey] = self.layout.from_dense(dense)
                state_dict[bkey] = torch.tensor(self.layout.block)
        self.clear_cache()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"n_components={self.n_components}, num_inducing={self.num_inducing}, "
                f"multigroup={bool(self.multigroup)}, diagonal_only={self.diagonal_only}, "
                f"cholesky_mode={self.cholesky_mode!r}, jitter={self.jitter:g}, "
                f"kl_weight={self.kl_weight:g}")
