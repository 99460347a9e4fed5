"""``report.html``: one self-contained page comparing the models of a ``main`` run.

A table of each model's headline numbers (held-out deviance, Moran's I, final ELBO,
iterations, training time) and every figure inline as a base64 PNG, so the file can be
mailed or opened from the MLflow UI's artifact view without anything beside it. Plain
string templating with :func:`html.escape`; no MLflow here (the ``main`` stage gathers
the numbers and figures and logs the page).

Models are ranked by held-out deviance alone, the one number that says how well a model
predicts counts it was not fitted to. Held-out sets are often a few hundred spots, so each
model's difference to the best comes with a paired bootstrap interval over those spots
(:func:`paired_interval`); Moran's I is shown, never ranked (higher only means smoother).
Factors of one model that duplicate each other (:func:`duplicate_factors`) are flagged.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from sf_mlflow.files import atomic_write
from sf_mlflow.models.stopping import describe_stop

__all__ = ["ModelResult", "Figure", "METRIC_COLUMNS", "render_report", "write_report",
           "paired_interval", "duplicate_factors", "DUPLICATE_R"]

#: Two factors of one model whose log-factors correlate beyond this (in absolute value)
#: describe one pattern twice.
DUPLICATE_R = 0.9
#: Bootstrap resamples and coverage of the report's intervals.
N_BOOTSTRAP = 2000
INTERVAL = 0.95


@dataclass
class Figure:
    """A PNG on disk and the caption it is shown with."""

    path: Path
    caption: str


@dataclass
class ModelResult:
    """One model of the report: its settings in words, its numbers, its runs and figures."""

    name: str
    description: str
    metrics: Mapping[str, float]
    run_ids: Mapping[str, str]          # stage -> run ID
    figures: list[Figure] = field(default_factory=list)
    converged: bool | None = None
    heldout_deviance: Optional[np.ndarray] = None
    """(N_heldout,): each held-out spot's deviance, same spots and order for every model."""
    factors: Optional[np.ndarray] = None
    """(N_train, L): the factors at the training spots, to find duplicates."""


def paired_interval(diff: np.ndarray, n_boot: int = N_BOOTSTRAP, level: float = INTERVAL,
                    seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``diff.sum()`` over spots resampled with replacement.

    diff : (N_heldout,) per-spot deviance of a model minus the best model's, so spots
    shared by the two pair up; seeded, so the same runs give the same report.
    """
    diff = np.asarray(diff, dtype=np.float64)
    rng = np.random.default_rng(seed)
    totals = np.empty(n_boot)
    for b in range(0, n_boot, 250):   # bounded memory for large held-out sets
        idx = rng.integers(0, diff.size, size=(min(250, n_boot - b), diff.size))
        totals[b:b + idx.shape[0]] = diff[idx].sum(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(totals, [tail, 100 - tail])
    return float(lo), float(hi)


def duplicate_factors(factors: np.ndarray, threshold: float = DUPLICATE_R
                      ) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, r)`` (i < j, 1-based as the figures number them) of factors whose
    log-factors correlate with ``|r| > threshold`` over the spots; factors (N, L) > 0."""
    F = np.log(np.clip(np.asarray(factors, dtype=np.float64), 1e-300, None))
    keep = F.std(axis=0) > 0
    if keep.sum() < 2:
        return []
    r = np.corrcoef(F[:, keep].T)
    cols = np.flatnonzero(keep)
    return [(int(cols[a]) + 1, int(cols[b]) + 1, float(r[a, b]))
            for a in range(len(cols)) for b in range(a + 1, len(cols))
            if abs(r[a, b]) > threshold]


#: (metric key, column heading, format) of the columns after the rank and the difference to
#: the best; none is ranked but held-out deviance (see the module docstring).
METRIC_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("heldout_deviance", "held-out deviance", "{:,.1f}"),
    ("heldout_deviance_mean", "held-out deviance / entry", "{:.4f}"),
    ("moran_i_mean", "mean Moran's I", "{:.3f}"),
    ("final_elbo", "final ELBO", "{:,.1f}"),
    ("n_iter", "iterations", "{:,.0f}"),
    ("training_time_s", "training time (s)", "{:.1f}"),
)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th.text, td.text { text-align: left; }
td.best { font-weight: bold; background: #eef7ee; }
figure { margin: 1em 0 2em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
code { font-size: 0.9em; } .note { color: #555; font-size: 0.9em; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _number(value: float | None, fmt: str) -> str:
    if value is None or not math.isfinite(float(value)):
        return "&ndash;"
    return _esc(fmt.format(float(value)))


def _ranked(models: Sequence[ModelResult]) -> list[ModelResult]:
    """Best held-out deviance first; models without one last, in their given order."""
    def key(m: ModelResult) -> float:
        v = m.metrics.get("heldout_deviance")
        return float(v) if v is not None and math.isfinite(float(v)) else math.inf
    return sorted(models, key=key)


def _difference(m: ModelResult, best: ModelResult) -> str:
    """``+12.3 [4.5, 20.1]``: the difference to the best and its paired interval."""
    if m is best:
        return "best"
    a, b = m.metrics.get("heldout_deviance"), best.metrics.get("heldout_deviance")
    if a is None or b is None or not math.isfinite(float(a)):
        return "&ndash;"
    text = f"{float(a) - float(b):+,.1f}"
    x, y = m.heldout_deviance, best.heldout_deviance
    if x is not None and y is not None and np.shape(x) == np.shape(y) and np.size(x) > 1:
        lo, hi = paired_interval(np.asarray(x) - np.asarray(y))
        text += f" [{lo:+,.1f}, {hi:+,.1f}]" + (" (not distinguishable)" if lo <= 0 else "")
    return _esc(text)


def _notes(m: ModelResult) -> list[str]:
    """What the reader must know about a model beside its numbers."""
    notes = []
    if m.factors is not None:
        notes += [f"factors {i} and {j} duplicate each other (r = {r:.2f})"
                  for i, j, r in duplicate_factors(m.factors)]
    return notes


def _stopped(m: ModelResult) -> str:
    """How the fit ended: converged, early-stopped or cut by the time budget (with the
    iteration kept), or not converged."""
    reason = ("time_budget" if "time_budget_s" in m.metrics else
              "validation" if m.converged and "early_stopped_at" in m.metrics else "")
    said = describe_stop(reason, m.metrics.get("early_stopped_at"),
                         m.metrics.get("kept_iteration"))
    return said or {True: "converged", False: "not converged", None: "&ndash;"}[m.converged]


def metrics_table(models: Sequence[ModelResult]) -> str:
    """The table of every model's headline numbers, ranked by held-out deviance."""
    ranked = _ranked(models)
    best = ranked[0] if ranked and "heldout_deviance" in ranked[0].metrics else None
    head = "".join(f"<th>{_esc(title)}</th>" for _, title, _ in METRIC_COLUMNS)
    rows = []
    for rank, m in enumerate(ranked, 1):
        cells = [f"<td>{rank if best is not None and 'heldout_deviance' in m.metrics else ''}</td>",
                 f'<td class="text"><a href="#model-{_esc(m.name)}">{_esc(m.name)}</a></td>',
                 f'<td class="text">{_esc(m.description)}</td>']
        cells.append(f"<td>{_difference(m, best) if best is not None else '&ndash;'}</td>")
        for key, _, fmt in METRIC_COLUMNS:
            cls = ' class="best"' if key == "heldout_deviance" and m is best else ""
            cells.append(f"<td{cls}>{_number(m.metrics.get(key), fmt)}</td>")
        cells.append(f'<td class="text">{_stopped(m)}</td>')
        cells.append(f'<td class="text">{_esc("; ".join(_notes(m)))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="metrics"><thead><tr><th>rank</th><th class="text">model</th>'
            f'<th class="text">settings used</th><th>held-out deviance minus the best '
            f'[{100 * INTERVAL:.0f} % interval]</th>{head}<th class="text">stopped</th>'
            '<th class="text">notes</th></tr></thead>'
            "<tbody>\n" + "\n".join(rows) + "\n</tbody></table>")


def png_bytes(path: str | Path) -> bytes:
    """The PNG to inline: reduced to a 256-colour palette when that makes it smaller (the
    spatial maps shrink about threefold, with no visible change), else the file as it is."""
    raw = Path(path).read_bytes()
    try:
        from PIL import Image   # matplotlib's own dependency

        with Image.open(io.BytesIO(raw)) as im:
            small = io.BytesIO()
            im.convert("RGB").quantize(colors=256).save(small, "PNG")
    except Exception:  # not a PNG Pillow reads (or no Pillow): inline the file unchanged
        return raw
    return small.getvalue() if small.tell() < len(raw) else raw


def _image(fig: Figure) -> str:
    data = base64.b64encode(png_bytes(fig.path)).decode("ascii")
    return (f'<figure><img alt="{_esc(fig.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(fig.caption)}</figcaption></figure>")


def _marking(m: ModelResult) -> list[str]:
    """A hybrid's line on its two kinds of factor (its analyze metrics mark the hybrid)."""
    if "n_spatial_factors" not in m.metrics:
        return []
    means = ", ".join(f"{kind} {float(m.metrics[key]):.3f}" for kind, key in (
        ("spatial", "moran_i_mean_spatial"), ("non-spatial", "moran_i_mean_nonspatial"))
        if key in m.metrics)
    return [f'<p class="note">hybrid: {int(m.metrics["n_spatial_factors"])} spatial factors '
            "(GP prior), the others non-spatial (Gaussian prior); figure panels say which"
            + (f"; mean Moran's I {_esc(means)}" if means else "") + ".</p>"]


def _model_section(m: ModelResult) -> str:
    runs = ", ".join(f"{_esc(stage)} <code>{_esc(rid)}</code>" for stage, rid in m.run_ids.items())
    parts = [f'<section id="model-{_esc(m.name)}"><h2>{_esc(m.name)}</h2>',
             f"<p>{_esc(m.description)}</p>", *_marking(m),
             *[f'<p class="note">warning: {_esc(n)}</p>' for n in _notes(m)],
             f'<p class="note">runs: {runs}</p>']
    parts += [_image(f) for f in m.figures] or ['<p class="note">no figures</p>']
    parts.append("</section>")
    return "\n".join(parts)


def render_report(title: str, models: Sequence[ModelResult], *,
                  comparison: Sequence[Figure] = (), intro: str = "",
                  footer: Mapping[str, str] | None = None) -> str:
    """The whole page as a string: title, metrics table, comparison figures, each model."""
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="note">{_esc(intro)} Generated {_esc(when)}.</p>' if intro else
        f'<p class="note">Generated {_esc(when)}.</p>',
        "<h2>Metrics</h2>", metrics_table(models),
        '<p class="note">Ranked by held-out deviance: the Poisson deviance of the held-out '
        "spots, predicted from their positions (lower is better; the best is in bold). The "
        f"interval is a paired bootstrap over the held-out spots ({N_BOOTSTRAP} resamples); "
        "one that reaches zero means the held-out spots cannot tell the two models apart. "
        "Moran's I: spatial autocorrelation of the factors, mean over factors; higher means "
        "smoother, not better, so it is not ranked. The final ELBO bounds each model's own "
        "evidence; the bounds of different priors differ in tightness, so it is not ranked "
        f"either. Notes flag factors of one model whose log-factors correlate beyond "
        f"|r| = {DUPLICATE_R} (one pattern described twice).</p>",
    ]
    if comparison:
        out.append('<section id="comparison"><h2>Comparison</h2>')
        out += [_image(f) for f in comparison]
        out.append("</section>")
    out += [_model_section(m) for m in models]
    if footer:
        out.append('<h2>Provenance</h2><table class="note">' + "".join(
            f'<tr><td class="text">{_esc(k)}</td><td class="text"><code>{_esc(v)}</code></td></tr>'
            for k, v in footer.items()) + "</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(path: str | Path, title: str, models: Sequence[ModelResult], **kwargs) -> Path:
    """Write :func:`render_report` to ``path`` (whole or not at all); return it."""
    path = Path(path)
    text = render_report(title, models, **kwargs)
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
    return path
