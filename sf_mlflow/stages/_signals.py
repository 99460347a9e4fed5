"""Graceful interruption: SIGINT / SIGTERM / SIGHUP become a request to stop at the next safe point.

Outside the fit, :func:`~sf_mlflow.tracking.stage_run` makes these signals raise
:class:`KeyboardInterrupt` so that every open run ends KILLED; :class:`StopRequests`
takes them over for the fit and gives them back afterwards.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Optional

from sf_mlflow.models.progress import STEP, TRAINING, current_phase, note_stop_request


class StopRequests:
    """Context manager that turns SIGINT, SIGTERM and SIGHUP into a flag.

    A training loop checks :attr:`requested` after each iteration and stops there,
    so the state it saves is consistent (a signal in the middle of an optimiser step
    would leave parameters and moments out of step). During a slow step the trainer can
    undo (:func:`~sf_mlflow.models.progress.current_phase` ``"step"``: it restores the
    state before it) and outside the loop (not ``"training"``: the initialisation phases)
    the signal raises :class:`KeyboardInterrupt` at once. A second
    signal while the first is pending raises it at once too, for a user who really wants
    out. Outside the main thread signal handlers cannot be installed; then nothing
    changes and the default behaviour applies.
    """

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                    if hasattr(signal, n))

    def __init__(self, what: str = "training"):
        self.what = what
        self.signal: Optional[int] = None
        self.aborted = False         # a second signal came: no checkpoint, out at once
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal is not None:
            self.aborted = True
            raise KeyboardInterrupt
        self.signal = signum
        name = signal.Signals(signum).name
        # noted as well as raised: should Python drop the KeyboardInterrupt below (raised in
        # a weakref callback), the fit's next phase or progress step raises it again
        note_stop_request()
        if current_phase() == STEP:
            print(f"\n{name} received: stopping {self.what} now; the step under way is undone and a "
                  "checkpoint of the last whole iteration saved (send it again to abort at once)",
                  file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        if current_phase() != TRAINING:
            # initialisation (or what follows the loop): no state a checkpoint could keep, so
            # nothing to wait for
            print(f"\n{name} received: stopping {self.what} now ({current_phase() or 'outside the fit'})",
                  file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        print(f"\n{name} received: stopping {self.what} after the current "
              "iteration and saving a checkpoint (send it again to abort at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        note_stop_request(False)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
