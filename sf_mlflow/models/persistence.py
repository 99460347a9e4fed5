"""Saving, loading and checkpointing the estimator.

Files hold tensors, numbers, strings, lists and dicts only, so they are read with
``torch.load(..., weights_only=True)``. The spatial prior's settings are stored as
``{"svgp": {...}}``; files of format 1 (flat spatial keyword arguments) still load. A
hybrid prior (``spatial_components``) is stored as its two parts' states
(``spatial.*``, ``gaussian.*``) and rebuilt by :func:`sf_mlflow.models.hybrid.empty_prior`.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sf_mlflow.errors import ConfigError, DataError, ModelError, ModelFileError, SfMlflowError
from sf_mlflow.models.device import resolve_device
from sf_mlflow.models.hybrid import empty_prior
from sf_mlflow.models.settings import SVGP

__all__ = ["FORMAT_VERSION", "save_model", "load_model", "checkpoint_blob", "read_checkpoint",
           "checked_checkpoint", "portable_params", "params_from_portable"]

#: Version of the file layout written by :func:`save_model` and :func:`checkpoint_blob`.
FORMAT_VERSION = 2
#: Versions :func:`load_model` and :func:`read_checkpoint` read.
READABLE_VERSIONS = (1, 2)
CHECKPOINT_KIND = "pnmf-checkpoint"

#: Hyperparameters that may change between a checkpoint and the fit resuming from it.
#: (``distributed``: a data-parallel fit computes the single-process one, so either resumes the other.)
RESUMABLE_CHANGES = ("max_iter", "tol", "tol_window", "verbose", "log_every", "learning_rate",
                     "validation_every", "patience", "distributed")

#: Spatial keyword arguments of format-1 files, by their current SVGP field name.
_FORMAT1_SPATIAL = {"kernel": "kernel", "num_inducing": "num_inducing", "lengthscale": "lengthscale",
                    "sigma": "sigma", "group_diff_param": "group_diff_param", "use_groups": "groups",
                    "train_lengthscale": "train_lengthscale",
                    "per_factor_lengthscale": "per_factor_lengthscale", "cholesky_mode": "cholesky_mode",
                    "diagonal_only": "diagonal_only", "inducing_allocation": "inducing_allocation",
                    "jitter": "jitter"}


def portable_params(model) -> dict[str, Any]:
    """The estimator's hyperparameters as plain values (the prior's settings as a dict)."""
    params = model.get_params(deep=False)
    if isinstance(params["dtype"], torch.dtype):
        params["dtype"] = str(params["dtype"]).replace("torch.", "")
    params["prior"] = _portable_prior(params["prior"])
    return params


def _portable_prior(prior: Any) -> Any:
    if isinstance(prior, SVGP):
        return {"svgp": prior.to_dict()}
    if isinstance(prior, str) and prior.lower() == "svgp":
        return {"svgp": SVGP().to_dict()}
    return prior


def params_from_portable(params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``PNMF`` from :func:`portable_params` (or a format-1 file's)."""
    params = dict(params)
    spatial = {new: params.pop(old) for old, new in _FORMAT1_SPATIAL.items() if old in params}
    prior = params.get("prior")
    if isinstance(prior, dict) and "svgp" in prior:
        params["prior"] = SVGP(**prior["svgp"])
    elif prior == "svgp":
        params["prior"] = SVGP(**spatial)
    return params


def save_model(model, path) -> None:
    """Write hyperparameters, learned state and attributes of a fitted model."""
    state = {
        "prior": {k: v.detach().cpu() for k, v in model.prior_.state_dict().items()},
        "loadings": model._loadings_t.detach().cpu(),
        "coordinates": None if model._coordinates is None else model._coordinates.cpu(),
        "groups": None if model._groups is None else model._groups.cpu(),
        "train_coordinates": (None if model.train_coordinates_ is None
                              else torch.as_tensor(model.train_coordinates_, dtype=torch.float64)),
    }
    # The SVGP prior's inducing points (buffers Z, g_Z) are passed back to its
    # constructor at load time, so loading does not rerun k-means.
    for name, attr in (("inducing_points", "Z"), ("inducing_groups", "g_Z")):
        value = getattr(model.prior_, attr, None)
        state[name] = value.detach().cpu() if isinstance(value, Tensor) else None
    attributes = {
        "elbo_history_": torch.as_tensor(model.elbo_history_, dtype=torch.float64),
        "n_iter_": int(model.n_iter_), "converged_": bool(model.converged_),
        "stopped_early_": bool(model.stopped_early_), "fit_time_": float(model.fit_time_),
        "stop_reason_": str(model.stop_reason_),
        "early_stopped_at_": -1 if model.early_stopped_at_ is None else int(model.early_stopped_at_),
        "kept_iteration_": -1 if model.kept_iteration_ is None else int(model.kept_iteration_),
        "validation_history_": torch.as_tensor(model.validation_history_, dtype=torch.float64),
        "n_features_in_": int(model.n_features_in_), "n_spots_": int(model.n_spots_),
    }
    torch.save({"format_version": FORMAT_VERSION, "hyperparameters": portable_params(model),
                "state": state, "attributes": attributes}, Path(path))


def _load_problem(err: BaseException) -> str:
    """What was wrong with a file ``torch.load`` refused, in words a user can act on.

    torch's own message for a rejected pickle advises ``weights_only=False``, i.e. running
    whatever code the file names; that advice is never passed on.
    """
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return f"it holds Python objects{what} besides tensors and plain values"
    if isinstance(err, EOFError) or "failed finding central directory" in text:
        return "the file is empty or truncated"
    if isinstance(err, FileNotFoundError):
        return "the file does not exist"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _read_blob(path, what: str) -> Any:
    """``torch.load`` of ``path`` (tensors and plain values only), else ``ModelFileError``."""
    path = Path(path)
    problem = _container_problem(path)
    if problem is None:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError,
                zipfile.BadZipFile, AttributeError, ImportError, IndexError, KeyError) as err:
            problem = _load_problem(err)
    problem = f"not a valid sf_mlflow {what}: {problem}"
    how = "PNMF.save" if what == "model" else "PNMF.save_checkpoint"
    raise ModelFileError(f"{path} is {problem}; write it again with {how} (or re-run the train "
                         "stage that logged it)", path=path, problem=problem)


def _container_problem(path: Path) -> str | None:
    """Why ``path`` is not a ``torch.save`` archive (a zip file) at all, or None."""
    if not path.is_file():
        return "the file does not exist"
    if path.stat().st_size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return "the file is truncated or not a torch.save archive"
    return None


def load_model(cls, path, device: str = "cpu"):
    """A fitted ``cls`` (PNMF) from a file of :func:`save_model`, on ``device``.

    Raises :class:`~sf_mlflow.errors.ModelFileError` (an ``ArtifactError`` and a
    ``ModelError``) when the file is missing, truncated, holds anything but tensors and
    plain values, or is not a model of a readable format.
    """
    blob = _read_blob(path, "model")
    version = blob.get("format_version") if isinstance(blob, dict) else None
    if version not in READABLE_VERSIONS:
        problem = (f"not a valid sf_mlflow model: format_version = {version!r}, expected one of "
                   f"{READABLE_VERSIONS} (not a PNMF file, or written by an incompatible version)")
        raise ModelFileError(f"{path} is {problem}", path=path, problem=problem)
    try:
        return _restore(cls, blob, device)
    except SfMlflowError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, IndexError) as err:
        problem = (f"not a valid sf_mlflow model: its contents do not match format {version} "
                   f"({type(err).__name__}: {err})")
        raise ModelFileError(f"{path} is {problem}", path=path, problem=problem) from None


def _restore(cls, blob: dict, device: str):
    """The model a checked file's ``blob`` describes."""
    model = cls(**params_from_portable(blob["hyperparameters"]))
    model.device = device
    p = model._validated()
    dev, dtype = resolve_device(device), p["dtype"]
    st, at = blob["state"], blob["attributes"]
    n = int(at["n_spots_"])
    model._coordinates = None if st["coordinates"] is None else st["coordinates"].to(dev, dtype)
    model._groups = None if st["groups"] is None else st["groups"].to(dev)
    # float64 coordinates where the file has them (format 1: the model's dtype)
    X = st.get("train_coordinates", st["coordinates"])
    model.train_coordinates_ = None if X is None else X.double().numpy()
    model.train_groups_ = None if st["groups"] is None else st["groups"].numpy()
    ip, ig = st.get("inducing_points"), st.get("inducing_groups")
    prior = empty_prior(p, n, model._coordinates, model._groups,
                        inducing_points=None if ip is None else ip.to(dev, dtype),
                        inducing_groups=None if ig is None else ig.to(dev), dtype=dtype)
    prior = prior.to(device=dev, dtype=dtype)
    prior.load_state_dict(st["prior"])
    model.prior_ = prior
    model._loadings_t = st["loadings"].to(dev, dtype)
    model.device_ = dev
    model.elbo_history_ = at["elbo_history_"].numpy()
    for key in ("n_iter_", "converged_", "stopped_early_", "fit_time_", "n_features_in_", "n_spots_"):
        setattr(model, key, at[key])
    model.stop_reason_ = at.get("stop_reason_", "tol" if model.converged_ else "max_iter")
    early, kept = int(at.get("early_stopped_at_", -1)), int(at.get("kept_iteration_", -1))
    model.early_stopped_at_ = None if early < 0 else early
    model.kept_iteration_ = None if kept < 0 else kept
    vh = at.get("validation_history_")
    model.validation_history_ = np.empty((0, 2)) if vh is None else vh.numpy().reshape(-1, 2)
    model.num_inducing_ = getattr(prior, "num_inducing", None)
    return model


def checkpoint_blob(model, trainer_state: dict) -> dict:
    """A checkpoint: the trainer's state with the hyperparameters and data shape it belongs to."""
    return {"format_version": FORMAT_VERSION, "kind": CHECKPOINT_KIND,
            "hyperparameters": portable_params(model), "n_spots": int(model.n_spots_),
            "n_features": int(model.n_features_in_), "trainer": trainer_state}


def read_checkpoint(path) -> dict:
    """A checkpoint written with ``torch.save(checkpoint_blob(...))``."""
    blob = _read_blob(path, "checkpoint")
    if not isinstance(blob, dict) or blob.get("kind") != CHECKPOINT_KIND:
        raise ModelError(f"{path} is not a PNMF checkpoint (written by save_checkpoint)")
    return blob


def checked_checkpoint(model, resume: Any, n: int, d: int) -> dict:
    """``resume`` (a checkpoint or its path), checked against the model and data (n, d)."""
    blob = resume if isinstance(resume, dict) else read_checkpoint(resume)
    if blob.get("kind") != CHECKPOINT_KIND or blob.get("format_version") not in READABLE_VERSIONS:
        raise ModelError("resume is not a PNMF checkpoint of a readable format version "
                         f"{READABLE_VERSIONS}; pass the output of PNMF.checkpoint()")
    if (blob["n_spots"], blob["n_features"]) != (n, d):
        raise DataError(f"the checkpoint was taken on Y of shape ({blob['n_spots']}, "
                        f"{blob['n_features']}), but Y has shape ({n}, {d}); resume on "
                        "the same data")
    theirs = params_from_portable(blob["hyperparameters"])
    theirs["prior"] = _portable_prior(theirs.get("prior", "gaussian"))
    mine = portable_params(model)
    diff = _differences({k: v for k, v in theirs.items() if k not in RESUMABLE_CHANGES},
                        {k: mine.get(k) for k in theirs if k not in RESUMABLE_CHANGES})
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff)
        raise ConfigError(f"cannot resume: hyperparameters differ from the checkpoint's ({detail})")
    return blob


def _differences(theirs: Any, mine: Any, key: str = "") -> list[tuple[str, tuple[Any, Any]]]:
    """The dotted keys whose values differ, e.g. ``prior.svgp.lengthscale`` (not the
    prior's whole settings), sorted, with the two values."""
    if isinstance(theirs, dict) and isinstance(mine, dict):
        out = []
        for k in sorted(set(theirs) | set(mine), key=str):
            out += _differences(theirs.get(k), mine.get(k), f"{key}.{k}" if key else str(k))
        return out
    return [] if theirs == mine else [(key, (theirs, mine))]
