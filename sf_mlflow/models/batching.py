"""Mini-batches of spots and genes: an endless, resumable stream of index batches."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["IndexStream", "literal_state"]


def literal_state(text: str) -> dict:
    """Parse a numpy bit-generator state saved with ``repr`` (a dict of str and int)."""
    import ast

    return ast.literal_eval(text)


class IndexStream:
    """Endless stream of index batches covering 0..n-1 once per epoch, with savable state.

    Batches of one epoch differ in size by at most one (``array_split``), so every
    batch of a shuffled epoch is a uniformly random subset and the N/B scaling
    keeps the ELBO estimate unbiased. The state (the current epoch's order and the
    position in it) is saved in checkpoints so a resumed fit draws the same batches.
    """

    def __init__(self, n: int, size: Optional[int], shuffle: bool, rng: np.random.Generator):
        self.n, self.shuffle, self.rng = n, shuffle, rng
        self.full = size is None or size >= n
        self.n_batches = 1 if self.full else -(-n // size)
        self.order: Optional[np.ndarray] = None
        self.pos = self.n_batches   # forces a new epoch on the first draw

    def __iter__(self) -> "IndexStream":
        return self

    def __next__(self) -> np.ndarray:
        if self.full:
            return np.arange(self.n)
        if self.pos >= self.n_batches:
            self.order = self.rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self.pos = 0
        part = np.array_split(self.order, self.n_batches)[self.pos]
        self.pos += 1
        return np.sort(part)   # sorted indices make the CSR row gather contiguous-ish

    def state_dict(self) -> dict:
        return {"order": None if self.order is None else torch.tensor(self.order),
                "pos": int(self.pos)}

    def load_state_dict(self, state: dict) -> None:
        self.order = None if state["order"] is None else state["order"].numpy()
        self.pos = int(state["pos"])
