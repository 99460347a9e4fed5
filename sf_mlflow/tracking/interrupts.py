"""Signals while stage runs are open: SIGINT, SIGTERM and SIGHUP end them KILLED, never half-made.

SIGINT raises :class:`KeyboardInterrupt` (Python's default), and while a stage run is open
SIGTERM and SIGHUP do too (unless the process installed its own handlers), so every open
run -- a child stage and its ``main`` parent -- ends KILLED on the way out. Signals are
held back (:func:`signals_held`) while a run is being created or ended, so they cannot leave
one half-opened or RUNNING. An interrupt Python drops (raised inside a ``__del__`` or weakref
callback) is raised again every half second until a stage run has caught it
(:func:`note_caught`).
"""

from __future__ import annotations

import contextlib
import gc
import signal
import _thread
import sys
import threading
import time
import traceback
from typing import Any, Iterator

from mlflow.tracking import MlflowClient

from sf_mlflow.errors import exception_chain

__all__ = ["signals_interrupt", "signals_held", "note_caught", "release_interrupted_connections"]


#: Signals that end the open runs KILLED: SIGINT's default handler raises KeyboardInterrupt
#: already; ours does the same for SIGTERM and SIGHUP, and can hold all three back.
_INTERRUPTS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                    if hasattr(signal, n))
#: While ``depth`` > 0 a signal is only noted (``pending``) and raised when the hold ends.
_HOLD: dict[str, Any] = {"depth": 0, "pending": None}


#: The interrupt under way: its signal, whether a stage run has caught the KeyboardInterrupt
#: (the watchdog then stops: from there on it propagates as any exception does), whether
#: the outermost run is ending (later interrupts then change nothing), and how many stage
#: runs are open.
_KILL: dict[str, Any] = {"signum": None, "caught": False, "ending": False, "open": 0}
#: How often the watchdog raises an interrupt again that no stage run has caught yet.
_REPEAT_S = 0.5


def _interrupt(signum: int, frame) -> None:
    if _HOLD["depth"]:
        _HOLD["pending"] = signum
        return
    if _KILL["ending"]:
        return
    if _KILL["signum"] is None:
        print(f"\n{signal.Signals(signum).name} received: ending the open runs as KILLED",
              file=sys.stderr, flush=True)
        _KILL["signum"], _KILL["caught"] = signum, False
        threading.Thread(target=_repeat_interrupt, name="sf-interrupt", daemon=True).start()
    raise KeyboardInterrupt


def _repeat_interrupt() -> None:
    """Raise the interrupt in the main thread again until a stage run has caught it.

    A signal handler runs between any two bytecodes, also inside a weakref callback, a
    ``__del__`` or a garbage collection, where Python prints "Exception ignored" and drops
    the exception: the KeyboardInterrupt would be lost and the stage go on as if no signal
    had come. (Seen: a ThreadPoolExecutor's weakref callback ate it during ``analyze``.)
    It stops as soon as any stage run has caught the interrupt: one raised again while the
    first is still unwinding (through a store call's clean-up, say) could only do harm.
    """
    while True:
        time.sleep(_REPEAT_S)
        signum = _KILL["signum"]
        if signum is None or _KILL["caught"] or not _KILL["open"]:
            return
        _thread.interrupt_main(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _default_handler(sig: int, handler) -> bool:
    return handler is (signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`KeyboardInterrupt` inside the block.

    Only where the process left their default handler in place, and only in the main
    thread (elsewhere handlers cannot be installed); the outermost block installs,
    nested blocks find it done, and the handlers are restored on the way out.
    """
    previous = {}
    if _in_main_thread():
        for sig in _INTERRUPTS:
            if _default_handler(sig, signal.getsignal(sig)):
                previous[sig] = signal.signal(sig, _interrupt)
    _KILL["open"] += 1
    try:
        yield
    finally:
        _KILL["open"] -= 1
        if not _KILL["open"]:
            _KILL.update(ending=False, signum=None, caught=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold the signals of :func:`signals_interrupt` back; one that came is raised after.

    (A signal mask would not do: it is per thread, and any other thread -- the
    heartbeat's, torch's -- would take the signal and run the handler all the same.)
    """
    if not _in_main_thread():
        yield
        return
    _HOLD["depth"] += 1
    try:
        yield
    finally:
        _HOLD["depth"] -= 1
        if not _HOLD["depth"] and _HOLD["pending"] is not None:
            signum, _HOLD["pending"] = _HOLD["pending"], None
            _interrupt(signum, None)


def release_interrupted_connections(client: MlflowClient,
                                     interrupt: BaseException | None = None) -> None:
    """Close the store connections an interrupt may have left inside a transaction.

    A KeyboardInterrupt raised in the middle of a store call can leave its sqlite
    connection holding a lock; ending the run from another connection would then wait
    for this very process and fail as "database is locked". The interrupted session is
    kept alive by the exception's traceback -- or by that of an exception it interrupted
    in turn, its ``__context__`` -- so the finished frames of every exception in the chain
    are cleared first (tracebacks keep their lines); collecting the session then returns
    its connection to the pool, rolled back, and disposing of the pool closes it.
    """
    for err in exception_chain(interrupt):
        traceback.clear_frames(err.__traceback__)
    gc.collect()
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    engine = getattr(store, "engine", None)
    if engine is not None:
        engine.dispose()


def note_caught() -> None:
    """A stage run caught the interrupt: the watchdog stops; if it is the outermost run,
    later signals change nothing (the process is on its way out)."""
    _KILL["caught"] = True
    if _KILL["open"] == 1:
        _KILL["ending"], _KILL["signum"] = True, None
