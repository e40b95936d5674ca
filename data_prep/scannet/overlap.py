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

Membership tests use a bitmap over the target fragment's bounding box, and all candidate
partners of a fragment are processed in one vectorised batch.
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


class _CellSet:
    """The cells ``occupied + stencil`` as a membership test for integer cell coordinates.

    A bitmap over the bounding box when it is small (the usual case: one camera frustum), in
    ``buffer`` if given (it must be all False; ``release()`` makes it so again, resetting only
    the cells that were set), else sorted packed keys (a frustum stretched by far outliers).
    """

    def __init__(self, occupied: np.ndarray, stencil: np.ndarray,
                 buffer: np.ndarray | None = None):
        self.lo = (occupied.min(axis=0) + stencil.min(axis=0)).astype(np.int64)  # (3,)
        self.dims = occupied.max(axis=0) + stencil.max(axis=0) - self.lo + 1  # (3,)
        self.flat = self._flat(occupied[:, None, :] + stencil).ravel()  # duplicates harmless
        size = int(np.prod(self.dims.astype(np.float64)))
        if size <= _MAX_DENSE_CELLS:
            self.bitmap = (buffer[:size] if buffer is not None and len(buffer) >= size
                           else np.zeros(size, bool))
            self.bitmap[self.flat] = True
        else:
            self.bitmap, self.keys = None, np.unique(self.flat)

    def _flat(self, cells: np.ndarray) -> np.ndarray:
        c = cells.astype(np.int64) - self.lo
        return (c[..., 0] * self.dims[1] + c[..., 1]) * self.dims[2] + c[..., 2]

    def contains(self, cells: np.ndarray) -> np.ndarray:
        c = [cells[:, d].astype(np.int64) - self.lo[d] for d in range(3)]  # 3 x (n,)
        # one unsigned comparison per axis: negatives wrap to huge values
        inside = ((c[0].view(np.uint64) < self.dims[0]) & (c[1].view(np.uint64) < self.dims[1])
                  & (c[2].view(np.uint64) < self.dims[2]))
        flat = ((c[0] * self.dims[1] + c[1]) * self.dims[2] + c[2])[inside]
        out = np.zeros(len(cells), bool)
        if self.bitmap is not None:
            out[inside] = self.bitmap[flat]
        elif len(flat):
            pos = np.minimum(np.searchsorted(self.keys, flat), len(self.keys) - 1)
            out[inside] = self.keys[pos] == flat
        return out

    def release(self) -> None:
        if self.bitmap is not None:
            self.bitmap[self.flat] = False


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
    coarse = np.floor(points / radius).astype(np.int64)  # (P, 3) cells of edge r
    fine = np.floor(points / (radius / FINE_DIVISIONS * (1 - 1e-9))).astype(np.int32)

    # Coarse cells packed into one key over the scene's grid (margins make room for dilation).
    lo = coarse.min(axis=0) - 1
    ext = coarse.max(axis=0) - lo + 2
    n_cells = int(np.prod(ext))
    ckey = ((coarse[:, 0] - lo[0]) * ext[1] + coarse[:, 1] - lo[1]) * ext[2] + coarse[:, 2] - lo[2]
    shift = (_NEAR[:, 0] * ext[1] + _NEAR[:, 1]) * ext[2] + _NEAR[:, 2]  # (27,) neighbour offsets
    # occupied (cloud, cell) and its 27-dilation, as packed int64 and as sparse matrices:
    # (occupied) x (dilated)^T counts, for each pair of clouds, cells of one near the other
    occ = np.unique(owner * n_cells + ckey)  # (K,)
    dil = np.unique((occ[:, None] + shift).ravel())  # (K',), stays in its cloud's block
    A = sparse.csr_matrix((np.ones(len(occ)), (occ // n_cells, occ % n_cells)), shape=(F, n_cells))
    B = sparse.csr_matrix((np.ones(len(dil)), (dil // n_cells, dil % n_cells)), shape=(F, n_cells))
    shared = (A @ B.T).tocoo()
    keep = shared.row != shared.col
    rows_i, cols_j = shared.row[keep], shared.col[keep]  # both directions of each candidate
    dil_bounds = np.searchsorted(dil, np.arange(F + 1) * n_cells)  # dilated cells per cloud
    near_map = np.zeros(n_cells, bool) if n_cells <= _MAX_DENSE_CELLS else None
    buffer = np.zeros(0, bool)  # reused bitmap of the fine cell sets, grown on demand

    n_sure = n_kd = 0
    for j in np.unique(cols_j):  # all candidate partners of cloud j in one batch
        partners = np.sort(rows_i[cols_j == j])
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in partners])
        # 1. can match at all: in the 27-neighbourhood of a cell of j
        j_cells = dil[dil_bounds[j]:dil_bounds[j + 1]] - j * n_cells
        if near_map is not None:
            near_map[j_cells] = True
            rows = rows[near_map[ckey[rows]]]
            near_map[j_cells] = False  # reset only what was set: no O(n_cells) clearing
        else:
            pos = np.minimum(np.searchsorted(j_cells, ckey[rows]), len(j_cells) - 1)
            rows = rows[j_cells[pos] == ckey[rows]]
        # 2. matches for sure: a fine cell of j in the sure stencil of the point's fine cell
        own = slice(starts[j], starts[j + 1])
        sure_set = _CellSet(fine[own], _SURE, buffer)
        if sure_set.bitmap is not None and sure_set.bitmap.base is not buffer:
            buffer = np.zeros(max(2 * len(buffer), len(sure_set.bitmap)), bool)
        sure = sure_set.contains(fine[rows])
        sure_set.release()
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
