"""Overlap ratio of all fragment pairs of a scene, exactly as the original PointContrast lists.

Definition (DESIGN.md section 6): both fragments are voxel-downsampled to 5 cm (centroid per
voxel, the grid anchored half a voxel below the cloud's minimum, as open3d's
``voxel_down_sample``); for each direction, the fraction of one cloud's points that have a point
of the other within 7.5 cm; the ratio is the larger of the two directions.

The published implementation asks a KD-tree for each point of each cloud against every other
cloud, in Python: O(F^2 N) interpreted queries. Here the cost follows the pairs that overlap:

1. *coarse cells* of edge ``radius``: a point can only match points in its 27 neighbouring
   cells. A sparse (fragment x cell) occupancy product finds the pairs sharing any
   neighbourhood; every other pair has overlap exactly 0 and costs nothing more;
2. for a candidate pair, only points whose coarse neighbourhood holds the other cloud can
   match (hash lookups, vectorised);
3. of those, a point matches for sure when the other cloud occupies a *fine cell* (edge
   ``radius / 5``, or ``radius / 4`` on large grids) of its "sure" stencil: the 171 (57) cells
   whose every point is within ``radius`` of every point of its own cell;
4. the rest are answered exactly by one batched KD-tree query per fragment.

Membership tests are gathers from a reusable bitmap (over the grid's keys when it is small,
else over its occupied cells), and all candidate partners of a fragment are processed in one
vectorised batch. Every index is int64: scipy's int32 indices are widened before arithmetic.

:func:`verify_overlap` recomputes a sample of pairs by the definition (:func:`direct_overlap`,
brute-force nearest neighbours); pair prep runs it on every scene and fails the scene on any
difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

VOXEL_SIZE = 0.05  # m, downsampling before the overlap test
RADIUS_FACTOR = 1.5  # neighbour radius in voxels (7.5 cm)
SELF_CHECK_TOL = 1e-6  # largest fast-vs-direct overlap difference the self-check accepts


def voxel_downsample(points: np.ndarray, voxel_size: float = VOXEL_SIZE) -> np.ndarray:
    """Centroid per occupied voxel, (M, 3) float64: open3d's ``voxel_down_sample``, which *is*
    the definition the original pair lists were computed with (grid anchored half a voxel
    below the cloud's minimum)."""
    import open3d as o3d

    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {p.shape}")
    if len(p) == 0:
        return p.reshape(0, 3)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(p))
    return np.asarray(pcd.voxel_down_sample(voxel_size).points)


def _stencil(k: int) -> np.ndarray:
    """Offsets d of the cells (edge r/k) lying entirely within r of every point of cell 0:
    max distance between the two cells = (r/k) * ||(|d| + 1)|| <= r."""
    g = np.arange(-k, k + 1)
    d = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return d[((np.abs(d) + 1) ** 2).sum(axis=1) <= k * k]


_NEAR = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
# Fine cells of edge r/k; the sure stencil has 171 cells at k = 5, 57 at k = 4. Measured: on the
# 100 real 7-Scenes frames (a small grid, bitmap over keys) k = 5 needs 19% fewer KD-tree queries
# and is 5% faster; on a 200-fragment scene over 100 m (bitmap over occupied cells, a lookup per
# stencil cell) it is 40% slower. So k = 5 where the fine grid fits a key bitmap, else k = 4.
FINE_DIVISIONS = (5, 4)
_MAX_DENSE_CELLS = 1 << 26  # up to this a cell set is a bitmap over the keys (64 MB)
_MAX_KEY = 1 << 62  # packed int64 cell keys (plus stencil offsets) stay below 2^63


class OverlapExtentError(ValueError):
    """The scene is too large to index its cells with int64 keys (absurd poses or outliers)."""


class _Grid:
    """Cells of one edge length over all clouds: int64 keys packed from the (x, y, z) cell
    indices, also renumbered ``0..U-1`` over the *occupied* cells, and one reusable membership
    set (reset cell by cell, never cleared wholesale): a bitmap over the keys when the grid is
    small enough (no lookups), else a bitmap over the occupied ids, whose size is at most the
    number of points however far the scene extends (outliers at 65 m)."""

    def __init__(self, points: np.ndarray, edge: float, reach: int, by_key: bool = True):
        cells = np.floor(points / edge).astype(np.int64)  # (P, 3) int64
        lo = cells.min(axis=0) - reach  # margins: a stencil of this reach stays inside
        self.ext = (cells.max(axis=0) - lo + reach + 1).astype(np.int64)  # (3,) int64
        size = math.prod(int(e) for e in self.ext)  # exact: Python ints do not wrap
        if size >= _MAX_KEY:
            span = points.max(axis=0) - points.min(axis=0)
            raise OverlapExtentError(
                f"the scene spans {span[0]:.4g} m x {span[1]:.4g} m x {span[2]:.4g} m: "
                f"{size:.3g} cells of {edge:.4g} m, more than int64 cell keys can index "
                f"(2^62); a frame has an absurd pose or far outlier points (drop them with "
                f"--max-depth or --invalid-depth, or use a larger voxel size)")
        c = cells - lo  # (P, 3) int64, >= 0
        self.keys = (c[:, 0] * self.ext[1] + c[:, 1]) * self.ext[2] + c[:, 2]  # (P,) int64
        self.cells, self.id = np.unique(self.keys, return_inverse=True)  # (U,) sorted, (P,)
        self.id = self.id.astype(np.int64).reshape(-1)
        self.dense = by_key and size <= _MAX_DENSE_CELLS  # membership by key (no lookups)
        self._by_key = np.zeros(size, bool) if self.dense else None
        self._by_id = np.zeros(len(self.cells), bool)
        self._marked_keys = self._marked_ids = np.zeros(0, np.int64)

    def offsets(self, stencil: np.ndarray) -> np.ndarray:
        """(S,) int64 key offsets of a stencil of cell offsets (S, 3)."""
        d = stencil.astype(np.int64)
        return (d[:, 0] * self.ext[1] + d[:, 1]) * self.ext[2] + d[:, 2]

    def occupied(self, keys: np.ndarray) -> np.ndarray:
        """Ids of those of ``keys`` (int64) that some point occupies; the others are dropped."""
        pos = np.minimum(np.searchsorted(self.cells, keys), len(self.cells) - 1)
        return pos[self.cells[pos] == keys]

    def mark_ids(self, ids: np.ndarray) -> None:
        """Mark occupied cells by id (one way of marking between two clears)."""
        self._by_id[ids] = True
        self._marked_ids = ids

    def mark_keys(self, keys: np.ndarray) -> None:
        """Mark cells by key, occupied or not."""
        if self._by_key is None:
            self.mark_ids(self.occupied(keys))
        else:
            self._by_key[keys] = True
            self._marked_keys = keys

    def holds(self, rows: np.ndarray) -> np.ndarray:
        """(R,) bool: does each point (row of the concatenated clouds) lie in a marked cell?"""
        if len(self._marked_keys):  # marked by key (dense grid): nothing was marked by id
            return self._by_key[self.keys[rows]]
        return self._by_id[self.id[rows]]

    def clear(self) -> None:
        self._by_id[self._marked_ids] = False
        if self._by_key is not None:
            self._by_key[self._marked_keys] = False
        self._marked_keys = self._marked_ids = np.zeros(0, np.int64)


def _unique(x: np.ndarray) -> np.ndarray:
    """Sorted unique values of a 1-D array. ``np.unique`` of NumPy 2.4 hashes plain calls,
    which measured 37x slower than sorting on 2M int64 keys."""
    x = np.sort(x, kind="stable")
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def _dilate(grid: _Grid, cells: np.ndarray, clouds: np.ndarray, shift: np.ndarray,
            chunk: int = 1 << 18) -> np.ndarray:
    """Packed ``cloud * U + id`` (int64, sorted, unique) of the occupied cells within ``shift``
    of each (cloud, cell id) of ``clouds``/``cells``; chunks bound the (k, 27) temporary."""
    U = np.int64(len(grid.cells))
    parts = [np.zeros(0, np.int64)]
    for s in range(0, len(cells), chunk):
        nb = (grid.cells[cells[s:s + chunk]][:, None] + shift).ravel()  # (k 27,) int64 keys
        pos = np.minimum(np.searchsorted(grid.cells, nb), U - 1)
        hit = grid.cells[pos] == nb
        parts.append(_unique(np.repeat(clouds[s:s + chunk], len(shift))[hit] * U + pos[hit]))
    return _unique(np.concatenate(parts))


@dataclass
class OverlapResult:
    """``directional[i, j]``: fraction of cloud i's points with a point of cloud j within radius."""

    directional: np.ndarray  # (F, F) float64, 0 on the diagonal
    n_pairs: int  # F (F - 1) / 2
    n_candidates: int  # pairs that share a coarse neighbourhood (the rest are exactly 0)
    n_kdtree_queries: int  # points that needed an exact KD-tree answer
    n_sure: int  # points matched by the fine-cell test alone

    @property
    def overlap(self) -> np.ndarray:
        """(F, F) symmetric ratio: max of the two directions."""
        return np.maximum(self.directional, self.directional.T)


def overlap_matrix(clouds: list[np.ndarray], radius: float = VOXEL_SIZE * RADIUS_FACTOR
                   ) -> OverlapResult:
    """Directional overlap of every pair of (already downsampled) clouds."""
    F = len(clouds)
    clouds = [np.asarray(c, np.float64).reshape(-1, 3) for c in clouds]
    sizes = np.array([len(c) for c in clouds], dtype=np.int64)
    directional = np.zeros((F, F))
    if (sizes > 0).sum() < 2:
        return OverlapResult(directional, F * (F - 1) // 2, 0, 0, 0)
    points = np.concatenate(clouds)  # (P, 3) all clouds
    owner = np.repeat(np.arange(F, dtype=np.int64), sizes)  # (P,) int64 cloud of each point
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (F + 1,)
    coarse = _Grid(points, radius, reach=1, by_key=False)  # edge r: matches in 27 neighbours
    for k in FINE_DIVISIONS:  # the finest that still fits a key bitmap, else the last
        fine = _Grid(points, radius / k * (1 - 1e-9), reach=k)
        if fine.dense:
            break
    near_shift, sure_shift = coarse.offsets(_NEAR), fine.offsets(_stencil(k))

    # candidate pairs: clouds with a coarse cell of one in the 27-neighbourhood of the other's.
    # (cloud, occupied cell id) occupancy and its dilation as sparse matrices (F, U), packed as
    # cloud * U + id: at most F x P, never F x grid size (which passes 2^31 at ScanNet extents).
    U = np.int64(len(coarse.cells))
    occ = _unique(owner * U + coarse.id)  # (K,) int64 packed (cloud, cell id)
    dil = _dilate(coarse, occ % U, occ // U, near_shift)  # (D,) int64 packed (cloud, cell id)
    A = sparse.csr_matrix((np.ones(len(occ)), (occ // U, occ % U)), shape=(F, int(U)))
    B = sparse.csr_matrix((np.ones(len(dil)), (dil // U, dil % U)), shape=(F, int(U)))
    shared = (A @ B.T).tocoo()  # scipy's indices are int32: widen before any arithmetic
    rows_i, cols_j = shared.row.astype(np.int64), shared.col.astype(np.int64)
    keep = rows_i != cols_j
    rows_i, cols_j = rows_i[keep], cols_j[keep]  # both directions of each candidate
    dil_bounds = np.searchsorted(dil, np.arange(F + 1, dtype=np.int64) * U)  # (F + 1,)

    n_sure = n_kd = 0
    for j in _unique(cols_j):  # all candidate partners of cloud j in one batch (j: int64)
        partners = np.sort(rows_i[cols_j == j])
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in partners])
        own = slice(starts[j], starts[j + 1])
        # 1. can match at all: in the 27-neighbourhood of a cell of j
        coarse.mark_ids(dil[dil_bounds[j]:dil_bounds[j + 1]] - j * U)
        rows = rows[coarse.holds(rows)]
        coarse.clear()
        # 2. matches for sure: a fine cell of j in the sure stencil of the point's fine cell
        fine.mark_keys((_unique(fine.keys[own])[:, None] + sure_shift).ravel())
        sure = fine.holds(rows)
        fine.clear()
        directional[:, j] += np.bincount(owner[rows[sure]], minlength=F)
        # 3. exact answer for the rest
        rest = rows[~sure]
        if len(rest):
            dist, _ = cKDTree(points[own]).query(points[rest], k=1, distance_upper_bound=radius)
            directional[:, j] += np.bincount(owner[rest[dist <= radius]], minlength=F)
        n_sure += int(sure.sum())
        n_kd += len(rest)
    directional /= np.maximum(sizes, 1)[:, None]
    return OverlapResult(directional, F * (F - 1) // 2, len(rows_i) // 2, n_kd, n_sure)


def direct_overlap(a: np.ndarray, b: np.ndarray, radius: float = VOXEL_SIZE * RADIUS_FACTOR
                   ) -> tuple[float, float]:
    """The definition, by brute force: (fraction of a's points with a point of b within radius,
    and the same for b against a). One KD-tree per cloud, no cells, no pruning."""
    a, b = np.asarray(a, np.float64).reshape(-1, 3), np.asarray(b, np.float64).reshape(-1, 3)
    if len(a) == 0 or len(b) == 0:
        return 0.0, 0.0
    da, _ = cKDTree(b).query(a, k=1, distance_upper_bound=radius)
    db, _ = cKDTree(a).query(b, k=1, distance_upper_bound=radius)
    return float((da <= radius).mean()), float((db <= radius).mean())


@dataclass
class SelfCheck:
    """The fast overlap of a sample of pairs against :func:`direct_overlap`."""

    pairs_checked: int
    max_abs_diff: float  # over both directions of every checked pair
    worst_pair: tuple[int, int]  # cloud indices of the largest difference
    fast: tuple[float, float]  # its (i->j, j->i) overlaps by the fast path
    direct: tuple[float, float]  # and by the definition
    groups: dict[str, int]  # how many checked pairs were kept / rejected / zero / most distant
    seconds: float

    def ok(self, tol: float = SELF_CHECK_TOL) -> bool:
        return self.max_abs_diff <= tol

    def summary(self) -> dict:
        return {"pairs_checked": self.pairs_checked, "max_abs_diff": self.max_abs_diff,
                "worst_pair": list(self.worst_pair), "fast": list(self.fast),
                "direct": list(self.direct), "groups": self.groups}  # no time: reruns match


def sample_pairs(clouds: list[np.ndarray], overlap: np.ndarray, n: int, min_overlap: float,
                 seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """``(m, 2)`` int64 pairs (i < j) to check, m <= n, and the count per group. A quarter each:
    the most distant pairs (by centroid; where overflowing cell keys lost pairs), kept pairs,
    rejected pairs with some overlap, and pairs of overlap 0; a short group's share goes to a
    seeded random draw of the rest."""
    F = len(clouds)
    iu, ju = np.triu_indices(F, k=1)  # (F (F - 1) / 2,) int64 each
    if n <= 0 or len(iu) == 0:
        return np.zeros((0, 2), np.int64), {}
    centre = np.stack([c.mean(axis=0) if len(c) else np.zeros(3) for c in clouds])  # (F, 3)
    dist = np.linalg.norm(centre[iu] - centre[ju], axis=1)
    ov = overlap[iu, ju]
    rng = np.random.default_rng(seed)
    quota = max(n // 4, 1)
    groups = {"most_distant": np.argsort(-dist, kind="stable")[:quota],
              "kept": rng.permutation(np.flatnonzero(ov >= min_overlap))[:quota],
              "rejected": rng.permutation(np.flatnonzero((ov > 0) & (ov < min_overlap)))[:quota],
              "zero": rng.permutation(np.flatnonzero(ov == 0))[:quota]}
    chosen = np.unique(np.concatenate(list(groups.values())))
    rest = np.setdiff1d(np.arange(len(iu)), chosen)
    chosen = np.concatenate([chosen, rng.permutation(rest)[:max(n - len(chosen), 0)]])[:n]
    counts = {k: int(np.isin(v, chosen).sum()) for k, v in groups.items()}
    return np.stack([iu[chosen], ju[chosen]], axis=1).astype(np.int64), counts


def verify_overlap(clouds: list[np.ndarray], result: OverlapResult, n: int = 32,
                   min_overlap: float = 0.3, radius: float = VOXEL_SIZE * RADIUS_FACTOR,
                   seed: int = 0) -> SelfCheck:
    """Recompute ``n`` sampled pairs by the definition and compare with ``result``."""
    import time

    t0 = time.perf_counter()
    clouds = [np.asarray(c, np.float64).reshape(-1, 3) for c in clouds]
    pairs, groups = sample_pairs(clouds, result.overlap, n, min_overlap, seed)
    worst, worst_pair, fast, direct = -1.0, (-1, -1), (0.0, 0.0), (0.0, 0.0)
    for i, j in pairs.tolist():
        d = direct_overlap(clouds[i], clouds[j], radius)
        f = (float(result.directional[i, j]), float(result.directional[j, i]))
        diff = max(abs(f[0] - d[0]), abs(f[1] - d[1]))
        if diff > worst:
            worst, worst_pair, fast, direct = diff, (i, j), f, d
    return SelfCheck(len(pairs), max(worst, 0.0), worst_pair, fast, direct, groups,
                     time.perf_counter() - t0)
