"""Choosing the torch device from a user setting."""

from __future__ import annotations

import warnings

import torch

from sf_mlflow.errors import ConfigError

__all__ = ["resolve_device", "DEVICE_NAMES"]

#: Names accepted by :func:`resolve_device` (case-insensitive).
DEVICE_NAMES = ("cpu", "gpu", "cuda", "auto")


def resolve_device(name: str) -> torch.device:
    """Turn ``"cpu"``, ``"gpu"``/``"cuda"`` or ``"auto"`` into a ``torch.device``.

    ``"gpu"``/``"cuda"`` (optionally ``"cuda:1"``) fall back to the CPU with one
    warning when CUDA is not available, so a config written for a GPU machine
    still runs elsewhere; ``"auto"`` picks CUDA when present, silently.

    Raises
    ------
    ConfigError
        For any other name.
    """
    key = str(name).strip().lower()
    base, _, ordinal = key.partition(":")
    if base == "cpu" and not ordinal:
        return torch.device("cpu")
    if base == "auto" and not ordinal:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base in ("gpu", "cuda") and (not ordinal or ordinal.isdigit()):
        if not torch.cuda.is_available():
            warnings.warn(f"device = {name!r}: CUDA is not available, falling back to CPU",
                          RuntimeWarning, stacklevel=2)
            return torch.device("cpu")
        return torch.device(f"cuda:{ordinal}" if ordinal else "cuda")
    raise ConfigError(f"device = {name!r} is not recognised; expected one of "
                      f"{', '.join(DEVICE_NAMES)} (or 'cuda:<index>')")
