"""A tracking server that stops answering: the fit goes on, and the run's writes wait for it.

With ``MLFLOW_TRACKING_URI`` on an ``http(s)://`` server, a server that is down at the start
of a stage fails it within :func:`start_wait` seconds (``SF_TRACKING_WAIT_S``, default 30)
with one line, not MLflow's minutes of retries and a traceback. A server lost while a stage
runs does not cost the fit: the ELBO curve is buffered in memory while the server is away
(:class:`~sf_mlflow.tracking.runs.MetricStream`; progress says since when and how many values
wait), every other write of the run waits for the server to come back (polling its
``/health`` every second, a line every :data:`SAY_EVERY_S` seconds, signals answered at once)
for up to :func:`outage_wait` seconds (``SF_TRACKING_OUTAGE_S``, default one hour), then
goes through. A server away for longer than that: the run's writes go to a local journal
(:mod:`~sf_mlflow.tracking.journal`) and the stage goes on; ``spatial_factorization sync``
uploads it later.

How long a server has been away is known process-wide (:func:`away_since`): a ``main`` run
and its stage's run, or a write after a long fit whose ELBO stream saw the server go, count
from the first failure, not each from its own.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from typing import Callable, Iterator, TypeVar

from sf_mlflow.errors import StoreError, exception_chain

__all__ = ["is_server", "unreachable", "answers", "check_server", "quick_requests",
           "wait_for_server", "start_wait", "outage_wait", "WAIT_ENV", "OUTAGE_ENV",
           "ServerAway", "away_since", "note_away", "note_back"]

WAIT_ENV = "SF_TRACKING_WAIT_S"
OUTAGE_ENV = "SF_TRACKING_OUTAGE_S"
#: Seconds between two "still unreachable" lines.
SAY_EVERY_S = 30.0
#: What requests, urllib3 and MLflow say, in some layer of the chain, when nobody answers.
_UNREACHABLE = ("max retries exceeded", "connection refused", "failed to establish a new connection",
                "connectionerror", "connection aborted", "remotedisconnected", "read timed out",
                "connection reset", "name or service not known", "bad gateway",
                "service unavailable")

T = TypeVar("T")

#: Tracking URI -> when its server was first found not answering (cleared when it answers).
_AWAY: dict[str, float] = {}


class ServerAway(StoreError):
    """The tracking server has not answered for longer than :func:`outage_wait`."""

    def __init__(self, message: str, since: float):
        super().__init__(message)
        self.since = since


def away_since(uri: str) -> float | None:
    """Since when the server at ``uri`` has not answered, or None."""
    return _AWAY.get(uri)


def note_away(uri: str) -> float:
    """Note that the server at ``uri`` did not answer; return since when it has not."""
    return _AWAY.setdefault(uri, time.time())


def note_back(uri: str) -> None:
    _AWAY.pop(uri, None)


def _seconds(env: str, default: float) -> float:
    try:
        value = float(os.environ.get(env, default))
    except ValueError:
        return default
    return value if value > 0 else default


def start_wait() -> float:
    """Seconds a stage waits for a server that does not answer at its start."""
    return _seconds(WAIT_ENV, 30.0)


def outage_wait() -> float:
    """Seconds a run's writes wait for a server lost while the stage ran."""
    return _seconds(OUTAGE_ENV, 3600.0)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps) says the server did not answer."""
    text = " ".join(f"{type(e).__name__} {e}" for e in exception_chain(err)).lower()
    return any(s in text for s in _UNREACHABLE)


def answers(uri: str, timeout: float = 2.0) -> bool:
    """Whether the server at ``uri`` answers its health check now."""
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).ok
    except requests.RequestException:
        return False


def check_server(uri: str) -> None:
    """Wait up to :func:`start_wait` seconds for the server at ``uri`` to answer, else
    raise :class:`StoreError` (one line)."""
    if not is_server(uri):
        return
    limit = start_wait()
    deadline = time.monotonic() + limit
    while not answers(uri):
        if time.monotonic() >= deadline:
            raise StoreError(
                f"the tracking server {uri} does not answer (no reply from {uri.rstrip('/')}"
                f"/health for {limit:g} s); start it (mlflow server ...) or point "
                f"MLFLOW_TRACKING_URI at a running one; {WAIT_ENV}=<seconds> waits longer")
        time.sleep(1.0)


@contextlib.contextmanager
def quick_requests() -> Iterator[None]:
    """MLflow's HTTP requests without retries and with a short timeout inside the block (a
    write tried while the server may be away must not hold the fit for minutes)."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    before = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def since_text(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def wait_for_server(uri: str, since: float, say: Callable[[str], None], what: str) -> None:
    """Poll the server at ``uri`` (unreachable since ``since``) until it answers; a line every
    :data:`SAY_EVERY_S` seconds; :class:`ServerAway` after :func:`outage_wait` seconds."""
    limit = outage_wait()
    said = None
    while not answers(uri):
        now = time.time()
        if now - since >= limit:
            raise ServerAway(
                f"the tracking server {uri} has not answered since {since_text(since)} "
                f"({now - since:.0f} s), so {what} could not be logged; start the server and "
                f"run the stage again ({OUTAGE_ENV}=<seconds> waits longer)", since)
        if said is None or now - said >= SAY_EVERY_S:
            say(f"tracking server {uri} unreachable since {since_text(since)}; waiting for it "
                f"to log {what} ({now - since:.0f} s so far, Ctrl-C to stop)")
            said = now
        time.sleep(1.0)
    note_back(uri)
    say(f"tracking server {uri} is back (away {time.time() - since:.0f} s)")


def patiently(uri: str, write: Callable[[], T], say: Callable[[str], None], what: str) -> T:
    """``write()``; when the server does not answer, wait for it and try again
    (:class:`ServerAway` once it has been away for :func:`outage_wait` seconds)."""
    if not is_server(uri):
        return write()
    while True:
        try:
            if away_since(uri) is None:
                return write()
            with quick_requests():
                return write()
        except Exception as err:
            if not unreachable(err):
                raise
        wait_for_server(uri, note_away(uri), say, what)
