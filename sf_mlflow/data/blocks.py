"""Row blocks of a sparse count matrix, so that temporaries stay bounded at any N.

Deviances, reconstruction error and the loading refits all evaluate something at the
non-zeros of Y; done for all N spots at once that is several (nnz,)-sized arrays (about
10^8 entries for 10^6 spots). They walk Y in row blocks of a bounded number of entries
instead, and need the row of every stored entry of a block.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import scipy.sparse as sp

__all__ = ["row_blocks", "nonzero_rows"]


def row_blocks(n_rows: int, per_row: float, entries: int = 2_000_000) -> Iterator[slice]:
    """Row slices of about ``entries`` entries each, for rows of ``per_row`` entries on
    average (at least one row per slice)."""
    step = max(1, int(entries // max(per_row, 1.0)))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def nonzero_rows(Y: sp.csr_matrix) -> np.ndarray:
    """The row of every stored entry of ``Y``, (nnz,), in storage order."""
    return np.repeat(np.arange(Y.shape[0]), np.diff(Y.indptr))
