"""Logging to a run that already exists (e.g. a finished child run), by its ID.

The tune stage adds the held-out deviance curve, the trial number and the trial's
state to each trial's train run after :func:`~sf_mlflow.stages.train.run_train`
has ended it. MLflow accepts params, metrics and tags on an ended run.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from sf_mlflow.tracking.runs import StageRun, configure_tracking


def existing_run(run_id: str) -> StageRun:
    """A :class:`StageRun` handle on run ``run_id`` (its status is left as it is)."""
    configure_tracking()
    return StageRun(MlflowClient(), run_id)


def alias_run_id(name: str, alias: str) -> str | None:
    """The run whose model version ``alias`` of registered model ``name`` points at, or None."""
    from mlflow.exceptions import MlflowException

    configure_tracking()
    try:
        return MlflowClient().get_model_version_by_alias(name, alias).run_id
    except MlflowException:  # no such model or alias yet
        return None
