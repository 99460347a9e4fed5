"""Stage claims: one process computes a stage; another that needs the same result waits for it.

Two ``main`` runs started at once on one store used to compute every stage twice: each looked
for a finished run to reuse, found none, and ran its own. Before computing a stage, ``main``
now claims it: it inserts a row keyed by what the stage computes (stage, stage hash, code
version, upstream run) into the table ``sf_stage_claims`` of the tracking store's own
database. The key is the table's primary key, so of two processes inserting the same key the
database lets exactly one succeed -- the claim is atomic however the two interleave. The other
waits, printing so, until the claim is released, then reuses the finished run. A stage run on
its own (``spatial_factorization train``, ``mlflow run . -e train``) holds the claim of what it
computes too (:func:`hold_claim`), so a ``main`` started meanwhile waits for it; the stage
itself never waits, since it was asked for a run of its own.

A claim names the run that holds it (the ``main`` run, which has a heartbeat: see
:mod:`sf_mlflow.tracking.liveness`). A claim whose holder is no longer RUNNING, or whose
process is dead, is stale: a waiter removes it (only if it still names that holder) and
claims the stage itself. Stores without a database of ours to write to (an ``http://``
tracking server) get no claims: each process computes what it found unfinished, as before.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

#: The table of claims, in the tracking store's database.
TABLE = "sf_stage_claims"
#: Seconds between two looks at a claim another process holds (signals stay prompt).
POLL_S = 1.0
#: Seconds between two "still waiting" lines.
SAY_EVERY_S = 30.0

__all__ = ["Claim", "claimed", "claims_supported", "hold_claim", "stage_claim", "TABLE"]


@dataclass(frozen=True)
class Claim:
    """The row of a claim: what is computed, by which run, where, since when."""

    key: str
    run_id: str
    host: str
    pid: int
    since: float


def claims_supported(uri: str) -> bool:
    """Whether the store at ``uri`` is a database claims can be written to."""
    return uri.startswith(("sqlite:///", "postgresql", "mysql", "mssql"))


_ENGINES: dict = {}


def _table(uri: str):
    """``(engine, table)`` of the claims of the store at ``uri``, the table created if new."""
    import sqlalchemy as sa

    if uri not in _ENGINES:
        kwargs = {"connect_args": {"timeout": 20}} if uri.startswith("sqlite") else {}
        engine = sa.create_engine(uri, **kwargs)
        meta = sa.MetaData()
        table = sa.Table(TABLE, meta,
                         sa.Column("key", sa.String(512), primary_key=True),
                         sa.Column("run_id", sa.String(64), nullable=False),
                         sa.Column("host", sa.String(255), nullable=False),
                         sa.Column("pid", sa.Integer, nullable=False),
                         sa.Column("since", sa.Float, nullable=False))
        try:
            meta.create_all(engine, checkfirst=True)
        except sa.exc.DatabaseError:
            # another process created it between the check and the CREATE (PostgreSQL)
            meta.create_all(engine, checkfirst=True)
        _ENGINES[uri] = (engine, table)
    return _ENGINES[uri]


def _try_claim(uri: str, key: str, run_id: str) -> Optional[Claim]:
    """Insert the claim; None when it is ours now, else the claim that holds ``key``."""
    import sqlalchemy as sa

    engine, table = _table(uri)
    row = {"key": key, "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
           "since": time.time()}
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(**row))
        return None
    except sa.exc.IntegrityError:
        with engine.begin() as conn:
            held = conn.execute(sa.select(table).where(table.c.key == key)).mappings().first()
        if held is None:          # released between the insert and the look: try again
            return _try_claim(uri, key, run_id)
        return Claim(**dict(held))


def _release(uri: str, key: str, run_id: str) -> None:
    """Delete the claim ``key`` if ``run_id`` holds it (a stale claim another removed and
    claimed anew is left to its new holder)."""
    engine, table = _table(uri)
    with engine.begin() as conn:
        conn.execute(table.delete().where((table.c.key == key) & (table.c.run_id == run_id)))


@contextlib.contextmanager
def claimed(uri: str, key: str, run_id: str, *, holder_gone: Callable[[Claim], Optional[str]],
            say: Callable[[str], None]) -> Iterator[bool]:
    """Hold the claim ``key`` for run ``run_id`` while the block runs.

    Yields True once the claim is this run's (the block computes the stage, then the claim
    is released whatever happens), or False at once when the store takes no claims. While
    another run holds it, waits -- polling every :data:`POLL_S` seconds, a line every
    :data:`SAY_EVERY_S` -- and yields True when it was released (the block then finds the
    holder's finished run to reuse) or when ``holder_gone(claim)`` names why its holder is
    dead (the stale claim is removed first).
    """
    if not claims_supported(uri):
        yield False
        return
    t0, said = time.monotonic(), None
    while True:
        held = _try_claim(uri, key, run_id)
        if held is None or held.run_id == run_id:
            break
        gone = holder_gone(held)
        if gone is not None:
            say(f"the run {held.run_id} that claimed it is gone ({gone}); taking it over")
            _release(uri, key, held.run_id)
            continue
        now = time.monotonic()
        if said is None or now - said >= SAY_EVERY_S:
            say(f"waiting for run {held.run_id} (process {held.pid} on {held.host}), which is "
                "computing it, to finish" + (f" ({now - t0:.0f} s so far)" if said else ""))
            said = now
        time.sleep(POLL_S)
    try:
        yield True
    finally:
        _release(uri, key, run_id)


def _key(stage: str, stage_hash: str, code_version: str, upstream_run_id: str | None) -> str:
    return f"{stage}|{stage_hash}|{code_version}|{upstream_run_id or '-'}"


def _holder_gone(claim: Claim) -> Optional[str]:
    """Why the holder of ``claim`` will never release it: its run is no longer RUNNING or
    its process is dead (:func:`~sf_mlflow.tracking.liveness.death_reason`); else None."""
    from mlflow.tracking import MlflowClient

    from sf_mlflow.tracking.liveness import death_reason

    try:
        run = MlflowClient().get_run(claim.run_id)
    except Exception:   # deleted for good: nobody will release it
        return "its run no longer exists"
    if run.info.status != "RUNNING":
        return f"its run ended {run.info.status}"
    return death_reason(run.data.tags)


@contextlib.contextmanager
def stage_claim(stage: str, stage_hash: str, code_version: str, upstream_run_id: str | None,
                holder_run_id: str, say: Callable[[str], None]) -> Iterator[bool]:
    """:func:`claimed` for the stage result that ``(stage, stage_hash, code_version,
    upstream_run_id)`` names, held by ``holder_run_id`` in the current tracking store.

    A holder is gone when its run is no longer RUNNING or its process is dead.
    """
    import mlflow

    with claimed(mlflow.get_tracking_uri(), _key(stage, stage_hash, code_version,
                                                 upstream_run_id),
                 holder_run_id, holder_gone=_holder_gone, say=say) as got:
        yield got


def hold_claim(stage: str, stage_hash: str, code_version: str, upstream_run_id: str | None,
               run_id: str, say: Callable[[str], None]) -> Optional[Callable[[], None]]:
    """Claim the stage that a standalone command computes in run ``run_id``; return the
    function that releases the claim (call it once the run has ended), or None.

    A ``main`` started meanwhile that needs the same result then waits for this run and
    reuses it. The command itself never waits: it was asked to compute a run. When another
    live run holds the claim, it says so, goes on, and returns None.
    """
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not claims_supported(uri):
        return None
    key = _key(stage, stage_hash, code_version, upstream_run_id)
    held = _try_claim(uri, key, run_id)
    if held is not None and held.run_id != run_id and _holder_gone(held) is not None:
        _release(uri, key, held.run_id)
        held = _try_claim(uri, key, run_id)
    if held is not None and held.run_id != run_id:
        say(f"note: run {held.run_id} (process {held.pid} on {held.host}) is computing the "
            f"same {stage} now; this run computes it too (`main` waits for such a run and "
            "reuses it)")
        return None
    return lambda: _release(uri, key, run_id)
