"""The figures stage: PNGs of one analyze run, or a comparison of several."""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sf_mlflow import plots
from sf_mlflow.analysis.ordering import factor_titles
from sf_mlflow.config import Config
from sf_mlflow.data.counts import SpatialCounts
from sf_mlflow.errors import RunLookupError
from sf_mlflow.stages._common import (
    base_tags,
    finished,
    load_preprocessed,
    open_run,
    resolve_upstream,
    safe_name,
    say,
    staging_dir,
)
from sf_mlflow.tracking import TAG_MODEL, TAG_UPSTREAM, download_artifacts, get_stage_run

STAGE = "figures"


@dataclass
class Analysis:
    """One analyze run's outputs with the data and training curve behind them."""

    run_id: str
    model: str
    preprocess_run_id: str
    data: SpatialCounts          # training spots
    factors: np.ndarray          # (N, L), Moran's I order
    scales: np.ndarray           # (N, L)
    loadings: np.ndarray         # (D, L)
    moran: np.ndarray            # (L,)
    order: np.ndarray            # (L,) original factor index of each rank
    elbo: np.ndarray             # (T,)
    lfc: np.ndarray | None       # (G, D, L)
    groupwise: np.ndarray | None  # (G, L, N)


def load_analysis(run_id: str, tmp: Path) -> Analysis:
    """An analyze run's outputs, its train run's ELBO curve and its preprocess run's data."""
    run = get_stage_run(run_id, "analyze")
    train = get_stage_run(run.data.tags[TAG_UPSTREAM], "train")
    pre_id = train.data.tags[TAG_UPSTREAM]
    a = download_artifacts(run_id, "", tmp / run_id / "analyze")
    t = download_artifacts(train.info.run_id, "elbo_history.csv", tmp / run_id / "train")
    pre = load_preprocessed(pre_id, tmp / run_id / "preprocess")
    with open(t) as fh:
        elbo = np.array([float(r["elbo"]) for r in csv.DictReader(fh)])
    with open(a / "moran_i.csv") as fh:
        rows = list(csv.DictReader(fh))
    gw = None
    if (a / "groupwise_factors.npz").is_file():
        with np.load(a / "groupwise_factors.npz") as z:
            gw = z["factors"]
    lfc = np.load(a / "enrichment_lfc.npy") if (a / "enrichment_lfc.npy").is_file() else None
    return Analysis(
        run_id=run_id, model=run.data.tags.get(TAG_MODEL, "model"), preprocess_run_id=pre_id,
        data=pre.training_spots(),
        factors=np.load(a / "factors.npy"), scales=np.load(a / "scales.npy"),
        loadings=np.load(a / "loadings.npy"),
        moran=np.array([float(r["moran_i"]) for r in rows]),
        order=np.array([int(r["original_factor"]) for r in rows]), elbo=elbo, lfc=lfc,
        groupwise=gw)


def single_figures(an: Analysis, out: Path) -> list[Path]:
    """Every figure of one analyze run, written under ``out``."""
    d = an.data
    X = d.coordinates
    moran_original = np.empty_like(an.moran)
    moran_original[an.order] = an.moran  # factor_titles wants scores in the original order
    titles = factor_titles(moran_original, order=an.order)
    genes = list(d.gene_names)
    made = []

    def save(fig, name):
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        made.append(path)

    save(plots.factors_spatial(X, an.factors, titles, title=f"{an.model.upper()} factors"),
         "factors_spatial.png")
    save(plots.scales_spatial(X, an.scales, titles), "scales_spatial.png")
    save(plots.elbo_curve(an.elbo), "elbo_curve.png")
    save(plots.top_genes(an.loadings, genes, titles=titles), "top_genes.png")
    save(plots.factors_with_genes(X, an.factors, d.counts, an.loadings, genes, titles),
         "factors_with_genes.png")
    if an.lfc is not None and d.group_names:
        save(plots.gene_enrichment_heatmap(an.lfc, genes, d.group_names, titles,
                                           loadings=an.loadings), "gene_enrichment.png")
        for g, name in enumerate(d.group_names):
            save(plots.enrichment_for_group(an.lfc[g], genes, name, titles, loadings=an.loadings),
                 f"enrichment_by_group/{safe_name(name)}.png")
    if an.groupwise is not None and d.group_names:
        save(plots.groupwise_factors(X, an.factors, an.groupwise, d.group_names, titles),
             "groupwise_factors.png")
    return made


def comparison_figures(analyses: list[Analysis], out: Path) -> list[Path]:
    """Moran's I side by side and the factor maps together (needs the same spots)."""
    first = analyses[0]
    for an in analyses[1:]:
        if an.preprocess_run_id != first.preprocess_run_id:
            raise RunLookupError(
                f"analyze runs {first.run_id} and {an.run_id} come from different preprocess "
                f"runs ({first.preprocess_run_id} vs {an.preprocess_run_id}); comparison "
                "figures need models fitted on the same spots")
    labels = []
    for an in analyses:
        label = an.model.upper()
        labels.append(label if label not in labels else f"{label} ({an.run_id[:7]})")
    paths = [out / "compare_moran_i.png", out / "compare_factors.png"]
    plots.compare_morans_i({lab: an.moran for lab, an in zip(labels, analyses)}).savefig(paths[0])
    plots.compare_factor_maps(first.data.coordinates,
                              {lab: an.factors for lab, an in zip(labels, analyses)},
                              titles={lab: [f"factor {r + 1}, Moran's I {v:.2f}"
                                            for r, v in enumerate(an.moran)]
                                      for lab, an in zip(labels, analyses)}
                              ).savefig(paths[1])
    return paths


def run_figures(config: Config, analyze_run_ids: list[str] | None = None, *,
                parent_run_id: str | None = None) -> str:
    """Draw every figure of the given analyze runs (or the newest for the config).

    One run: its figures under ``figures/``. Several: each run's figures under
    ``figures/<model>_<run id>/`` plus ``figures/compare_*.png``. Returns the run ID.
    """
    ids = [i for i in (analyze_run_ids or []) if i]
    if not ids:
        ids = [resolve_upstream(config, "analyze", None, by=STAGE,
                                param="analyze_run_ids").info.run_id]
    params = {"upstream.analyze_run_ids": ",".join(ids)}
    tags = {**base_tags(config, STAGE), TAG_UPSTREAM: ",".join(ids)}
    with open_run(config, STAGE, params=params, tags=tags,
                  run_name=f"figures/{len(ids)}-run" + ("s" if len(ids) > 1 else ""),
                  description=f"Figures of analyze runs {', '.join(ids)}",
                  parent_run_id=parent_run_id, headline=f"figures of {', '.join(ids)}") as run:
        with tempfile.TemporaryDirectory() as tmp:
            analyses = [load_analysis(i, Path(tmp)) for i in ids]
        with staging_dir(config, STAGE, run.run_id) as out:
            figdir = out / "figures"
            figdir.mkdir()
            made = []
            for an in analyses:
                sub = figdir if len(analyses) == 1 else figdir / f"{an.model}_{an.run_id[:8]}"
                made += single_figures(an, sub)
            if len(analyses) > 1:
                made += comparison_figures(analyses, figdir)
            (out / "figures.json").write_text(json.dumps(
                [str(p.relative_to(out)) for p in made], indent=1))
            run.log_artifacts(out)
        run.log_metrics({"n_figures": len(made)})
        say(STAGE, f"{len(made)} figures logged")
    return finished(STAGE, run)
