"""Batch dataclasses: what collate functions produce and objectives consume.

Shapes use N_v for the voxels of view v over the whole batch, M for the matches and B for the
scenes (pairs) of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch


@dataclass
class View:
    """One view of every scene in the batch, voxelised and independently transformed.

    coords: (N, 4) int32 batched voxel coordinates, batch index first, after the view's random
            rigid transform (the network's input grid)
    feats:  (N, C) float32 input features (constant ones or RGB in [-0.5, 0.5])
    world:  (N, 3) float32 voxel centres in world coordinates *before* the transform
            (ScanNet's world frame: metric, gravity-aligned, z up)

    Camera fields, present only when the dataset was asked for frames
    (``PairDataset(frame_size=(h, w))``, config ``data.frame_size``), else ``None``; row ``b``
    belongs to scene ``b`` (``batch_index == b``):

    frames:     (B, h, w, 3) uint8 RGB frame the view's fragment was measured from, downscaled
    intrinsics: (B, 3, 3) float32 pinhole matrix of ``frames`` (pixel (u, v) with integer
                coordinates looks along ((u - cx) / fx, (v - cy) / fy, 1))
    poses:      (B, 4, 4) float32 camera-to-world; ``inverse(pose) @ world`` with ``intrinsics``
                projects ``world`` into ``frames``

    Before collation (a :class:`~mink_ssl.data.pairs.PairSample`'s view) coords are (N, 3) and
    the camera fields carry no batch dimension: (h, w, 3), (3, 3), (4, 4).
    """

    coords: torch.Tensor
    feats: torch.Tensor
    world: torch.Tensor
    frames: Optional[torch.Tensor] = None
    intrinsics: Optional[torch.Tensor] = None
    poses: Optional[torch.Tensor] = None

    @property
    def batch_index(self) -> torch.Tensor:
        """(N,) int64 scene of each row."""
        return self.coords[:, 0].long()

    @property
    def has_frames(self) -> bool:
        """Whether the camera fields (frames, intrinsics, poses) are present."""
        return self.frames is not None

    def to(self, device) -> "View":
        return View(*(None if (t := getattr(self, f.name)) is None else t.to(device)
                      for f in fields(self)))


@dataclass
class PairBatch:
    """Pairs of overlapping views.

    views:   (view 0, view 1)
    matches: (M, 2) int64; row m pairs ``views[0]`` row ``matches[m, 0]`` with ``views[1]``
             row ``matches[m, 1]`` (voxels within 1.5 voxels in world coordinates); both rows
             belong to the same scene of the batch
    names:   the pair of each scene, e.g. ("scene0000_00/000025", "scene0000_00/000050")
    skipped: pairs dropped from this batch for having too few matches
    voxel_size: metres, the grid of the views' coords (objectives that re-quantise read it here)
    """

    views: tuple[View, View]
    matches: torch.Tensor
    names: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0
    voxel_size: Optional[float] = None

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device) -> "PairBatch":
        return PairBatch((self.views[0].to(device), self.views[1].to(device)),
                         self.matches.to(device), self.names, self.skipped, self.voxel_size)
