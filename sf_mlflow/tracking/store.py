"""What went wrong with the tracking store or the disk, as one line a user can act on.

sqlite, SQLAlchemy and MLflow each wrap the one underlying failure (another process holds
the write lock, the store's folder is read-only, the disk is full) in their own exception,
often only as text, so the failure is recognised in the text of every exception of the
chain. :func:`explain_failure` is the command line's last resort for errors no stage
translated itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from pathlib import Path

from sf_mlflow.errors import StoreError, exception_chain

__all__ = ["explain_failure", "store_failure", "SQLITE_BUSY_TIMEOUT_S", "sqlite_path",
           "quiet_translated_failures"]

#: How long MLflow's sqlite sessions wait for another writer's lock (its ``PRAGMA
#: busy_timeout = 20000``, fixed in MLflow) before a write fails with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 20

_LOCKED = ("database is locked", "database table is locked")
_READ_ONLY = ("readonly database", "read-only database", "read-only file system",
              "unable to open database file")
_DAMAGED = ("database disk image is malformed", "file is not a database")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _text(err: BaseException) -> str:
    return " ".join(str(e) for e in exception_chain(err)).lower()


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def store_failure(err: BaseException, uri: str | None = None) -> StoreError | None:
    """A :class:`StoreError` when ``err`` (or what it wraps) says the store is locked,
    read-only or damaged, else None."""
    text = _text(err)
    uri = uri or _tracking_uri()
    if any(s in text for s in _LOCKED):
        return StoreError(
            f"the tracking store {uri} is locked by another writer (sqlite gave up after "
            f"waiting {SQLITE_BUSY_TIMEOUT_S} s); wait for it to finish or point "
            "MLFLOW_TRACKING_URI at another store")
    if any(s in text for s in _READ_ONLY):
        return StoreError(
            f"the tracking store {uri} is read-only (its file or folder cannot be written); "
            "stages write runs to it: make it writable, or copy it somewhere writable and point "
            "MLFLOW_TRACKING_URI at the copy (reading, e.g. spatial_factorization export, works "
            "on a read-only store)")
    problem = _damage(text)
    if problem is not None:
        return damaged_store(uri, problem)
    return None


def _damage(text: str) -> str | None:
    """sqlite's words for a damaged database, if ``text`` (lower case) has them."""
    return next((s for s in _DAMAGED if s in text), None)


def damaged_store(uri: str, problem: str) -> StoreError:
    """The one line for a store whose database is damaged (``problem``: sqlite's words)."""
    path = sqlite_path(uri)
    return StoreError(
        f"the tracking store {uri} is damaged (sqlite: {problem}); restore {path or 'it'} "
        "from a backup, or point MLFLOW_TRACKING_URI at a new store (e.g. "
        "sqlite:///mlflow-new.db); the runs' artifacts beside it are untouched")


#: Stores up to this size are checked for damage (sqlite's quick_check, well under a second
#: here) before a run is made in them: a run created in a damaged store could not be ended.
QUICK_CHECK_MAX_BYTES = 256 * 2**20


def check_integrity(uri: str) -> None:
    """Raise :func:`damaged_store` when sqlite's ``quick_check`` of the store finds damage."""
    import sqlite3

    path = sqlite_path(uri)
    if path is None or not path.is_file() or path.stat().st_size > QUICK_CHECK_MAX_BYTES:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                timeout=SQLITE_BUSY_TIMEOUT_S)) as con:
            result = con.execute("PRAGMA quick_check(1)").fetchone()[0]
    except sqlite3.DatabaseError as err:
        problem = _damage(str(err).lower())
        if problem is not None:
            raise damaged_store(uri, problem) from None
        return      # locked, unreadable: the store's own access reports that
    if result != "ok":
        detail = [ln for ln in str(result).splitlines() if not ln.startswith("***")]
        raise damaged_store(uri, "quick_check found " + (detail[0] if detail else "damage")[:200])


#: Failures of writing, whatever the file.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _os_error(err: BaseException) -> OSError | None:
    """The failure of the disk in ``err``'s chain: a write failure, or any OSError that names
    its path (a system path such as /proc given as a folder, a vanished file)."""
    for e in exception_chain(err):
        if isinstance(e, OSError) and e.errno is not None and (
                e.errno in _WRITE_ERRNOS or e.filename is not None):
            return e
    return None


def explain_failure(err: BaseException) -> str | None:
    """One line for a store or disk failure ``err`` no stage translated, or None."""
    store = store_failure(err)
    if store is not None:
        return str(store)
    os_err = _os_error(err)
    if os_err is None:
        return None
    # h5py puts the file's name only into its message ("filename = 'x.h5ad'")
    named = re.search(r"filename = '([^']+)'", str(os_err))
    where = os_err.filename or (named.group(1) if named else "an output file")
    if os_err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing {where}; free space or set output_dir "
                "(or the artifact location) elsewhere")
    reason = os.strerror(os_err.errno)
    if os_err.errno not in _WRITE_ERRNOS:
        return (f"cannot use {where} ({reason}); check the path, or set output_dir (or the "
                "artifact location) elsewhere")
    return (f"cannot write {where} ({reason}); make it writable or set output_dir (or the "
            "artifact location) elsewhere")


class _TranslatedFailures(logging.Filter):
    """Drops MLflow's ERROR log (with its traceback) of a store failure that
    :func:`store_failure` turns into one line anyway; other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().lower()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + _text(record.exc_info[1])
        return not any(s in text for s in _LOCKED + _READ_ONLY + _DAMAGED)


_FILTER = _TranslatedFailures()


def quiet_translated_failures() -> None:
    """Install the filter on the logger MLflow reports SQLAlchemy errors with (idempotent)."""
    logger = logging.getLogger("mlflow.store.db.utils")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
