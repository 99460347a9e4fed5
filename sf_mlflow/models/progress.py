"""Progress of a fit's long phases by the clock, and the phase a fit is in.

Initialisation (the PNMF start, the kernel hyperparameters, the inducing points, the
conjugate start) can take minutes at Slide-seq scale before the first iteration: each phase
reports a line with its ETA at least every :data:`PROGRESS_EVERY_S` seconds (:class:`Progress`).
:func:`phase` names what a fit is doing; whoever handles signals reads :func:`current_phase`:
inside ``"training"`` an interrupt waits for the iteration to end (its state is then whole,
a checkpoint can be kept); inside ``"step"`` (a slow step the trainer can undo) and anywhere
else there is nothing worth waiting for. A stop is also noted (:func:`note_stop_request`), and
a noted stop raises :class:`KeyboardInterrupt` on entering any phase and, outside
``"training"``, at the next :meth:`Progress.tick`: inside ``"training"`` it keeps the next slow
step from starting (rather than waiting seconds or minutes for a step whose result would only
be thrown away); elsewhere it stops the fit even when Python dropped the handler's own
KeyboardInterrupt (raised inside a weakref callback or ``__del__``, where Python prints
"Exception ignored" and goes on).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, Optional

__all__ = ["PROGRESS_EVERY_S", "Progress", "phase", "current_phase", "note_stop_request",
           "stop_point", "stopping", "TRAINING", "STEP", "duration_text"]

#: Longest wait between two progress lines of a long phase (and of training iterations).
PROGRESS_EVERY_S = 10.0

#: The name of the phase of the optimisation loop proper.
TRAINING = "training"
#: Inside TRAINING: a step the trainer can undo (it holds a snapshot of the state before it).
STEP = "step"

_PHASES: list[str] = []
_STOP = {"requested": False}


def note_stop_request(requested: bool = True) -> None:
    """A stop was asked for while the current iteration ends (or, False, no longer is)."""
    _STOP["requested"] = bool(requested)


def stop_point() -> None:
    """Raise :class:`KeyboardInterrupt` when a stop was noted and the fit is not inside
    ``"training"`` (whose iterations end first): a place where initialisation may end."""
    if _STOP["requested"] and current_phase() != TRAINING:
        raise KeyboardInterrupt


def stopping(say: Callable[[str], None]) -> Callable[[str], None]:
    """``say`` that passes a :func:`stop_point` before each line: a phase's progress line marks
    the end of one piece of work and the start of the next, so a noted stop ends the phase
    there rather than after the next piece (an interrupt Python dropped between two pieces
    that report no :meth:`Progress.tick` would otherwise let the next one run whole)."""
    def said(line: str) -> None:
        stop_point()
        say(line)
    return said


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the block as the fit's phase ``name`` (phases nest; the innermost is current).

    Entering any phase after :func:`note_stop_request` raises :class:`KeyboardInterrupt`
    before the block runs (a slow :data:`STEP` is then not started).
    """
    if _STOP["requested"]:
        raise KeyboardInterrupt
    _PHASES.append(name)
    try:
        yield
    finally:
        _PHASES.pop()


def current_phase() -> Optional[str]:
    """The innermost phase under way, or None outside any fit."""
    return _PHASES[-1] if _PHASES else None


def duration_text(seconds: float) -> str:
    """``"4m05s"``, or ``"1h07m"`` from an hour on."""
    seconds = max(int(round(seconds)), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Counts the steps of one phase and says how far it is, by the clock.

    ``say(line)`` receives ``"<what>: <done>/<total> <unit>, <elapsed> so far, ETA <eta>"`` at
    most every :data:`PROGRESS_EVERY_S` seconds (the first after that long); ``total`` may be
    an upper bound (``bound=True`` writes "ETA <=").
    """

    def __init__(self, say: Optional[Callable[[str], None]], what: str, total: int,
                 unit: str = "steps", *, bound: bool = False):
        self.say, self.what, self.total, self.unit, self.bound = say, what, max(int(total), 1), unit, bound
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    def tick(self) -> None:
        """One step done; a line when one is due. Raises KeyboardInterrupt when a stop was
        noted outside the training loop (whose iterations end first)."""
        stop_point()
        self.done += 1
        now = time.perf_counter()
        if self.say is None or now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        elapsed = now - self.t0
        left = elapsed / self.done * max(self.total - self.done, 0) if self.done else float("nan")
        eta = "?" if left != left else duration_text(left)
        self.say(f"{self.what}: {min(self.done, self.total)}/{self.total} {self.unit}, "
                 f"{duration_text(elapsed)} so far, ETA {'<= ' if self.bound else ''}{eta}")
