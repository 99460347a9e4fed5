"""Training diagnostics: the ELBO trace."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
from matplotlib.figure import Figure

from sf_mlflow.errors import DataError
from sf_mlflow.plots._common import (LABEL_SIZE, QUALITATIVE, SUPTITLE_SIZE, TICK_SIZE,
                                     TITLE_SIZE, finish, new_figure)

__all__ = ["elbo_curve"]


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred running mean with shrinking windows at the ends, (T,) -> (T,)."""
    if window <= 1 or y.size < 3:
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    half = window // 2
    i = np.arange(y.size)
    lo = np.clip(i - half, 0, y.size)
    hi = np.clip(i + half + 1, 0, y.size)
    return (c[hi] - c[lo]) / (hi - lo)


def _exponent(y: np.ndarray) -> int:
    """Power of ten to divide by so tick labels stay short (0 for moderate values)."""
    m = float(np.max(np.abs(y))) if y.size else 0.0
    if m == 0 or 1e-3 <= m < 1e4:
        return 0
    return int(np.floor(np.log10(m)))


def _scaled_label(label: str, k: int) -> str:
    return label if k == 0 else f"{label} (x 1e{k})"


def _heldout_axis(ax, steps: np.ndarray, values: np.ndarray, lo: float, hi: float):
    """Held-out deviance on a second y axis of ``ax``, for the steps in [lo, hi]."""
    keep = (steps >= lo) & (steps <= hi) & np.isfinite(values)
    if not keep.any():
        return None
    twin = ax.twinx()
    twin.plot(steps[keep], values[keep], color=QUALITATIVE[2], lw=1.0, ls="--", marker="o",
              ms=2.5, label="held-out deviance")
    twin.set_ylabel("held-out deviance (lower is better)", fontsize=LABEL_SIZE,
                    color=QUALITATIVE[2])
    twin.tick_params(labelsize=TICK_SIZE, colors=QUALITATIVE[2])
    twin.spines["top"].set_visible(False)
    return twin


def elbo_curve(elbo: np.ndarray, x: Optional[np.ndarray] = None, *, xlabel: str = "iteration",
               ylabel: str = "ELBO", title: Optional[str] = "Training objective",
               zoom_fraction: float = 0.5, heldout: Optional[tuple] = None,
               kept: Optional[int] = None,
               path: Optional[str | os.PathLike] = None) -> Figure:
    """The ELBO over training: the whole run, and a zoom on its late part.

    Parameters
    ----------
    elbo : ndarray, (T,)
        ELBO (higher is better) per logged step. Non-finite values (a diverged step) are
        left out and counted in the title.
    x : ndarray, (T,), optional
        Step numbers; default 0..T-1.
    xlabel, ylabel : str
        Axis labels.
    title : str, optional
        Figure title.
    zoom_fraction : float
        The right panel shows the last ``zoom_fraction`` of the steps, with y-limits fitted
        to them, so late progress (invisible next to the first steps' huge gains) shows.
    heldout : (steps (K,), values (K,)), optional
        Held-out deviance at the steps it was checked, drawn on a second y axis.
    kept : int, optional
        The iteration whose state the fit kept (early stopping or a time budget rolled it
        back): a vertical line on both panels.
    path : str or path-like, optional
        Save the figure there too.

    Returns
    -------
    matplotlib.figure.Figure
        Left: all steps (y on a symmetric-log scale when the first steps span over 20
        times the late range). Right: the late steps, raw (thin) and a running mean
        (thick) when the trace is noisy (minibatch ELBOs), and the final value.
    """
    y = np.asarray(elbo, dtype=np.float64).ravel()
    if y.size == 0:
        raise DataError("elbo is empty; expected a 1-D array (T,) with at least one value")
    t = np.arange(y.size, dtype=np.float64) if x is None else np.asarray(x, dtype=np.float64).ravel()
    if t.shape != y.shape:
        raise DataError(f"x has shape {t.shape}; expected {y.shape} like elbo")
    if not 0 < zoom_fraction <= 1:
        raise DataError(f"zoom_fraction = {zoom_fraction!r} must lie in (0, 1]")
    ok = np.isfinite(y) & np.isfinite(t)
    n_bad = int((~ok).sum())
    t, y = t[ok], y[ok]
    fig = new_figure(9.0, 3.4)
    ax_all, ax_zoom = fig.subplots(1, 2)
    colour = QUALITATIVE[0]
    if y.size == 0:
        for ax in (ax_all, ax_zoom):
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center",
                    transform=ax.transAxes, fontsize=TITLE_SIZE)
            ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    else:
        start = int(np.floor((1 - zoom_fraction) * y.size))
        start = min(start, max(y.size - 2, 0))
        tz, yz = t[start:], y[start:]
        window = max(1, yz.size // 25)
        smooth = _moving_average(yz, window)
        noisy = yz.size > 10 and np.std(yz - smooth) > 0.05 * max(np.ptp(smooth), 1e-300)
        late_range = float(np.ptp(yz)) or max(abs(float(yz[-1])) * 1e-3, 1e-12)

        absy = np.abs(y)
        tiny = max(float(np.median(np.abs(yz))), 1e-300)
        # symlog only pays off when the early values span decades beyond the late ones
        use_symlog = np.ptp(y) > 20 * late_range and float(absy.max()) > 10 * tiny
        if use_symlog:
            ax_all.plot(t, y, color=colour, lw=1.0)
            ax_all.set_yscale("symlog", linthresh=tiny / 10)
            ax_all.set_title("all steps (symmetric log y)", fontsize=TITLE_SIZE)
            ax_all.set_ylabel(ylabel, fontsize=LABEL_SIZE)
        else:
            k = _exponent(y)
            ax_all.plot(t, y / 10.0 ** k, color=colour, lw=1.0)
            ax_all.set_title("all steps", fontsize=TITLE_SIZE)
            ax_all.set_ylabel(_scaled_label(ylabel, k), fontsize=LABEL_SIZE)
        ax_all.axvspan(tz[0], tz[-1], color="0.9", zorder=0, lw=0)
        ax_all.text(0.98, 0.04, "zoomed right", transform=ax_all.transAxes, ha="right",
                    va="bottom", fontsize=TICK_SIZE, color="0.4")

        k = _exponent(yz)
        yz, smooth, late_range = yz / 10.0 ** k, smooth / 10.0 ** k, late_range / 10.0 ** k
        ax_zoom.set_ylabel(_scaled_label(ylabel, k), fontsize=LABEL_SIZE)
        ax_zoom.ticklabel_format(axis="y", useOffset=False)   # plain values, no "+1.085" offset
        ax_zoom.plot(tz, yz, color=colour, lw=0.6 if noisy else 1.2, alpha=0.5 if noisy else 1.0,
                     label="raw" if noisy else None)
        if noisy:
            ax_zoom.plot(tz, smooth, color=QUALITATIVE[1], lw=1.6,
                         label=f"running mean ({window} steps)")
            ax_zoom.legend(fontsize=TICK_SIZE, frameon=False, loc="best")
        pad = 0.08 * late_range
        ax_zoom.set_ylim(float(yz.min()) - pad, float(yz.max()) + pad)
        ax_zoom.set_title(f"last {100 * zoom_fraction:.0f}% of steps; final {y[-1]:.6g}",
                          fontsize=TITLE_SIZE)
    if y.size:   # the left panel shows every check, the start's (step 0) too
        _marks(fig, (ax_all, ax_zoom), (-np.inf, t[-1]), (tz[0], tz[-1]), heldout, kept)
    for ax in (ax_all, ax_zoom):
        ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
        ax.tick_params(labelsize=TICK_SIZE)
        ax.grid(True, lw=0.3, color="0.85")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    if title or n_bad:
        extra = f" ({n_bad} non-finite values left out)" if n_bad else ""
        fig.suptitle(f"{title or ''}{extra}", fontsize=SUPTITLE_SIZE)
    return finish(fig, path)


def _marks(fig: Figure, axes, span_all, span_zoom, heldout, kept) -> None:
    """The held-out deviance axis and the kept iteration on both panels, with one legend."""
    handles = []
    for ax, (lo, hi) in zip(axes, (span_all, span_zoom)):
        if heldout is not None:
            steps, values = (np.asarray(v, dtype=np.float64).ravel() for v in heldout)
            if steps.shape != values.shape:
                raise DataError(f"heldout has {steps.size} steps and {values.size} values; "
                                "expected two arrays of the same length (K,)")
            twin = _heldout_axis(ax, steps, values, lo, hi)
            if twin is not None and not handles:
                handles += twin.get_lines()[:1]
        if kept is not None and lo <= kept <= hi:
            line = ax.axvline(kept, color="0.2", lw=1.0, ls=":",
                              label=f"kept iteration {int(kept)}")
            if len(handles) < 2 and line.get_label() not in [h.get_label() for h in handles]:
                handles.append(line)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
                   fontsize=TICK_SIZE, bbox_to_anchor=(0.5, -0.02))
