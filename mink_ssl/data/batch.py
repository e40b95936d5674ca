"""Batch dataclasses: what collate functions produce and objectives consume.

Shapes use N_v for the voxels of view v over the whole batch and M for the matches.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class View:
    """One view of every scene in the batch, voxelised and independently transformed.

    coords: (N, 4) int32 batched voxel coordinates, batch index first, after the view's random
            rigid transform (the network's input grid)
    feats:  (N, C) float32 input features (constant ones or RGB in [-0.5, 0.5])
    world:  (N, 3) float32 voxel centres in world coordinates *before* the transform
            (ScanNet's world frame: metric, gravity-aligned, z up)
    """

    coords: torch.Tensor
    feats: torch.Tensor
    world: torch.Tensor

    @property
    def batch_index(self) -> torch.Tensor:
        """(N,) int64 scene of each row."""
        return self.coords[:, 0].long()

    def to(self, device) -> "View":
        return View(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class PairBatch:
    """Pairs of overlapping views.

    views:   (view 0, view 1)
    matches: (M, 2) int64; row m pairs ``views[0]`` row ``matches[m, 0]`` with ``views[1]``
             row ``matches[m, 1]`` (voxels within 1.5 voxels in world coordinates); both rows
             belong to the same scene of the batch
    names:   the pair of each scene, e.g. ("scene0000_00/000025", "scene0000_00/000050")
    skipped: pairs dropped from this batch for having too few matches
    """

    views: tuple[View, View]
    matches: torch.Tensor
    names: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device) -> "PairBatch":
        return PairBatch((self.views[0].to(device), self.views[1].to(device)),
                         self.matches.to(device), self.names, self.skipped)
