"""The preprocess stage: load a data set, filter it, and log the result as artifacts."""

from __future__ import annotations

import warnings

from sf_mlflow.config import Config
from sf_mlflow.data.io import write_preprocessed
from sf_mlflow.data.preprocess import QCWarning, describe_filters, preprocess
from sf_mlflow.data.sources import load_dataset
from sf_mlflow.stages._checks import check_output_dir
from sf_mlflow.stages._common import (
    PREPROCESS_SECTIONS,
    base_tags,
    finished,
    open_run,
    preprocess_hash,
    say,
    staging_dir,
)

STAGE = "preprocess"


def run_preprocess(config: Config, *, parent_run_id: str | None = None) -> str:
    """Load ``config.dataset``, apply QC, gene selection, scaling and the held-out split.

    Logs ``data/X.npy``, ``data/Y.npz``, ``data/C.npy``, ``data/metadata.json`` and
    ``config.yaml`` as artifacts, the preprocessing settings as params and what each
    filter kept and removed as metrics. Returns the run ID.
    """
    check_output_dir(config)
    params = config.flat(*PREPROCESS_SECTIONS)
    description = (f"Preprocess {config.dataset} for '{config.name}': min_counts="
                   f"{config.preprocessing.min_counts}, min_cells={config.preprocessing.min_cells}, "
                   f"filter_mt={config.preprocessing.filter_mt}, "
                   f"max_mt_fraction={config.preprocessing.max_mt_fraction}, "
                   f"holdout={config.preprocessing.holdout_fraction:g}")
    with open_run(config, STAGE, params=params, tags=base_tags(config, STAGE),
                  run_name=f"preprocess/{config.dataset}", description=description,
                  parent_run_id=parent_run_id,
                  headline=f"loading dataset '{config.dataset}'") as run:
        raw = load_dataset(config)
        say(STAGE, f"loaded {raw.n_spots:,} spots x {raw.n_genes:,} genes"
                   + (f" from {raw.counts_source}" if raw.counts_source else "")
                   + (f", {raw.n_groups} groups" if raw.groups is not None else ", no groups"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", QCWarning)
            result = preprocess(raw, config.preprocessing, seed=config.seed,
                                min_training_spots=config.analysis.moran_k + 1)
        for line in describe_filters(result.report):
            say(STAGE, line)
        for w in caught:
            if issubclass(w.category, QCWarning):
                say(STAGE, f"warning: {w.message}")
            else:  # not ours to word: pass it on as it came
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        kept = result.data
        say(STAGE, f"kept {kept.n_spots:,} spots x {kept.n_genes:,} genes "
                   f"({int(result.heldout.sum()):,} spots held out)")
        with staging_dir(config, STAGE, run.run_id) as out:
            write_preprocessed(out / "data", result, metadata={
                "dataset": config.dataset, "experiment": config.name,
                "preprocess_hash": preprocess_hash(config), "run_id": run.run_id,
                "counts_source": raw.counts_source})
            (out / "config.yaml").write_text(config.to_yaml())
            run.log_artifacts(out / "data", "data")
            run.log_artifact(out / "config.yaml")
        metrics = {f"preprocess.{k}": v for k, v in result.report.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["n_spots"] = kept.n_spots
        metrics["n_genes"] = kept.n_genes
        metrics["n_heldout"] = int(result.heldout.sum())
        run.log_metrics(metrics)
    return finished(STAGE, run)
