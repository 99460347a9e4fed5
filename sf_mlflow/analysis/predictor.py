"""Factors (or expected counts) of spots from raw positions: the registered model's logic.

MLflow-free: :mod:`sf_mlflow.tracking.registry` wraps :class:`FactorPredictor` in an
``mlflow.pyfunc.PythonModel`` and logs it; everything a prediction does lives here, so it
can be used and tested without MLflow. The input, output and params are documented in
:mod:`sf_mlflow.tracking.registry`.

A prediction is three steps, each a method of :class:`FactorPredictor`:

1. :meth:`~FactorPredictor.positions`: raw ``x``, ``y`` to the model's (scaled) units by
   the preprocess run's transform ``scaled = (raw - center) * scale``;
2. :meth:`~FactorPredictor.group_codes`: group names to the model's group codes;
3. :meth:`~FactorPredictor.factors`: :meth:`PNMF.predict_at
   <sf_mlflow.models.pnmf.PNMF.predict_at>`, the one rule for factors at positions;
   for ``output="expected_counts"`` then times the loadings of the chosen genes.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from sf_mlflow.errors import DataError, ModelError

__all__ = ["DEFAULT_PARAMS", "OUTPUTS", "COORDINATE_MODES", "INFO_FORMAT",
           "ExtrapolationWarning", "describe_model", "FactorPredictor", "prediction_info", "with_train_coordinates"]


#: Margin of the training extent, as a fraction of its larger side: positions this close
#: to the box of the training spots (e.g. held-out spots on the edge) do not warn.
EXTENT_MARGIN = 0.05


class ExtrapolationWarning(UserWarning):
    """Predict positions lie outside the extent of the training spots."""

#: Version of the ``prediction.json`` written from :func:`prediction_info`.
INFO_FORMAT = 1

#: Defaults of the predict params (``neighbours`` is replaced by the model's own k).
DEFAULT_PARAMS: dict[str, Any] = {"output": "factors", "genes": [], "coordinates": "raw",
                                  "neighbours": 6, "exp_mean": False}
OUTPUTS = ("factors", "expected_counts")
COORDINATE_MODES = ("raw", "scaled")


def prediction_info(model, metadata: Mapping[str, Any], *, model_kind: str, neighbours: int,
                    train_run_id: str | None = None,
                    preprocess_run_id: str | None = None) -> dict[str, Any]:
    """What predictions need besides ``model.pth``, as a JSON-ready dict.

    model : fitted PNMF (its L and whether it uses groups).
    metadata : the preprocess run's ``data/metadata.json`` (gene and group names, the
        coordinate transform ``scaled = (raw - center) * scale``).
    """
    transform = metadata.get("coordinate_transform") or {}
    report = metadata.get("preprocessing") or {}
    center = transform.get("center", report.get("coordinate_center"))
    scale = transform.get("scale", report.get("coordinate_scale"))
    if center is None or scale is None:
        raise DataError("the preprocess metadata has no coordinate transform (center, scale); "
                        "run the preprocess stage again with this version of the package")
    spatial = model.is_spatial
    # a hybrid's GP factors need the groups too (uses_groups_ is set only by a GP with groups)
    uses_groups = bool(model.uses_groups_)
    group_names = metadata.get("group_names")
    if uses_groups and not group_names:
        raise DataError("the model uses groups but the preprocess metadata names none")
    return {
        "format_version": INFO_FORMAT,
        "model_kind": str(model_kind),
        "spatial": bool(spatial),
        "spatial_factors": [bool(s) for s in model.spatial_factors_],
        "uses_groups": uses_groups,
        "n_components": int(model.n_components),
        "factor_columns": [f"factor_{i}" for i in range(int(model.n_components))],
        "factor_order": "model (not Moran's I order)",
        "gene_names": [str(g) for g in metadata["gene_names"]],
        "group_names": [str(g) for g in group_names] if group_names else None,
        "coordinate_transform": {"center": [float(c) for c in center], "scale": float(scale),
                                 "formula": "scaled = (raw - center) * scale"},
        "neighbours": int(neighbours),
        "dataset": metadata.get("dataset"),
        "train_run_id": train_run_id,
        "preprocess_run_id": preprocess_run_id,
    }


def describe_model(info: Mapping[str, Any]) -> str:
    """What a registered model is and how to call it (Markdown; the model version's description)."""
    L, kind = int(info["n_components"]), str(info["model_kind"])
    genes, groups = info["gene_names"], info.get("group_names") or []
    marked = info.get("spatial_factors") or []
    K = sum(map(bool, marked))
    gp = ("a sparse variational GP prior over spot coordinates"
          + (" with a multi-group kernel" if info["uses_groups"] else ""))
    prior = gp if info["spatial"] else "non-spatial: independent Gaussian prior"
    if not info["spatial"] and K:    # a hybrid (NSFH)
        spatial_cols = ", ".join(f"`factor_{i}`" for i, s in enumerate(marked) if s)
        prior = (f"hybrid: {K} spatial factors ({spatial_cols}) with {gp}, the other {L - K} "
                 "non-spatial with an independent Gaussian prior")
    cols = "`x`, `y`" + (", `group`" if info["uses_groups"] else "")
    shown = ", ".join(map(str, groups[:12])) + (", ..." if len(groups) > 12 else "")
    if groups:
        shown = f" with {len(groups)} groups ({shown})" + (
            "" if info["uses_groups"] else ", which this model does not use")
    far = ("the GP's prior (every factor 1.0)" if info["spatial"]
           else "the factors of the nearest training spots" if not K else
           "the GP's prior for the spatial factors (1.0), the nearest training spots' for the others")
    lines = [
        f"**{kind.upper()}** spatial factor model ({prior}): L = {L} factors, loadings for "
        f"{len(genes)} genes, fitted on data set `{info.get('dataset')}`{shown}.",
        f"Train run `{info.get('train_run_id')}`, preprocess run `{info.get('preprocess_run_id')}`.",
        "",
        f"**Input**: a DataFrame with columns {cols}: spot coordinates in the data set's "
        "original units" + (" and the group name (one of the groups above)"
                            if info["uses_groups"] else "") + ".",
        f"**Output**: columns `factor_0` .. `factor_{L - 1}` (the model's factor order), or "
        "with `output=expected_counts` one column per gene.",
        "**Params**: `output` (`factors` | `expected_counts`), `genes` (list, default all), "
        "`coordinates` (`raw` | `scaled`), "
        + (f"`neighbours` (k nearest training spots, default {int(info['neighbours'])}), "
           if not info["spatial"] else "")
        + "`exp_mean` (E[exp F] instead of exp(E[F])).",
        "",
        "```python",
        "import mlflow",
        'model = mlflow.pyfunc.load_model("models:/<name>@<alias>")',
        "model.predict(model.input_example)   # 5 training spots, in the columns above",
        "```",
        f"Positions outside the training extent warn: far from the data the prediction is {far}.",
    ]
    return "\n".join(lines)


def _choice(name: str, value: Any, allowed) -> str:
    if value not in allowed:
        raise DataError(f"param {name} = {value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


def with_train_coordinates(model, stored: Optional[np.ndarray]):
    """``model``, or a shallow copy of it whose ``train_coordinates_`` are ``stored``.

    ``stored`` : (N, 2) scaled training coordinates kept beside the model (the registered
    model's ``train_coordinates.npy``, float64), or None. The model's own
    ``train_coordinates_`` are used when present; ``stored`` must then agree with them
    (up to the rounding of a model file that kept them in the model's dtype, float32 by
    default). ``stored`` replaces them (on a copy; ``model`` is not changed) only

    * when the model has none (a PNMF fitted without ``coordinates``): the documented
      fallback that lets such a model predict by nearest training spots; or
    * when the model's are a rounded copy of ``stored`` (model files written before
      ``train_coordinates_`` were saved in float64), so that predictions use the same
      float64 positions as they did when such a model was registered.
    """
    if stored is None:
        return model
    stored = np.asarray(stored, dtype=np.float64)
    own = model.train_coordinates_
    if own is not None:
        if own.shape != stored.shape or not np.allclose(
                own, stored, rtol=1e-6, atol=1e-6 * float(np.abs(stored).max(initial=0.0))):
            raise DataError(f"train_coordinates {stored.shape} differ from the coordinates the "
                            f"model was fitted on {own.shape}; pass the training spots' scaled "
                            "coordinates in fitting order, or None to use the model's")
        if np.array_equal(own, stored):
            return model
    model = copy.copy(model)
    model.train_coordinates_ = stored
    return model


class FactorPredictor:
    """Factors (or expected counts) of spots from their positions and groups.

    Parameters
    ----------
    model : PNMF, fitted.
    info : dict from :func:`prediction_info`.
    train_coordinates : (N, 2) scaled coordinates of the training spots (float64), or None
        for the model's ``train_coordinates_``; see :func:`with_train_coordinates`.
    """

    def __init__(self, model, info: Mapping[str, Any], train_coordinates: Optional[np.ndarray] = None):
        self.model = with_train_coordinates(model, train_coordinates)
        self.info = dict(info)
        t = self.info["coordinate_transform"]
        self.center = np.asarray(t["center"], dtype=np.float64)      # (2,)
        self.scale = float(t["scale"])
        self.gene_names = [str(g) for g in self.info["gene_names"]]     # (D,), the loadings' rows
        # a name -> its rows; more than one only in models registered before repeated gene
        # names were refused, which then answer by position and refuse the ambiguous name
        self.gene_rows: dict[str, list[int]] = {}
        for i, g in enumerate(self.gene_names):
            self.gene_rows.setdefault(g, []).append(i)
        names = self.info.get("group_names") or []
        self.group_index = {g: i for i, g in enumerate(names)}
        self.loadings = np.asarray(model.loadings_, dtype=np.float64)  # (D, L)

    @property
    def train_coordinates(self) -> Optional[np.ndarray]:
        """(N, 2) scaled training coordinates, float64 (the model's ``train_coordinates_``)."""
        return self.model.train_coordinates_

    @property
    def columns(self) -> list[str]:
        return list(self.info["factor_columns"])

    def positions(self, frame: pd.DataFrame, mode: str = "raw") -> np.ndarray:
        """Scaled (M, 2) coordinates from the ``x``, ``y`` columns."""
        missing = [c for c in ("x", "y") if c not in frame.columns]
        if missing:
            raise DataError(f"input lacks column(s) {missing}; expected columns 'x', 'y'"
                            + (" and 'group'" if self.info["uses_groups"] else "")
                            + f", got {list(frame.columns)}")
        try:
            X = frame[["x", "y"]].to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataError(f"columns 'x' and 'y' must be numbers ({e})") from None
        if not np.isfinite(X).all():
            bad = int((~np.isfinite(X).all(axis=1)).sum())
            raise DataError(f"columns 'x'/'y' contain NaN or infinite values in {bad} row(s)")
        mode = _choice("coordinates", mode, COORDINATE_MODES)
        return X if mode == "scaled" else (X - self.center) * self.scale

    def raw_coordinates(self, X_scaled: np.ndarray) -> np.ndarray:
        """Raw (original-unit) coordinates of scaled ones, the inverse of :meth:`positions`."""
        return np.asarray(X_scaled, dtype=np.float64) / self.scale + self.center

    def group_codes(self, frame: pd.DataFrame) -> Optional[np.ndarray]:
        """(M,) group codes from the ``group`` column, or None for a model without groups."""
        if not self.info["uses_groups"]:
            return None
        known = list(self.group_index)
        if "group" not in frame.columns:
            raise DataError(f"input lacks column 'group', which this model needs (one of "
                            f"{known}); got columns {list(frame.columns)}")
        values = frame["group"].astype(object).to_numpy()
        unknown = sorted({str(v) for v in values if not isinstance(v, str)
                          or v not in self.group_index})
        if unknown:
            raise DataError(f"column 'group' has unknown group(s) {unknown[:10]}"
                            + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
                            + f"; this model knows {known}")
        return np.array([self.group_index[v] for v in values], dtype=np.int64)

    def example_frame(self, n: int) -> pd.DataFrame:
        """The first ``n`` training spots, in raw units (and group names), as a predict input."""
        if self.train_coordinates is None:
            raise ModelError("the model has no training coordinates (it was fitted without "
                             "coordinates): fit(Y, coordinates=X), or pass train_coordinates")
        n = min(n, self.train_coordinates.shape[0])
        xy = self.raw_coordinates(self.train_coordinates[:n])
        frame = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]})
        if self.info["uses_groups"]:
            codes = self.model.train_groups_[:n]
            frame["group"] = [self.info["group_names"][int(c)] for c in codes]
        return frame

    def training_extent(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """``(low, high)``: the (2,) corners of the box of the training spots, widened by
        :data:`EXTENT_MARGIN` of its larger side on every side, in scaled units; or None."""
        T = self.train_coordinates
        if T is None or len(T) == 0:
            return None
        low, high = T.min(axis=0), T.max(axis=0)
        pad = EXTENT_MARGIN * float((high - low).max())
        return low - pad, high + pad

    def check_extent(self, X: np.ndarray) -> int:
        """Warn (:class:`ExtrapolationWarning`) when scaled positions X (M, 2) lie outside the
        training extent (:meth:`training_extent`); return how many do.

        Far outside it a spatial model's GP returns its prior (every factor exactly 1.0),
        and the non-spatial model repeats the factors of the nearest edge spots.
        """
        extent = self.training_extent()
        if extent is None or X.shape[0] == 0:
            return 0
        low, high = extent
        outside = ((X < low) | (X > high)).any(axis=1)
        n = int(outside.sum())
        if n:
            lo, hi = self.raw_coordinates(low), self.raw_coordinates(high)
            what = ("the GP returns its prior there (every factor 1.0 far from the data)"
                    if self.info["spatial"] else
                    "the non-spatial model repeats the factors of the nearest training spots")
            warnings.warn(
                f"{n} of {X.shape[0]} position(s) lie outside the training extent (the training "
                f"spots' box plus {EXTENT_MARGIN:.0%}) "
                f"x in [{lo[0]:.6g}, {hi[0]:.6g}], y in [{lo[1]:.6g}, {hi[1]:.6g}] (raw units of "
                f"the data set; scaled [{low[0]:.4g}, {high[0]:.4g}] x [{low[1]:.4g}, "
                f"{high[1]:.4g}]): {what}. Check that x, y are in the data set's original units "
                "(or pass params={'coordinates': 'scaled'} for scaled ones)",
                ExtrapolationWarning, stacklevel=3)
        return n

    def factors(self, X: np.ndarray, groups: Optional[np.ndarray], *, neighbours: int,
                exp_mean: bool = False) -> np.ndarray:
        """(M, L) factors at scaled coordinates X (M, 2) and group codes (M,) or None.

        :meth:`PNMF.predict_at <sf_mlflow.models.pnmf.PNMF.predict_at>`: the GP predictive
        of a spatial model, the nearest-training-spot rule of a non-spatial one (the
        held-out prediction of the analyze stage).
        """
        if X.shape[0] == 0:
            return np.empty((0, int(self.info["n_components"])))
        k = int(neighbours)
        if not self.info["spatial"] and self.train_coordinates is not None:
            n = self.train_coordinates.shape[0]
            if not 1 <= k <= n:
                raise DataError(f"param neighbours = {k} needs 1 <= neighbours <= {n} training spots")
        return self.model.predict_at(X, groups=groups, neighbours=k, exp_mean=bool(exp_mean))

    def predict(self, frame: pd.DataFrame, params: Optional[Mapping[str, Any]] = None) -> pd.DataFrame:
        """Factors (M, L) or expected counts (M, G) of the spots in ``frame``."""
        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame(frame)
        p = {**DEFAULT_PARAMS, "neighbours": self.info["neighbours"],
             **{k: v for k, v in (params or {}).items() if v is not None}}
        output = _choice("output", p["output"], OUTPUTS)
        X = self.positions(frame, p["coordinates"])
        groups = self.group_codes(frame)
        self.check_extent(X)
        F = self.factors(X, groups, neighbours=p["neighbours"], exp_mean=bool(p["exp_mean"]))
        if output == "factors":
            return pd.DataFrame(F, index=frame.index, columns=self.columns)
        rows, genes = self.gene_columns(p["genes"])
        return pd.DataFrame(F @ self.loadings[rows].T, index=frame.index, columns=genes)

    def gene_columns(self, genes: Any) -> tuple[list[int], list[str]]:
        """The loadings' rows and the column names of ``genes`` (a name, a list of names, or
        empty/None for every gene, by position)."""
        if genes is None:
            genes = []
        genes = [genes] if isinstance(genes, str) else [str(g) for g in np.ravel(genes)]
        if not genes:
            return list(range(len(self.gene_names))), list(self.gene_names)
        unknown = [g for g in genes if g not in self.gene_rows]
        if unknown:
            raise DataError(f"param genes has unknown gene(s) {unknown[:10]}; this model has "
                            f"{len(self.gene_names)} genes, e.g. {self.gene_names[:5]}")
        ambiguous = [g for g in genes if len(self.gene_rows[g]) > 1]
        if ambiguous:
            raise DataError(f"param genes: {ambiguous[:10]} name(s) several genes of this model "
                            f"(rows {[self.gene_rows[g] for g in ambiguous[:3]]}); leave genes "
                            "empty for one column per gene by position, or retrain with "
                            "data.make_unique: true")
        return [self.gene_rows[g][0] for g in genes], genes
