"""The figures stage: PNGs of one analyze run, or a comparison of several.

Every map is drawn over all kept spots of the preprocess run, with y growing downwards as
``squidpy.pl.spatial_scatter`` draws it (:data:`INVERT_Y`); held-out spots are hollow
rings. Several analyze runs are checked to cover the same spots (same preprocess
settings hash, same spot index) before anything is drawn.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sf_mlflow import plots
from sf_mlflow.analysis.enrichment import group_gene_counts, relative_enrichment
from sf_mlflow.analysis.ordering import factor_titles
from sf_mlflow.config import Config
from sf_mlflow.data.counts import SpatialCounts
from sf_mlflow.errors import RunLookupError
from sf_mlflow.models.stopping import describe_stop
from sf_mlflow.plots._common import HELDOUT_LABEL
from sf_mlflow.stages._checks import check_output_dir, check_tags
from sf_mlflow.stages._common import (
    base_tags,
    finished,
    group_file_names,
    load_preprocessed,
    open_run,
    resolve_upstream,
    say,
    staging_dir,
)
from sf_mlflow.tracking import (TAG_DATASET, TAG_MODEL, TAG_PREPROCESS_HASH, TAG_UPSTREAM,
                                download_artifacts, get_stage_run, metric_history)

STAGE = "figures"

#: Draw y growing downwards (image convention), as ``squidpy.pl.spatial_scatter`` does, so
#: the maps match squidpy's of the same data. Set to False to draw y growing upwards (the
#: plotting functions take ``invert_y=`` too).
INVERT_Y = True

#: Legend of held-out spots when the analyze run has no values for them (runs made before
#: analyze covered all spots): grey rings.
NO_VALUE_LABEL = "held-out spot (not fitted; not in this run's outputs)"


@dataclass
class Lineage:
    """Where an analyze run comes from: its train and preprocess runs."""

    run_id: str
    model: str
    train_run_id: str
    preprocess_run_id: str
    preprocess_hash: str
    dataset: str | None = None


@dataclass
class Analysis:
    """One analyze run's outputs over all kept spots, with the data and ELBO curve behind them."""

    run_id: str
    model: str
    preprocess_run_id: str
    preprocess_hash: str
    data: SpatialCounts          # all kept spots of the preprocess run, in its order
    heldout: np.ndarray          # (N,) bool
    spots: np.ndarray            # (N,) spot names: the index every array follows
    factors: np.ndarray          # (N, L), Moran's I order; NaN rows: no value
    scales: np.ndarray           # (N, L)
    loadings: np.ndarray         # (D, L)
    moran: np.ndarray            # (L,)
    order: np.ndarray            # (L,) original factor index of each rank
    elbo: np.ndarray             # (T,)
    lfc: np.ndarray | None       # (G, D, L)
    groupwise: np.ndarray | None  # (G, L, N), NaN at held-out spots
    heldout_label: str = HELDOUT_LABEL
    spatial: np.ndarray | None = None  # (L,) bool, a hybrid's marking of its GP factors
    stop_note: str | None = None       # "early-stopped at iteration k, kept iteration j"
    heldout_history: tuple | None = None   # (steps (K,), held-out deviance (K,)) of the fit
    kept_iteration: int | None = None      # the iteration the fit kept, when rolled back

    def titles(self) -> list[str]:
        """Panel titles in rank order; a hybrid's say which factors are spatial."""
        original = np.empty_like(self.moran)
        original[self.order] = self.moran  # factor_titles wants scores in the original order
        titles = factor_titles(original, order=self.order)
        if self.spatial is None:
            return titles
        return [t.replace(")", "), " + ("spatial" if s else "non-spatial"), 1)
                for t, s in zip(titles, self.spatial)]


def lineage(run_id: str) -> Lineage:
    """The train and preprocess runs of an analyze run (tags only; nothing downloaded)."""
    run = get_stage_run(run_id, "analyze")
    train = get_stage_run(run.data.tags[TAG_UPSTREAM], "train")
    pre_id = train.data.tags[TAG_UPSTREAM]
    pre = get_stage_run(pre_id, "preprocess")
    return Lineage(run_id=run_id, model=run.data.tags.get(TAG_MODEL, "model"),
                   train_run_id=train.info.run_id, preprocess_run_id=pre_id,
                   preprocess_hash=pre.data.tags.get(TAG_PREPROCESS_HASH, f"run {pre_id}"),
                   dataset=pre.data.tags.get(TAG_DATASET))


def check_config(config: Config, runs: list[Lineage]) -> None:
    """Refuse analyze runs whose preprocess run holds other data than the config describes.

    Only the data are compared (data set and preprocessing settings): the figures depend on
    no config section, and comparison figures show models of other settings side by side.
    """
    for r in runs:
        check_tags(config, "analyze", r.run_id,
                   {TAG_DATASET: r.dataset, TAG_PREPROCESS_HASH: r.preprocess_hash},
                   param="analyze_run_ids", stage_hash=False,
                   via=f" (its preprocess run {r.preprocess_run_id})")


def check_same_settings(runs: list[Lineage]) -> None:
    """Refuse analyze runs whose preprocess runs had different settings (before any download)."""
    first = runs[0]
    for r in runs[1:]:
        if r.preprocess_hash != first.preprocess_hash:
            raise RunLookupError(
                f"analyze runs {first.run_id} and {r.run_id} come from preprocess runs with "
                f"different settings ({first.preprocess_run_id}: {TAG_PREPROCESS_HASH}="
                f"{first.preprocess_hash}; {r.preprocess_run_id}: {r.preprocess_hash}); "
                "comparison figures need models fitted on the same spots")


def check_same_spots(analyses: list[Analysis]) -> None:
    """Refuse analyze runs whose factors follow different spot indexes (before drawing)."""
    first = analyses[0]
    for an in analyses[1:]:
        if not np.array_equal(an.spots, first.spots):
            n = min(an.spots.size, first.spots.size)
            diff = int((an.spots[:n] != first.spots[:n]).sum()) + abs(an.spots.size - first.spots.size)
            raise RunLookupError(
                f"analyze runs {first.run_id} ({first.spots.size} spots) and {an.run_id} "
                f"({an.spots.size} spots) cover different spots ({diff} rows differ); "
                "comparison figures need models fitted on the same spots")


def _expand(rows: np.ndarray, mask: np.ndarray, axis: int = 0) -> np.ndarray:
    """Rows of the spots in ``mask`` placed into an array over all spots, NaN elsewhere.

    Floating rows keep their precision (float32 group-wise factors stay float32: at 10^6
    spots x 20 groups x 10 factors float64 would be 1.6 GB); others become float64.
    """
    shape = list(rows.shape)
    shape[axis] = mask.size
    dtype = rows.dtype if np.issubdtype(rows.dtype, np.floating) else np.float64
    out = np.full(shape, np.nan, dtype=dtype)
    idx = [slice(None)] * rows.ndim
    idx[axis] = mask
    out[tuple(idx)] = rows
    return out


def _spot_layout(a: Path, pre) -> tuple[np.ndarray, bool]:
    """Rows of ``factors.npy`` as a mask over the preprocessed spots, and whether they are all.

    ``spots.csv`` present: every kept spot, checked against the preprocessed spot names.
    Absent (runs made before analyze covered all spots): the training spots only.
    """
    names = np.asarray(pre.data.spot_names).astype(str)
    if not (a / "spots.csv").is_file():
        return ~pre.heldout, False
    with open(a / "spots.csv") as fh:
        rows = list(csv.DictReader(fh))
    spots = np.array([r["spot"] for r in rows], dtype=str)
    if not np.array_equal(spots, names):
        raise RunLookupError(f"{a / 'spots.csv'} does not list the preprocess run's "
                             f"{names.size} spots in their order; rerun analyze")
    return np.ones(names.size, bool), True


def load_analysis(lin: Lineage, tmp: Path) -> Analysis:
    """An analyze run's outputs, its train run's ELBO curve and its preprocess run's data."""
    run_id = lin.run_id
    a = download_artifacts(run_id, "", tmp / run_id / "analyze")
    t = download_artifacts(lin.train_run_id, "elbo_history.csv", tmp / run_id / "train")
    pre = load_preprocessed(lin.preprocess_run_id, tmp / run_id / "preprocess")
    with open(t) as fh:
        elbo = np.array([float(r["elbo"]) for r in csv.DictReader(fh)])
    with open(a / "moran_i.csv") as fh:
        rows = list(csv.DictReader(fh))
    rows_mask, complete = _spot_layout(a, pre)
    factors = _expand(np.load(a / "factors.npy"), rows_mask)
    scales = _expand(np.load(a / "scales.npy"), rows_mask)
    loadings = np.load(a / "loadings.npy")
    gw = None
    if (a / "groupwise_factors.npz").is_file():
        with np.load(a / "groupwise_factors.npz") as z:
            gw = _expand(z["factors"], ~pre.heldout, axis=2)  # fitted on training spots
    return Analysis(
        run_id=run_id, model=lin.model, preprocess_run_id=lin.preprocess_run_id,
        preprocess_hash=lin.preprocess_hash, data=pre.data, heldout=pre.heldout.astype(bool),
        spots=np.asarray(pre.data.spot_names).astype(str),
        factors=factors, scales=scales, loadings=loadings,
        moran=np.array([float(r["moran_i"]) for r in rows]),
        order=np.array([int(r["original_factor"]) for r in rows]), elbo=elbo,
        lfc=_enrichment(a, pre, loadings), groupwise=gw,
        heldout_label=HELDOUT_LABEL if complete else NO_VALUE_LABEL, spatial=_marking(a, lin),
        **_training(lin))


def _training(lin: Lineage) -> dict:
    """How the train run's fit ended (its tags: the note and iteration kept when early
    stopping or a time budget rolled it back) and its held-out deviance per check."""
    tags = get_stage_run(lin.train_run_id, "train").data.tags
    kept = tags.get("sf.kept_iteration")
    steps, values = metric_history(lin.train_run_id, "heldout_deviance")
    return {"stop_note": describe_stop(tags.get("sf.stop_reason", ""),
                                       tags.get("sf.early_stopped_at"), kept),
            "kept_iteration": int(kept) if kept not in (None, "") else None,
            "heldout_history": (steps, values) if steps.size else None}


def _marking(a: Path, lin: Lineage) -> np.ndarray | None:
    """A hybrid analyze run's ``spatial_factors.npy`` (rank order); None for other models,
    whose factors are all of one kind (and runs made before the file was written)."""
    f = a / "spatial_factors.npy"
    return np.load(f).astype(bool) if lin.model == "hybrid" and f.is_file() else None


def _enrichment(a: Path, pre, loadings: np.ndarray) -> np.ndarray | None:
    """Group enrichment, (G, D, L): recomputed from the group loadings with the genes'
    training counts per group (shrinkage, too-few-count genes left out) when they are
    there, else the analyze run's ``enrichment_lfc.npy``, else None."""
    d = pre.data
    if not d.group_names:
        return None
    files = [a / f"loadings_group_{g}.npy" for g in group_file_names(d.group_names)]
    if all(f.is_file() for f in files) and d.groups is not None:
        train = ~pre.heldout
        n = group_gene_counts(d.counts[np.flatnonzero(train)], d.groups[train],
                              len(d.group_names))
        return relative_enrichment(loadings, np.stack([np.load(f) for f in files]),
                                   group_counts=n)
    f = a / "enrichment_lfc.npy"
    return np.load(f) if f.is_file() else None


class _Saver:
    """Saves figures under a folder, printing each one as it is written."""

    def __init__(self, out: Path, root: Path):
        self.out, self.root, self.made = out, root, []

    def __call__(self, draw, name: str) -> None:
        t0 = time.perf_counter()
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        draw().savefig(path)
        self.made.append(path)
        say(STAGE, f"drew {path.relative_to(self.root)} ({time.perf_counter() - t0:.1f} s)")


def _sd_label(an: Analysis) -> str:
    """What the held-out rings of the scales map show: a spatial model's GP predictive sd;
    none (grey) for the non-spatial model's, and for a hybrid's non-spatial factors."""
    held_sd = np.isfinite(an.scales[an.heldout]) if an.heldout.any() else np.zeros((0, 1))
    if held_sd.size and held_sd.all():
        return "held-out spot (not fitted; the GP's predictive sd at its position)"
    if held_sd.size and held_sd.any():
        return "held-out spot (not fitted; GP predictive sd, grey: none, a non-spatial factor)"
    return "held-out spot (not fitted; grey: no posterior sd)"


#: Most groups drawn one panel (or one file) each; with more, the most populous are drawn
#: (osmFISH's 32 clusters are all drawn; labels that name cells, hundreds, are not).
MAX_GROUP_PANELS = 40


def panel_groups(d: SpatialCounts) -> list[int]:
    """Codes of the groups drawn one panel or file each: all, or the :data:`MAX_GROUP_PANELS`
    with most spots (in code order), saying so. 200 groups once made a 1,215 x 80,489-pixel
    figure and 456 s of drawing."""
    G = len(d.group_names or [])
    if G <= MAX_GROUP_PANELS or d.groups is None:
        return list(range(G))
    sizes = np.bincount(d.groups, minlength=G)
    shown = sorted(np.argsort(-sizes, kind="stable")[:MAX_GROUP_PANELS].tolist())
    say(STAGE, f"{G} groups: the per-group figures (enrichment_by_group, groupwise_factors) "
               f"show the {MAX_GROUP_PANELS} with most spots ({int(sizes[shown].sum()):,} of "
               f"{int(sizes.sum()):,} spots)")
    return shown


def single_figures(an: Analysis, save: _Saver) -> None:
    """Every figure of one analyze run, saved with ``save``."""
    d = an.data
    X, held = d.coordinates, an.heldout
    titles = an.titles()
    genes = list(d.gene_names)
    opts = dict(invert_y=INVERT_Y, heldout=held)
    save(lambda: plots.factors_spatial(X, an.factors, titles,
                                       title=f"{an.model.upper()} factors", **opts),
         "factors_spatial.png")
    save(lambda: plots.scales_spatial(
        X, an.scales, titles, heldout_label=_sd_label(an),
        title=f"{an.model.upper()}: posterior standard deviation of the log-factors", **opts),
        "scales_spatial.png")
    save(lambda: plots.elbo_curve(
        an.elbo, np.arange(1, an.elbo.size + 1),    # iterations count from 1, as logged
        title=f"{an.model.upper()} training objective" + (
            f" ({an.stop_note})" if an.stop_note else ""),
        heldout=an.heldout_history, kept=an.kept_iteration), "elbo_curve.png")
    save(lambda: plots.top_genes(an.loadings, genes, titles=titles), "top_genes.png")
    save(lambda: plots.factors_with_genes(X, an.factors, d.counts, an.loadings, genes,
                                          titles, **opts), "factors_with_genes.png")
    if an.lfc is not None and d.group_names:
        save(lambda: plots.gene_enrichment_heatmap(an.lfc, genes, d.group_names, titles,
                                                   loadings=an.loadings),
             "gene_enrichment.png")
    shown = panel_groups(d)
    if an.lfc is not None and d.group_names:
        files = group_file_names(d.group_names)
        for g in shown:
            save(lambda g=g: plots.enrichment_for_group(
                an.lfc[g], genes, d.group_names[g], titles, loadings=an.loadings),
                f"enrichment_by_group/{files[g]}.png")
    # only factors with a GP have group-wise predictions (a hybrid's non-spatial: none)
    gp = np.ones(an.moran.size, bool) if an.spatial is None else an.spatial
    if an.groupwise is not None and d.group_names and gp.any():
        save(lambda: plots.groupwise_factors(
            X, an.factors[:, gp], an.groupwise[shown][:, gp], [d.group_names[g] for g in shown],
            [t for t, s in zip(titles, gp) if s], invert_y=INVERT_Y,
            heldout=held, heldout_label="held-out spot (not fitted; grey: no group-wise "
                                        "prediction)"), "groupwise_factors.png")


def data_figures(an: Analysis, save: _Saver) -> None:
    """Figures of the data every model shares: where the cell types are."""
    d = an.data
    if d.groups is not None and d.group_names:
        save(lambda: plots.cell_types(d.coordinates, d.groups, d.group_names,
                                      invert_y=INVERT_Y, heldout=an.heldout), "cell_types.png")


def comparison_figures(analyses: list[Analysis], save: _Saver) -> None:
    """Moran's I side by side and the factor maps paired by correlation (same spots)."""
    first = analyses[0]
    labels = []
    for an in analyses:
        label = an.model.upper()
        labels.append(label if label not in labels else f"{label} ({an.run_id[:7]})")
    save(lambda: plots.compare_morans_i({lab: an.moran for lab, an in zip(labels, analyses)}),
         "compare_moran_i.png")
    save(lambda: plots.compare_factor_maps(
        first.data.coordinates, {lab: an.factors for lab, an in zip(labels, analyses)},
        titles={lab: [f"factor {r + 1}" + ("" if an.spatial is None else
                                           ", spatial" if an.spatial[r] else ", non-spatial")
                      + f", Moran's I {v:.2f}" for r, v in enumerate(an.moran)]
                for lab, an in zip(labels, analyses)},
        invert_y=INVERT_Y, heldout=first.heldout, match_spots=~first.heldout),
        "compare_factors.png")


def load_all(runs: list[Lineage]) -> list[Analysis]:
    """Every analyze run's outputs, checked to cover the same spots before returning."""
    with tempfile.TemporaryDirectory() as tmp:
        analyses = [load_analysis(r, Path(tmp)) for r in runs]
    check_same_spots(analyses)
    return analyses


def run_figures(config: Config, analyze_run_ids: list[str] | None = None, *,
                parent_run_id: str | None = None, labels: dict[str, str] | None = None) -> str:
    """Draw every figure of the given analyze runs (or the newest for the config).

    One run: its figures under ``figures/``. Several: each run's figures under
    ``figures/<model>_<run id>/`` plus ``figures/compare_*.png``; they must come from
    preprocess runs with the same settings and cover the same spots, which is checked
    before anything is drawn. ``labels`` names models by analyze run ID (e.g. ``main``'s
    ``models:`` names, so an SVGP and an MGGP-SVGP are told apart); otherwise a run is
    labelled by its model kind. Returns the run ID.
    """
    ids = [i for i in (analyze_run_ids or []) if i]
    if not ids:
        ids = [resolve_upstream(config, "analyze", None, by=STAGE,
                                param="analyze_run_ids").info.run_id]
    # refuse wrong run IDs, other data and unwritable outputs before opening a run
    runs = [lineage(i) for i in ids]
    check_same_settings(runs)
    check_config(config, runs)
    check_output_dir(config)
    analyses = load_all(runs) if len(runs) > 1 else None
    params = {"upstream.analyze_run_ids": ",".join(ids)}
    tags = {**base_tags(config, STAGE), TAG_UPSTREAM: ",".join(ids)}
    with open_run(config, STAGE, params=params, tags=tags,
                  run_name=f"figures/{len(ids)}-run" + ("s" if len(ids) > 1 else ""),
                  description=f"Figures of analyze runs {', '.join(ids)}",
                  parent_run_id=parent_run_id, headline=f"figures of {', '.join(ids)}") as run:
        analyses = [dataclasses.replace(an, model=(labels or {}).get(an.run_id, an.model))
                    for an in analyses or load_all(runs)]
        with staging_dir(config, STAGE, run.run_id) as out:
            figdir = out / "figures"
            figdir.mkdir()
            save = _Saver(figdir, out)
            for an in analyses:
                save.out = figdir if len(analyses) == 1 else figdir / f"{an.model}_{an.run_id[:8]}"
                single_figures(an, save)
            save.out = figdir
            data_figures(analyses[0], save)
            if len(analyses) > 1:
                comparison_figures(analyses, save)
            (out / "figures.json").write_text(json.dumps(
                [str(p.relative_to(out)) for p in save.made], indent=1))
            run.log_artifacts(out)
        run.log_metrics({"n_figures": len(save.made)})
        say(STAGE, f"{len(save.made)} figures logged")
    return finished(STAGE, run)
