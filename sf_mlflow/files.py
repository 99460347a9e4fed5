"""Files the project writes where a user keeps things: whole or not at all, never overwritten unasked.

A file is written to a hidden temporary sibling and renamed over its target only once it is
complete (a rename within one folder is atomic), so a crash, a full disk or a signal leaves
the target as it was: an existing file intact, a new one absent. Stage outputs get the same
guarantee folder-wise from their staging folder (:func:`sf_mlflow.stages._common.staging`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from sf_mlflow.errors import DataError

__all__ = ["atomic_write", "check_target", "replacing", "safe_name"]


def safe_name(name: str, fallback: str = "file") -> str:
    """``name`` usable in a file or folder name (``L2/3 IT`` -> ``L2_3_IT``; ``fallback``
    when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or fallback


def _temporary_sibling(path: Path) -> Path:
    # keeps the suffix: writers such as anndata's pick the format from it
    return path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(file object)`` to a temporary sibling, then rename over ``path``."""
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_target(path: Path, *, force: bool = False, force_flag: str = "--force",
                 name: str = "") -> None:
    """Refuse to write ``path`` when it is a folder, or a file that exists and ``force`` is
    not given (:class:`DataError` naming ``force_flag``, and ``path`` as ``name`` when given,
    e.g. "output"); callers check before long work."""
    path = Path(path)
    shown = f"{name} {str(path)!r}" if name else repr(str(path))
    if path.is_dir():
        raise DataError(f"{shown} is a folder; name a file to write inside it")
    if path.exists() and not force:
        raise DataError(f"{shown} exists; pass {force_flag} to replace it, or choose "
                        "another path")


@contextlib.contextmanager
def replacing(path: Path, *, force: bool = False, force_flag: str = "--force",
              expected_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` at; on success it is renamed over ``path``.

    Parameters
    ----------
    path : the file to write
    force : replace an existing ``path`` (else :class:`DataError` naming ``force_flag``)
    force_flag : the option a user passes to replace (named in the error)
    expected_bytes : a lower bound of the file's size; a folder with less free space is
        refused before anything is written

    Any :class:`OSError` while writing (a full disk, a file size limit, a vanished folder)
    becomes one :class:`DataError` line that says the target is untouched; the temporary
    file is removed whatever happens.
    """
    path = Path(path)
    check_target(path, force=force, force_flag=force_flag)
    existed = path.exists()
    untouched = "the existing file is untouched" if existed else "nothing was written there"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError as e:
        raise DataError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    if expected_bytes > free:
        raise DataError(f"cannot write {str(path)!r}: it needs at least "
                        f"{expected_bytes / 2**20:,.1f} MiB and its file system has "
                        f"{free / 2**20:,.1f} MiB free; free some space or write elsewhere "
                        f"({untouched})")
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        reason = e.strerror or str(e).splitlines()[0][:200]
        raise DataError(f"cannot write {str(path)!r}: {reason}; {untouched}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
