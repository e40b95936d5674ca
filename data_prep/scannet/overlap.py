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
   ``radius / 4``) of its "sure" stencil: the 57 cells whose every point is within ``radius``
   of every point of its own cell;
4. the rest are answered exactly by one batched KD-tree query per fragment.

Membership tests are gathers from a reusable bitmap over the scene's cell grid, and all
candidate partners of a fragment are processed in one vectorised batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

VOXEL_SIZE = 0.05  # m, downsampling before the overlap test
RADIUS_FACTOR = 1.5  # neighbour radius in voxels (7.5 cm)


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
FINE_DIVISIONS = 4  # fine cells of edge r/4; the sure stencil has 57 cells
_SURE = _stencil(FINE_DIVISIONS)
_MAX_DENSE_CELLS = 1 << 26  # above this a cell set is a sorted key array instead of a bitmap


class _Grid:
    """Integer cells of one edge length over all clouds, packed into int64 keys, with a
    membership set that is a reusable bitmap (reset cell by cell, never cleared wholesale)
    when the grid is small enough, else a sorted key array."""

    def __init__(self, points: np.ndarray, edge: float, reach: int):
        cells = np.floor(points / edge).astype(np.int64)  # (P, 3)
        lo = cells.min(axis=0) - reach  # margins: a stencil of this reach stays inside
        self.ext = cells.max(axis=0) - lo + reach + 1
        c = cells - lo
        self.keys = (c[:, 0] * self.ext[1] + c[:, 1]) * self.ext[2] + c[:, 2]  # (P,)
        self.size = int(np.prod(self.ext.astype(np.float64)))
        self._bitmap = np.zeros(self.size, bool) if self.size <= _MAX_DENSE_CELLS else None
        self._set = np.zeros(0, np.int64)

    def offsets(self, stencil: np.ndarray) -> np.ndarray:
        """(S,) key offsets of a stencil of cell offsets (S, 3)."""
        return (stencil[:, 0] * self.ext[1] + stencil[:, 1]) * self.ext[2] + stencil[:, 2]

    def fill(self, keys: np.ndarray) -> None:
        if self._bitmap is not None:
            self._bitmap[keys] = True
        self._set = keys

    def contains(self, keys: np.ndarray) -> np.ndarray:
        if self._bitmap is not None:
            return self._bitmap[keys]
        s = np.unique(self._set)
        pos = np.minimum(np.searchsorted(s, keys), len(s) - 1)
        return s[pos] == keys

    def clear(self) -> None:
        if self._bitmap is not None:
            self._bitmap[self._set] = False
        self._set = np.zeros(0, np.int64)


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
    sizes = np.array([len(c) for c in clouds])
    directional = np.zeros((F, F))
    if (sizes > 0).sum() < 2:
        return OverlapResult(directional, F * (F - 1) // 2, 0, 0, 0)
    points = np.concatenate(clouds)  # (P, 3) all clouds
    owner = np.repeat(np.arange(F), sizes)  # (P,) cloud of each point
    starts = np.concatenate([[0], np.cumsum(sizes)])
    coarse = _Grid(points, radius, reach=1)  # cells of edge r: matches lie in the 27-neighbourhood
    fine = _Grid(points, radius / FINE_DIVISIONS * (1 - 1e-9), reach=FINE_DIVISIONS)
    near_shift, sure_shift = coarse.offsets(_NEAR), fine.offsets(_SURE)

    # candidate pairs: clouds with a coarse cell of one in the 27-neighbourhood of the other's.
    # (cloud, cell) occupancy and its dilation as sparse matrices; A B^T counts shared cells.
    occ = np.unique(owner * coarse.size + coarse.keys)  # (K,) packed (cloud, cell)
    dil = np.unique((occ[:, None] + near_shift).ravel())  # stays in its cloud's block
    n = coarse.size
    A = sparse.csr_matrix((np.ones(len(occ)), (occ // n, occ % n)), shape=(F, n))
    B = sparse.csr_matrix((np.ones(len(dil)), (dil // n, dil % n)), shape=(F, n))
    shared = (A @ B.T).tocoo()
    keep = shared.row != shared.col
    rows_i, cols_j = shared.row[keep], shared.col[keep]  # both directions of each candidate
    dil_bounds = np.searchsorted(dil, np.arange(F + 1) * n)  # each cloud's dilated cells

    n_sure = n_kd = 0
    for j in np.unique(cols_j):  # all candidate partners of cloud j in one batch
        partners = np.sort(rows_i[cols_j == j])
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in partners])
        own = slice(starts[j], starts[j + 1])
        # 1. can match at all: in the 27-neighbourhood of a cell of j
        coarse.fill(dil[dil_bounds[j]:dil_bounds[j + 1]] - j * n)
        rows = rows[coarse.contains(coarse.keys[rows])]
        coarse.clear()
        # 2. matches for sure: a fine cell of j in the sure stencil of the point's fine cell
        fine.fill((fine.keys[own][:, None] + sure_shift).ravel())
        sure = fine.contains(fine.keys[rows])
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
