"""Data sources: the Slide-seqV2 hippocampus data, any AnnData ``.h5ad`` file, generated data.

Every source returns a validated :class:`~sf_mlflow.data.counts.SpatialCounts` whose counts
are CSR float64 holding integer values, so downstream code never branches on the source.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from pathlib import Path
from typing import Any, Optional, Union

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

#: ``data.use_raw``: "auto", True or False.
UseRaw = Union[str, bool]
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
                             layer=d.layer, use_raw=d.use_raw, missing_groups=d.missing_groups,
                             make_unique=d.make_unique)
    if cfg.dataset == "h5ad":
        if d.path is None:
            raise DataError("dataset 'h5ad' needs data.path: set it to the .h5ad file to read "
                            "(e.g. --set data.path=/path/to/file.h5ad)")
        group_key = None if d.group_key == "auto" else d.group_key
        return read_h5ad_counts(d.path, coordinates_key=d.coordinates_key, group_key=group_key,
                                layer=d.layer, use_raw=d.use_raw, missing_groups=d.missing_groups,
                             make_unique=d.make_unique)
    if cfg.dataset == "synthetic":
        return synthetic_from_config(d.synthetic, cfg.seed).validate(source="synthetic data")
    raise DataError(f"dataset = {cfg.dataset!r} is unknown; valid datasets: {', '.join(DATASETS)}")


def load_slideseq(path: Optional[str | Path] = None, *, coordinates_key: str = "spatial",
                  group_key: Optional[str] = SLIDESEQ_GROUP_KEY, layer: Optional[str] = None,
                  use_raw: UseRaw = "auto", missing_groups: str = "drop",
                  download: bool = True, make_unique: bool = False) -> SpatialCounts:
    """Read squidpy's Slide-seqV2 mouse hippocampus data (41,786 beads, 14 cell types).

    squidpy's file keeps 4,000 selected, log-normalised genes in ``X`` and the raw counts
    of all genes in ``adata.raw``; the plan's reference reads ``adata.raw``, so that is
    what ``use_raw="auto"`` reads here whenever the file has it (else ``X``, as for the
    window file in the shared data, whose ``X`` is raw counts).

    Parameters
    ----------
    path : str or Path, optional
        The cached ``.h5ad`` file; default :data:`SLIDESEQ_DEFAULT_PATH`.
    coordinates_key, group_key, layer, missing_groups, make_unique
        As in :func:`read_h5ad_counts`; ``group_key`` defaults to ``"cluster"``.
    use_raw : {"auto", True, False}
        ``"auto"`` = ``adata.raw`` when present (and ``layer`` is None), else ``X``; True =
        ``adata.raw`` (an error if absent); False = ``X`` or ``layer``.
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
    return _read_h5ad(p, coordinates_key=coordinates_key, group_key=group_key, layer=layer,
                      use_raw=use_raw, missing_groups=missing_groups, prefer_raw=True,
                      make_unique=make_unique)


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
                     missing_groups: str = "drop", use_raw: UseRaw = "auto",
                     make_unique: bool = False) -> SpatialCounts:
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
        Layer holding the raw counts (N, D); None = ``X`` (or ``adata.raw``, see ``use_raw``).
    missing_groups : {"drop", "unknown"}
        Spots with a missing label (NaN, None or empty string) are dropped, or put in a
        group named ``"unknown"``.
    use_raw : {"auto", True, False}
        Read ``adata.raw.X`` (N, D_raw) and its gene names: True = always (an error if the
        file has none); False = never; ``"auto"`` = when the file has ``adata.raw``,
        ``layer`` is None and ``X`` holds non-integer values (normalised data).
    make_unique : bool
        Gene or spot names that occur more than once are an error (a model indexed by name
        would mix them up); True appends ``-1``, ``-2``, ... to the repeats instead (the rule
        of anndata's ``var_names_make_unique``) and logs how many were renamed.

    Returns
    -------
    SpatialCounts
        ``counts`` CSR (N, D) float64, ``coordinates`` (N, 2) float64, ``groups`` (N,)
        int64 codes into the sorted ``group_names`` (G,), validated with ``source=path``;
        ``counts_source`` names the matrix read ("X", "layer 'counts'" or "adata.raw").
        Counts stored as integral floats are accepted; any non-integer value is an error
        that names the matrix read and the setting that picks another.
    """
    return _read_h5ad(path, coordinates_key=coordinates_key, group_key=group_key, layer=layer,
                      use_raw=use_raw, missing_groups=missing_groups, prefer_raw=False,
                      make_unique=make_unique)


def _read_h5ad(path: str | Path, *, coordinates_key: str, group_key: Optional[str],
               layer: Optional[str], use_raw: UseRaw, missing_groups: str,
               prefer_raw: bool, make_unique: bool = False) -> SpatialCounts:
    """:func:`read_h5ad_counts`; ``prefer_raw`` makes ``use_raw="auto"`` read ``adata.raw``
    whenever it is present (the Slide-seq source), not only when ``X`` is non-integral."""
    p = Path(path)
    if p.exists() and not p.is_file():
        what = "a folder" if p.is_dir() else "not a regular file (a device, pipe or socket)"
        raise DataError(f"data.path {str(path)!r} is {what}; set data.path to an .h5ad file")
    if not p.is_file():
        where = "the folder does not exist" if not p.parent.is_dir() else "no such file"
        raise DataError(f"h5ad file {str(path)!r} not found ({where}); set data.path to an "
                        "existing .h5ad file")
    import anndata

    try:
        with warnings.catch_warnings():
            # repeated names are refused or made unique below, in the project's own words
            warnings.filterwarnings("ignore", message=".*names are not unique")
            adata = anndata.read_h5ad(p)
    except Exception as e:  # h5py/anndata raise assorted types for corrupt or non-h5ad files
        raise DataError(f"{p}: cannot be read as an AnnData .h5ad file "
                        f"({type(e).__name__}: {e})") from None
    return counts_from_anndata(adata, source=str(p), coordinates_key=coordinates_key,
                               group_key=group_key, layer=layer, missing_groups=missing_groups,
                               use_raw=use_raw, prefer_raw=prefer_raw, make_unique=make_unique)


def counts_from_anndata(adata: Any, source: str = "AnnData", coordinates_key: str = "spatial",
                        group_key: Optional[str] = None, layer: Optional[str] = None,
                        missing_groups: str = "drop", use_raw: UseRaw = "auto",
                        prefer_raw: bool = False, make_unique: bool = False) -> SpatialCounts:
    """:func:`read_h5ad_counts` for an in-memory ``anndata.AnnData``; ``source`` names it in errors.

    ``prefer_raw=True`` makes ``use_raw="auto"`` read ``adata.raw`` whenever it is present;
    ``make_unique`` as in :func:`read_h5ad_counts`.
    """
    if missing_groups not in _MISSING_POLICIES:
        raise DataError(f"{source}: missing_groups = {missing_groups!r} is unknown; use one of "
                        f"{', '.join(_MISSING_POLICIES)}")
    if not (use_raw == "auto" or isinstance(use_raw, (bool, np.bool_))):
        raise DataError(f"{source}: use_raw = {use_raw!r} is invalid; expected 'auto', true or "
                        "false (data.use_raw)")
    _check_not_empty(adata, source)
    what = _which_counts(adata, source, layer, use_raw, prefer_raw)
    counts, gene_names = _counts_matrix(adata, source, what, layer)
    coords = _coordinates(adata, source, coordinates_key)
    groups, names = None, None
    keep = None
    if group_key is not None:
        groups, names, keep = _group_codes(adata, source, group_key, missing_groups)
    data = SpatialCounts(
        counts=counts,
        coordinates=coords,
        gene_names=np.asarray(gene_names, dtype=object),
        spot_names=np.asarray(adata.obs_names, dtype=object),
        groups=groups,
        group_names=names,
        counts_source=_describe(what, layer),
    )
    if keep is not None and not keep.all():
        log.warning("%s: dropped %d of %d spots whose obs[%r] label is missing "
                    "(set data.missing_groups: unknown to keep them)",
                    source, int((~keep).sum()), keep.size, group_key)
        data = data.subset(spots=keep)
    if make_unique:
        data, genes, spots = data.made_unique()
        if genes or spots:
            log.warning("%s: data.make_unique renamed %d repeated gene names and %d repeated spot "
                        "names (-1, -2, ... appended)", source, genes, spots)
    return data.validate(source=source)


def _check_not_empty(adata: Any, source: str) -> None:
    """Refuse an AnnData without spots or genes before anything else is read from it
    (its group column, coordinates or counts would each report a misleading problem)."""
    n_obs, n_vars = int(adata.n_obs), int(adata.n_vars)
    raw = getattr(adata, "raw", None)
    if raw is not None:
        n_vars = max(n_vars, int(raw.n_vars))
    if n_obs == 0 or n_vars == 0:
        missing = " and ".join(w for w, n in (("no spots (0 obs)", n_obs),
                                                ("no genes (0 vars)", n_vars)) if n == 0)
        raise DataError(f"{source}: the file has {missing}: it is an empty AnnData "
                        f"({n_obs} spots x {n_vars} genes); set data.path to a file that "
                        "holds the counts")


def _which_counts(adata: Any, source: str, layer: Optional[str], use_raw: UseRaw,
                  prefer_raw: bool) -> str:
    """Which matrix holds the counts: "raw", "layer" or "X"."""
    has_raw = getattr(adata, "raw", None) is not None
    if use_raw is True or use_raw is np.True_:
        if layer is not None:
            raise DataError(f"{source}: data.layer = {layer!r} and data.use_raw = true both pick "
                            "the counts; set data.layer: null to read adata.raw, or "
                            "data.use_raw: false to read the layer")
        if not has_raw:
            raise DataError(f"{source}: data.use_raw = true but the file has no adata.raw; set "
                            "data.use_raw: false (or auto) to read X, or data.layer to a layer of "
                            f"raw counts (available layers: {_listing(adata.layers.keys())})")
        return "raw"
    if layer is not None:
        return "layer"
    if use_raw == "auto" and has_raw:
        if prefer_raw:
            return "raw"
        X = adata.X
        if X is None or _first_non_integer(X) is not None:
            log.info("%s: X is not integral, so the counts are read from adata.raw "
                     "(set data.use_raw: false to read X)", source)
            return "raw"
    return "X"


def _describe(what: str, layer: Optional[str]) -> str:
    return {"raw": "adata.raw", "X": "X"}.get(what, f"layer {layer!r}")


def _first_non_integer(X: Any) -> Optional[tuple[int, int, float, int]]:
    """(row, column, value, how many) of the first finite non-integer entry, or None.

    NaN and infinite values are left to ``SpatialCounts.validate``, whose message is about them.
    """
    if sp.issparse(X):
        M = sp.csr_matrix(X)
        v = M.data
    else:
        M = None
        v = np.asarray(X).ravel()
    if v.dtype.kind in "iub":  # integer storage cannot hold fractions
        return None
    v = v.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore"):
        bad = np.isfinite(v) & (v != np.round(v))
    if not bad.any():
        return None
    k = int(np.flatnonzero(bad)[0])
    if M is not None:
        row = int(np.searchsorted(M.indptr, k, side="right") - 1)
        col = int(M.indices[k])
    else:
        row, col = divmod(k, np.asarray(X).shape[1])
    return row, col, float(v[k]), int(bad.sum())


def _counts_matrix(adata: Any, source: str, what: str, layer: Optional[str]
                   ) -> tuple[sp.csr_matrix, Any]:
    """The count matrix as CSR (N, D) float64 and its gene names (D,).

    Integral values in any numeric storage are accepted (squidpy stores raw counts as
    float32); non-integer values are refused here with a hint at the setting that picks
    another matrix. Negative and non-finite values are left to ``SpatialCounts.validate``.
    """
    has_raw = getattr(adata, "raw", None) is not None
    genes = adata.var_names
    if what == "raw":
        X, genes, name = adata.raw.X, adata.raw.var_names, "adata.raw.X"
    elif what == "layer":
        if layer not in adata.layers:
            raise DataError(f"{source}: layer {layer!r} not found; available layers: "
                            f"{_listing(adata.layers.keys())} (set data.layer to one of them, "
                            "or to null to read X" + (" or adata.raw)" if has_raw else ")"))
        X, name = adata.layers[layer], f"layer {layer!r}"
    else:
        X, name = adata.X, "X"
        if X is None:
            raise DataError(f"{source}: X is empty; set data.layer to the layer holding raw "
                            f"counts (available layers: {_listing(adata.layers.keys())})"
                            + (" or data.use_raw: true to read adata.raw" if has_raw else ""))
    try:
        if sp.issparse(X):
            Y = sp.csr_matrix(X, dtype=np.float64)
        else:
            Y = sp.csr_matrix(np.asarray(X, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: {name} cannot be read as a numeric count matrix "
                        f"({type(X).__name__}: {e})") from None
    Y.sum_duplicates()
    Y.eliminate_zeros()  # explicit zeros would inflate detection counts in preprocessing
    bad = _first_non_integer(Y)
    if bad is not None:
        row, col, value, n_bad = bad
        fixes = []
        if what != "raw" and has_raw:
            fixes.append(f"set data.use_raw: true to read adata.raw ({adata.raw.n_vars:,} genes)")
        others = [k for k in adata.layers.keys() if not (what == "layer" and k == layer)]
        fixes.append("set data.layer to a layer of raw counts (available layers: "
                     f"{_listing(others)})")
        if what != "X":
            fixes.append("data.use_raw: false and data.layer: null to read X")
        raise DataError(
            f"{source}: {name} holds {n_bad:,} non-integer values (first: spot "
            f"{str(adata.obs_names[row])!r}, gene {str(genes[col])!r} = {value:g}), so it is "
            "not raw counts (normalised or log-transformed?); " + ", or ".join(fixes))
    return Y, genes


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
