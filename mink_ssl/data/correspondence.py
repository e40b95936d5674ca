"""Correspondences between two voxelised views: every voxel pair within a radius in world space."""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree


def find_matches(world0: np.ndarray, world1: np.ndarray, radius: float,
                 max_matches: int | None = None, rng: np.random.Generator | None = None
                 ) -> np.ndarray:
    """All pairs ``(a, b)`` with ``||world0[a] - world1[b]|| <= radius``, as (M, 2) int64.

    ``world0`` (N0, 3) and ``world1`` (N1, 3) are the voxels' positions in world coordinates
    before the views' random transforms. Rows are sorted by (a, b). With ``max_matches``, a
    uniformly random subset of that size (drawn with ``rng``) is returned, still sorted.
    """
    w0 = np.asarray(world0, np.float64).reshape(-1, 3)
    w1 = np.asarray(world1, np.float64).reshape(-1, 3)
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if len(w0) == 0 or len(w1) == 0:
        return np.zeros((0, 2), np.int64)
    pairs = cKDTree(w0).sparse_distance_matrix(cKDTree(w1), radius, output_type="ndarray")
    matches = np.stack([pairs["i"], pairs["j"]], axis=1).astype(np.int64)  # (M, 2)
    if max_matches is not None and len(matches) > max_matches:
        rng = rng if rng is not None else np.random.default_rng()
        matches = matches[rng.choice(len(matches), max_matches, replace=False)]
    order = np.lexsort((matches[:, 1], matches[:, 0]))
    return matches[order]


def self_check_matches(world0: np.ndarray, world1: np.ndarray, radius: float, matches: np.ndarray,
                  rows: int = 256, rng: np.random.Generator | None = None) -> dict:
    """Self-check of :func:`find_matches` (uncapped) by brute force: for ``rows`` sampled voxels
    of view 0, their partners within ``radius`` among *all* voxels of view 1, by explicit
    distances, must be exactly the rows of ``matches`` that start at them. Pairs within 1e-9 m
    of the radius are left out (the KD-tree and NumPy may round the boundary apart).

    Returns the counts checked; raises ``ValueError`` naming the first disagreeing voxel pair."""
    w0 = np.asarray(world0, np.float64).reshape(-1, 3)
    w1 = np.asarray(world1, np.float64).reshape(-1, 3)
    rng = rng if rng is not None else np.random.default_rng(0)
    sample = np.sort(rng.choice(len(w0), min(rows, len(w0)), replace=False)).astype(np.int64)
    d = np.sqrt(((w0[sample, None, :] - w1[None, :, :]) ** 2).sum(-1))  # (S, N1) brute force
    clear = np.abs(d - radius) > 1e-9
    a, b = np.nonzero((d <= radius) & clear)
    expected = set(zip(sample[a].tolist(), b.tolist()))
    m = np.asarray(matches, np.int64).reshape(-1, 2)
    m = m[np.isin(m[:, 0], sample)]
    ok_rows = clear[np.searchsorted(sample, m[:, 0]), m[:, 1]]  # away from the boundary
    found = set(map(tuple, m[ok_rows].tolist()))
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        i, j = (missing or extra)[0]
        raise ValueError(
            f"correspondence self-check failed: voxels {i} (view 0) and {j} (view 1) are "
            f"{np.linalg.norm(w0[i] - w1[j]):.6f} m apart (radius {radius} m) but the fast "
            f"search {'missed' if missing else 'invented'} them ({len(missing)} missed, "
            f"{len(extra)} invented among {len(expected)} pairs of {len(sample)} voxels); "
            "this is a bug in mink-ssl: please report it with this message")
    return {"rows_checked": int(len(sample)), "matches_checked": len(expected)}


def random_similarity_transform(rng: np.random.Generator, rotation_deg: float,
                                axis: str = "random", scale: tuple[float, float] = (1.0, 1.0),
                                translation: float = 0.0) -> np.ndarray:
    """A 4x4 similarity: rotation by up to ``rotation_deg`` about a random unit axis ('random')
    or about z ('z'), uniform scale in ``scale``, translation uniform in [-t, t]^3 metres."""
    if axis == "random":
        a = rng.normal(size=3)
        a /= np.linalg.norm(a)
    elif axis == "z":
        a = np.array([0.0, 0.0, 1.0])
    else:
        raise ValueError(f"rotation axis must be 'random' or 'z', got {axis!r}")
    theta = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg) if rotation_deg else 0.0)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    R = np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K  # Rodrigues
    T = np.eye(4)
    T[:3, :3] = R * rng.uniform(*scale)
    T[:3, 3] = rng.uniform(-translation, translation, 3) if translation else 0.0
    return T


def to_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
