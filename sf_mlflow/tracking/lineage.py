"""Finding and checking upstream runs: the links of the pipeline's run lineage."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import mlflow
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sf_mlflow.errors import RunLookupError
from sf_mlflow.tracking.experiments import lookup_experiment_id
from sf_mlflow.tracking.liveness import sweep_dead_runs
from sf_mlflow.tracking.runs import (
    TAG_CODE_VERSION,
    TAG_DIVERGED,
    TAG_INTERRUPTED,
    TAG_REUSABLE,
    TAG_STAGE,
    TAG_STAGE_HASH,
    TAG_UPSTREAM,
    configure_tracking,
)


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def get_stage_run(run_id: str, stage: str, statuses: tuple[str, ...] = ("FINISHED",)):
    """Return the MLflow run ``run_id``, checking it is a run of ``stage`` in one of ``statuses``.

    Raises :class:`RunLookupError` when it does not exist, belongs to another stage or
    has another status (by default: did not finish).
    """
    uri = configure_tracking()
    client = MlflowClient()
    run_id = str(run_id).strip()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RunLookupError(
            f"{stage} run ID {run_id!r} does not exist in the tracking store {uri} "
            f"(check the ID in the MLflow UI, or MLFLOW_TRACKING_URI)") from None
    actual = run.data.tags.get(TAG_STAGE)
    if actual != stage:
        what = f"a '{actual}' run" if actual else "not a run of this pipeline"
        raise RunLookupError(f"run ID {run_id!r} is {what}, but a '{stage}' run ID is required here")
    if run.info.status not in statuses:
        raise RunLookupError(f"{stage} run {run_id!r} is {run.info.status}, not "
                             f"{' or '.join(statuses)}; run the {stage} stage again or pass "
                             "another run ID")
    return run


def find_latest_run(stage: str, tags: dict[str, str], experiment_id: str | None = None):
    """Newest FINISHED run of ``stage`` in one experiment whose tags match, or None.

    ``experiment_id``: the experiment to search; default the experiment of the stage run
    open in this process (:func:`~sf_mlflow.tracking.experiments.lookup_experiment_id`).
    Never searches other experiments: a chain's runs stay in its experiment. Runs of
    that experiment left RUNNING by a dead process are first ended FAILED
    (:func:`~sf_mlflow.tracking.liveness.sweep_dead_runs`), so none is taken for work
    in progress.
    """
    configure_tracking()
    client = MlflowClient()
    if experiment_id is None:
        experiment_id = lookup_experiment_id()
        if experiment_id is None:
            return None
    sweep_dead_runs([str(experiment_id)], client)
    clauses = [f"tags.`{TAG_STAGE}` = {_quote(stage)}", "attributes.status = 'FINISHED'"]
    clauses += [f"tags.`{k}` = {_quote(v)}" for k, v in tags.items()]
    runs = client.search_runs([str(experiment_id)], " and ".join(clauses),
                              run_view_type=ViewType.ACTIVE_ONLY,
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def find_reusable_run(stage: str, stage_hash: str, code_version: str,
                      upstream_run_id: str | None = None, experiment_id: str | None = None):
    """Newest FINISHED run of ``stage`` that computed the same thing, or None.

    Same thing = the same stage hash (the settings the stage depends on), the same
    upstream run (none for preprocess) and the same code version; runs tagged
    ``sf.reusable = false`` (work that stopped short) never qualify. Only runs of
    ``experiment_id`` (default: the experiment of the stage run open in this process).
    """
    tags = {TAG_STAGE_HASH: stage_hash, TAG_CODE_VERSION: code_version, TAG_REUSABLE: "true"}
    if upstream_run_id:
        tags[TAG_UPSTREAM] = upstream_run_id
    return find_latest_run(stage, tags, experiment_id)


def find_interrupted_run(stage: str, stage_hash: str, code_version: str, upstream_run_id: str,
                         experiment_id: str | None = None):
    """The newest run of ``stage`` that an interrupt stopped with a checkpoint, or None.

    Same stage hash, upstream run and code version as :func:`find_reusable_run`; tagged
    ``sf.interrupted = true`` (it logged a checkpoint) and not diverged (resuming a
    diverged fit with the same settings would diverge again); KILLED or FAILED (under
    ``mlflow run`` the launcher turns KILLED into FAILED). None when a run of the same
    thing started after it finished: that one is the result.
    """
    configure_tracking()
    client = MlflowClient()
    if experiment_id is None:
        experiment_id = lookup_experiment_id()
        if experiment_id is None:
            return None
    sweep_dead_runs([str(experiment_id)], client)
    tags = {TAG_STAGE: stage, TAG_STAGE_HASH: stage_hash, TAG_CODE_VERSION: code_version,
            TAG_UPSTREAM: upstream_run_id}
    runs = client.search_runs([str(experiment_id)],
                              " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items()),
                              run_view_type=ViewType.ACTIVE_ONLY,
                              order_by=["attributes.start_time DESC"], max_results=100)
    for run in runs:
        if run.info.status == "FINISHED":
            return None
        if (run.info.status in ("KILLED", "FAILED")
                and run.data.tags.get(TAG_INTERRUPTED) == "true"
                and run.data.tags.get(TAG_DIVERGED) != "true"):
            return run
    return None


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run."""
    configure_tracking()
    return dict(MlflowClient().get_run(run_id).data.metrics)


def describe_run(run) -> str:
    """``<id> (<name>, finished 2026-11-25 21:03)`` for progress messages."""
    end = run.info.end_time or run.info.start_time
    when = _dt.datetime.fromtimestamp(end / 1000).strftime("%Y-%m-%d %H:%M") if end else "?"
    return f"{run.info.run_id} ({run.info.run_name}, finished {when})"


def download_artifacts(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """Download one artifact (file or folder; ``""`` = all) of a run into ``dst``; return its path."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path or None,
                                                dst_path=str(dst))
    return Path(local)
