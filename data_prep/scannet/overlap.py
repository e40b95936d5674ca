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
   ``radius / 3``) of its "sure" stencil: the 19 cells (its own, 6 face and 12 edge
   neighbours) whose every point is closer than ``radius`` to every point of its own cell;
4. the rest are answered exactly by one batched KD-tree query per fragment.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

VOXEL_SIZE = 0.05  # m, downsampling before the overlap test
RADIUS_FACTOR = 1.5  # neighbour radius in voxels (7.5 cm)


def voxel_downsample(points: np.ndarray, voxel_size: float = VOXEL_SIZE) -> np.ndarray:
    """Centroid per occupied voxel, (M, 3) float64; the grid as open3d's voxel_down_sample."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {p.shape}")
    if len(p) == 0:
        return p.reshape(0, 3)
    origin = p.min(axis=0) - voxel_size / 2
    idx = np.floor((p - origin) / voxel_size).astype(np.int64)  # (N, 3), >= 0
    extent = idx.max(axis=0) + 1
    keys = (idx[:, 0] * extent[1] + idx[:, 1]) * extent[2] + idx[:, 2]
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    sums = np.stack([np.bincount(inverse, weights=p[:, d], minlength=len(counts))
                     for d in range(3)], axis=1)  # (M, 3)
    return sums / counts[:, None]


_OFFSETS = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
# fine cells of edge r/3 at these offsets lie entirely within r of any point of the centre cell:
# max distance = (r/3) * sqrt(sum((|d| + 1)^2)) <= r  <=>  at most two non-zero components
_SURE = _OFFSETS[(np.abs(_OFFSETS) > 0).sum(axis=1) <= 2]  # (19, 3)


class _Grid:
    """Integer cell keys of edge ``cell`` over a shared origin; packable with one extent."""

    def __init__(self, clouds: list[np.ndarray], cell: float):
        allp = np.concatenate(clouds)
        self.cell = cell
        self.lo = np.floor(allp.min(axis=0) / cell).astype(np.int64) - 1  # room for dilation
        self.ext = np.floor(allp.max(axis=0) / cell).astype(np.int64) - self.lo + 2

    def cells(self, p: np.ndarray) -> np.ndarray:
        return np.floor(p / self.cell).astype(np.int64) - self.lo  # (N, 3)

    def key(self, c: np.ndarray) -> np.ndarray:
        return (c[..., 0] * self.ext[1] + c[..., 1]) * self.ext[2] + c[..., 2]

    @property
    def size(self) -> int:
        return int(np.prod(self.ext))


def _isin_sorted(query: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_keys, query)
    pos[pos == len(sorted_keys)] = 0
    return sorted_keys[pos] == query if len(sorted_keys) else np.zeros(len(query), bool)


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
    directional = np.zeros((F, F))
    nonempty = [c for c in clouds if len(c)]
    if F < 2 or len(nonempty) < 2:
        return OverlapResult(directional, F * (F - 1) // 2, 0, 0, 0)
    coarse, fine = _Grid(nonempty, radius), _Grid(nonempty, radius / 3 * (1 - 1e-9))

    # per cloud: coarse cell key of each point, its occupied coarse cells dilated by 1 cell,
    # the fine cell key of each point, and its occupied fine cells dilated by the sure stencil
    point_cells = [coarse.cells(c) for c in clouds]
    point_keys = [coarse.key(c) for c in point_cells]
    dilated = [np.unique(coarse.key(np.unique(c, axis=0)[:, None, :] + _OFFSETS)) for c in point_cells]
    fine_cells = [fine.cells(c) for c in clouds]
    fine_keys = [fine.key(c) for c in fine_cells]
    fine_sure = [np.unique(fine.key(np.unique(c, axis=0)[:, None, :] + _SURE)) for c in fine_cells]

    # candidate pairs: some cell of i inside the dilated occupancy of j (a symmetric relation)
    occ = sparse.csr_matrix((np.ones(sum(len(np.unique(k)) for k in point_keys)),
                             (np.repeat(np.arange(F), [len(np.unique(k)) for k in point_keys]),
                              np.concatenate([np.unique(k) for k in point_keys]))),
                            shape=(F, coarse.size))
    dil = sparse.csr_matrix((np.ones(sum(len(d) for d in dilated)),
                             (np.repeat(np.arange(F), [len(d) for d in dilated]),
                              np.concatenate(dilated))), shape=(F, coarse.size))
    shared = (occ @ dil.T).tocoo()
    cand = shared.row != shared.col
    rows, cols = shared.row[cand], shared.col[cand]  # both directions of each candidate pair

    n_sure = n_kd = 0
    for j in range(F):  # one batched KD query against cloud j for all its candidate partners
        partners = rows[cols == j]
        if len(partners) == 0:
            continue
        pending_pts, pending_owner = [], []
        for i in partners:
            near = _isin_sorted(point_keys[i], dilated[j])  # can match at all
            sure = near & _isin_sorted(fine_keys[i], fine_sure[j])
            directional[i, j] = sure.sum()
            rest = near & ~sure
            pending_pts.append(clouds[i][rest])
            pending_owner.append(np.full(int(rest.sum()), i))
            n_sure += int(sure.sum())
        pts = np.concatenate(pending_pts)
        if len(pts):
            dist, _ = cKDTree(clouds[j]).query(pts, k=1, distance_upper_bound=radius)
            hits = np.bincount(np.concatenate(pending_owner)[dist <= radius], minlength=F)
            directional[partners, j] += hits[partners]
            n_kd += len(pts)
    sizes = np.array([max(len(c), 1) for c in clouds], np.float64)
    directional /= sizes[:, None]
    return OverlapResult(directional, F * (F - 1) // 2, len(rows) // 2, n_kd, n_sure)
