"""Choosing the torch device from a user setting, and preparing the process for a CPU fit."""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

import torch

from sf_mlflow.errors import ConfigError

__all__ = ["resolve_device", "prepare_device", "keep_freed_memory", "DEVICE_NAMES",
           "MALLOC_ENV"]

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


#: Set to ``0`` to leave the C allocator's settings alone (see :func:`keep_freed_memory`).
MALLOC_ENV = "SF_MLFLOW_KEEP_FREED_MEMORY"

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of unmapping it.

    glibc serves every request above its mmap threshold (at most 32 MiB) with a fresh
    ``mmap`` and unmaps it on ``free``. A training step on a CPU allocates and frees tensors
    of tens to hundreds of MiB (the (L, B, M) kernel matrices, the (M, M) curvature and
    precision of each factor), so every step paid the page faults that zero-fill that memory
    again. ``benchmarks/bench_svgp.py`` on two cores at Slide-seq size (41,786 spots, 14
    groups, L 10): a natural step took 5.6 s at M 1,000, B 10,000 (one kernel per factor)
    and 19.1 s at M 3,000, B 7,000 with glibc's defaults, 4.1 s and 13.1 s with mmap off and
    the heap kept (Adam: 5.4 and 11.0 s against 3.7 and 9.0 s; measured with the step's
    SciPy-LAPACK variant, 13.1 s at M 3,000 as the one shipped). The process then holds its
    peak memory until it exits (a trim happens only above 2 GiB free at the top).

    Applied once per process; not on other C libraries or platforms, nor when the
    environment variable ``SF_MLFLOW_KEEP_FREED_MEMORY`` is ``0``. Returns whether it is
    in effect.
    """
    global _kept
    if _kept is None:
        _kept = False
        if sys.platform.startswith("linux") and os.environ.get(MALLOC_ENV, "1").strip() != "0":
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _kept = bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _kept


def prepare_device(device: torch.device) -> torch.device:
    """``device``, after preparing the process for a fit on it (:func:`keep_freed_memory`
    on a CPU)."""
    if device.type == "cpu":
        keep_freed_memory()
    return device
