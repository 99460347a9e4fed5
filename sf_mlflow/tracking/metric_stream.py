"""A step metric (the ELBO curve) written in batches, and kept while a tracking server is away."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from mlflow.entities import Metric

from sf_mlflow.tracking.interrupts import signals_held
from sf_mlflow.tracking.outage import (
    SAY_EVERY_S,
    away_since,
    is_server,
    note_away,
    note_back,
    outage_wait,
    quick_requests,
    since_text,
    unreachable,
)

if TYPE_CHECKING:
    from sf_mlflow.tracking.runs import StageRun

__all__ = ["MetricStream", "series"]


def series(key: str, values, steps=None) -> list:
    """Metrics ``key`` at ``steps`` (default 0, 1, ...), the non-finite values left out."""
    ts = int(time.time() * 1000)
    steps = range(len(values)) if steps is None else steps
    return [Metric(key, float(v), ts, int(s)) for s, v in zip(steps, values)
            if math.isfinite(float(v))]


class MetricStream:
    """Buffers one step metric and writes it with ``log_batch`` every ``flush_every`` steps.

    Lets the MLflow UI follow a long fit without one database write per iteration. While a
    tracking server does not answer, the values stay buffered and the fit goes on (a line
    says since when and how many wait); they are written once it answers again, and at the
    latest by :meth:`flush`, which waits for it. Once the run keeps its writes in a local
    journal (:mod:`~sf_mlflow.tracking.journal`), the values go there.
    """

    def __init__(self, run: "StageRun", key: str, flush_every: int = 100):
        self.run, self.key, self.flush_every = run, key, flush_every
        self._steps: list[int] = []
        self._values: list[float] = []
        self._said = 0.0

    def append(self, step: int, value: float) -> None:
        self._steps.append(step)
        self._values.append(value)
        if len(self._steps) % self.flush_every == 0:
            self._try_flush()

    def _try_flush(self) -> None:
        """Write what is buffered; keep it when the server does not answer."""
        uri = self.run.uri
        if not is_server(uri) or self.run.journal is not None:
            return self.flush()
        away = away_since(uri)
        try:
            # no retries: a server that does not answer at once is tried again at the next
            # flush, the fit is not held for MLflow's minutes of back-off
            with quick_requests(), signals_held():
                self.run._log_metric_items(series(self.key, self._values, self._steps))
        except Exception as err:
            if not unreachable(err):
                raise
            since, now = note_away(uri), time.time()
            if now - since >= outage_wait() and self.run.keep_locally(since):
                return self.flush()     # into the run's journal: on disk, not in memory
            if away is None or now - self._said >= SAY_EVERY_S:
                self._said = now
                self.run.say(f"tracking server {uri} unreachable since {since_text(since)}; "
                             f"training goes on, {len(self._steps)} values of {self.key} "
                             "buffered here until it answers")
            return
        if away is not None:
            note_back(uri)
            self.run.say(f"tracking server {uri} answers again: {len(self._steps)} "
                         f"buffered values of {self.key} written")
        self._steps, self._values = [], []

    def flush(self) -> None:
        """Write what is buffered, waiting for an unreachable server."""
        if self._steps:
            self.run.log_metric_history(self.key, self._values, self._steps)
            self._steps, self._values = [], []
