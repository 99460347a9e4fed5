"""Positive parametrisations of the diagonal of the SVGP's Cholesky factors ``Lu``.

``cholesky_mode = "exp"``: ``d = exp(raw)``; ``"softplus"``: ``d = log(1 + exp(raw))``,
whose slope stays bounded as d grows. The KL term needs ``log d``, taken without forming
``d`` where it would underflow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["to_positive", "log_positive", "from_positive"]


def to_positive(raw: Tensor, mode: str) -> Tensor:
    """The diagonal ``d`` from its raw parameter."""
    return torch.exp(raw) if mode == "exp" else nn.functional.softplus(raw)


def log_positive(raw: Tensor, mode: str) -> Tensor:
    """``log`` of :func:`to_positive`, without the underflow of ``log(softplus(x))`` at x << 0."""
    if mode == "exp":
        return raw
    # log(softplus(x)) -> x as x -> -inf, where softplus(x) underflows; the unused branch is
    # fed a safe value so that its gradient is not 0 * inf = NaN.
    tiny = raw < -30.0
    return torch.where(tiny, raw, torch.log(nn.functional.softplus(torch.where(tiny, 0.0, raw))))


def from_positive(value: float, mode: str) -> float:
    """The raw parameter of a diagonal value (inverse of :func:`to_positive`)."""
    return math.log(value) if mode == "exp" else math.log(math.expm1(value))
