"""Detection training augmentations, VoteNet's (step 2 of a sample, see
:mod:`mink_ssl.data.detection`): one linear map ``p -> A p`` with ``A = s R_z(theta) F`` of the
points, and the boxes mapped with it (centres by ``A``, sizes by ``s``, headings ``pi - h`` for an
x flip, ``-h`` for a y flip, then ``+ theta``; axis-aligned boxes replaced by the aligned box
around the rotated one)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DetAugmentation:
    """VoteNet's training augmentations (see the module docstring)."""

    flip_x: bool = True  # mirror x (flip about the YZ plane) with probability 0.5
    flip_y: bool = False  # mirror y (about the XZ plane) with probability 0.5; ScanNet only
    rotation_deg: float = 5.0  # about +z, uniform in [-r, r]; ScanNet 5, SUN RGB-D 30
    scale: tuple[float, float] = (1.0, 1.0)  # uniform; SUN RGB-D (0.85, 1.15)

    def __post_init__(self):
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be a range (lo, hi) with 0 < lo <= hi, got "
                             f"{self.scale}")
        if not 0 <= self.rotation_deg <= 180:
            raise ValueError(f"rotation_deg must be in [0, 180], got {self.rotation_deg}")

    def draw(self, rng: np.random.Generator) -> tuple[bool, bool, float, float]:
        """(flip x, flip y, rotation radians, scale) of one sample."""
        fx = bool(self.flip_x and rng.random() < 0.5)
        fy = bool(self.flip_y and rng.random() < 0.5)
        theta = float(np.deg2rad(rng.uniform(-self.rotation_deg, self.rotation_deg)))
        return fx, fy, theta, float(rng.uniform(*self.scale))


def transform_matrix(flip_x: bool, flip_y: bool, theta: float, scale: float) -> np.ndarray:
    """(3, 3) ``A = s R_z(theta) F``: mirror, then rotate about +z, then scale."""
    c, s = math.cos(theta), math.sin(theta)
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    F = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0])
    return scale * R @ F


def transform_boxes(boxes: np.ndarray, flip_x: bool, flip_y: bool, theta: float, scale: float,
                    axis_aligned: bool) -> np.ndarray:
    """Boxes (K, 7) under ``transform_matrix(...)``; ``axis_aligned``: the axis-aligned box
    around each rotated box (heading 0) instead of a heading change."""
    A = transform_matrix(flip_x, flip_y, theta, scale)
    out = np.asarray(boxes, np.float64).copy()
    out[:, :3] = out[:, :3] @ A.T
    out[:, 3:6] *= scale
    if axis_aligned:
        c, s = abs(math.cos(theta)), abs(math.sin(theta))
        dx, dy = out[:, 3].copy(), out[:, 4].copy()
        out[:, 3], out[:, 4] = c * dx + s * dy, s * dx + c * dy  # extents of the rotated box
        out[:, 6] = 0.0
        return out.astype(np.float32)
    h = out[:, 6]
    if flip_x:
        h = np.pi - h
    if flip_y:
        h = -h
    out[:, 6] = wrap_angle(h + theta)
    return out.astype(np.float32)


def wrap_angle(angle):
    """Angles (any shape, numpy or torch) wrapped to [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi
