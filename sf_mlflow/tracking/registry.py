"""Train runs as registered MLflow models: factors (or expected counts) from positions.

A train run is logged as an MLflow *pyfunc* model and registered under a name; it is
then loaded anywhere, without the training data or this checkout, with::

    import mlflow
    model = mlflow.pyfunc.load_model("models:/<name>@<alias>")
    factors = model.predict(frame)                               # (M, L) DataFrame

Input ``frame`` (a pandas DataFrame, one row per query spot):

``x``, ``y`` (float)
    Spot coordinates in the ORIGINAL units of the data set (the units of the ``.h5ad``
    ``obsm`` / the generated data, before preprocessing). The model applies the
    preprocess run's transform ``scaled = (raw - center) * scale`` itself. With
    ``params={"coordinates": "scaled"}`` they are taken as already scaled (the units
    of the preprocess run's ``data/X.npy``).
``group`` (str)
    The spot's group (cell type) name as in the data set. Required by a model whose GP
    (over all factors, or a hybrid's spatial ones) was fitted with groups (multi-group
    kernel); otherwise not part of the signature and ignored.

Output: a DataFrame with the input's index and columns ``factor_0 .. factor_{L-1}``:
the factors ``exp(E[F])`` in the model's own factor order (NOT the descending Moran's I
order of the analyze stage's arrays; the analyze run's ``moran_i.csv`` maps its ranks to
these indices through its ``original_factor`` column).

* spatial (SVGP) model: the GP predictive at the positions (and groups);
* non-spatial model: the mean log-factor of the ``neighbours`` nearest training spots
  (the held-out prediction of the analyze stage). ``neighbours=1`` at a training
  spot's own position returns that spot's fitted factors.

Params (``model.predict(frame, params={...})``, declared in the signature):

``output``: ``"factors"`` (default) or ``"expected_counts"``: the rates
    ``factors @ W[genes].T``, one column per gene, named by gene;
``genes``: gene names for ``expected_counts`` (default ``[]`` = all genes);
``coordinates``: ``"raw"`` (default) or ``"scaled"``;
``neighbours``: k of the non-spatial nearest-neighbour prediction (default: the train
    config's ``analysis.moran_k``, as analyze uses); ignored by spatial models;
``exp_mean``: factors ``E[exp F]`` instead of ``exp(E[F])`` (default false).

What a prediction does (positions from raw ``x``, ``y``, group codes, ``PNMF.predict_at``,
expected counts, the params' defaults) is :class:`sf_mlflow.analysis.predictor.FactorPredictor`,
which needs no MLflow; this module only wraps it as a pyfunc model, declares its signature
and params, and logs and registers it.

Aliases, not stages: :func:`register_train_run` creates a new model version and points
an alias at it. ``latest`` is MLflow's built-in alias for the newest version; any other
alias (e.g. ``best``, ``champion``) is set explicitly and moves on each registration.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version as _pkg_version
from pathlib import Path
from typing import Any, Mapping, Optional

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ParamSchema, ParamSpec

import sf_mlflow
from sf_mlflow.analysis.predictor import (
    DEFAULT_PARAMS,
    INFO_FORMAT,
    FactorPredictor,
    describe_model,
    prediction_info,
)
from sf_mlflow.errors import ModelError, RunLookupError
from sf_mlflow.tracking.lineage import download_artifacts, get_stage_run
from sf_mlflow.tracking.runs import TAG_MODEL, TAG_UPSTREAM, configure_tracking

__all__ = [
    "DEFAULT_PARAMS", "FactorPredictor", "SpatialFactorModel", "prediction_info",
    "log_pyfunc_model", "register_logged_model", "register_fitted_model", "register_train_run",
    "TAG_REGISTERED_MODEL", "TAG_REGISTERED_VERSION", "TAG_PYFUNC_MODEL_ID",
]

#: Tags written on the train run when its model is logged / registered.
TAG_PYFUNC_MODEL_ID = "sf.pyfunc_model_id"
TAG_REGISTERED_MODEL = "sf.registered_model"
TAG_REGISTERED_VERSION = "sf.registered_model_version"
TAG_REGISTERED_ALIAS = "sf.registered_model_alias"
#: Tag of the logged model: what it is and how to call it (the registered versions' description).
TAG_DESCRIPTION = "sf.description"

#: Name of the logged model inside its run, and the files it carries.
LOGGED_MODEL_NAME = "spatial_factors"
INFO_FILE = "prediction.json"
TRAIN_COORDINATES_FILE = "train_coordinates.npy"
MODEL_SCRIPT = "spatial_factor_model.py"
_MODEL_SCRIPT_TEXT = '''\
"""MLflow model-from-code entry: the sf_mlflow pyfunc wrapper (sf_mlflow ships in code/)."""
import mlflow.models

from sf_mlflow.tracking.registry import SpatialFactorModel

mlflow.models.set_model(SpatialFactorModel())
'''
#: Training spots in the logged input example.
INPUT_EXAMPLE_ROWS = 5


# ---- the pyfunc wrapper (the prediction itself: sf_mlflow.analysis.predictor) ------------------

class SpatialFactorModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: loads ``model.pth`` and ``prediction.json``, predicts from positions.

    See the module docstring for the input, output and params.
    """

    def load_context(self, context) -> None:
        from sf_mlflow.models.pnmf import PNMF

        info = json.loads(Path(context.artifacts["info"]).read_text())
        if info.get("format_version") != INFO_FORMAT:
            raise ModelError(f"{INFO_FILE}: format_version {info.get('format_version')!r}, "
                             f"expected {INFO_FORMAT}")
        model = PNMF.load(context.artifacts["model"], device="cpu")
        coords = context.artifacts.get("train_coordinates")
        self.predictor = FactorPredictor(model, info, None if coords is None else np.load(coords))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # (A DataFrame type hint: MLflow validates the input against the logged signature
        # rather than inferring one from hints.)
        return self.predictor.predict(model_input, params)


# ---- logging and registering --------------------------------------------------------------

def _requirement(pkg: str) -> str:
    try:
        v = _pkg_version(pkg)
    except PackageNotFoundError:
        return pkg
    return f"{pkg}=={v.split('+')[0]}"  # drop local builds such as torch's +cpu


def pip_requirements() -> list[str]:
    """The model's runtime requirements, pinned to this environment (MLflow does not infer them)."""
    return [_requirement(p) for p in ("mlflow", "torch", "numpy", "scipy", "pandas", "cloudpickle")]


def params_schema(neighbours: int) -> ParamSchema:
    """The predict params with their types and defaults (see the module docstring)."""
    return ParamSchema([
        ParamSpec("output", "string", DEFAULT_PARAMS["output"]),
        ParamSpec("genes", "string", [], (-1,)),  # [] = all genes
        ParamSpec("coordinates", "string", DEFAULT_PARAMS["coordinates"]),
        ParamSpec("neighbours", "long", int(neighbours)),
        ParamSpec("exp_mean", "boolean", bool(DEFAULT_PARAMS["exp_mean"])),
    ])


def log_pyfunc_model(run_id: str, model_path: str | Path, info: Mapping[str, Any],
                     train_coordinates: Optional[np.ndarray] = None) -> str:
    """Log a fitted PNMF file as a pyfunc model of run ``run_id``; return the model ID.

    The model (an MLflow 3 LoggedModel in the run's experiment) carries ``model.pth``,
    ``prediction.json`` (``info``), for the non-spatial model the (N, 2) scaled training
    coordinates, and a copy of the ``sf_mlflow`` package (``code_paths``), so loading it
    needs neither the run's artifacts nor this checkout. The signature (from an input
    example of training spots) declares the params. Tags the run ``sf.pyfunc_model_id``.
    """
    from sf_mlflow.models.pnmf import PNMF

    configure_tracking()
    client = MlflowClient()
    run = client.get_run(run_id)
    model = PNMF.load(model_path)
    predictor = FactorPredictor(model, info, train_coordinates)
    example = predictor.example_frame(INPUT_EXAMPLE_ROWS)  # a few training spots, raw units
    params = {**DEFAULT_PARAMS, "neighbours": int(info["neighbours"])}
    signature = infer_signature(example, predictor.predict(example, params))
    signature.params = params_schema(int(info["neighbours"]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(dict(info), indent=1))
        artifacts = {"model": str(model_path), "info": str(tmp / INFO_FILE)}
        if not info["spatial"]:
            np.save(tmp / TRAIN_COORDINATES_FILE, np.asarray(predictor.train_coordinates, np.float64))
            artifacts["train_coordinates"] = str(tmp / TRAIN_COORDINATES_FILE)
        code = tmp / "code" / "sf_mlflow"
        shutil.copytree(Path(sf_mlflow.__file__).resolve().parent, code,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # "Models from code": the model is this small script, run at load time (after
        # the shipped package is put on sys.path), rather than a pickled object.
        (tmp / MODEL_SCRIPT).write_text(_MODEL_SCRIPT_TEXT)
        logged = client.create_logged_model(
            experiment_id=run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
            tags={"sf.model": str(info["model_kind"]), "sf.train_run_id": run_id,
                  TAG_DESCRIPTION: describe_model(info)},
            params={"n_components": str(info["n_components"]), "spatial": str(info["spatial"]),
                    "uses_groups": str(info["uses_groups"])})
        Model.log(artifact_path=None, name=LOGGED_MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                  model_id=logged.model_id, python_model=str(tmp / MODEL_SCRIPT), artifacts=artifacts,
                  code_paths=[str(code)], signature=signature, input_example=example,
                  pip_requirements=pip_requirements())
    # log_batch, not set_tag: two tune workers may log the same best run at once, and only
    # log_batch retries the insert that loses that race
    client.log_batch(run_id, tags=[RunTag(TAG_PYFUNC_MODEL_ID, logged.model_id)])
    return logged.model_id


def _set_alias(client: MlflowClient, name: str, alias: str, version) -> None:
    """Point ``alias`` at ``version``, once more if another process created the alias between
    MLflow's look-up and its insert (two tune workers registering their best at once)."""
    for attempt in range(3):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as e:
            # SQLite: "UNIQUE constraint failed"; PostgreSQL: "violates unique constraint"
            if attempt == 2 or "unique constraint" not in str(e.message).lower():
                raise


def register_logged_model(model_id: str, name: str, alias: str = "latest", *,
                          run_id: str | None = None) -> str:
    """Register a logged model as a new version of ``name`` and point ``alias`` at it.

    ``latest`` is MLflow's reserved alias that always resolves to the newest version, so
    it is not set; any other alias is (re)assigned to the new version. The version's
    description says what the model is and how to call it (:func:`describe_model`). Tags
    ``run_id`` (when given) with the model name, version and alias. Returns the version.
    """
    if not name or not str(name).strip():
        raise ModelError("the registered model name is empty; pass a name, e.g. register_as=sf_slideseq")
    configure_tracking()
    client = MlflowClient()
    try:
        mv = mlflow.register_model(f"models:/{model_id}", name,
                                   tags={"sf.train_run_id": run_id} if run_id else None)
        description = client.get_logged_model(model_id).tags.get(TAG_DESCRIPTION)
        if description:
            client.update_model_version(name, mv.version, description=description)
        if alias and alias.lower() != "latest":
            _set_alias(client, name, alias, mv.version)
    except MlflowException as e:
        raise ModelError(f"registering model {name!r} (alias {alias!r}) failed: {e.message}") from None
    if run_id:
        # one log_batch: it retries when another process tags the same run at the same moment
        # (two tune workers registering one best trial), where set_tag fails
        client.log_batch(run_id, tags=[RunTag(TAG_REGISTERED_MODEL, name),
                                       RunTag(TAG_REGISTERED_VERSION, str(mv.version)),
                                       RunTag(TAG_REGISTERED_ALIAS, alias or "latest")])
    return str(mv.version)


def register_fitted_model(run_id: str, model_path: str | Path, metadata: Mapping[str, Any], *,
                          name: str, alias: str = "latest", model_kind: str, neighbours: int,
                          preprocess_run_id: str | None = None,
                          train_coordinates: Optional[np.ndarray] = None) -> str:
    """Log ``model_path`` as run ``run_id``'s pyfunc model and register it; return the version.

    For the train stage, inside its (still running) run. ``metadata`` is the preprocess
    run's ``metadata.json``; ``train_coordinates`` (N, 2) the scaled training coordinates.
    """
    from sf_mlflow.models.pnmf import PNMF

    info = prediction_info(PNMF.load(model_path), metadata, model_kind=model_kind,
                           neighbours=neighbours, train_run_id=run_id,
                           preprocess_run_id=preprocess_run_id)
    model_id = log_pyfunc_model(run_id, model_path, info, train_coordinates)
    return register_logged_model(model_id, name, alias, run_id=run_id)


def _logged_model_of(client: MlflowClient, run) -> Optional[str]:
    """The READY pyfunc model already logged for a train run, or None."""
    model_id = run.data.tags.get(TAG_PYFUNC_MODEL_ID)
    if not model_id:
        return None
    try:
        logged = client.get_logged_model(model_id)
    except MlflowException:
        return None
    return model_id if str(logged.status).upper().endswith("READY") else None


def _train_neighbours(run) -> int:
    """The train config's ``analysis.moran_k``: the k analyze uses for held-out spots."""
    value = run.data.params.get("analysis.moran_k")
    try:
        return int(float(value)) if value is not None else DEFAULT_PARAMS["neighbours"]
    except ValueError:
        return DEFAULT_PARAMS["neighbours"]


def register_train_run(train_run_id: str, name: str, alias: str = "latest") -> str:
    """Register a FINISHED train run's model under ``name`` and alias ``alias``; return the version.

    Logs the pyfunc model first when the run has none yet (from the run's ``model.pth``
    and its preprocess run's ``data/metadata.json`` and ``data/X.npy``), then registers a
    new version and points ``alias`` at it (``latest`` always means the newest version).
    """
    from sf_mlflow.models.pnmf import PNMF

    run = get_stage_run(train_run_id, "train")
    client = MlflowClient()
    model_id = _logged_model_of(client, run)
    if model_id is None:
        pre_id = run.data.tags.get(TAG_UPSTREAM)
        if not pre_id:
            raise RunLookupError(f"train run {train_run_id!r} has no {TAG_UPSTREAM} tag naming "
                                 "its preprocess run")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            path = download_artifacts(train_run_id, "model.pth", tmp / "train")
            path = path if path.is_file() else path / "model.pth"
            meta = json.loads(download_artifacts(pre_id, "data/metadata.json",
                                                 tmp / "pre").read_text())
            model = PNMF.load(path)
            info = prediction_info(model, meta, model_kind=run.data.tags.get(TAG_MODEL, "pnmf"),
                                   neighbours=_train_neighbours(run),
                                   train_run_id=train_run_id, preprocess_run_id=pre_id)
            coords = None
            if not info["spatial"]:
                X = np.load(download_artifacts(pre_id, "data/X.npy", tmp / "pre"))
                held = np.zeros(X.shape[0], dtype=bool)
                held[np.asarray(meta["split"]["heldout_indices"], dtype=np.int64)] = True
                coords = X[~held]
            model_id = log_pyfunc_model(train_run_id, path, info, coords)
    return register_logged_model(model_id, name, alias, run_id=train_run_id)
