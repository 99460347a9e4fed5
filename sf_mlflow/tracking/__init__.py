"""MLflow integration: the only package that imports mlflow.

Stages wrap their work in :func:`stage_run`; lineage helpers find and check
upstream runs. The model, data and analysis code know nothing of MLflow.
"""

from sf_mlflow.tracking.existing import alias_run_id, existing_run
from sf_mlflow.tracking.experiments import (
    add_headline_metrics,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    HEADLINE_VIEW,
    describe_experiment,
    experiment_url,
    ui_address,
    ui_port,
    lookup_experiment_id,
    select_experiment,
)
from sf_mlflow.tracking.lineage import (
    describe_run,
    download_artifacts,
    find_latest_run,
    find_reusable_run,
    get_stage_run,
    metric_history,
    run_metrics,
)
from sf_mlflow.tracking.runs import (
    TAG_CODE_VERSION,
    TAG_CONFIG_HASH,
    TAG_CONVERGED,
    TAG_DATASET,
    TAG_DIVERGED,
    TAG_INTERRUPTED,
    TAG_MODEL,
    TAG_PREPROCESS_HASH,
    TAG_RESUMED_FROM,
    TAG_REUSABLE,
    TAG_STAGE,
    TAG_STAGE_HASH,
    TAG_UPSTREAM,
    MetricStream,
    StageRun,
    configure_tracking,
    stage_run,
)
from sf_mlflow.tracking.journal import SUFFIX as UNSENT_SUFFIX
from sf_mlflow.tracking.registry import register_train_run
from sf_mlflow.tracking.runs import reading_store, ui_command

__all__ = [
    # tags
    "TAG_CODE_VERSION", "TAG_CONFIG_HASH", "TAG_CONVERGED", "TAG_DATASET", "TAG_DIVERGED",
    "TAG_INTERRUPTED", "TAG_MODEL",
    "TAG_PREPROCESS_HASH", "TAG_RESUMED_FROM", "TAG_REUSABLE", "TAG_STAGE", "TAG_STAGE_HASH",
    "TAG_UPSTREAM",
    # runs
    "MetricStream", "StageRun", "UNSENT_SUFFIX", "configure_tracking", "existing_run", "stage_run", "ui_command",
    "reading_store",
    # experiments
    "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "HEADLINE_VIEW", "add_headline_metrics",
    "describe_experiment",
    "experiment_url", "lookup_experiment_id", "select_experiment", "ui_address", "ui_port",
    # lineage
    "describe_run", "download_artifacts", "find_latest_run", "find_reusable_run",
    "get_stage_run", "metric_history", "run_metrics",
    # registry
    "alias_run_id", "register_train_run",
]
