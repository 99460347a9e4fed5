"""Runs that never lie: heartbeats of live runs, and sweeping runs whose process is dead.

A process killed with SIGKILL (or a machine that lost power) cannot end its runs, so
they would stay RUNNING forever, and a RUNNING run looks like work in progress. Every
stage run therefore carries

* ``sf.host`` and ``sf.pid``: where its process runs, and
* ``sf.heartbeat``: the time (seconds since the epoch) its process last said it is
  alive, rewritten every ``SF_HEARTBEAT_INTERVAL`` seconds (default 30) by one daemon
  thread per process for all of the process's open runs (a ``main`` run and its child).

:func:`sweep_dead_runs` (called by the lookups of :mod:`sf_mlflow.tracking.lineage` and
at the start of ``main``) ends as FAILED, tagged ``sf.failure_reason``, each RUNNING run
of this pipeline whose process is gone from this host, or whose heartbeat is older than
``SF_HEARTBEAT_STALE`` seconds (default four intervals): a live process writes a
heartbeat every interval, so one missed by four is dead, or cut off from the store.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import threading
import time
from typing import Iterable

import mlflow
from mlflow.entities import RunTag, ViewType
from mlflow.tracking import MlflowClient

TAG_HEARTBEAT = "sf.heartbeat"
TAG_HOST = "sf.host"
TAG_PID = "sf.pid"
#: Why a run was ended FAILED by someone else than its own process.
TAG_FAILURE_REASON = "sf.failure_reason"

INTERVAL_ENV = "SF_HEARTBEAT_INTERVAL"
STALE_ENV = "SF_HEARTBEAT_STALE"
_DEFAULT_INTERVAL = 30.0


def heartbeat_interval() -> float:
    """Seconds between two heartbeats of a run (``SF_HEARTBEAT_INTERVAL``, default 30)."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, _DEFAULT_INTERVAL))
    except ValueError:
        value = _DEFAULT_INTERVAL
    return value if value > 0 else _DEFAULT_INTERVAL


def stale_after() -> float:
    """Seconds without a heartbeat after which a run is dead (``SF_HEARTBEAT_STALE``)."""
    try:
        value = float(os.environ.get(STALE_ENV, 0))
    except ValueError:
        value = 0.0
    return value if value > 0 else 4 * heartbeat_interval()


def liveness_tags() -> dict[str, str]:
    """The tags a stage run starts with: this host, this process, a heartbeat now."""
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()),
            TAG_HEARTBEAT: f"{time.time():.0f}"}


class _Heartbeat:
    """One daemon thread that rewrites ``sf.heartbeat`` of every open run of this process.

    One thread, not one per run: nested runs (``main`` and its child) share it, and the
    sqlite store sees one small write per open run per interval. The lock makes sure no
    heartbeat is written after :meth:`stop` returned for a run (that is, after its end).
    """

    def __init__(self) -> None:
        self._runs: dict[str, MlflowClient] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, client: MlflowClient, run_id: str) -> None:
        with self._lock:
            self._runs[run_id] = client
            if self._thread is None or not self._thread.is_alive():
                # daemon: a heartbeat never keeps an ending process alive
                self._thread = threading.Thread(target=self._beat, name="sf-heartbeat",
                                                daemon=True)
                self._thread.start()

    def stop(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def _beat(self) -> None:
        while True:
            time.sleep(heartbeat_interval())
            # one look a beat, outside the lock: MLflow's retries against a server that is away
            # would hold the lock, and a run that is ending, for minutes
            away = _server_away()
            with self._lock:
                if not self._runs:
                    self._thread = None
                    return
                if away:
                    continue
                now = f"{time.time():.0f}"
                for run_id, client in list(self._runs.items()):
                    try:
                        client.log_batch(run_id, tags=[RunTag(TAG_HEARTBEAT, now)])
                    except Exception:  # a busy store: the next beat tries again
                        pass


_HEARTBEAT = _Heartbeat()


def _server_away() -> bool:
    """Whether the tracking server is known not to answer, or does not answer now."""
    from sf_mlflow.tracking.outage import answers, away_since, is_server

    uri = mlflow.get_tracking_uri()
    return is_server(uri) and (away_since(uri) is not None or not answers(uri, timeout=2.0))


def start_heartbeat(client: MlflowClient, run_id: str) -> None:
    """Keep ``sf.heartbeat`` of ``run_id`` fresh until :func:`stop_heartbeat`."""
    _HEARTBEAT.start(client, run_id)


def stop_heartbeat(run_id: str) -> None:
    """No more heartbeats for ``run_id`` (call before ending the run)."""
    _HEARTBEAT.stop(run_id)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):  # someone else's process: alive
        return False
    return False


def death_reason(tags: dict[str, str], now: float | None = None) -> str | None:
    """Why the RUNNING run with ``tags`` is dead, or None while it may be alive.

    Dead: its process is gone from this host, or its heartbeat is stale. A run without
    a heartbeat (made before heartbeats existed) is judged by its process alone.
    """
    now = time.time() if now is None else now
    host, pid, beat = tags.get(TAG_HOST), tags.get(TAG_PID), tags.get(TAG_HEARTBEAT)
    try:
        last = float(beat) if beat else None
    except ValueError:
        last = None
    seen = (_dt.datetime.fromtimestamp(last).strftime("%Y-%m-%d %H:%M:%S")
            if last is not None else "never")
    if host == socket.gethostname() and pid and pid.isdigit() and _process_gone(int(pid)):
        return f"process {pid} on host {host} is gone (last heartbeat {seen})"
    if last is not None and now - last > stale_after():
        return (f"no heartbeat from process {pid} on host {host} for {now - last:.0f} s "
                f"(last {seen}; a live run beats every {heartbeat_interval():g} s)")
    return None


def sweep_dead_runs(experiment_ids: Iterable[str], client: MlflowClient | None = None
                    ) -> list[str]:
    """End as FAILED every RUNNING stage run of ``experiment_ids`` whose process is dead.

    Each swept run is tagged ``sf.failure_reason`` and announced on stdout. Returns the
    IDs of the swept runs.
    """
    client = client or MlflowClient()
    ids = [str(e) for e in experiment_ids if e is not None]
    if not ids:
        return []
    running = client.search_runs(ids, "attributes.status = 'RUNNING'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
    swept = []
    for run in running:
        tags = run.data.tags
        if "sf.stage" not in tags:
            continue
        reason = death_reason(tags)
        if reason is None:
            continue
        client.log_batch(run.info.run_id, tags=[RunTag(TAG_FAILURE_REASON, reason)])
        client.set_terminated(run.info.run_id, "FAILED")
        print(f"[{tags['sf.stage']}] run {run.info.run_id} ({run.info.run_name}) was left "
              f"RUNNING: {reason}; marked FAILED", flush=True)
        swept.append(run.info.run_id)
    return swept
