"""``report.html``: one self-contained page comparing the models of a ``main`` run.

A table of each model's headline numbers (held-out deviance, Moran's I, final ELBO,
iterations, training time) and every figure inline as a base64 PNG, so the file can be
mailed or opened from the MLflow UI's artifact view without anything beside it. Plain
string templating with :func:`html.escape`; no MLflow here (the ``main`` stage gathers
the numbers and figures and logs the page).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from sf_mlflow.models.stopping import describe_stop

__all__ = ["ModelResult", "Figure", "METRIC_COLUMNS", "render_report", "write_report"]


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


#: (metric key, column heading, format, which is better: "low", "high" or None).
METRIC_COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
    ("heldout_deviance", "held-out deviance", "{:,.1f}", "low"),
    ("heldout_deviance_mean", "held-out deviance / entry", "{:.4f}", "low"),
    ("moran_i_mean", "mean Moran's I", "{:.3f}", "high"),
    ("final_elbo", "final ELBO", "{:,.1f}", None),
    ("n_iter", "iterations", "{:,.0f}", None),
    ("training_time_s", "training time (s)", "{:.1f}", None),
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


def _best(models: Sequence[ModelResult], key: str, better: str | None) -> float | None:
    values = [float(m.metrics[key]) for m in models
              if key in m.metrics and math.isfinite(float(m.metrics[key]))]
    if better is None or len(values) < 2:
        return None
    return min(values) if better == "low" else max(values)


def metrics_table(models: Sequence[ModelResult]) -> str:
    """The table of every model's headline numbers; the best of each comparable column bold."""
    head = "".join(f"<th>{_esc(title)}</th>" for _, title, _, _ in METRIC_COLUMNS)
    rows = []
    for m in models:
        cells = [f'<td class="text"><a href="#model-{_esc(m.name)}">{_esc(m.name)}</a></td>',
                 f'<td class="text">{_esc(m.description)}</td>']
        for key, _, fmt, better in METRIC_COLUMNS:
            value = m.metrics.get(key)
            best = _best(models, key, better)
            cls = ' class="best"' if best is not None and value == best else ""
            cells.append(f"<td{cls}>{_number(value, fmt)}</td>")
        converged = {True: "yes", False: "no", None: "&ndash;"}[m.converged]
        # patience or the time budget ended it (and kept its best state): say so, not yes/no
        reason = ("time_budget" if "time_budget_s" in m.metrics else
                  "validation" if m.converged else "")
        converged = describe_stop(reason, m.metrics.get("early_stopped_at"),
                                  m.metrics.get("kept_iteration")) or converged
        cells.append(f'<td class="text">{converged}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="metrics"><thead><tr><th class="text">model</th>'
            f'<th class="text">settings</th>{head}<th class="text">converged</th></tr></thead>'
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
             f"<p>{_esc(m.description)}</p>", *_marking(m), f'<p class="note">runs: {runs}</p>']
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
        '<p class="note">Held-out deviance: Poisson deviance of the held-out spots (lower is '
        "better). Moran's I: spatial autocorrelation of the factors, mean over factors. The "
        "best value of each is in bold. The final ELBO bounds each model's own evidence; the "
        "bounds of different priors differ in tightness, so held-out deviance is the fairer "
        "comparison.</p>",
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
    """Write :func:`render_report` to ``path``; return it."""
    path = Path(path)
    path.write_text(render_report(title, models, **kwargs), encoding="utf-8")
    return path
