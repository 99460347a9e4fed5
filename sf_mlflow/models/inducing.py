"""Choosing the inducing points of the sparse GP: k-means centroids, shared among groups.

For a multi-group kernel every inducing point carries a group, and the number of points
per group is set by an allocation rule:

* ``proportional``: ``M * n_g / N`` points for group g (``n_g`` its spots);
* ``equal``: ``M / G`` points per group;
* ``derived``: k-means on all spots; each centroid takes the majority group of the spots
  nearest to it (its k-means cluster), and groups left without a point take one over
  from a group that has several.

For the first two, the integer parts of the quotas are allocated first and the remainder
one point at a time to the largest remaining fractional parts (ties: larger group, then
lower code), never giving a group more points than it has distinct spot locations; what a
cap withholds goes round the uncapped groups the same way. A group whose quota rounds to
zero gets no point (e.g. a group of 5 spots among 40,000 with M = 3,000): the multi-group
kernel then informs it only through the cross-group covariance.

Centroids come from scikit-learn's k-means (Lloyd iterations on all the group's spots),
seeded by k-means++ on a subsample of at most ``max(10,000, 3 M_g)`` spots: k-means++ on
all of N = 41,786 spots with M = 3,000 costs several times more than the Lloyd iterations
and gains nothing measurable for inducing points.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import torch

from sf_mlflow.errors import ModelError

__all__ = ["select_inducing_points", "allocate_counts", "auto_num_inducing", "place_inducing",
           "group_parts", "occupied_cells", "ALLOCATIONS",
           "AUTO_MAX", "AUTO_MAX_CPU", "AUTO_MIN", "AUTO_SPOTS_PER_POINT", "auto_max"]

#: Accepted values of ``allocation``.
ALLOCATIONS = ("proportional", "equal", "derived")

#: Maximum Lloyd iterations; k-means on spot coordinates converges in ~10-30.
_MAX_ITER = 100

#: Minimum size of the subsample the k-means++ initialisation runs on.
_INIT_SUBSAMPLE = 10_000


#: ``num_inducing: auto`` without a lengthscale: one inducing point per this many distinct
#: spot locations, at least AUTO_MIN (and never more than the locations), at most AUTO_MAX.
AUTO_SPOTS_PER_POINT = 10
AUTO_MIN = 100
AUTO_MAX = 3000
#: The cap of ``num_inducing: auto`` on a CPU: a natural-gradient step costs O(L M^3 + L M^2 B),
#: about 1.5 s per iteration at L = 10, M = 1000 on two cores against 5-6 s at M = 1400;
#: a number given in the config is used as it is, on any device.
AUTO_MAX_CPU = 1000


def auto_max(device) -> int:
    """The cap of ``num_inducing: auto`` on ``device`` (a torch device or its type string)."""
    kind = getattr(device, "type", str(device))
    return AUTO_MAX_CPU if kind == "cpu" else AUTO_MAX

#: With a lengthscale, ``num_inducing: auto`` gives at most one inducing point per this many
#: distinct locations (a sparse GP with M near N costs more than it saves).
AUTO_SPOTS_PER_LENGTHSCALE_POINT = 4


def occupied_cells(coordinates: np.ndarray, lengthscale: float) -> int:
    """How many squares of side ``lengthscale`` (on a grid anchored at the minimum) hold at
    least one of the spots ``coordinates: (N, 2)``."""
    X = np.asarray(coordinates, dtype=np.float64)
    if X.shape[0] == 0:
        return 0
    cells = np.floor((X - X.min(axis=0)) / float(lengthscale)).astype(np.int64)
    return int(np.unique(cells, axis=0).shape[0])


def group_parts(coordinates: np.ndarray, groups: Optional[np.ndarray]) -> list[np.ndarray]:
    """The spots ``coordinates: (N, 2)`` split by group code ``groups: (N,)`` (one part
    without groups), in the order of the sorted codes."""
    X = np.asarray(coordinates, dtype=np.float64)
    if groups is None:
        return [X]
    g = np.asarray(groups)
    return [X[g == c] for c in np.unique(g)]


def auto_num_inducing(coordinates: np.ndarray, groups: Optional[np.ndarray] = None,
                      lengthscale: Optional[float] = None, *, explain: bool = False,
                      max_points: int = AUTO_MAX):
    """M for ``num_inducing = "auto"``.

    With a ``lengthscale``: inducing points about one lengthscale apart wherever there are
    spots, i.e. one per lengthscale-wide square the spots occupy; with ``groups (N,)`` the
    squares are counted per group and summed, since the multi-group kernel needs each group's
    field resolved where that group has spots. Clipped to ``[AUTO_MIN, AUTO_MAX]`` and to the
    distinct locations (of each group). Without a lengthscale (a fixed-size rule for callers
    that have none): a tenth of the distinct locations, ``min(AUTO_MAX, n, max(AUTO_MIN, n //
    10))``. ``max_points`` replaces AUTO_MAX (:func:`auto_max`: less on a CPU).

    ``coordinates: (N, 2)``. Returns M, or with ``explain`` ``(M, reason)`` where the reason
    says how M came about and whether the cap bound.
    """
    X = np.asarray(coordinates, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 2 or X.shape[0] < 1:
        raise ModelError(f"coordinates must have shape (N, 2) with N >= 1, got {X.shape}")
    max_points = max(int(max_points), AUTO_MIN)
    if lengthscale is None:
        n = int(np.unique(X, axis=0).shape[0])
        M = int(min(max_points, n, max(AUTO_MIN, n // AUTO_SPOTS_PER_POINT)))
        why = f"a tenth of the {n} distinct spot locations, within [{AUTO_MIN}, {max_points}]"
        return (M, why) if explain else M
    if not (np.isfinite(lengthscale) and lengthscale > 0):
        raise ModelError(f"lengthscale = {lengthscale!r} must be a positive number")
    parts = group_parts(X, groups)
    cells = sum(occupied_cells(part, lengthscale) for part in parts)
    distinct = sum(int(np.unique(part, axis=0).shape[0]) for part in parts)
    M = int(min(max(cells, AUTO_MIN), max_points, distinct,
                max(AUTO_MIN, distinct // AUTO_SPOTS_PER_LENGTHSCALE_POINT)))
    per = "" if groups is None else f" per group ({len(parts)} groups)"
    why = f"{cells} squares of side {lengthscale:.3g}, the shortest lengthscale, hold spots{per}"
    if M == max_points and cells > max_points:
        where = " on a CPU (3000 on a GPU)" if max_points == AUTO_MAX_CPU else ""
        why += (f"; capped at {max_points}{where}, so the inducing points are about "
                f"{lengthscale * math.sqrt(cells / max_points):.3g} apart (set model.num_inducing "
                f"to use more)")
    elif M < cells:
        why += (f"; capped at a {AUTO_SPOTS_PER_LENGTHSCALE_POINT}th of the {distinct} distinct spot "
                f"locations (so many inducing points would cost more than the exact GP saves)")
    elif M == AUTO_MIN and cells < AUTO_MIN:
        why += f"; raised to the minimum {AUTO_MIN}"
    return (M, why) if explain else M


def allocate_counts(quotas: np.ndarray, caps: np.ndarray, total: int) -> np.ndarray:
    """Integer counts (G,) summing to ``total`` that follow real ``quotas`` (G,), each <= ``caps``.

    Integer parts first (capped), then one point at a time to the groups whose quota
    exceeds their count the most (ties: larger cap, then lower index), skipping full groups.
    Requires ``caps.sum() >= total``.
    """
    quotas = np.asarray(quotas, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    if caps.sum() < total:
        raise ModelError(f"cannot place {total} inducing points in groups of at most "
                         f"{caps.tolist()} distinct locations")
    counts = np.minimum(np.floor(quotas + 1e-9).astype(np.int64), caps)
    remaining = total - int(counts.sum())
    while remaining > 0:
        open_ = np.flatnonzero(counts < caps)
        # lexsort sorts by the last key first: largest shortfall, then largest cap, then index
        order = open_[np.lexsort((open_, -caps[open_], -(quotas[open_] - counts[open_])))]
        take = order[:remaining]
        counts[take] += 1
        remaining -= take.size
    return counts


def _kmeans(X: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (k, 2) and labels (n,) of k-means on distinct points ``X: (n, 2)``, k <= n."""
    n = X.shape[0]
    if k == n:
        return X.copy(), np.arange(n)
    from sklearn.cluster import KMeans, kmeans_plusplus

    rng = np.random.default_rng(seed)
    n_init = min(n, max(_INIT_SUBSAMPLE, 3 * k))
    sub = X if n_init == n else X[rng.choice(n, n_init, replace=False)]
    init, _ = kmeans_plusplus(sub, k, random_state=seed)
    with warnings.catch_warnings():
        # Clusters that empty out are re-seeded by sklearn; its warning says nothing actionable.
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=_MAX_ITER, random_state=seed).fit(X)
    return km.cluster_centers_, km.labels_


def _check_inputs(coordinates, groups, num_inducing, allocation):
    X = np.asarray(coordinates, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 2:
        raise ModelError(f"coordinates must have shape (N, 2), got {X.shape}")
    if not np.isfinite(X).all():
        raise ModelError("coordinates contain NaN or infinite values")
    if isinstance(num_inducing, bool) or int(num_inducing) != num_inducing or num_inducing < 1:
        raise ModelError(f"num_inducing = {num_inducing!r} must be a positive integer")
    if allocation not in ALLOCATIONS:
        raise ModelError(f"inducing allocation = {allocation!r} is unknown; expected one of "
                         f"{', '.join(ALLOCATIONS)}")
    g = None
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (X.shape[0],):
            raise ModelError(f"groups must have shape (N,) = ({X.shape[0]},), got {g.shape}")
        if not np.issubdtype(g.dtype, np.integer):
            raise ModelError(f"groups must be integer codes, got dtype {g.dtype}")
        g = g.astype(np.int64)
    return X, g, int(num_inducing)


def select_inducing_points(coordinates: np.ndarray, groups: Optional[np.ndarray], num_inducing: int,
                           allocation: str = "proportional", seed: int = 0
                           ) -> tuple[np.ndarray, np.ndarray]:
    """k-means inducing points and their groups.

    Parameters
    ----------
    coordinates : ndarray, (N, 2)
        Spot coordinates.
    groups : ndarray of int, (N,), or None
        Group code of every spot; None puts every point in group 0.
    num_inducing : int
        M, at most the number of distinct spot locations.
    allocation : {"proportional", "equal", "derived"}
        How the M points are shared among groups (see the module docstring).
    seed : int
        Seed of the k-means initialisation; equal seeds give identical points.

    Returns
    -------
    Z : ndarray float64, (M, 2)
        Inducing locations, ordered by group.
    g_Z : ndarray int64, (M,)
        Their group codes.

    Raises
    ------
    ModelError
        When M exceeds the number of distinct spot locations (overall, or for ``equal``/
        ``proportional`` the total the groups can hold), or for ``derived`` when M is
        smaller than the number of non-empty groups. The message names M, N and the
        group sizes.
    """
    X, g, M = _check_inputs(coordinates, groups, num_inducing, allocation)
    N = X.shape[0]
    if g is None:
        distinct = np.unique(X, axis=0)
        if M > distinct.shape[0]:
            raise ModelError(f"num_inducing = {M} exceeds the number of distinct spot locations "
                             f"({distinct.shape[0]} among N = {N} spots); use num_inducing <= "
                             f"{distinct.shape[0]}")
        Z, _ = _kmeans(distinct, M, seed)
        return Z, np.zeros(M, dtype=np.int64)

    codes, sizes = np.unique(g, return_counts=True)
    per_group = [np.unique(X[g == c], axis=0) for c in codes]  # distinct locations per group
    caps = np.array([p.shape[0] for p in per_group], dtype=np.int64)
    described = ", ".join(f"{c}: {s}" for c, s in zip(codes.tolist(), sizes.tolist()))
    if allocation == "derived":
        return _derived(X, g, codes, M, seed, described)

    if M > caps.sum():
        raise ModelError(f"num_inducing = {M} exceeds the number of distinct spot locations "
                         f"within groups ({int(caps.sum())} among N = {N} spots; group sizes "
                         f"{{{described}}})")
    if allocation == "proportional":
        quotas = M * sizes / N
    else:
        quotas = np.full(codes.shape[0], M / codes.shape[0])
    counts = allocate_counts(quotas, caps, M)
    Zs, gs = [], []
    for i, (c, pts, k) in enumerate(zip(codes, per_group, counts)):
        if k == 0:
            continue
        Zc, _ = _kmeans(pts, int(k), seed + i)
        Zs.append(Zc)
        gs.append(np.full(int(k), c, dtype=np.int64))
    return np.concatenate(Zs), np.concatenate(gs)


def _derived(X: np.ndarray, g: np.ndarray, codes: np.ndarray, M: int, seed: int,
             described: str) -> tuple[np.ndarray, np.ndarray]:
    """k-means on all spots; each centroid's group is its cluster's majority group."""
    N, G = X.shape[0], codes.shape[0]
    distinct, inverse = np.unique(X, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if M > distinct.shape[0]:
        raise ModelError(f"num_inducing = {M} exceeds the number of distinct spot locations "
                         f"({distinct.shape[0]} among N = {N} spots; group sizes {{{described}}})")
    if M < G:
        raise ModelError(f"inducing allocation 'derived' gives every group at least one point, "
                         f"so num_inducing = {M} must be >= the number of groups G = {G} "
                         f"(group sizes {{{described}}})")
    Z, labels_distinct = _kmeans(distinct, M, seed)
    labels = labels_distinct[inverse]  # cluster of every spot, duplicates included
    gi = np.searchsorted(codes, g)  # group index 0..G-1 of every spot
    votes = np.zeros((M, G), dtype=np.int64)
    np.add.at(votes, (labels, gi), 1)
    owner = votes.argmax(axis=1)  # majority group; ties go to the lower code
    # A group that wins no cluster takes the centroid where it has the most spots, among
    # centroids whose group keeps another point; processed largest group first.
    for j in np.argsort(-votes.sum(axis=0), kind="stable"):
        if (owner == j).any():
            continue
        held = np.bincount(owner, minlength=G)
        donors = np.flatnonzero(held[owner] > 1)
        if votes[donors, j].max() > 0:
            best = donors[np.argmax(votes[donors, j])]
        else:  # none of its spots is in a donor's cluster: take the donor closest to one of them
            pts = X[gi == j]
            d2 = ((Z[donors, None, :] - pts[None, :, :]) ** 2).sum(-1).min(axis=1)
            best = donors[np.argmin(d2)]
        owner[best] = j
    order = np.argsort(owner, kind="stable")
    return Z[order], codes[owner[order]]


def place_inducing(coordinates, groups, num_inducing, allocation, seed,
                   inducing_points=None, inducing_groups=None):
    """Inducing points Z (M, 2) and their groups (M,) as CPU tensors: the given ones, checked,
    or :func:`select_inducing_points` on the spots (coordinates (N, 2), groups (N,) or None)."""
    if inducing_points is not None:
        Z = torch.as_tensor(inducing_points).detach()
        if Z.dim() != 2 or Z.shape[1] != 2 or Z.shape[0] < 1:
            raise ModelError(f"inducing_points must have shape (M, 2) with M >= 1, got "
                             f"{tuple(Z.shape)}")
        if inducing_groups is None:
            gZ = torch.zeros(Z.shape[0], dtype=torch.int64)
        else:
            gZ = torch.as_tensor(inducing_groups).detach()
            if gZ.shape != (Z.shape[0],) or gZ.is_floating_point():
                raise ModelError(f"inducing_groups must be integer codes of shape (M,) = "
                                 f"({Z.shape[0]},), got {tuple(gZ.shape)} {gZ.dtype}")
            if groups is None and torch.unique(gZ).numel() > 1:
                raise ModelError("inducing_groups holds several groups but groups = None asks for "
                                 "a single-group kernel; pass the spots' groups to load a "
                                 "multi-group model")
        return Z.cpu(), gZ.cpu().long()
    Zn, gn = select_inducing_points(
        coordinates.detach().cpu().double().numpy(),
        None if groups is None else groups.detach().cpu().numpy(),
        num_inducing, allocation, seed)
    return torch.from_numpy(Zn), torch.from_numpy(gn)
