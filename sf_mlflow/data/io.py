"""Reading and writing a preprocessed data folder (the preprocess stage's artifact).

Layout::

    X.npy          (N, 2) float64   rescaled coordinates
    Y.npz          (N, D) CSR        counts (scipy.sparse.save_npz)
    C.npy          (N,) int64        group codes (all zeros without groups)
    truth.npz      generated data only: factors (N, L), log_factors (N, L), loadings (D, L)
    metadata.json  names, filter report, split, coordinate transform; written LAST

Every file is written to a temporary name and renamed into place, and ``metadata.json`` is
removed first and written last, so a folder whose writer died part-way never has a
``metadata.json`` and :func:`read_preprocessed` rejects it instead of mixing old and new files.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import scipy.sparse as sp

from sf_mlflow.data.counts import SpatialCounts
from sf_mlflow.data.preprocess import PreprocessResult
from sf_mlflow.errors import ArtifactError, DataError
from sf_mlflow.files import atomic_write

__all__ = ["PreprocessedData", "write_preprocessed", "read_preprocessed", "FILES"]

COORDINATES_FILE = "X.npy"
COUNTS_FILE = "Y.npz"
GROUPS_FILE = "C.npy"
TRUTH_FILE = "truth.npz"
METADATA_FILE = "metadata.json"
#: Files every complete folder has (truth.npz only for generated data).
FILES = (COORDINATES_FILE, COUNTS_FILE, GROUPS_FILE, METADATA_FILE)
_RESERVED = ("n_spots", "n_genes", "n_groups", "gene_names", "spot_names", "group_names",
             "preprocessing", "split", "coordinate_transform", "has_truth", "truth_keys")


@dataclass
class PreprocessedData:
    """A preprocessed folder read back.

    Attributes
    ----------
    data : SpatialCounts
        Counts (N, D), rescaled coordinates (N, 2), groups (N,) or None.
    heldout : ndarray of bool, (N,)
        True for held-out spots.
    metadata : dict
        The parsed ``metadata.json``.
    truth : dict, optional
        ``{"factors": (N, L), "log_factors": (N, L), "loadings": (D, L)}`` for generated data.
    """

    data: SpatialCounts
    heldout: np.ndarray
    metadata: dict[str, Any]
    truth: Optional[dict[str, np.ndarray]] = None

    def training_spots(self) -> SpatialCounts:
        """The spots models are fitted on (all that were not held out)."""
        return self.data.subset(spots=np.flatnonzero(~self.heldout))

    def heldout_spots(self) -> Optional[SpatialCounts]:
        """The held-out spots, or None when the preprocess run held none out."""
        if not self.heldout.any():
            return None
        return self.data.subset(spots=np.flatnonzero(self.heldout))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_preprocessed(directory: str | Path, result: PreprocessResult,
                       metadata: Optional[dict[str, Any]] = None) -> list[Path]:
    """Write a :class:`PreprocessResult` to ``directory``.

    Parameters
    ----------
    directory : str or Path
        Created if needed; files of an earlier write are replaced.
    result : PreprocessResult
        Filtered data (N, D), held-out mask (N,) and report.
    metadata : dict, optional
        Extra JSON-serialisable entries (e.g. dataset name, config digest); their keys must
        not clash with the ones written here.

    Returns
    -------
    list of Path
        The files written, ``metadata.json`` last.
    """
    clash = sorted(set(_RESERVED) & set(metadata or {}))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by write_preprocessed")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / METADATA_FILE
    # without metadata.json the folder reads as incomplete until the new write finishes
    meta_path.unlink(missing_ok=True)

    data = result.data
    n, d = data.counts.shape
    heldout = np.asarray(result.heldout, dtype=bool)
    if heldout.shape != (n,):
        raise ValueError(f"heldout has shape {heldout.shape}, expected ({n},)")
    report = result.report or {}

    written = []
    X = np.ascontiguousarray(data.coordinates, dtype=np.float64)
    atomic_write(out / COORDINATES_FILE, lambda fh: np.save(fh, X))
    written.append(out / COORDINATES_FILE)
    Y = sp.csr_matrix(data.counts)
    atomic_write(out / COUNTS_FILE, lambda fh: sp.save_npz(fh, Y, compressed=True))
    written.append(out / COUNTS_FILE)
    C = (np.zeros(n, dtype=np.int64) if data.groups is None
         else np.asarray(data.groups, dtype=np.int64))
    atomic_write(out / GROUPS_FILE, lambda fh: np.save(fh, C))
    written.append(out / GROUPS_FILE)

    truth_path = out / TRUTH_FILE
    truth = {k: np.asarray(v) for k, v in (data.truth or {}).items()
             if isinstance(v, np.ndarray)}
    if truth:
        atomic_write(truth_path, lambda fh: np.savez(fh, **truth))
        written.append(truth_path)
    else:
        truth_path.unlink(missing_ok=True)  # stale truth from an earlier synthetic run

    meta: dict[str, Any] = {
        "n_spots": int(n),
        "n_genes": int(d),
        "n_groups": int(data.n_groups),
        "gene_names": [str(g) for g in data.gene_names],
        "spot_names": [str(s) for s in data.spot_names],
        "group_names": None if data.group_names is None else [str(g) for g in data.group_names],
        "preprocessing": report,
        "split": {
            "holdout_fraction": float(report.get("settings", {}).get(
                "holdout_fraction", heldout.mean() if n else 0.0)),
            "heldout_indices": [int(i) for i in np.flatnonzero(heldout)],
        },
        "coordinate_transform": {
            "center": report.get("coordinate_center"),
            "scale": report.get("coordinate_scale"),
            "formula": "new = (old - center) * scale",
            "inverse": "old = new / scale + center",
            # how center and scale were chosen, so the numbers can be re-derived and audited
            "rule": report.get("coordinate_scaling"),
            "spatial_scale": report.get("settings", {}).get("spatial_scale"),
            "side_lengths": report.get("coordinate_side_lengths"),
        },
        "has_truth": bool(truth),
        "truth_keys": sorted(truth),
    }
    meta.update(metadata or {})
    text = json.dumps(meta, indent=1, default=_json_default)
    atomic_write(meta_path, lambda fh: fh.write(text.encode()))
    written.append(meta_path)
    return written


def _require(folder: Path, name: str) -> Path:
    p = folder / name
    if not p.is_file():
        hint = (" (metadata.json is written last, so the preprocess step that made this folder "
                "did not finish; run it again)" if name == METADATA_FILE else
                "; the folder is damaged, run the preprocess step again")
        raise DataError(f"preprocessed folder {str(folder)!r} lacks {name}{hint}")
    return p


#: The subfolder of a preprocess stage's folder (and of its run's artifacts) with the files.
DATA_SUBFOLDER = "data"


def _data_folder(folder: Path) -> Path:
    """``folder``, or its ``data/`` subfolder when ``folder`` is a preprocess stage's folder."""
    if not folder.is_dir():
        raise DataError(f"preprocessed folder {str(folder)!r} does not exist; run the "
                        "preprocess step first or check the path")
    if any((folder / name).exists() for name in FILES):
        return folder
    sub = folder / DATA_SUBFOLDER
    if sub.is_dir() and any((sub / name).exists() for name in FILES):
        return sub  # a preprocess stage folder (or its downloaded artifacts): files in data/
    raise DataError(f"folder {str(folder)!r} is not a preprocessed folder: it holds none of "
                    f"{', '.join(FILES)} (nor does a '{DATA_SUBFOLDER}' subfolder); pass the "
                    f"'{DATA_SUBFOLDER}' folder of a preprocess run, e.g. "
                    f"<output_dir>/preprocess/<run id>/{DATA_SUBFOLDER}")


def _read_truth(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _read_array(folder: Path, name: str, read: Callable[[Path], Any]) -> Any:
    """``read(folder / name)``; a file numpy cannot parse is an :class:`ArtifactError`."""
    path = _require(folder, name)
    try:
        return read(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        kind = Path(name).suffix
        problem = "the file is empty" if path.stat().st_size == 0 else f"{type(e).__name__}: {e}"
        problem = f"not a valid {kind} file: {problem}"
        raise ArtifactError(f"preprocessed file {str(path)!r} is damaged ({problem}); run the "
                            "preprocess step again", path=path, problem=problem) from None


def read_preprocessed(directory: str | Path) -> PreprocessedData:
    """Read a folder written by :func:`write_preprocessed`.

    Parameters
    ----------
    directory : str or Path
        The folder, or a preprocess stage's folder (or its run's downloaded artifacts),
        whose ``data/`` subfolder holds the files.

    Returns
    -------
    PreprocessedData
        Data (N, D) with coordinates (N, 2) and groups (N,) or None, held-out mask (N,),
        metadata and truth (or None).
    """
    folder = _data_folder(Path(directory))
    meta_path = _require(folder, METADATA_FILE)
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path}: not valid JSON ({e}); run the preprocess step again") from None
    X = _read_array(folder, COORDINATES_FILE, np.load)
    Y = _read_array(folder, COUNTS_FILE, lambda p: sp.load_npz(p).tocsr())
    C = _read_array(folder, GROUPS_FILE, np.load)
    truth = None
    if meta.get("has_truth"):
        truth = _read_array(folder, TRUTH_FILE, _read_truth)

    n, d = Y.shape
    if (meta.get("n_spots"), meta.get("n_genes")) != (n, d):
        raise DataError(f"preprocessed folder {str(folder)!r}: {COUNTS_FILE} is {n} x {d} but "
                        f"{METADATA_FILE} says {meta.get('n_spots')} x {meta.get('n_genes')}; "
                        "the files come from different runs, run the preprocess step again")
    group_names = meta.get("group_names")
    heldout = np.zeros(n, dtype=bool)
    heldout[np.asarray(meta["split"]["heldout_indices"], dtype=np.int64)] = True
    data = SpatialCounts(
        counts=Y,
        coordinates=X,
        gene_names=np.asarray(meta["gene_names"], dtype=object),
        spot_names=np.asarray(meta["spot_names"], dtype=object),
        groups=None if group_names is None else C.astype(np.int64),
        group_names=group_names,
        truth=truth,
    ).validate(source=str(folder))
    return PreprocessedData(data=data, heldout=heldout, metadata=meta, truth=truth)
