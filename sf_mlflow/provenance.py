"""Which code produced a result: the package version plus a hash of its source.

Stage runs are tagged with :func:`code_version` so results can be traced to the
exact code, and a later run can tell whether an earlier one is still valid. The
source hash covers uncommitted edits, which a git commit alone would miss; the
git commit is recorded beside it when the package sits in a git checkout.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

import sf_mlflow

_PACKAGE_DIR = Path(sf_mlflow.__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 (first 12 hex digits) over the package's ``.py`` files, path and content."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        h.update(str(path.relative_to(_PACKAGE_DIR)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<version>+src.<hash>``, e.g. ``0.1.0+src.3f2a9c1b7d04``."""
    return f"{sf_mlflow.__version__}+src.{source_hash()}"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the git checkout holding the package, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_PACKAGE_DIR, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None
