"""The in-memory form of a spatial-transcriptomics data set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import scipy.sparse as sp

from sf_mlflow.errors import DataError


#: Truth arrays indexed by spot (rows) and by gene (rows), subset alongside the counts.
_SPOT_TRUTH = {"factors", "log_factors"}
_GENE_TRUTH = {"loadings"}


@dataclass
class SpatialCounts:
    """Counts, coordinates and optional cell-type groups of N spots and D genes.

    Attributes
    ----------
    counts : scipy.sparse.csr_matrix, (N, D)
        Raw non-negative integer counts (UMIs or molecules), spots in rows. The loaders
        of this package store them as float64 holding integer values.
    coordinates : ndarray, (N, 2), float64
        Spot positions.
    gene_names : ndarray of str, (D,)
    spot_names : ndarray of str, (N,)
    groups : ndarray of int64, (N,), optional
        Group code of every spot, in ``0..G-1``; ``None`` when the data have no groups.
    group_names : list of str, (G,), optional
        Label of each group code.
    truth : dict, optional
        For generated data only: ``{"factors": (N, L), "log_factors": (N, L),
        "loadings": (D, L)}`` and any other known quantities, so tests and benchmarks can score recovery.
    counts_source : str, optional
        Which matrix of the source file the counts came from (e.g. ``"adata.raw"``, ``"X"``),
        recorded by the loaders so a run shows which counts it used.
    """

    counts: sp.csr_matrix
    coordinates: np.ndarray
    gene_names: np.ndarray
    spot_names: np.ndarray
    groups: Optional[np.ndarray] = None
    group_names: Optional[list[str]] = None
    truth: Optional[dict[str, Any]] = field(default=None, repr=False)
    counts_source: Optional[str] = None

    @property
    def n_spots(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    @property
    def n_groups(self) -> int:
        return 0 if self.group_names is None else len(self.group_names)

    def validate(self, source: str = "data") -> "SpatialCounts":
        """Check shapes and values; raise :class:`DataError` naming ``source`` on a problem.

        Counts in another sparse format are converted to CSR in place, since every consumer
        slices rows.
        """
        Y = self.counts
        if not sp.issparse(Y):
            raise DataError(f"{source}: counts must be a scipy sparse matrix, got {type(Y).__name__}")
        if Y.format != "csr":
            Y = self.counts = Y.tocsr()
        n, d = Y.shape
        if n == 0 or d == 0:
            raise DataError(f"{source}: the count matrix is empty ({n} spots x {d} genes); "
                            "check that the file holds data")
        if len(self.gene_names) != d:
            raise DataError(f"{source}: {len(self.gene_names)} gene names for {d} genes")
        if len(self.spot_names) != n:
            raise DataError(f"{source}: {len(self.spot_names)} spot names for {n} spots")
        for what, names in (("gene", self.gene_names), ("spot", self.spot_names)):
            repeats = repeated_names(names)
            if repeats:
                shown = ", ".join(f"{name!r} x{k}" for name, k in repeats[:5])
                more = f" and {len(repeats) - 5} more" if len(repeats) > 5 else ""
                raise DataError(
                    f"{source}: {len(repeats)} {what} names occur more than once ({shown}{more}); "
                    f"a model would mix their {'loadings' if what == 'gene' else 'factors'} up. "
                    "Set data.make_unique: true to append -1, -2, ... to the repeats (as "
                    "anndata's make_unique does), or rename them in the file")
        vals = Y.data
        if vals.size:
            bad = ~np.isfinite(vals)
            if bad.any():
                raise DataError(f"{source}: counts contain {int(bad.sum())} NaN or infinite values "
                                f"({self._where(bad)}); raw integer counts are required")
            bad = vals < 0
            if bad.any():
                raise DataError(f"{source}: counts contain {int(bad.sum())} negative values "
                                f"(minimum {vals.min():g}; {self._where(bad)}); raw non-negative "
                                "integer counts are required (use data.layer to pick a raw-count layer)")
            bad = vals != np.round(vals)
            if bad.any():
                raise DataError(f"{source}: counts contain {int(bad.sum())} non-integer values "
                                f"({self._where(bad)}); pass raw counts, not normalised or "
                                "log-transformed data (use data.layer to pick a raw-count layer)")
        X = self.coordinates
        if X.ndim != 2 or X.shape != (n, 2):
            raise DataError(f"{source}: coordinates must have shape ({n}, 2), got {X.shape} "
                            "(check data.coordinates_key)")
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{source}: {int(bad.sum())} spots have NaN or infinite coordinates "
                            f"(first: spot {self.spot_names[i]!r} at {X[i].tolist()}); remove "
                            "those spots from the file first")
        if self.groups is not None:
            g = self.groups
            if g.shape != (n,):
                raise DataError(f"{source}: groups must have shape ({n},), got {g.shape}")
            if self.group_names is None or (g.size and (g.min() < 0 or g.max() >= len(self.group_names))):
                raise DataError(f"{source}: group codes must lie in 0..{self.n_groups - 1}, got "
                                f"{g.min() if g.size else None}..{g.max() if g.size else None}")
        return self

    def _where(self, bad: np.ndarray) -> str:
        """Describe the first flagged stored entry of the CSR counts, e.g. "first: spot 's1', gene 'g2' = -1"."""
        k = int(np.flatnonzero(bad)[0])
        Y = self.counts
        row = int(np.searchsorted(Y.indptr, k, side="right") - 1)
        col = int(Y.indices[k])
        return (f"first: spot {self.spot_names[row]!r}, gene {self.gene_names[col]!r} "
                f"= {Y.data[k]:g}")

    def made_unique(self) -> tuple["SpatialCounts", int, int]:
        """A copy whose repeated gene and spot names get ``-1``, ``-2``, ... appended (the first
        of each keeps its name), with the numbers of genes and of spots renamed."""
        genes, n_genes = unique_names(self.gene_names)
        spots, n_spots = unique_names(self.spot_names)
        out = SpatialCounts(**{**self.__dict__, "gene_names": genes, "spot_names": spots})
        return out, n_genes, n_spots

    def subset(self, spots: np.ndarray | None = None, genes: np.ndarray | None = None) -> "SpatialCounts":
        """A copy restricted to the given spot and gene indices (or boolean masks).

        Groups keep their codes and names (a group may become empty); truth arrays are
        subset alongside.
        """
        spots = np.arange(self.n_spots) if spots is None else np.asarray(spots)
        genes = np.arange(self.n_genes) if genes is None else np.asarray(genes)
        if spots.dtype == bool:
            spots = np.flatnonzero(spots)
        if genes.dtype == bool:
            genes = np.flatnonzero(genes)
        truth = None
        if self.truth is not None:
            truth = dict(self.truth)
            for key in _SPOT_TRUTH & truth.keys():
                truth[key] = truth[key][spots]
            for key in _GENE_TRUTH & truth.keys():
                truth[key] = truth[key][genes]
        return SpatialCounts(
            counts=self.counts[spots][:, genes].tocsr(),
            coordinates=self.coordinates[spots],
            gene_names=self.gene_names[genes],
            spot_names=self.spot_names[spots],
            groups=None if self.groups is None else self.groups[spots],
            group_names=self.group_names,
            truth=truth,
            counts_source=self.counts_source,
        )


def repeated_names(names) -> list[tuple[str, int]]:
    """Each name that occurs more than once, with its count, in order of first occurrence."""
    values, first, counts = np.unique(np.asarray(names).astype(str), return_index=True,
                                      return_counts=True)
    order = np.argsort(first[counts > 1], kind="stable")
    return [(str(v), int(k)) for v, k in zip(values[counts > 1][order], counts[counts > 1][order])]


def unique_names(names) -> tuple[np.ndarray, int]:
    """``names`` (D,) with ``-1``, ``-2``, ... appended to the second, third, ... occurrence of a
    name (skipping suffixes that are names already), and how many were renamed.

    The rule of anndata's ``var_names_make_unique`` (separator ``-``), so names agree with a
    file the user made unique there.
    """
    names = [str(x) for x in np.asarray(names, dtype=object).ravel()]
    taken = set(names)
    seen: dict[str, int] = {}
    out, renamed = [], 0
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        if k == 0:
            out.append(name)
            continue
        new = f"{name}-{k}"
        while new in taken:
            k += 1
            new = f"{name}-{k}"
        seen[name] = k + 1
        taken.add(new)
        out.append(new)
        renamed += 1
    return np.asarray(out, dtype=object), renamed
