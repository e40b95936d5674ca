"""Camera geometry shared by every RGB-D reader: depth back-projection into world points.

Conventions (those of ScanNet and its exports): depth images are uint16 with ``depth_shift``
units per metre (1000 for millimetres), 0 marks a missing measurement; intrinsics are the
3x3 (or 4x4 homogeneous) pinhole matrix; poses are 4x4 camera-to-world.
"""
from __future__ import annotations

import functools

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
    if pose is not None:
        pose = np.asarray(pose, dtype=np.float64)
        if pose.shape != (4, 4) or not np.isfinite(pose).all():
            raise ValueError(f"pose must be a finite 4x4 matrix, got shape {pose.shape} "
                             f"(ScanNet marks invalid poses with -inf: skip such frames)")
    d = depth[::stride, ::stride]
    rx, ry = _rays(H, W, stride, K[0, 0], K[1, 1], K[0, 2], K[1, 2])  # (h*w,) x/z and y/z
    pixel = np.flatnonzero(d) if max_depth is None else np.flatnonzero(
        (d > 0) & (d <= max_depth * depth_shift))  # (M,) flat indices into the strided image
    z = d.reshape(-1)[pixel].astype(np.float32) * np.float32(1.0 / depth_shift)  # (M,) metres
    x, y = rx[pixel] * z, ry[pixel] * z  # (M,) camera frame
    points = np.empty((len(z), 3), np.float32)
    if pose is None:
        points[:, 0], points[:, 1], points[:, 2] = x, y, z
    else:  # one axis at a time on 1-D arrays: much faster than an (M, 3) x (3, 3) matmul
        R, t = pose[:3, :3].astype(np.float32), pose[:3, 3].astype(np.float32)
        for a in range(3):
            points[:, a] = R[a, 0] * x + R[a, 1] * y + R[a, 2] * z + t[a]
    if stride != 1:  # back to flat indices of the full-resolution image
        w = (W + stride - 1) // stride
        pixel = (pixel // w) * stride * W + (pixel % w) * stride
    return points, pixel.astype(np.int64, copy=False)


@functools.lru_cache(maxsize=8)
def _rays(H: int, W: int, stride: int, fx: float, fy: float, cx: float, cy: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """Per (strided) pixel, flat: the camera-frame ray's x/z = (u - cx) / fx and y/z."""
    v, u = np.mgrid[0:H:stride, 0:W:stride]  # (h, w) rows, columns
    rx = ((u - cx) / fx).astype(np.float32).reshape(-1)
    ry = ((v - cy) / fy).astype(np.float32).reshape(-1)
    rx.flags.writeable = ry.flags.writeable = False  # shared by every caller
    return rx, ry
