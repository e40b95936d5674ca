"""Sparse-tensor helpers used across the library: batched coordinates, voxel quantisation with
the inverse map back to points, and :class:`SparseVoxels`, the engine-neutral sparse tensor that
networks take and return.

Conventions (everywhere in mink-ssl):

- *points* are float ``(N, 3)`` metric coordinates;
- *voxel coordinates* are integer ``(N, 3)`` grid indices ``floor(points / voxel_size)``;
- *batched coordinates* are int32 ``(N, 4)`` with the batch index in column 0 (MinkowskiEngine's
  layout); at tensor stride ``s`` they stay in stride-1 grid units, multiples of ``s``.

All functions accept torch tensors or numpy arrays, return torch tensors, and keep the device of
their input. Nothing here loops over points in Python, and nothing here imports a sparse engine:
only :mod:`mink_ssl.models` knows which engine runs a network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}"


def check_points(points, name: str = "points") -> torch.Tensor:
    """``points`` as a float tensor of shape ``(N, 3)``; ``ValueError`` naming the problem."""
    p = _as_tensor(points, name)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {_describe(p)}")
    if not p.is_floating_point():
        raise ValueError(f"{name} must be floating point metric coordinates, got {_describe(p)}")
    if not torch.isfinite(p).all():
        bad = (~torch.isfinite(p).all(dim=1)).nonzero()[:3, 0].tolist()
        raise ValueError(f"{name} contains non-finite values (rows {bad}...); drop or fix them first")
    return p


def check_batched_coordinates(coords, name: str = "coordinates") -> torch.Tensor:
    """Validate batched voxel coordinates: integer ``(N, 4)``, batch index (column 0) >= 0."""
    c = _as_tensor(coords, name)
    if c.is_floating_point() or c.dtype == torch.bool:
        raise ValueError(
            f"{name} must be integer voxel indices, got {_describe(c)}; quantise metric points "
            "with mink_ssl.sparse.quantize(points, voxel_size) first"
        )
    if c.ndim != 2 or c.shape[1] != 4:
        hint = (" (batch index missing? use mink_ssl.sparse.batched_coordinates([coords, ...]))"
                if c.ndim == 2 and c.shape[1] == 3 else "")
        raise ValueError(f"{name} must have shape (N, 4) with the batch index first, got "
                         f"{_describe(c)}{hint}")
    if c.shape[0] and int(c[:, 0].min()) < 0:
        raise ValueError(f"{name} has a negative batch index ({int(c[:, 0].min())}) in column 0")
    return c


def batched_coordinates(coords_list: Sequence, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Stack per-scene voxel coordinates ``[(N_i, 3), ...]`` into ``(sum N_i, 4)``, batch first."""
    if len(coords_list) == 0:
        raise ValueError("batched_coordinates needs at least one coordinate array, got none")
    parts = []
    for i, c in enumerate(coords_list):
        t = _as_tensor(c, f"coords_list[{i}]")
        if t.ndim != 2 or t.shape[1] != 3 or t.is_floating_point():
            raise ValueError(f"coords_list[{i}] must be integer voxel coordinates of shape (N, 3), "
                             f"got {_describe(t)}")
        parts.append(t)
    device = parts[0].device
    sizes = torch.tensor([len(p) for p in parts], device=device)
    batch = torch.repeat_interleave(torch.arange(len(parts), device=device), sizes)  # (N,)
    return torch.cat([batch[:, None].to(dtype), torch.cat(parts).to(dtype)], dim=1)  # (N, 4)


def pack_keys(voxel_coords: torch.Tensor, lo: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """Injective int64 key per integer coordinate row, for hashing/unique/searchsorted.

    ``lo`` (D,) is a lower bound of every column and ``extent`` (D,) an exclusive upper bound of
    ``coords - lo``; two calls with the same ``lo``/``extent`` give comparable keys. Keys are
    computed in int64 whatever the input dtype (ME coordinates are int32, and int32 x int stays
    int32); an extent whose product reaches 2^62 is refused rather than wrapped.
    """
    cells = math.prod(int(e) for e in extent.tolist())  # exact: Python ints do not wrap
    if cells >= 2**62:
        raise ValueError(f"coordinate extent {extent.tolist()} ({cells:.3g} cells) is too large "
                         "for int64 keys; is the voxel size far too small, or are there outlier "
                         "points far from the rest?")
    shifted = voxel_coords.to(torch.int64) - lo.to(torch.int64)  # (N, D), >= 0
    key = torch.zeros(len(shifted), dtype=torch.int64, device=shifted.device)
    for d in range(shifted.shape[1]):  # loop over the D columns only
        key = key * int(extent[d]) + shifted[:, d]
    return key


def _key_space(voxel_coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower bound and extent (D,) int64 of integer coordinates (N, D), for :func:`pack_keys`."""
    lo = voxel_coords.min(dim=0).values.to(torch.int64)
    extent = voxel_coords.max(dim=0).values.to(torch.int64) - lo + 1
    return lo, extent


@dataclass
class Quantization:
    """Result of :func:`quantize` for N points falling into M occupied voxels.

    coords:  (M, 3) int32 voxel coordinates, sorted by their packed key
    index:   (M,) int64, a representative point of each voxel (its first point in input order)
    inverse: (N,) int64, the voxel of each point: ``coords[inverse]`` is each point's voxel
    counts:  (M,) int64, number of points per voxel
    """

    coords: torch.Tensor
    index: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor


def quantize(points, voxel_size: float) -> Quantization:
    """Voxelise ``(N, 3)`` metric points on a grid of edge ``voxel_size`` metres."""
    p = check_points(points)
    if not (isinstance(voxel_size, (int, float)) and voxel_size > 0):
        raise ValueError(f"voxel_size must be a positive number of metres, got {voxel_size!r}")
    if len(p) == 0:
        raise ValueError("quantize got an empty point cloud (0 points); skip this scene upstream")
    scaled = torch.floor(p / voxel_size)  # (N, 3) float, the input's precision
    if float(scaled.abs().max()) >= 2**61:  # a float -> int64 cast beyond this is undefined
        raise ValueError(f"points reach {float(p.abs().max()):.4g} m, {float(scaled.abs().max()):.3g}"
                         f" voxels of {voxel_size} m from the origin: too far for int64 voxel "
                         "coordinates; drop the outlier points or fix the pose that put them there")
    vox = scaled.to(torch.int64)  # (N, 3) int64
    try:
        return unique_voxels(vox)
    except ValueError as e:
        span = (p.max(dim=0).values - p.min(dim=0).values).tolist()
        raise ValueError(f"points span {span[0]:.4g} m x {span[1]:.4g} m x {span[2]:.4g} m at "
                         f"voxel size {voxel_size} m: {e}") from None


def unique_voxels(voxel_coords) -> Quantization:
    """Unique rows of integer ``(N, D)`` coordinates with representative index and inverse map."""
    vox = _as_tensor(voxel_coords, "voxel_coords").to(torch.int64)
    lo, extent = _key_space(vox)
    keys = pack_keys(vox, lo, extent)  # (N,)
    uniq, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    order = torch.arange(len(keys), device=keys.device)
    first = torch.full((len(uniq),), len(keys), dtype=torch.int64, device=keys.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")  # (M,) first point per voxel
    return Quantization(coords=vox[first].to(torch.int32), index=first, inverse=inverse,
                        counts=counts)


@dataclass
class SparseVoxels:
    """A sparse tensor in no engine's type: what networks take and return.

    coords:  (N, 4) int32 batched voxel coordinates, batch index first, in stride-1 grid units
             (multiples of ``stride``); rows unique
    feats:   (N, C) float features, row i belonging to ``coords[i]``
    stride:  the tensor stride (1 for a network's input and output)

    ``F`` and ``C`` are MinkowskiEngine's short names for ``feats`` and ``coords``.
    """

    coords: torch.Tensor
    feats: torch.Tensor
    stride: int = 1

    @property
    def F(self) -> torch.Tensor:  # noqa: N802 (MinkowskiEngine's name)
        return self.feats

    @property
    def C(self) -> torch.Tensor:  # noqa: N802
        return self.coords

    def replace(self, feats: torch.Tensor) -> "SparseVoxels":
        """The same voxels with other features (N, C')."""
        if len(feats) != len(self.coords):
            raise ValueError(f"replacement features have {len(feats)} rows for "
                             f"{len(self.coords)} voxels")
        return SparseVoxels(self.coords, feats, self.stride)


def sparse_tensor(coords, feats, *, device: torch.device | str | None = None) -> SparseVoxels:
    """Checked :class:`SparseVoxels` from batched coordinates ``(N, 4)`` and features ``(N, C)``
    (integer features become float32), on ``device`` (default: that of the features)."""
    c = check_batched_coordinates(coords)
    f = _as_tensor(feats, "features")
    if f.ndim != 2:
        raise ValueError(f"features must have shape (N, C), got {_describe(f)}")
    if len(f) != len(c):
        raise ValueError(f"features have {len(f)} rows but coordinates have {len(c)}; "
                         "they must describe the same voxels")
    if not f.is_floating_point():
        f = f.float()
    device = device if device is not None else f.device
    return SparseVoxels(coords=c.to(device=device, dtype=torch.int32), feats=f.to(device))


def duplicate_rows(coords: torch.Tensor) -> int:
    """Number of rows of integer ``coords`` (N, D) that repeat an earlier row."""
    if len(coords) == 0:
        return 0
    lo, extent = _key_space(coords.to(torch.int64))
    keys = pack_keys(coords, lo, extent)
    return len(keys) - len(torch.unique(keys))
