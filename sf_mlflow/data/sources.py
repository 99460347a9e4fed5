"""Data sources: the Slide-seqV2 hippocampus data, any AnnData ``.h5ad`` file, generated data.

Every source returns a validated :class:`~sf_mlflow.data.counts.SpatialCounts` whose counts
are CSR float64 holding integer values, so downstream code never branches on the source.
"""

from __future__ import annotations

import logging
import numbers
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sf_mlflow.config import Config
from sf_mlflow.data.counts import SpatialCounts
from sf_mlflow.data.synthetic import synthetic_from_config
from sf_mlflow.errors import DataError

__all__ = [
    "DATASETS",
    "SLIDESEQ_DEFAULT_PATH",
    "load_dataset",
    "load_slideseq",
    "read_h5ad_counts",
    "counts_from_anndata",
]

log = logging.getLogger(__name__)

#: Names accepted by :func:`load_dataset`.
DATASETS = ("slideseq", "h5ad", "synthetic")

#: Where the Slide-seqV2 file is looked for (and downloaded to) when ``data.path`` is null;
#: relative to the working directory, like squidpy's own cache layout.
SLIDESEQ_DEFAULT_PATH = "data/slideseqv2.h5ad"

#: The obs column of squidpy's Slide-seqV2 cell-type labels (14 types).
SLIDESEQ_GROUP_KEY = "cluster"

_MISSING_POLICIES = ("drop", "unknown")
UNKNOWN_GROUP = "unknown"


def load_dataset(cfg: Config) -> SpatialCounts:
    """Load the data set a config names.

    Parameters
    ----------
    cfg : Config
        ``cfg.dataset`` picks the source ("slideseq", "h5ad" or "synthetic"); ``cfg.data``
        holds its settings and ``cfg.seed`` seeds generated data.

    Returns
    -------
    SpatialCounts
        Validated counts (N, D), coordinates (N, 2) and optional groups (N,).
    """
    d = cfg.data
    if cfg.dataset == "slideseq":
        group_key = SLIDESEQ_GROUP_KEY if d.group_key == "auto" else d.group_key
        return load_slideseq(d.path, coordinates_key=d.coordinates_key, group_key=group_key,
                             layer=d.layer, missing_groups=d.missing_groups)
    if cfg.dataset == "h5ad":
        if d.path is None:
            raise DataError("dataset 'h5ad' needs data.path: set it to the .h5ad file to read "
                            "(e.g. --set data.path=/path/to/file.h5ad)")
        group_key = None if d.group_key == "auto" else d.group_key
        return read_h5ad_counts(d.path, coordinates_key=d.coordinates_key, group_key=group_key,
                                layer=d.layer, missing_groups=d.missing_groups)
    if cfg.dataset == "synthetic":
        return synthetic_from_config(d.synthetic, cfg.seed).validate(source="synthetic data")
    raise DataError(f"dataset = {cfg.dataset!r} is unknown; valid datasets: {', '.join(DATASETS)}")


def load_slideseq(path: Optional[str | Path] = None, *, coordinates_key: str = "spatial",
                  group_key: Optional[str] = SLIDESEQ_GROUP_KEY, layer: Optional[str] = None,
                  missing_groups: str = "drop", download: bool = True) -> SpatialCounts:
    """Read squidpy's Slide-seqV2 mouse hippocampus data (41,786 beads x 4,000 genes).

    Parameters
    ----------
    path : str or Path, optional
        The cached ``.h5ad`` file; default :data:`SLIDESEQ_DEFAULT_PATH`.
    coordinates_key, group_key, layer, missing_groups
        As in :func:`read_h5ad_counts`; ``group_key`` defaults to ``"cluster"``.
    download : bool
        When the file is absent, try ``squidpy.datasets.slideseqv2(path=...)`` first.

    Returns
    -------
    SpatialCounts
        Counts (N, D), coordinates (N, 2), cell-type groups (N,) unless ``group_key`` is None.
    """
    p = Path(path if path is not None else SLIDESEQ_DEFAULT_PATH)
    if not p.is_file():
        reason = "it does not exist"
        if download:
            reason = _download_slideseq(p)
        if not p.is_file():
            raise DataError(
                f"Slide-seqV2 data file {str(p)!r} not found ({reason}). On a machine with "
                f"internet access, fetch it with: python -c \"import squidpy; "
                f"squidpy.datasets.slideseqv2(path='{p}')\" and copy it to {str(p)!r}, or set "
                "data.path to where the file is (e.g. --set data.path=/path/to/slideseqv2.h5ad)")
    return read_h5ad_counts(p, coordinates_key=coordinates_key, group_key=group_key,
                            layer=layer, missing_groups=missing_groups)


def _download_slideseq(p: Path) -> str:
    """Try squidpy's downloader; return why it failed (empty string on success)."""
    try:
        # squidpy takes seconds to import, so only pay for it when a download is needed
        import squidpy

        squidpy.datasets.slideseqv2(path=str(p))
    except Exception as e:  # offline machines fail in many ways (DNS, proxy, ExceptionGroup)
        return f"downloading it with squidpy failed: {type(e).__name__}: {e}"
    return "" if p.is_file() else "squidpy's download did not produce it"


def read_h5ad_counts(path: str | Path, coordinates_key: str = "spatial",
                     group_key: Optional[str] = None, layer: Optional[str] = None,
                     missing_groups: str = "drop") -> SpatialCounts:
    """Read raw counts, spot coordinates and optional group labels from an AnnData file.

    Parameters
    ----------
    path : str or Path
        The ``.h5ad`` file.
    coordinates_key : str
        Key of ``obsm`` holding the spot coordinates, array (N, 2).
    group_key : str, optional
        Column of ``obs`` with group (cell-type) labels; None = no groups.
    layer : str, optional
        Layer holding the raw counts (N, D); None = ``X``.
    missing_groups : {"drop", "unknown"}
        Spots with a missing label (NaN, None or empty string) are dropped, or put in a
        group named ``"unknown"``.

    Returns
    -------
    SpatialCounts
        ``counts`` CSR (N, D) float64, ``coordinates`` (N, 2) float64, ``groups`` (N,)
        int64 codes into the sorted ``group_names`` (G,), validated with ``source=path``.
    """
    p = Path(path)
    if not p.is_file():
        where = "the folder does not exist" if not p.parent.is_dir() else "no such file"
        raise DataError(f"h5ad file {str(path)!r} not found ({where}); set data.path to an "
                        "existing .h5ad file")
    import anndata

    try:
        adata = anndata.read_h5ad(p)
    except Exception as e:  # h5py/anndata raise assorted types for corrupt or non-h5ad files
        raise DataError(f"{p}: cannot be read as an AnnData .h5ad file "
                        f"({type(e).__name__}: {e})") from None
    return counts_from_anndata(adata, source=str(p), coordinates_key=coordinates_key,
                               group_key=group_key, layer=layer, missing_groups=missing_groups)


def counts_from_anndata(adata: Any, source: str = "AnnData", coordinates_key: str = "spatial",
                        group_key: Optional[str] = None, layer: Optional[str] = None,
                        missing_groups: str = "drop") -> SpatialCounts:
    """:func:`read_h5ad_counts` for an in-memory ``anndata.AnnData``; ``source`` names it in errors."""
    if missing_groups not in _MISSING_POLICIES:
        raise DataError(f"{source}: missing_groups = {missing_groups!r} is unknown; use one of "
                        f"{', '.join(_MISSING_POLICIES)}")
    counts = _counts_matrix(adata, source, layer)
    coords = _coordinates(adata, source, coordinates_key)
    groups, names = None, None
    keep = None
    if group_key is not None:
        groups, names, keep = _group_codes(adata, source, group_key, missing_groups)
    data = SpatialCounts(
        counts=counts,
        coordinates=coords,
        gene_names=np.asarray(adata.var_names, dtype=object),
        spot_names=np.asarray(adata.obs_names, dtype=object),
        groups=groups,
        group_names=names,
    )
    if keep is not None and not keep.all():
        log.warning("%s: dropped %d of %d spots whose obs[%r] label is missing "
                    "(set data.missing_groups: unknown to keep them)",
                    source, int((~keep).sum()), keep.size, group_key)
        data = data.subset(spots=keep)
    return data.validate(source=source)


def _counts_matrix(adata: Any, source: str, layer: Optional[str]) -> sp.csr_matrix:
    """The count matrix as CSR (N, D) float64 (values are checked later by validate)."""
    if layer is None:
        X = adata.X
        if X is None:
            raise DataError(f"{source}: X is empty; set data.layer to the layer holding raw "
                            f"counts (available layers: {_listing(adata.layers.keys())})")
        what = "X"
    else:
        if layer not in adata.layers:
            raise DataError(f"{source}: layer {layer!r} not found; available layers: "
                            f"{_listing(adata.layers.keys())} (set data.layer to one of them, "
                            "or to null to read X)")
        X = adata.layers[layer]
        what = f"layer {layer!r}"
    try:
        if sp.issparse(X):
            Y = sp.csr_matrix(X, dtype=np.float64)
        else:
            Y = sp.csr_matrix(np.asarray(X, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: {what} cannot be read as a numeric count matrix "
                        f"({type(X).__name__}: {e})") from None
    Y.sum_duplicates()
    Y.eliminate_zeros()  # explicit zeros would inflate detection counts in preprocessing
    return Y


def _coordinates(adata: Any, source: str, key: str) -> np.ndarray:
    """Spot coordinates, ndarray (N, 2) float64."""
    if key not in adata.obsm:
        raise DataError(f"{source}: obsm key {key!r} (coordinates) not found; available obsm "
                        f"keys: {_listing(adata.obsm.keys())} (set data.coordinates_key to one of them)")
    raw = adata.obsm[key]
    try:
        X = np.asarray(raw.to_numpy() if isinstance(raw, pd.DataFrame) else raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: obsm[{key!r}] is not numeric ({e})") from None
    if X.ndim != 2 or X.shape[1] != 2:
        raise DataError(f"{source}: obsm[{key!r}] has shape {X.shape}; 2-D coordinates of shape "
                        f"({adata.n_obs}, 2) are required (set data.coordinates_key to another key)")
    return X


def _is_missing(values: np.ndarray) -> np.ndarray:
    """True where a label is NaN, None or a blank string, (N,) bool."""
    missing = pd.isna(values)
    blank = np.array([isinstance(v, str) and not v.strip() for v in values], dtype=bool)
    return np.asarray(missing, dtype=bool) | blank


def _group_codes(adata: Any, source: str, key: str, policy: str
                 ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Codes (N,) int64, sorted names (G,) and the mask (N,) of spots to keep."""
    if key not in adata.obs.columns:
        raise DataError(f"{source}: obs column {key!r} (group labels) not found; available obs "
                        f"columns: {_listing(adata.obs.columns)} (set data.group_key to one of "
                        "them, or to null for no groups)")
    values = adata.obs[key].astype(object).to_numpy()
    missing = _is_missing(values)
    present = values[~missing]
    # numeric labels (e.g. cluster ids) sort as numbers, so "10" follows "9"
    numeric = all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in present)
    labels = np.array([_label(v) for v in values], dtype=object)
    uniq = {}
    for v, lab in zip(present, labels[~missing]):
        uniq.setdefault(lab, v)
    names = sorted(uniq, key=(lambda s: (float(uniq[s]), s)) if numeric else str)
    if policy == "unknown" and missing.any():
        if UNKNOWN_GROUP not in names:
            # numbers sort before any word, so "unknown" goes last for numeric labels
            names = names + [UNKNOWN_GROUP] if numeric else sorted(names + [UNKNOWN_GROUP])
        labels[missing] = UNKNOWN_GROUP
        missing = np.zeros_like(missing)
    if not names or missing.all():
        raise DataError(f"{source}: obs[{key!r}] has no non-missing labels; set data.group_key "
                        "to another column, to null for no groups, or data.missing_groups: unknown")
    index = {name: code for code, name in enumerate(names)}
    codes = np.array([index.get(lab, 0) if not m else 0 for lab, m in zip(labels, missing)],
                     dtype=np.int64)
    return codes, names, ~missing


def _label(v: Any) -> str:
    # integral floats come from integer columns with NaNs (pandas upcasts them)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _listing(keys: Any) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(repr(k) for k in keys) if keys else "(none)"
