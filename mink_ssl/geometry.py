"""Pure numpy geometry shared by data prep and the datasets: depth back-projection into world
points (every RGB-D reader) and the point-in-oriented-box test (detection prep and targets).

Conventions (those of ScanNet and its exports): depth images are uint16 with ``depth_shift``
units per metre (1000 for millimetres), 0 marks a missing measurement; intrinsics are the
3x3 (or 4x4 homogeneous) pinhole matrix; poses are 4x4 camera-to-world. Boxes are (K, 7):
centre xyz, full extents dx dy dz, heading (radians about +z, counter-clockwise seen from above:
the box's dx axis points along (cos h, sin h, 0)).
"""
from __future__ import annotations

import functools

import numpy as np

_BOX_CHUNK = 1 << 20  # (points x boxes) per chunk of the point-in-box test (~8 MB float64)


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


def points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, K) bool: point n lies inside or on oriented box k.

    points (N, 3); boxes (K, 7) centre, full extents, heading about +z. A point is expressed in
    each box's frame (rotated by -heading about the centre) and compared with the half extents;
    points are processed in chunks so the (n, K) temporaries stay small.
    """
    points = np.asarray(points, np.float64)
    boxes = np.asarray(boxes, np.float64)
    n, k = len(points), len(boxes)
    inside = np.zeros((n, k), bool)
    if n == 0 or k == 0:
        return inside
    centre, half = boxes[:, :3], boxes[:, 3:6] / 2  # (K, 3)
    cos, sin = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])  # (K,)
    step = max(1, _BOX_CHUNK // k)
    for s in range(0, n, step):  # chunks of points, not single points
        d = points[s:s + step, None, :] - centre[None]  # (n, K, 3) offsets from the centres
        u = d[..., 0] * cos + d[..., 1] * sin  # (n, K) along the box's dx axis
        v = d[..., 1] * cos - d[..., 0] * sin  # (n, K) along its dy axis
        inside[s:s + step] = ((np.abs(u) <= half[:, 0]) & (np.abs(v) <= half[:, 1])
                              & (np.abs(d[..., 2]) <= half[:, 2]))
    return inside
