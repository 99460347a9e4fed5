"""Generated spatial count data with known factors and loadings.

The generative model mirrors the one the package fits, so recovery can be scored:

* spots lie in the unit square (uniform at random, or on a near-square grid);
* cell-type groups are spatially coherent patches (nearest of G random centres), with a
  fraction of spots relabelled at random so groups interleave at their borders as cell
  types do in tissue;
* for every factor l the log-factor is a smooth field shared by all groups, mixed with a
  group-specific smooth field for the spot's group,
  ``sqrt(1 - group_effect) * shared_l + sqrt(group_effect) * specific_{l,g}``;
  smooth fields are Gaussian-process samples with an RBF kernel, drawn with random Fourier
  features so generation costs O(N x features) rather than O(N^3);
* factors ``F = exp(log-factor)``; loadings ``W`` non-negative, each gene loading mainly on
  one factor (sometimes two) and with a gene-specific overall level;
* ``Y ~ Poisson(F W^T)``, scaled so the mean expected total count per spot is
  ``mean_counts``, drawn in row blocks straight into CSR so large N x D never materialises
  as a dense float64 matrix.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from sf_mlflow.config import SyntheticConfig
from sf_mlflow.data.counts import SpatialCounts
from sf_mlflow.errors import DataError

__all__ = ["make_synthetic", "synthetic_from_config"]

#: Random Fourier features per field. 512 keeps the sample close to a true RBF-GP draw
#: at the lengthscales used here (>= ~0.02 of the unit square) while staying cheap.
N_FEATURES = 512

#: Fraction of spots whose group label is redrawn uniformly, so groups are coherent
#: patches with some interleaving rather than perfectly clean Voronoi cells.
GROUP_MIXING = 0.1

#: Standard deviation of the log-factors; exp(+-2 sd) spans a ~50-fold range, about what
#: real spatial expression programmes show.
LOG_FACTOR_SD = 1.0

#: Target number of entries of each dense row block while sampling counts (~32 MB float64).
_BLOCK_ENTRIES = 4_000_000


def _coordinates(n: int, layout: str, rng: np.random.Generator) -> np.ndarray:
    """Spot positions in the unit square, ndarray (n, 2)."""
    if layout == "uniform":
        return rng.random((n, 2))
    if layout == "grid":
        nx = int(math.ceil(math.sqrt(n)))
        ny = int(math.ceil(n / nx))
        gx, gy = np.meshgrid(np.linspace(0.0, 1.0, nx), np.linspace(0.0, 1.0, ny))
        return np.column_stack([gx.ravel(), gy.ravel()])[:n].astype(np.float64)
    raise DataError(f"synthetic layout = {layout!r} is unknown; use 'uniform' or 'grid'")


def _groups(coords: np.ndarray, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Group codes 0..G-1, ndarray (N,) int64: nearest random centre, plus random relabelling."""
    n = coords.shape[0]
    if n_groups == 1:
        return np.zeros(n, dtype=np.int64)
    centres = rng.random((n_groups, 2))
    d2 = ((coords[:, None, :] - centres[None, :, :]) ** 2).sum(-1)  # (N, G), G is small
    codes = d2.argmin(axis=1).astype(np.int64)
    mix = rng.random(n) < GROUP_MIXING
    codes[mix] = rng.integers(0, n_groups, size=int(mix.sum()))
    return codes


def _log_factors(coords: np.ndarray, groups: np.ndarray, n_components: int, n_groups: int,
                 lengthscale: float, group_effect: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Smooth log-factor fields, ndarray (N, L).

    A GP with kernel exp(-|x - x'|^2 / (2 l^2)) has spectral density N(0, I / l^2); with
    frequencies omega_m from it and phases b_m ~ U(0, 2 pi), the features
    phi_m(x) = sqrt(2 / M) cos(omega_m . x + b_m) satisfy E[phi(x) . phi(x')] = k(x, x'),
    so phi(x) @ a with a ~ N(0, I) is an (approximate) unit-variance GP draw. All fields
    share the features but have independent weights, hence are independent draws.
    """
    n = coords.shape[0]
    L, G, M = n_components, n_groups, N_FEATURES
    omega = rng.normal(scale=1.0 / lengthscale, size=(2, M))
    phase = rng.uniform(0.0, 2.0 * np.pi, size=M)
    a_shared = rng.normal(size=(M, L))
    a_specific = rng.normal(size=(M, G * L))  # column g * L + l is the field of (l, g)
    w_shared = math.sqrt(1.0 - group_effect)
    w_specific = math.sqrt(group_effect)
    out = np.empty((n, L))
    block = max(1, _BLOCK_ENTRIES // (M + G * L))
    norm = math.sqrt(2.0 / M)
    for start in range(0, n, block):
        sl = slice(start, min(n, start + block))
        phi = np.cos(coords[sl] @ omega + phase) * norm  # (b, M)
        shared = phi @ a_shared  # (b, L)
        specific = (phi @ a_specific).reshape(-1, G, L)  # (b, G, L)
        own = specific[np.arange(specific.shape[0]), groups[sl]]  # (b, L)
        out[sl] = w_shared * shared + w_specific * own
    return LOG_FACTOR_SD * out


def _loadings(n_genes: int, n_components: int, rng: np.random.Generator) -> np.ndarray:
    """Non-negative gene loadings, ndarray (D, L), each gene dominated by one or two factors."""
    D, L = n_genes, n_components
    W = rng.gamma(0.3, 0.05, size=(D, L))  # weak background on every factor
    rows = np.arange(D)
    primary = rng.integers(0, L, size=D)
    W[rows, primary] += rng.gamma(4.0, 0.25, size=D)
    if L > 1:
        has_second = rng.random(D) < 0.5
        # shift by 1..L-1 so the secondary factor always differs from the primary one
        secondary = (primary + rng.integers(1, L, size=D)) % L
        W[rows[has_second], secondary[has_second]] += rng.uniform(0.3, 0.8, size=int(has_second.sum()))
    # gene-level abundance spans about two orders of magnitude, as in real data
    W *= rng.lognormal(mean=0.0, sigma=1.0, size=(D, 1))
    return W


def _poisson_csr(F: np.ndarray, W: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Y ~ Poisson(F W^T) as CSR (N, D) float64, drawn one dense row block at a time."""
    n, d = F.shape[0], W.shape[0]
    block = max(1, _BLOCK_ENTRIES // max(d, 1))
    data, indices, row_nnz = [], [], []
    Wt = np.ascontiguousarray(W.T)
    for start in range(0, n, block):
        stop = min(n, start + block)
        y = rng.poisson(F[start:stop] @ Wt)  # (b, D) int64
        r, c = np.nonzero(y)  # row-major order, which is what CSR needs
        data.append(y[r, c].astype(np.float64))
        indices.append(c.astype(np.int32))
        row_nnz.append(np.bincount(r, minlength=stop - start))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(row_nnz))]).astype(np.int64)
    Y = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=(n, d))
    return Y


def make_synthetic(n_spots: int = 2000, n_genes: int = 300, n_components: int = 5,
                   n_groups: int = 3, lengthscale: float = 0.15, group_effect: float = 0.5,
                   mean_counts: float = 300.0, layout: str = "uniform",
                   seed: int = 0) -> SpatialCounts:
    """Generate spatial counts from a known multi-group spatial factor model.

    Parameters
    ----------
    n_spots : int
        Number of spots N.
    n_genes : int
        Number of genes D.
    n_components : int
        Number of true factors L.
    n_groups : int
        Number of groups G (1 = no group structure, every spot in group 0).
    lengthscale : float
        RBF lengthscale of the smooth log-factor fields, in units of the unit square.
    group_effect : float
        Weight in [0, 1] of the group-specific field: 0 = one pattern per factor shared
        by all groups, 1 = independent patterns per group.
    mean_counts : float
        Expected total count per spot, averaged over spots.
    layout : {"uniform", "grid"}
        Uniform random positions, or the first N points of a near-square grid.
    seed : int
        Seed of the ``numpy.random.Generator``; equal seeds give identical data.

    Returns
    -------
    SpatialCounts
        ``counts`` CSR (N, D) float64 of integer values; ``coordinates`` (N, 2) in
        [0, 1]^2; ``groups`` (N,) int64 codes with names ``"group0"..``; ``truth`` =
        ``{"factors": (N, L), "log_factors": (N, L), "loadings": (D, L)}`` with
        ``E[Y] = factors @ loadings.T`` exactly (the scale split between the two is
        arbitrary, so compare up to scale, e.g. by correlation).
    """
    if not 0.0 <= group_effect <= 1.0:
        raise DataError(f"synthetic group_effect = {group_effect!r} must lie in [0, 1]")
    for name, value in (("n_spots", n_spots), ("n_genes", n_genes),
                        ("n_components", n_components), ("n_groups", n_groups)):
        if int(value) < 1:
            raise DataError(f"synthetic {name} = {value!r} must be at least 1")
    if not lengthscale > 0 or not mean_counts > 0:
        raise DataError(f"synthetic lengthscale = {lengthscale!r} and mean_counts = "
                        f"{mean_counts!r} must both be positive")
    n_spots, n_genes, n_components, n_groups = (int(n_spots), int(n_genes),
                                                int(n_components), int(n_groups))
    rng = np.random.default_rng(seed)
    coords = _coordinates(n_spots, layout, rng)
    groups = _groups(coords, n_groups, rng)
    log_f = _log_factors(coords, groups, n_components, n_groups, lengthscale, group_effect, rng)
    F = np.exp(log_f)
    W = _loadings(n_genes, n_components, rng)
    # expected spot totals are F @ W.sum(0); one global factor keeps the low-rank truth exact
    W *= mean_counts / float(np.mean(F @ W.sum(axis=0)))
    Y = _poisson_csr(F, W, rng)
    return SpatialCounts(
        counts=Y,
        coordinates=coords,
        gene_names=np.array([f"gene{j}" for j in range(n_genes)], dtype=object),
        spot_names=np.array([f"spot{i}" for i in range(n_spots)], dtype=object),
        groups=groups,
        group_names=[f"group{g}" for g in range(n_groups)],
        truth={"factors": F, "log_factors": log_f, "loadings": W},
        counts_source="generated",
    )


def synthetic_from_config(cfg: SyntheticConfig, seed: int) -> SpatialCounts:
    """:func:`make_synthetic` with the settings of a :class:`SyntheticConfig`."""
    return make_synthetic(
        n_spots=cfg.n_spots, n_genes=cfg.n_genes, n_components=cfg.n_components,
        n_groups=cfg.n_groups, lengthscale=cfg.lengthscale, group_effect=cfg.group_effect,
        mean_counts=cfg.mean_counts, layout=cfg.layout, seed=seed)
