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
    rays = _rays(H, W, stride, K[0, 0], K[1, 1], K[0, 2], K[1, 2])  # (h*w, 3), z = 1
    pixel = np.flatnonzero(d) if max_depth is None else np.flatnonzero(
        (d > 0) & (d <= max_depth * depth_shift))  # (M,) flat indices into the strided image
    z = d.reshape(-1)[pixel].astype(np.float32) * np.float32(1.0 / depth_shift)  # (M,) metres
    points = rays[pixel] * z[:, None]  # (M, 3) camera frame
    if pose is not None:
        points = points @ pose[:3, :3].T.astype(np.float32) + pose[:3, 3].astype(np.float32)
    if stride != 1:  # back to flat indices of the full-resolution image
        w = (W + stride - 1) // stride
        pixel = (pixel // w) * stride * W + (pixel % w) * stride
    return points.astype(np.float32, copy=False), pixel.astype(np.int64, copy=False)


@functools.lru_cache(maxsize=8)
def _rays(H: int, W: int, stride: int, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Camera-frame ray of each (strided) pixel with z = 1: ((u - cx) / fx, (v - cy) / fy, 1)."""
    v, u = np.mgrid[0:H:stride, 0:W:stride]  # (h, w) rows, columns
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones(u.shape)], axis=-1)
    rays = rays.reshape(-1, 3).astype(np.float32)
    rays.flags.writeable = False  # shared by every caller
    return rays
