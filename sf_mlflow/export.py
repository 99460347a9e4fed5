"""An analyze run as an :class:`anndata.AnnData`: counts, positions, factors and their lineage.

:func:`to_anndata` gathers what an analyze run, its train run and its preprocess run
logged into one object a scanpy/squidpy user can take away::

    import sf_mlflow, squidpy as sq
    adata = sf_mlflow.to_anndata("<analyze run id>")
    sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=6)
    sq.gr.spatial_autocorr(adata, mode="moran", attr="obsm", layer="X_svgp")
    adata.uns["moranI"]           # Moran's I of each factor (all spots, held-out included)
    sq.pl.spatial_scatter(adata, shape=None, color="heldout")

The run's own ``moran_i.csv`` (``uns["sf_mlflow"]["moran_i"]``) is over the training
spots: ``adata[~adata.obs["heldout"]]`` with the same graph reproduces it.

``spatial_factorization export --run-id ID -o results.h5ad`` writes it to a file
(:func:`export_h5ad`). MLflow is reached only through :mod:`sf_mlflow.tracking`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from sf_mlflow.data.io import PreprocessedData, read_preprocessed
from sf_mlflow.errors import DataError, RunLookupError
from sf_mlflow.files import check_target, replacing
from sf_mlflow.stages._common import group_file_names
from sf_mlflow.tracking import (
    TAG_DATASET,
    TAG_MODEL,
    TAG_UPSTREAM,
    download_artifacts,
    get_stage_run,
    reading_store,
)

__all__ = ["to_anndata", "export_h5ad"]

#: Artifacts of an analyze run that :func:`to_anndata` reads.
_ANALYZE_FILES = ("factors.npy", "scales.npy", "loadings.npy", "moran_i.csv", "spots.csv")


def _chain(analyze_run_id: str) -> tuple[Any, str, str]:
    """The analyze run and the IDs of its train and preprocess runs."""
    run = get_stage_run(analyze_run_id, "analyze")
    train_id = run.data.tags.get(TAG_UPSTREAM)
    if not train_id:
        raise RunLookupError(f"analyze run {analyze_run_id!r} has no tag {TAG_UPSTREAM!r} naming "
                             "its train run; run the analyze stage again")
    train = get_stage_run(train_id, "train")
    pre_id = train.data.tags.get(TAG_UPSTREAM)
    if not pre_id:
        raise RunLookupError(f"train run {train_id!r} has no tag {TAG_UPSTREAM!r} naming its "
                             "preprocess run; train again on a preprocess run")
    get_stage_run(pre_id, "preprocess")
    return run, train_id, pre_id


def _read_spots(path: Path, pre: PreprocessedData, run_id: str) -> None:
    """Check the analyze run's ``spots.csv`` against the preprocessed spots and split."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = [r["spot"] for r in rows]
    held = np.array([r["heldout"] == "1" for r in rows], dtype=bool)
    if names != [str(s) for s in pre.data.spot_names] or not np.array_equal(held, pre.heldout):
        raise DataError(f"analyze run {run_id!r}: spots.csv does not list the spots of its "
                        "preprocess run in their order; the artifacts were changed after the "
                        "run, run the analyze stage again")


def _moran_table(path: Path):
    """``moran_i.csv`` as a DataFrame indexed ``factor_0``, ``factor_1``, ... (rank order):
    ``original_factor``, ``moran_i`` and ``spatial`` (whether the factor has the GP prior)."""
    import pandas as pd

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    table = pd.DataFrame({
        "original_factor": np.array([int(r["original_factor"]) for r in rows], dtype=np.int64),
        "moran_i": np.array([float(r["moran_i"]) for r in rows], dtype=np.float64)},
        index=pd.Index([f"factor_{i}" for i in range(len(rows))], name="factor"))
    if rows and "spatial" in rows[0]:
        table["spatial"] = np.array([r["spatial"] == "1" for r in rows], dtype=bool)
    return table


def original_coordinates(pre: PreprocessedData) -> np.ndarray:
    """The spots' positions in the data set's own units (the preprocess rescaling undone), (N, 2).

    ``old = new / scale + center`` from ``metadata.json``; the rescaled coordinates when the
    metadata has no transform. The rescaling is one scale for both axes, so k-nearest
    neighbours (and Moran's I on them) are the same in either unit.
    """
    t = pre.metadata.get("coordinate_transform") or {}
    center, scale = t.get("center"), t.get("scale")
    X = np.asarray(pre.data.coordinates, dtype=np.float64)
    if center is None or scale is None:
        return X.copy()
    return X / float(scale) + np.asarray(center, dtype=np.float64)


def _uns(run, kind: str, train_id: str, pre_id: str, moran_table, analyze_dir: Path
         ) -> dict[str, Any]:
    """``uns["sf_mlflow"]``: the chain's run IDs, Moran's I per factor and the run's metrics."""
    metrics: dict[str, float] = {}
    metrics_file = analyze_dir / "metrics.json"
    if metrics_file.is_file():
        saved = json.loads(metrics_file.read_text())
        metrics = {k: float(v) for k, v in saved.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update({k: float(v) for k, v in run.data.metrics.items()})
    params = run.data.params
    return {
        "model": kind,
        "dataset": run.data.tags.get(TAG_DATASET, ""),
        "run_ids": {"preprocess": pre_id, "train": train_id, "analyze": run.info.run_id},
        "factor_order": "descending Moran's I (on the training spots)",
        "moran_i": moran_table,
        "moran_k": int(params["analysis.moran_k"]) if "analysis.moran_k" in params else -1,
        "metrics": metrics,
        **_marking(analyze_dir),
    }


def _marking(analyze_dir: Path) -> dict[str, Any]:
    """``{"spatial_factors": bool (L,)}``: which factors (in the reported order) have the GP
    prior, from ``spatial_factors.npy``; empty for runs made before analyze wrote it."""
    f = analyze_dir / "spatial_factors.npy"
    return {"spatial_factors": np.load(f).astype(bool)} if f.is_file() else {}


def to_anndata(analyze_run_id: str, tracking_uri: str | None = None):
    """The results of an analyze run as an :class:`anndata.AnnData`.

    ``tracking_uri``: the store holding the run (default ``MLFLOW_TRACKING_URI``, else
    ``./mlflow.db``); a sqlite store that does not exist is an error, never created.

    Spots and genes are the preprocess run's kept ones, in their order; held-out spots
    are included. With ``<model>`` the run's model kind (``pnmf``, ``svgp``, ``mggp`` or
    ``hybrid``):

    * ``X``: the preprocessed counts (N, D), sparse CSR;
    * ``obs["heldout"]`` (categorical ``training`` / ``held-out``, so plots colour it as two
      classes; ``adata.obs["heldout"] == "held-out"`` is the mask), ``obs["group"]``
      (categorical, when the data has groups);
    * ``var["total_counts"]`` and ``var["n_spots"]`` (spots where the gene is detected);
    * ``obsm["spatial"]``: positions in the data set's units (squidpy's key);
      ``obsm["spatial_scaled"]``: the rescaled positions the model was fitted on;
    * ``obsm["X_<model>"]`` (N, L): factors in descending Moran's I order (held-out rows:
      the model's prediction from position, as analyze predicts them);
      ``obsm["X_<model>_scales"]`` (N, L): posterior sd of the log-factors (held-out: GP
      predictive sd; NaN for ``pnmf`` and a hybrid's non-spatial factors);
    * ``varm["<model>_loadings"]`` (D, L), same factor order; with groups
      ``varm["<model>_loadings_<group>"]`` (D, L), the loadings refitted on each group's
      spots, and ``varm["<model>_enrichment_<group>"]`` (D, L), their log fold change
      against the shared loadings;
    * ``uns["sf_mlflow"]``: ``model``, ``groups`` (whether the model used the cell-type
      groups), ``dataset``, ``run_ids`` of preprocess, train and analyze, ``moran_i`` (a
      DataFrame, one row per factor in the order above: ``original_factor``, ``moran_i``,
      ``spatial``), ``spatial_factors`` (bool (L,): which factors have the GP prior),
      ``group_files`` (group -> the ``<group>`` of the varm keys), ``moran_k`` and the run's
      ``metrics``.
    """
    with reading_store(tracking_uri):
        run, train_id, pre_id = _chain(analyze_run_id)
        with tempfile.TemporaryDirectory() as tmp:
            a = download_artifacts(run.info.run_id, "", Path(tmp) / "analyze")
            missing = [f for f in _ANALYZE_FILES if not (a / f).is_file()]
            if missing:
                raise RunLookupError(
                    f"analyze run {run.info.run_id!r} lacks {', '.join(missing)} (it was made "
                    "by an older version that saved factors of the training spots only); "
                    "analyze its train run again: spatial_factorization analyze -c CONFIG "
                    f"--train-run-id {train_id}")
            pre = read_preprocessed(download_artifacts(pre_id, "data", Path(tmp) / "preprocess"))
            _read_spots(a / "spots.csv", pre, run.info.run_id)
            return _assemble(run, train_id, pre_id, pre, a)


def _assemble(run, train_id: str, pre_id: str, pre: PreprocessedData, a: Path):
    """The AnnData of :func:`to_anndata` from the downloaded analyze folder ``a``."""
    import anndata as ad
    import pandas as pd

    kind = run.data.tags.get(TAG_MODEL, "model")
    d = pre.data
    uns = _uns(run, kind, train_id, pre_id, _moran_table(a / "moran_i.csv"), a)
    obs = pd.DataFrame({"heldout": pd.Categorical(
        np.where(pre.heldout, "held-out", "training"), categories=["training", "held-out"])},
        index=pd.Index([str(s) for s in d.spot_names]))
    if d.groups is not None and d.group_names:
        obs["group"] = pd.Categorical.from_codes(np.asarray(d.groups, dtype=np.int64),
                                                 categories=[str(g) for g in d.group_names])
    counts = sp.csr_matrix(d.counts)
    var = pd.DataFrame({"total_counts": np.asarray(counts.sum(axis=0)).ravel(),
                        "n_spots": np.asarray((counts > 0).sum(axis=0)).ravel()},
                       index=pd.Index([str(g) for g in d.gene_names]))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["spatial"] = original_coordinates(pre)
    adata.obsm["spatial_scaled"] = np.asarray(d.coordinates, dtype=np.float64)
    adata.obsm[f"X_{kind}"] = np.load(a / "factors.npy")
    adata.obsm[f"X_{kind}_scales"] = np.load(a / "scales.npy")
    adata.varm[f"{kind}_loadings"] = np.load(a / "loadings.npy")
    trained = get_stage_run(train_id, "train").data.params
    uns["groups"] = bool(kind != "pnmf" and d.group_names
                         and str(trained.get("model.groups", "")).lower() == "true")
    if d.group_names and (a / "enrichment_lfc.npy").is_file():
        files = group_file_names(d.group_names)
        lfc = np.load(a / "enrichment_lfc.npy")
        for g, file in enumerate(files):
            path = a / f"loadings_group_{file}.npy"
            if path.is_file():
                adata.varm[f"{kind}_loadings_{file}"] = np.load(path)
            adata.varm[f"{kind}_enrichment_{file}"] = lfc[g]
        uns["group_files"] = {str(n): f for n, f in zip(d.group_names, files)}
    adata.uns["sf_mlflow"] = uns
    return adata


def export_h5ad(run_id: str, output: str, tracking_uri: str | None = None,
                force: bool = False) -> Path:
    """Write :func:`to_anndata` of analyze run ``run_id`` (in the store ``tracking_uri``)
    to the ``.h5ad`` file ``output``.

    The file is written beside ``output`` under a temporary name and renamed only when
    complete (:func:`sf_mlflow.files.replacing`): a full disk or a crash leaves an existing
    ``output`` as it was and no half-written file. An existing ``output`` is replaced only
    with ``force``.
    """
    path = Path(output)
    if path.suffix != ".h5ad":
        raise DataError(f"output {output!r} must end in .h5ad, e.g. -o results.h5ad")
    if not path.parent.is_dir():
        raise DataError(f"output {output!r}: folder {str(path.parent)!r} does not exist; "
                        "create it first or choose another path")
    check_target(path, force=force, name="output")    # before minutes of reading, not after
    adata = to_anndata(run_id, tracking_uri)
    image = h5ad_image(adata)
    with replacing(path, force=force, expected_bytes=image.nbytes) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(image)
            fh.flush()
            os.fsync(fh.fileno())
    kind = adata.uns["sf_mlflow"]["model"]
    print(f"[export] wrote {path} ({adata.n_obs:,} spots x {adata.n_vars:,} genes, "
          f"{adata.obsm[f'X_{kind}'].shape[1]} {kind} factors in obsm['X_{kind}'], "
          f"{int((adata.obs['heldout'] == 'held-out').sum()):,} held-out spots in "
          "obs['heldout'])", flush=True)
    return path



def h5ad_image(adata) -> memoryview:
    """The bytes of ``adata`` as an ``.h5ad`` file, assembled in memory.

    HDF5 crashes the interpreter (a segmentation fault at exit, after pages of tracebacks)
    when the file it writes stops growing (a full disk, a quota); in memory it cannot, and
    the bytes then go to disk by plain file writes, whose failure is an ordinary OSError.
    The price is memory for one more copy of the file.
    """
    import h5py
    from anndata.io import write_elem

    adata.strings_to_categoricals()      # as AnnData.write_h5ad does
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        write_elem(f, "/", adata)
    return buffer.getbuffer()
