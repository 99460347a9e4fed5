"""Stationary covariance functions over 2-D spot coordinates, with an optional multi-group form.

All kernels share one construction, evaluated on whole distance matrices at once::

    k(x, x') = sigma^2 * shape(r / lengthscale),     r = ||x - x'||

with the Matern-1/2, -3/2, -5/2 and squared-exponential (RBF) shapes. Either one
lengthscale and one amplitude ``sigma`` are shared by all L factors (kernel matrices are then
``(N1, N2)``, factorised once for all factors), or each factor has its own of both (matrices
get a leading ``L`` batch dimension, ``(L, N1, N2)``).

Multi-group (MGGP) kernels
--------------------------
Li, Jones & Engelhardt, "Inferring multi-group Gaussian processes", let a function vary by
group g as well as position. With the group distance ``d2(g, g') = 0`` for equal groups and
``1`` otherwise, ``a = group_diff_param`` and ``nu = 1 / (a * d2 + 1)`` (so nu = 1 within a
group and ``1 / (a + 1)`` across groups), the kernels are, for p-dimensional coordinates
(p = 2 here)::

    RBF:         sigma^2 * exp(-r^2 nu / (2 l^2))           * nu^(p/2)
    Matern-1/2:  sigma^2 * exp(-t)                          * nu^((1 + p)/2),  t = r sqrt(nu) / l
    Matern-3/2:  sigma^2 * (1 + t) exp(-t)                  * nu^((3 + p)/2),  t = sqrt(3) r sqrt(nu) / l
    Matern-5/2:  sigma^2 * (1 + t + t^2/3) exp(-t)          * nu^((5 + p)/2),  t = sqrt(5) r sqrt(nu) / l

i.e. the plain shape at the distance ``r sqrt(nu)`` times ``nu^((2 nu_m + p) / 2)`` for the
Matern smoothness ``nu_m`` (the RBF is the ``nu_m -> inf`` limit whose prefactor is
``nu^(p/2)``). The paper derives the RBF and Matern-3/2 forms; the Matern-1/2 and -5/2 ones
follow by the same construction (a Gaussian scale mixture over the group offset) and are
given here by analogy. Within one group every formula is exactly the plain kernel, bit for
bit, and ``a = 0`` makes all groups identical.

Positivity of ``lengthscale``, ``sigma`` and ``a`` comes from a log parametrisation
(``raw_lengthscale = log l``, ``raw_sigma = log sigma``, ``raw_group_diff = log a``, with
``a = 0`` stored as ``-inf``): gradient steps are then relative, which suits scale
parameters. All are fixed (``requires_grad=False``) unless ``trainable``; :meth:`project`
keeps trained values inside bounds.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from sf_mlflow.errors import ModelError

__all__ = [
    "StationaryKernel",
    "Matern12",
    "Matern32",
    "Matern52",
    "RBF",
    "KERNELS",
    "make_kernel",
    "squared_distances",
]


def squared_distances(x1: Tensor, x2: Tensor) -> Tensor:
    """Squared Euclidean distances, (N1, N2), from coordinates ``x1: (N1, p)``, ``x2: (N2, p)``.

    Differences are formed per coordinate rather than through ``|x|^2 + |x'|^2 - 2 x.x'``
    (as ``torch.cdist`` does for large inputs): with coordinates of size ~50 in float32 the
    expansion loses ~1e-3 of absolute accuracy in ``r^2``, which distorts the kernel between
    close spots, whereas direct differences are exact up to one rounding. The loop runs over
    the p = 2 coordinate dimensions, never over pairs.
    """
    if x1.dim() != 2 or x2.dim() != 2 or x1.shape[1] != x2.shape[1]:
        raise ModelError(f"coordinates must have shapes (N1, p) and (N2, p) with the same p; "
                         f"got {tuple(x1.shape)} and {tuple(x2.shape)}")
    out = None
    for j in range(x1.shape[1]):
        d = x1[:, j, None] - x2[None, :, j]
        out = d * d if out is None else out.addcmul_(d, d)
    if out is None:  # p = 0: every point is at distance 0
        out = x1.new_zeros((x1.shape[0], x2.shape[0]))
    return out


class StationaryKernel(nn.Module):
    """Base class: ``sigma^2 * shape(r / lengthscale)``, optionally multi-group.

    Parameters
    ----------
    lengthscale : float or sequence of float
        Initial lengthscale ``l > 0``, in the units of the coordinates. A sequence of L
        values (or ``n_components`` given) makes one lengthscale per factor.
    sigma : float or sequence of float
        Initial amplitude ``sigma > 0``; ``k(x, x) = sigma^2``. One per factor (a sequence
        of L values, or one value repeated) when ``n_components`` is given.
    n_components : int, optional
        L. When given, lengthscale and sigma have shape (L,) (one per factor) and kernel
        matrices are ``(L, N1, N2)``; when None, one shared of each, matrices ``(N1, N2)``.
    multigroup : bool
        Use the MGGP form; :meth:`forward` then needs group codes.
    group_diff_param : float
        ``a >= 0`` in ``nu = 1 / (a d2 + 1)``; larger means groups are more different.
    trainable : bool
        Whether ``raw_lengthscale``, ``raw_sigma`` and (multi-group, ``a > 0``)
        ``raw_group_diff`` require gradients.
    dtype, device :
        Of the parameters.

    Attributes
    ----------
    raw_lengthscale : Parameter, () or (L,)
        ``log l``.
    raw_sigma : Parameter, () or (L,)
        ``log sigma``.
    raw_group_diff : Parameter, ()
        ``log a`` (``-inf`` for ``a = 0``).
    """

    #: Matern smoothness nu_m (``inf`` for the RBF); sets the MGGP prefactor exponent.
    smoothness: float = math.inf

    def __init__(self, lengthscale: float | Sequence[float] = 4.0, sigma: float = 1.0, *,
                 n_components: Optional[int] = None, multigroup: bool = False,
                 group_diff_param: float = 10.0, trainable: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        ls = torch.as_tensor(lengthscale, dtype=torch.float64).flatten()
        if n_components is not None:
            n_components = int(n_components)
            if n_components < 1:
                raise ModelError(f"n_components = {n_components!r} must be a positive integer")
        ls = _per_factor(lengthscale, "lengthscale", n_components)
        sg = _per_factor(sigma, "sigma", n_components)
        if not bool(torch.isfinite(ls).all()) or not bool((ls > 0).all()):
            raise ModelError(f"lengthscale = {lengthscale!r} must be finite and > 0")
        if not bool(torch.isfinite(sg).all()) or not bool((sg > 0).all()):
            raise ModelError(f"sigma = {sigma!r} must be finite and > 0")
        if not (math.isfinite(float(group_diff_param)) and float(group_diff_param) >= 0):
            raise ModelError(f"group_diff_param = {group_diff_param!r} must be finite and >= 0")
        self.n_components = n_components
        self.multigroup = bool(multigroup)
        self.raw_lengthscale = nn.Parameter(torch.log(ls).to(dtype=dtype, device=device).clone(),
                                            requires_grad=bool(trainable))
        self.raw_sigma = nn.Parameter(torch.log(sg).to(dtype=dtype, device=device).clone(),
                                      requires_grad=bool(trainable))
        # a = 0 (identical groups) is log 0 = -inf, which exp maps back to 0 exactly; it stays
        # fixed, as no gradient step can leave -inf.
        a = float(group_diff_param)
        self.raw_group_diff = nn.Parameter(
            torch.tensor(math.log(a) if a > 0 else -math.inf, dtype=dtype, device=device),
            requires_grad=bool(trainable) and self.multigroup and a > 0)

    # ---- hyperparameters -----------------------------------------------------------------
    @property
    def lengthscale(self) -> Tensor:
        """``l``, () or (L,)."""
        return torch.exp(self.raw_lengthscale)

    @property
    def sigma(self) -> Tensor:
        """``sigma``, () or (L,)."""
        return torch.exp(self.raw_sigma)

    @property
    def outputscale(self) -> Tensor:
        """``sigma^2 = k(x, x)``, () or (L,)."""
        return torch.exp(2.0 * self.raw_sigma)

    @property
    def group_diff_param(self) -> Tensor:
        """``a``, ()."""
        return torch.exp(self.raw_group_diff)

    def amplitude(self, ndim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``sigma^2`` shaped to broadcast against a per-factor tensor of ``ndim`` dims (its
        first the factor axis when per factor): () or (L, 1, ...)."""
        s = self.outputscale if dtype is None else self.outputscale.to(dtype)
        return s.reshape(s.shape + (1,) * (ndim - 1)) if self.per_factor else s

    @torch.no_grad()
    def project(self, lengthscale: tuple[float, float], sigma: tuple[float, float],
                group_diff: tuple[float, float]) -> None:
        """Clamp the trained hyperparameters into ``(low, high)`` bounds (projected steps)."""
        for raw, (lo, hi) in ((self.raw_lengthscale, lengthscale), (self.raw_sigma, sigma),
                              (self.raw_group_diff, group_diff)):
            if raw.requires_grad:
                raw.clamp_(math.log(lo), math.log(hi))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # States written before a was trained hold it as the buffer ``group_diff_param``, and
        # before per-factor amplitudes one shared sigma.
        old = state_dict.pop(prefix + "group_diff_param", None)
        if old is not None and prefix + "raw_group_diff" not in state_dict:
            state_dict[prefix + "raw_group_diff"] = torch.log(old.reshape(()))
        key = prefix + "raw_sigma"
        if key in state_dict and self.per_factor and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].expand(self.n_components).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @property
    def per_factor(self) -> bool:
        """Whether kernel matrices carry a leading factor dimension L."""
        return self.n_components is not None

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in (self.raw_lengthscale, self.raw_sigma, self.raw_group_diff))

    def _inv_lengthscale(self, dtype: torch.dtype) -> Tensor:
        """``1 / l`` in ``dtype``, shaped to broadcast against (N1, N2): () or (L, 1, 1)."""
        inv = torch.exp(-self.raw_lengthscale.to(dtype))
        return inv[:, None, None] if self.per_factor else inv

    # ---- evaluation ----------------------------------------------------------------------
    def _shape(self, r2: Tensor, dist_factor: Optional[Tensor], inv_ls: Tensor,
               inplace: bool) -> Tensor:
        """The unit-amplitude profile from squared distances; subclasses implement.

        r2 : (N1, N2), owned (may be overwritten). dist_factor : (N1, N2) or None, the
        multiplier of r^2 (``nu``; None within a single group). inv_ls : () or (L, 1, 1).
        ``inplace``: no gradient is needed through the hyperparameters, so fresh
        intermediates may be overwritten. Returns (N1, N2) or (L, N1, N2).
        """
        raise NotImplementedError

    def group_scale(self, g1: Tensor, g2: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``nu = 1 / (a d2(g, g') + 1)``, (N1, N2), for group codes ``g1: (N1,)``, ``g2: (N2,)``."""
        a = self.group_diff_param.to(dtype or self.group_diff_param.dtype)
        return _where_same(g1, g2, 1.0 / (a + 1.0))

    def _distances(self, x1: Tensor, x2: Tensor, dtype: Optional[torch.dtype]
                   ) -> tuple[torch.dtype, Tensor, bool]:
        """The dtype to compute in, squared distances (N1, N2) and whether intermediates
        may be overwritten.

        A (B, M) kernel matrix is the largest elementwise work of an SVGP step; when the
        hyperparameters need no gradient its intermediates are overwritten in place,
        which on CPUs also saves the page faults of fresh large allocations.
        """
        ref = self.raw_sigma
        dtype = dtype or ref.dtype
        x1 = x1.detach().to(dtype=dtype, device=ref.device)
        x2 = x2.detach().to(dtype=dtype, device=ref.device)
        return dtype, squared_distances(x1, x2), not (torch.is_grad_enabled() and self.trainable)

    def forward(self, x1: Tensor, x2: Tensor, g1: Optional[Tensor] = None,
                g2: Optional[Tensor] = None, *, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Kernel matrix between ``x1: (N1, 2)`` and ``x2: (N2, 2)``.

        Parameters
        ----------
        x1, x2 : Tensor, (N1, 2), (N2, 2)
            Coordinates (cast to the parameters' dtype and device). No gradient flows to them.
        g1, g2 : LongTensor, (N1,), (N2,), optional
            Group codes; required by a multi-group kernel, ignored otherwise.
        dtype : torch.dtype, optional
            Dtype to compute in (default: the parameters'); e.g. float64 for a Gram matrix
            about to be factorised. Gradients still reach the parameters through the cast.

        Returns
        -------
        Tensor, (N1, N2), or (L, N1, N2) with per-factor lengthscales.
        """
        ref = self.raw_sigma
        dtype, r2, inplace = self._distances(x1, x2, dtype)
        if not self.multigroup:
            k = self._shape(r2, None, self._inv_lengthscale(dtype), inplace)
        else:
            if g1 is None or g2 is None:
                raise ModelError("this is a multi-group kernel: pass group codes g1 (N1,) and g2 (N2,)")
            if g1.shape != (x1.shape[0],) or g2.shape != (x2.shape[0],):
                raise ModelError(f"group codes of shapes {tuple(g1.shape)}, {tuple(g2.shape)} do not "
                                 f"match coordinates of shapes {tuple(x1.shape)}, {tuple(x2.shape)}")
            g1, g2 = g1.to(ref.device), g2.to(ref.device)
            cross = 1.0 / (self.group_diff_param.to(dtype) + 1.0)      # nu across groups
            k = self._shape(r2, _where_same(g1, g2, cross), self._inv_lengthscale(dtype), inplace)
            # Within a group the factor is exactly 1, so the plain kernel is reproduced bit for bit.
            k = _mul(k, _where_same(g1, g2, cross ** self.mggp_exponent(x1.shape[1])), inplace)
        return _mul(k, self.amplitude(k.dim(), dtype), inplace)

    def within_and_across(self, x1: Tensor, x2: Tensor, *,
                          dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """The two values a multi-group kernel takes between ``x1: (N1, 2)`` and ``x2: (N2, 2)``.

        ``within``: both points in one group (the plain kernel); ``across``: in different
        groups. Each is (N1, N2), or (L, N1, N2) with per-factor lengthscales, and
        :meth:`forward` picks one of the two entrywise, bit for bit. A prediction for every
        group at once (:meth:`SVGPPrior.groupwise
        <sf_mlflow.models.svgp.SVGPPrior.groupwise>`) then costs two kernel evaluations
        instead of one per group.
        """
        if not self.multigroup:
            raise ModelError("within_and_across needs a multi-group kernel (group_diff_param set)")
        dtype, r2, inplace = self._distances(x1, x2, dtype)
        inv_ls = self._inv_lengthscale(dtype)
        cross = 1.0 / (self.group_diff_param.to(dtype) + 1.0)
        across = self._shape(r2.clone(), cross.clone(), inv_ls, inplace)
        across = _mul(across, cross ** self.mggp_exponent(x1.shape[1]), inplace)
        within = self._shape(r2, None, inv_ls, inplace)
        return (_mul(within, self.amplitude(within.dim(), dtype), inplace),
                _mul(across, self.amplitude(across.dim(), dtype), inplace))

    def mggp_exponent(self, p: int = 2) -> float:
        """Exponent of the MGGP prefactor ``nu^e``: ``(2 nu_m + p) / 2``, or ``p / 2`` for the RBF."""
        if math.isinf(self.smoothness):
            return p / 2.0
        return (2.0 * self.smoothness + p) / 2.0

    def diag(self, x: Tensor) -> Tensor:
        """``k(x, x) = sigma^2`` for every row of ``x: (N, 2)``, no matrix built: (N,), or
        (L, N) with per-factor amplitudes (the same for all kernels and groups: r = 0, nu = 1)."""
        return self.amplitude(2).expand(*self.outputscale.shape, x.shape[0])

    def extra_repr(self) -> str:
        ls = self.lengthscale.detach().cpu().tolist()
        sg = self.sigma.detach().cpu().tolist()
        return (f"lengthscale={ls}, sigma={sg}, multigroup={self.multigroup}, "
                f"group_diff_param={float(self.group_diff_param):.4g}, trainable={self.trainable}")


def _per_factor(value, name: str, n_components: Optional[int]) -> Tensor:
    """A hyperparameter as float64 (): shared, or (L,) when ``n_components`` is given."""
    v = torch.as_tensor(value, dtype=torch.float64).flatten()
    if n_components is None:
        if v.numel() != 1:
            raise ModelError(f"{name} has {v.numel()} values; pass n_components = {v.numel()} "
                             f"for one {name} per factor, or a single number")
        return v.reshape(())
    if v.numel() == 1:
        return v.expand(n_components).clone()
    if v.numel() != n_components:
        raise ModelError(f"{name} has {v.numel()} values, expected 1 or n_components = {n_components}")
    return v


def _where_same(g1: Tensor, g2: Tensor, other: Tensor) -> Tensor:
    """(N1, N2): 1 where ``g1[i] == g2[j]``, ``other`` (a scalar tensor) elsewhere."""
    if g1.dim() != 1 or g2.dim() != 1:
        raise ModelError(f"group codes must be 1-D, got shapes {tuple(g1.shape)} and {tuple(g2.shape)}")
    same = g1[:, None] == g2[None, :]
    return torch.where(same, torch.ones((), dtype=other.dtype, device=other.device), other)


def _mul(x: Tensor, s: Tensor, inplace: bool) -> Tensor:
    """``x * s``, overwriting ``x`` when allowed and the result keeps x's shape."""
    if inplace and torch.broadcast_shapes(x.shape, s.shape) == x.shape:
        return x.mul_(s)
    return x * s


def _distance(r2: Tensor, nu: Optional[Tensor]) -> Tensor:
    """``r sqrt(nu)``, (N1, N2), overwriting ``r2``. The square root is taken of the raw
    distance, which carries no gradient, so training the lengthscale never meets sqrt's
    infinite slope at r = 0."""
    r = r2.sqrt_()
    return r if nu is None else r.mul_(nu.sqrt_())


class Matern12(StationaryKernel):
    """Matern-1/2 (exponential): ``sigma^2 exp(-r / l)``. See :class:`StationaryKernel`."""

    smoothness = 0.5

    def _shape(self, r2, nu, inv_ls, inplace):
        t = _mul(_distance(r2, nu), inv_ls, inplace)
        return t.neg_().exp_() if inplace else torch.exp(-t)


class Matern32(StationaryKernel):
    """Matern-3/2: ``sigma^2 (1 + t) exp(-t)``, ``t = sqrt(3) r / l``. See :class:`StationaryKernel`."""

    smoothness = 1.5

    def _shape(self, r2, nu, inv_ls, inplace):
        t = _mul(_distance(r2, nu), math.sqrt(3.0) * inv_ls, inplace)
        e = torch.neg(t).exp_()
        return t.add_(1.0).mul_(e) if inplace else (1.0 + t) * e


class Matern52(StationaryKernel):
    """Matern-5/2: ``sigma^2 (1 + t + t^2 / 3) exp(-t)``, ``t = sqrt(5) r / l``."""

    smoothness = 2.5

    def _shape(self, r2, nu, inv_ls, inplace):
        t = _mul(_distance(r2, nu), math.sqrt(5.0) * inv_ls, inplace)
        e = torch.neg(t).exp_()
        if inplace:
            return torch.mul(t, t).div_(3.0).add_(t).add_(1.0).mul_(e)
        return (1.0 + t + t * t / 3.0) * e


class RBF(StationaryKernel):
    """Squared exponential: ``sigma^2 exp(-r^2 / (2 l^2))``. See :class:`StationaryKernel`."""

    smoothness = math.inf

    def _shape(self, r2, nu, inv_ls, inplace):
        s = r2 if nu is None else r2.mul_(nu)
        s = _mul(s, -0.5 * (inv_ls * inv_ls), inplace)
        return s.exp_() if inplace else torch.exp(s)


#: Kernel classes by configuration name.
KERNELS: dict[str, type[StationaryKernel]] = {
    "Matern12": Matern12,
    "Matern32": Matern32,
    "Matern52": Matern52,
    "RBF": RBF,
}


def make_kernel(name: str, lengthscale: float | Sequence[float] = 4.0, sigma: float = 1.0, *,
                n_components: Optional[int] = None, multigroup: bool = False,
                group_diff_param: float = 10.0, trainable: bool = False,
                dtype: torch.dtype = torch.float32, device=None) -> StationaryKernel:
    """Build a kernel by name (``Matern12``, ``Matern32``, ``Matern52``, ``RBF``; any case).

    ``n_components`` given means one lengthscale per factor; see :class:`StationaryKernel`
    for the other arguments.
    """
    lookup = {k.lower(): v for k, v in KERNELS.items()}
    cls = lookup.get(str(name).lower())
    if cls is None:
        raise ModelError(f"kernel = {name!r} is unknown; expected one of {', '.join(KERNELS)}")
    return cls(lengthscale, sigma, n_components=n_components, multigroup=multigroup,
               group_diff_param=group_diff_param, trainable=trainable, dtype=dtype, device=device)
