"""Segmentation training augmentations (:class:`Augmentation`, applied by
:class:`mink_ssl.data.segmentation.SegmentationDataset`).

Training augmentations, in the order applied (those of the released CSC / PointContrast
fine-tuning code, ``downstream/semseg/datasets/{dataset,voxelizer,transforms}.py``; each is off
when its parameter is at the neutral value):

1. elastic distortion (``elastic``: list of (granularity, magnitude) metres, e.g. ScanNet's
   ((0.2, 0.4), (0.8, 1.6))): smoothed Gaussian noise on a grid, interpolated trilinearly and
   added to the points; applied with probability 0.95;
   crop (``clip_bound`` h metres, S3DIS 4, Synthia 18; CSC ``CLIP_BOUND``, Voxelizer.clip): the
   points inside the axis-aligned cube [c - h, c + h) per axis, where c is the centre of the
   scene's bounding box moved by ``t * size`` (size: the bounding box's extents; t uniform in
   [-r, r] per axis, r = ``clip_translation`` (horizontal, vertical) ratios, S3DIS (0.2, 0.05),
   Synthia (0.1, 0)); CSC leaves a scene whose largest extent is under h uncropped, which is the
   same (such a scene lies inside the moved cube); an empty crop keeps the whole scene;
2. rotation about gravity by a uniform angle in [-rotation_deg, rotation_deg] and small tilts
   about the two horizontal axes in [-tilt_deg, tilt_deg] (S3DIS pi/32, ScanNet pi/64);
3. uniform scaling in ``scale`` (0.9, 1.1);
4. horizontal flips (``flip``): each horizontal axis mirrored with probability 0.5;
5. chromatic auto-contrast (probability ``color_auto_contrast``, 0.2): colours stretched to the
   full range and blended with the originals by a uniform random factor;
6. chromatic translation (``color_translation`` ratio, 0.1): one random RGB offset in
   [-ratio, ratio] x 255 per scene, probability 0.95;
7. chromatic jitter (``color_jitter`` std, 0.05): Gaussian noise of std x 255 per point,
   probability 0.95;
8. after voxelisation, voxel dropout (``dropout`` p, 0.2; CSC ``RandomDropout(0.2)``): with
   probability p, a random ``int(M (1 - p))`` of the M voxels are kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """Training augmentations (see the module docstring for order and probabilities)."""

    rotation_deg: float = 180.0
    tilt_deg: float = 0.0
    scale: tuple[float, float] = (0.9, 1.1)
    flip: bool = True
    elastic: tuple[tuple[float, float], ...] = ()
    color_auto_contrast: float = 0.2
    color_translation: float = 0.1
    color_jitter: float = 0.05
    dropout: float = 0.2
    clip_bound: float | None = None
    clip_translation: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be a range (lo, hi) with 0 < lo <= hi, got "
                             f"{self.scale}")
        for g_m in self.elastic:
            if len(g_m) != 2 or not (g_m[0] > 0 and g_m[1] >= 0):
                raise ValueError(f"elastic entries must be (granularity > 0, magnitude >= 0) "
                                 f"in metres, got {list(self.elastic)}")
        if not 0 <= self.color_auto_contrast <= 1:
            raise ValueError(f"color_auto_contrast is a probability in [0, 1], got "
                             f"{self.color_auto_contrast}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout is a probability in [0, 1), got {self.dropout}")
        if self.clip_bound is not None and not self.clip_bound > 0:
            raise ValueError(f"clip_bound is the crop's half size in metres (> 0) or None, got "
                             f"{self.clip_bound}")
        if len(self.clip_translation) != 2 or not all(0 <= r <= 0.5
                                                      for r in self.clip_translation):
            raise ValueError(f"clip_translation must be (horizontal, vertical) ratios in [0, 0.5],"
                             f" got {self.clip_translation}")
        if self.rotation_deg < 0 or self.tilt_deg < 0 or self.color_translation < 0 \
                or self.color_jitter < 0:
            raise ValueError("rotation_deg, tilt_deg, color_translation and color_jitter must "
                             f"be >= 0, got {self}")

    @classmethod
    def none(cls) -> "Augmentation":
        """Every augmentation off (evaluation, tests)."""
        return cls(rotation_deg=0.0, tilt_deg=0.0, scale=(1.0, 1.0), flip=False, elastic=(),
                   color_auto_contrast=0.0, color_translation=0.0, color_jitter=0.0,
                   dropout=0.0, clip_bound=None)


def rotation_matrix(angle: float, axis: int = 2) -> np.ndarray:
    """3x3 rotation by ``angle`` radians about coordinate axis ``axis`` (0 x, 1 y, 2 z)."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def elastic_distortion(points: np.ndarray, rng: np.random.Generator, granularity: float,
                       magnitude: float) -> np.ndarray:
    """Points (N, 3) displaced by smooth noise: Gaussian noise on a grid of ``granularity``
    metres, smoothed by three passes of a 3-tap box filter per axis (twice), interpolated
    trilinearly at each point and scaled by ``magnitude``."""
    from scipy.interpolate import RegularGridInterpolator
    from scipy.ndimage import uniform_filter1d

    lo = points.min(0)
    dims = ((points.max(0) - lo) // granularity).astype(int) + 3  # (3,) grid cells per axis
    noise = rng.standard_normal((*dims, 3)).astype(np.float32)  # (gx, gy, gz, 3)
    for _ in range(2):
        for axis in range(3):
            noise = uniform_filter1d(noise, 3, axis=axis, mode="constant")
    axes = [np.linspace(lo[d] - granularity, lo[d] + granularity * (dims[d] - 2), dims[d])
            for d in range(3)]
    interp = RegularGridInterpolator(axes, noise, bounds_error=False, fill_value=0.0)
    return points + (interp(points) * magnitude).astype(points.dtype)


def crop_mask(points: np.ndarray, half_size: float, shift_ratio) -> np.ndarray:
    """(N,) bool: the points (N, 3) inside the cube [c - h, c + h) per axis, h = ``half_size``,
    c = bounding-box centre + ``shift_ratio`` (3,) x bounding-box size (float64, as CSC's
    ``Voxelizer.clip``)."""
    p = np.asarray(points)
    lo, hi = p.min(0).astype(np.float64), p.max(0).astype(np.float64)
    size = hi - lo
    centre = lo + size * 0.5 + np.multiply(np.asarray(shift_ratio, np.float64), size)
    return ((p >= centre - half_size) & (p < centre + half_size)).all(1)


def voxel_dropout(num_voxels: int, p: float, rng: np.random.Generator) -> np.ndarray | None:
    """CSC's ``RandomDropout(p)``: with probability ``p`` the sorted indices of a random
    ``int(M (1 - p))`` of ``num_voxels`` = M voxels, else None (all kept)."""
    if p and rng.random() < p:
        return np.sort(rng.choice(num_voxels, int(num_voxels * (1 - p)), replace=False))
    return None


def augment_scene(points: np.ndarray, colors: np.ndarray, labels: np.ndarray, aug: Augmentation,
                  rng: np.random.Generator, up_axis: int = 2
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augmentations 1-7 of ``aug`` (the crop included) on points (N, 3), colours (N, 3) and
    labels (N,); returns (points float32, colours float32 in [0, 255], labels) of the kept
    points."""
    p = np.asarray(points, np.float32)
    if aug.elastic and rng.random() < 0.95:
        for granularity, magnitude in aug.elastic:
            p = elastic_distortion(p, rng, granularity, magnitude)
    if aug.clip_bound is not None:
        h, v = aug.clip_translation
        bound = np.where(np.arange(3) == up_axis, v, h)  # (3,) ratio per axis
        keep = crop_mask(p, aug.clip_bound, rng.uniform(-bound, bound))
        if keep.any():
            p, colors, labels = p[keep], colors[keep], labels[keep]
    p, col = _transform(p, colors, aug, rng, up_axis)
    return p, col, labels


def augment(points: np.ndarray, colors: np.ndarray, aug: Augmentation,
            rng: np.random.Generator, up_axis: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Apply augmentations 1-7 of ``aug`` to points (N, 3) and colours (N, 3); returns (points
    float32, colours float32 in [0, 255]) (fewer points with a crop)."""
    p, col, _ = augment_scene(points, colors, np.zeros(len(points), np.int64), aug, rng, up_axis)
    return p, col


def _transform(p: np.ndarray, colors: np.ndarray, aug: Augmentation, rng: np.random.Generator,
               up_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Augmentations 2-7 (rotation, scale, flips, colours)."""
    col = np.asarray(colors, np.float32).copy()
    horizontal = [a for a in range(3) if a != up_axis]
    R = rotation_matrix(np.deg2rad(rng.uniform(-aug.rotation_deg, aug.rotation_deg)), up_axis)
    for a in horizontal:
        R = rotation_matrix(np.deg2rad(rng.uniform(-aug.tilt_deg, aug.tilt_deg)), a) @ R
    S = np.diag(np.full(3, rng.uniform(*aug.scale)))
    if aug.flip:
        for a in horizontal:
            if rng.random() < 0.5:
                S[a, a] *= -1
    T = (S @ R).astype(np.float32)
    centre = p.mean(0, dtype=np.float64).astype(np.float32)
    p = (p - centre) @ T.T  # (N, 3)
    if aug.color_auto_contrast and rng.random() < aug.color_auto_contrast:
        lo, hi = col.min(0, keepdims=True), col.max(0, keepdims=True)  # (1, 3)
        stretched = (col - lo) * (255.0 / np.maximum(hi - lo, 1e-6))
        blend = rng.random()
        col = (1 - blend) * col + blend * stretched
    if aug.color_translation and rng.random() < 0.95:
        offset = (rng.random((1, 3)) - 0.5) * 2 * 255 * aug.color_translation
        col = np.clip(col + offset, 0, 255)
    if aug.color_jitter and rng.random() < 0.95:
        col = np.clip(col + rng.standard_normal(col.shape) * aug.color_jitter * 255, 0, 255)
    return p, col.astype(np.float32)
