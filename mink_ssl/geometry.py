"""Camera geometry shared by every RGB-D reader: depth back-projection into world points.

Conventions (those of ScanNet and its exports): depth images are uint16 with ``depth_shift``
units per metre (1000 for millimetres), 0 marks a missing measurement; intrinsics are the
3x3 (or 4x4 homogeneous) pinhole matrix; poses are 4x4 camera-to-world.
"""
from __future__ import annotations

import numpy as np


def _intrinsic_3x3(K: np.ndarray) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.shape == (4, 4):
        K = K[:3, :3]
    if K.shape != (3, 3):
        raise ValueError(f"intrinsics must be a 3x3 or 4x4 matrix, got shape {K.shape}")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"intrinsics have non-positive focal lengths fx={K[0, 0]}, fy={K[1, 1]}")
    return K


def backproject(depth: np.ndarray, intrinsics: np.ndarray, depth_shift: float,
                pose: np.ndarray | None = None, *, max_depth: float | None = None,
                stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Back-project a depth image into 3D points.

    Args:
        depth: (H, W) depth image, ``depth_shift`` units per metre; 0 = invalid.
        intrinsics: 3x3 or 4x4 pinhole matrix of the depth camera.
        depth_shift: units per metre (ScanNet's header field; 1000 for millimetre PNGs).
        pose: optional 4x4 camera-to-world transform; points are returned in world coordinates.
        max_depth: optional cut-off in metres (far Kinect readings are noisy).
        stride: use every ``stride``-th pixel in both directions.

    Returns:
        points (M, 3) float32 and pixel (M,) int64 flat indices into the (H, W) image of each
        valid point, so colours or labels can be gathered with ``image.reshape(-1, C)[pixel]``.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be a 2-D image, got shape {depth.shape}")
    if not depth_shift or depth_shift <= 0:
        raise ValueError(f"depth_shift must be positive (units per metre), got {depth_shift!r}")
    K = _intrinsic_3x3(intrinsics)
    H, W = depth.shape
    v, u = np.mgrid[0:H:stride, 0:W:stride]  # (h, w) pixel rows, columns
    z = depth[::stride, ::stride].astype(np.float64) / float(depth_shift)  # (h, w) metres
    valid = z > 0
    if max_depth is not None:
        valid &= z <= max_depth
    z, u, v = z[valid], u[valid], v[valid]  # (M,)
    x = (u - K[0, 2]) * z / K[0, 0]
    y = (v - K[1, 2]) * z / K[1, 1]
    points = np.stack([x, y, z], axis=1)  # (M, 3) camera frame
    if pose is not None:
        pose = np.asarray(pose, dtype=np.float64)
        if pose.shape != (4, 4) or not np.isfinite(pose).all():
            raise ValueError(f"pose must be a finite 4x4 matrix, got shape {pose.shape} "
                             f"(ScanNet marks invalid poses with -inf: skip such frames)")
        points = points @ pose[:3, :3].T + pose[:3, 3]
    pixel = (v * W + u).astype(np.int64)
    return points.astype(np.float32), pixel
