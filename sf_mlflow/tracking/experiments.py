"""Which MLflow experiment a stage's runs go to, and what the experiment carries for the UI.

The experiment of a run is, first match wins:

1. the console script's ``--experiment-name`` (:func:`select_experiment`);
2. ``MLFLOW_EXPERIMENT_NAME``;
3. under ``mlflow run`` (``MLFLOW_RUN_ID`` set): the experiment ``mlflow run`` put its run
   in, i.e. its ``--experiment-name`` / ``--experiment-id`` -- unless that is the Default
   experiment (ID ``0``), which is where ``mlflow run`` puts a run when it was given none;
4. ``MLFLOW_EXPERIMENT_ID`` set outside ``mlflow run``;
5. the config's ``name``.

``mlflow run`` creates its run before the entry point can read the config, and MLflow
cannot move a run to another experiment. So when rule 3 falls through to the config's
name, the stage creates its run there and leaves ``mlflow run``'s run in Default as a thin
*launcher* run that links to it (tags ``sf.redirected_to_run_id`` and
``sf.redirected_to_experiment``; the stage run has ``sf.launcher_run_id``). Lookups of
upstream or reusable runs search one experiment only (:func:`lookup_experiment_id`).

Every experiment the package creates or uses is tagged ``mlflow.experimentKind =
custom_model_development`` (MLflow 3's "Machine learning" kind) and carries a saved
runs-table view with the headline metric columns (:data:`HEADLINE_VIEW`).
:func:`experiment_url` opens that view in the UI's "Model training" mode: MLflow 3.17's UI
keeps a per-browser GenAI / Model training switch that starts on GenAI, where an experiment
opens on its traces overview whatever its kind tag (checked with headless Chromium).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient

from sf_mlflow.errors import RunLookupError

#: MLflow 3's experiment-type tag; ``custom_model_development`` = "Machine learning" in the UI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: The experiment ``mlflow run`` uses when it is given none.
DEFAULT_EXPERIMENT_ID = "0"

#: Key of the saved runs-table view (experiment tag ``mlflow.sharedViewState.<key>``,
#: opened by the URL of :func:`experiment_url`).
HEADLINE_VIEW = "sf-headline"
_SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
#: Metric columns of that view: the headline metrics of ``main`` and of the stage runs.
HEADLINE_COLUMNS = ("final_elbo", "moran_i_mean", "heldout_deviance_mean", "training_time_s",
                    "n_iter")
#: Tag columns of that view.
HEADLINE_TAG_COLUMNS = ("sf.stage", "sf.model", "sf.dataset")

TAG_LAUNCHER_RUN = "sf.launcher_run_id"
TAG_REDIRECTED_RUN = "sf.redirected_to_run_id"
TAG_REDIRECTED_EXPERIMENT = "sf.redirected_to_experiment"

_SELECTED: list[Optional[str]] = [None]
#: Experiment IDs of the stage runs open in this process (innermost last).
_ACTIVE: list[str] = []


def select_experiment(name: Optional[str]) -> None:
    """Put this process's runs in experiment ``name`` (``None``: back to the rules above)."""
    _SELECTED[0] = str(name).strip() if name and str(name).strip() else None


@dataclass(frozen=True)
class Launcher:
    """The run ``mlflow run`` created for this process, and its experiment."""

    run_id: str
    experiment_id: Optional[str]


def launcher() -> Optional[Launcher]:
    """The ``mlflow run`` run this process was started for (``MLFLOW_RUN_ID``), or None."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    return Launcher(run_id, os.environ.get("MLFLOW_EXPERIMENT_ID"))


def chosen_experiment(config_name: str) -> tuple[str, str, str]:
    """``("name" | "id", value, why)``: the experiment of this process's runs, by the rules above."""
    if _SELECTED[0]:
        return "name", _SELECTED[0], "--experiment-name"
    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return "name", os.environ["MLFLOW_EXPERIMENT_NAME"], "MLFLOW_EXPERIMENT_NAME"
    launch = launcher()
    if launch is not None:
        if launch.experiment_id and launch.experiment_id != DEFAULT_EXPERIMENT_ID:
            return "id", launch.experiment_id, "mlflow run --experiment-name/--experiment-id"
    elif os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return "id", os.environ["MLFLOW_EXPERIMENT_ID"], "MLFLOW_EXPERIMENT_ID"
    return "name", config_name, "the config's name"


def experiment_id_for(client: MlflowClient, config_name: str, *, create: bool = True
                      ) -> Optional[str]:
    """ID of the experiment chosen for ``config_name``'s runs (created when missing and
    ``create``; else None when it does not exist yet)."""
    how, value, why = chosen_experiment(config_name)
    if how == "id":
        exp = client.get_experiment(value) if _exists(client, value) else None
        if exp is None:
            raise RunLookupError(f"experiment ID {value!r} (from {why}) does not exist in the "
                                 f"tracking store {mlflow.get_tracking_uri()}; pass an existing "
                                 "ID or an experiment name instead")
        return exp.experiment_id
    exp = client.get_experiment_by_name(value)
    if exp is not None:
        if exp.lifecycle_stage == "deleted" and create:
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(value, artifact_location=_artifact_location(value),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        exp = client.get_experiment_by_name(value)
        if exp is None:
            raise
        return exp.experiment_id


def _exists(client: MlflowClient, experiment_id: str) -> bool:
    try:
        client.get_experiment(experiment_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def lookup_experiment_id(config_name: Optional[str] = None) -> Optional[str]:
    """The one experiment that lookups of upstream / reusable runs search.

    The experiment of the innermost stage run open in this process (e.g. the ``main``
    run whose stages are being reused), else the experiment chosen for ``config_name``
    (None when it does not exist yet: nothing to find).
    """
    if _ACTIVE:
        return _ACTIVE[-1]
    if config_name is None:
        raise ValueError("no stage run is open: pass the experiment (or the config's name) "
                         "whose runs to search")
    from sf_mlflow.tracking.runs import configure_tracking

    configure_tracking()
    return experiment_id_for(MlflowClient(), config_name, create=False)


def headline_view_state(metrics=HEADLINE_COLUMNS, tags=HEADLINE_TAG_COLUMNS) -> dict:
    """The runs-table view: MLflow's default columns, the headline metrics and tags."""
    columns = ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`"]
    columns += [f"metrics.`{m}`" for m in metrics] + [f"tags.`{t}`" for t in tags]
    return {"selectedColumns": columns, "orderByKey": "attributes.start_time",
            "orderByAsc": False, "runsExpanded": {}}


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as model training (unless it has a kind) and save the headline view."""
    exp = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    view = _SHARED_VIEW_PREFIX + HEADLINE_VIEW
    if view not in exp.tags:
        client.set_experiment_tag(experiment_id, view, json.dumps(headline_view_state()))


def add_headline_metrics(experiment_id: str, metrics) -> None:
    """Add metric columns to the experiment's headline view (e.g. a multi-model ``main``'s
    ``<model>.heldout_deviance_mean``, which the fixed columns leave empty)."""
    client = MlflowClient()
    key = _SHARED_VIEW_PREFIX + HEADLINE_VIEW
    tags = client.get_experiment(experiment_id).tags
    state = json.loads(tags[key]) if key in tags else headline_view_state()
    columns = state["selectedColumns"]
    new = [c for c in (f"metrics.`{m}`" for m in metrics) if c not in columns]
    if new:
        first_tag = next((i for i, c in enumerate(columns) if c.startswith("tags.")), len(columns))
        state["selectedColumns"] = columns[:first_tag] + new + columns[first_tag:]
        client.set_experiment_tag(experiment_id, key, json.dumps(state))


def _artifact_location(name: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: beside the database
    (``<store folder>/mlruns/<name>-<8 hex>``), not under whatever folder the process runs
    in -- MLflow's default, which under ``mlflow run`` is the project's checkout. None (the
    server's choice) for other stores."""
    import uuid

    from sf_mlflow.files import safe_name
    from sf_mlflow.tracking.store import sqlite_path

    db = sqlite_path(mlflow.get_tracking_uri())
    if db is None:
        return None
    safe = safe_name(name, "experiment")[:60]
    return str(db.resolve().parent / "mlruns" / f"{safe}-{uuid.uuid4().hex[:8]}")


#: The port ``mlflow ui`` is told to use in the printed command, and so the port of every
#: printed URL of a local store; ``SF_UI_PORT`` changes both (e.g. when 5000 is taken).
UI_PORT_ENV = "SF_UI_PORT"


def ui_address() -> tuple[str, bool]:
    """``(address of the UI, whether it is a tracking server already)``: the tracking URI
    itself for an ``http(s)://`` server, else ``http://127.0.0.1:<SF_UI_PORT or 5000>``,
    where the printed ``mlflow ui`` command serves the local store."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/"), True
    return f"http://127.0.0.1:{ui_port()}", False


def ui_port() -> int:
    value = os.environ.get(UI_PORT_ENV, "5000")
    return int(value) if value.isdigit() and 0 < int(value) < 65536 else 5000


#: The query that opens MLflow 3.17's UI in its "Model training" mode: otherwise it opens in
#: its GenAI mode (a per-browser setting, GenAI by default) on the traces overview.
ML_VIEW = "workflowType=machine_learning"


def experiment_url(experiment_id: str, host: str | None = None) -> str:
    """URL of the experiment's runs table with the headline columns (on ``host``, default
    :func:`ui_address`)."""
    host = host or ui_address()[0]
    return (f"{host}/#/experiments/{experiment_id}/runs?viewStateShareKey={HEADLINE_VIEW}"
            f"&{ML_VIEW}")


def describe_experiment(experiment_id: str) -> str:
    """``'name' (ID 3)``."""
    exp = MlflowClient().get_experiment(experiment_id)
    return f"'{exp.name}' (ID {experiment_id})"
