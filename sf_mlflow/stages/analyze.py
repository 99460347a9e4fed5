"""The analyze stage: factors, Moran's I, deviances, group loadings and enrichment of a train run."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np

from sf_mlflow.analysis.summary import all_spots, analyze_model
from sf_mlflow.config import Config
from sf_mlflow.models.pnmf import PNMF
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
from sf_mlflow.tracking import TAG_MODEL, TAG_UPSTREAM, download_artifacts, get_stage_run

STAGE = "analyze"


def load_lineage(train_run, tmp: Path):
    """The fitted model of a train run and the preprocessed data of its preprocess run."""
    pre_id = train_run.data.tags[TAG_UPSTREAM]
    model_dir = download_artifacts(train_run.info.run_id, "model.pth", tmp / "train")
    model = PNMF.load(model_dir if model_dir.is_file() else model_dir / "model.pth")
    pre = load_preprocessed(pre_id, tmp / "preprocess")
    return model, pre, pre_id


def run_analyze(config: Config, train_run_id: str | None = None, *,
                parent_run_id: str | None = None) -> str:
    """Analyze a train run and log arrays, tables and metrics. Returns the run ID.

    Artifacts: ``factors.npy`` (N, L) and ``scales.npy`` (N, L) of ALL N kept spots of the
    preprocess run, in the preprocessed data's spot order (training rows: the fitted
    model's factors and posterior sd of the log-factors; held-out rows: the model's
    prediction from position, :meth:`~sf_mlflow.models.pnmf.PNMF.predict_at`, as used for
    the held-out deviance, and the GP predictive sd -- NaN for the non-spatial model);
    ``spots.csv`` (``spot,heldout``: spot name, 0/1) in the same row order;
    ``loadings.npy`` (D, L), ``heldout_deviance.npy`` (N_heldout,: each held-out spot's
    Poisson deviance, in the order of the held-out rows; for paired comparisons), ``moran_i.csv`` (rank, original factor, Moran's I, ``spatial``
    0/1: whether the factor has the GP prior), ``spatial_factors.npy`` (bool (L,), the same
    marking: all True for the spatial model, all False for the non-spatial one, a hybrid's
    K spatial factors wherever Moran's I ranks them), ``metrics.json``, and with groups
    ``loadings_group_<g>.npy`` (D, L), ``gene_enrichment.json`` and ``enrichment_lfc.npy``
    (G, D, L); models with spatial factors add ``groupwise_factors.npz`` (G, L, N_train;
    NaN for a hybrid's non-spatial factors). Factor axes are in descending Moran's I
    order; Moran's I and every metric are computed on the training spots. A hybrid's
    held-out rows: GP predictive for its spatial factors (with its sd), nearest training
    spots for the others (sd NaN).
    :func:`sf_mlflow.to_anndata` turns the run into an AnnData.
    """
    advice = ("Pass a train run made with this config and the overrides (--set, -P) it was "
              "trained with (for a model of a models: list or a tuning trial, its settings), "
              "or omit --train-run-id (-P train_run_id) to use the newest matching one")
    train_run = resolve_upstream(config, "train", train_run_id, by=STAGE, advice=advice)
    # the data the train run read, by its preprocess run's own tags (not the train run's)
    pre_id = train_run.data.tags.get(TAG_UPSTREAM, "")
    check_tags(config, "train", train_run.info.run_id,
               get_stage_run(pre_id, "preprocess").data.tags, advice=advice, stage_hash=False,
               via=f" (its preprocess run {pre_id})")
    check_output_dir(config)
    train_id = train_run.info.run_id
    kind = train_run.data.tags.get(TAG_MODEL, "pnmf")
    a = config.analysis
    params = {**config.flat("analysis"), "upstream.train_run_id": train_id}
    tags = {**base_tags(config, STAGE), TAG_UPSTREAM: train_id, TAG_MODEL: kind}
    description = f"Analyze {kind.upper()} train run {train_id} ({config.dataset})"
    with open_run(config, STAGE, params=params, tags=tags,
                  run_name=f"analyze/{kind}/L{config.model.n_components}",
                  description=description, parent_run_id=parent_run_id) as run:
        with tempfile.TemporaryDirectory() as tmp:
            model, pre, pre_id = load_lineage(train_run, Path(tmp))
        train, held = pre.training_spots(), pre.heldout_spots()
        result = analyze_model(model, train, held, moran_k=a.moran_k, exp_mean=a.exp_mean,
                               group_loadings_iter=a.group_loadings_iter,
                               n_top_genes=a.n_top_genes,
                               progress=lambda line: say(STAGE, line))
        with staging_dir(config, STAGE, run.run_id) as out:
            write_outputs(out, result, train, pre)
            (out / "metrics.json").write_text(json.dumps(
                {**result.metrics, "train_run_id": train_id, "preprocess_run_id": pre_id},
                indent=2))
            run.log_artifacts(out)
        run.log_metrics(result.metrics)
        say(STAGE, f"mean Moran's I {result.metrics['moran_i_mean']:.3f}"
                   + "".join(f" ({kind} factors {result.metrics[f'moran_i_mean_{key}']:.3f})"
                             for kind, key in (("spatial", "spatial"), ("non-spatial", "nonspatial"))
                             if f"moran_i_mean_{key}" in result.metrics)
                   + "; train deviance "
                   f"{result.metrics['train_deviance']:.6g}"
                   + (f"; held-out deviance {result.metrics['heldout_deviance']:.6g}"
                      if "heldout_deviance" in result.metrics else ""))
    return finished(STAGE, run)


def write_outputs(out: Path, result, train, pre) -> None:
    """The arrays and tables of :func:`run_analyze` (all but ``metrics.json``) under ``out``.

    ``pre`` is the preprocessed data: ``factors.npy``, ``scales.npy`` and ``spots.csv``
    cover all its spots in its order, held-out ones included.
    """
    arrays = result.arrays
    for name in ("factors", "scales"):
        np.save(out / f"{name}.npy",
                all_spots(arrays[name], arrays.get(f"heldout_{name}"), pre.heldout))
    np.save(out / "loadings.npy", arrays["loadings"])
    if "heldout_deviance" in arrays:
        np.save(out / "heldout_deviance.npy", arrays["heldout_deviance"])
    np.save(out / "spatial_factors.npy", np.asarray(arrays["spatial_factors"], dtype=bool))
    with open(out / "spots.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["spot", "heldout"])
        w.writerows(zip(map(str, pre.data.spot_names), pre.heldout.astype(int)))
    with open(out / "moran_i.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "original_factor", "moran_i", "spatial"])
        w.writerows((r, int(o), repr(float(v)), int(sf)) for r, (o, v, sf) in enumerate(
            zip(result.order, result.moran, arrays["spatial_factors"])))
    if "group_loadings" in arrays:
        for g, name in enumerate(group_file_names(train.group_names)):
            np.save(out / f"loadings_group_{name}.npy", arrays["group_loadings"][g])
        (out / "gene_enrichment.json").write_text(json.dumps(result.enrichment, indent=1))
        np.save(out / "enrichment_lfc.npy", arrays["enrichment_lfc"])
    if "groupwise_factors" in arrays:
        np.savez_compressed(out / "groupwise_factors.npz", factors=arrays["groupwise_factors"],
                            group_names=np.asarray(train.group_names, dtype=str))
