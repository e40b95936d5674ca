"""Point-cloud crops for the distillation objective: spherical crops of view 0 around seeded
centres at given scales, the points two crops share, and per-group caps on sampled points.
Vectorised over voxels, crops and scenes (see :mod:`mink_ssl.objectives.distillation`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from mink_ssl.sparse import unique_voxels


# --- crops ------------------------------------------------------------------------------------

@dataclass
class Crops:
    """C crops of each of the B scenes of a view, stacked as one batched sparse input.

    Rows (M of them) are sorted by crop, then scene: the rows of the first I crops (the global
    ones) come first. Crop c of scene b has batch index ``c * B + b``.

    coords:   (M, 4) int32 batched voxel coordinates of the rotated, re-quantised crops
    origin:   (M,) int64 the view row each crop voxel comes from
    crop:     (M,) int64 crop number of each row, in [0, C)
    centres:  (B, C) int64 view row at the centre of each crop
    ratios:   (B, C) float sampled fraction r of the scene's voxels in each crop
    angles:   (B, C) float rotation of each crop about the vertical, radians
    selected: (B, C) int64 voxels of the scene inside each crop, before re-quantisation
    """

    coords: torch.Tensor
    origin: torch.Tensor
    crop: torch.Tensor
    centres: torch.Tensor
    ratios: torch.Tensor
    angles: torch.Tensor
    selected: torch.Tensor


def check_scales(scales: Sequence[Sequence[float]]) -> torch.Tensor:
    t = torch.as_tensor([list(s) for s in scales], dtype=torch.float64)
    if t.ndim != 2 or t.shape[1] != 2 or len(t) == 0:
        raise ValueError(f"crop scales must be a list of (lo, hi) ranges, got {scales}")
    bad = ~((t[:, 0] > 0) & (t[:, 0] <= t[:, 1]) & (t[:, 1] <= 1))
    if bad.any():
        raise ValueError(f"crop scale {t[bad][0].tolist()} is not a range 0 < lo <= hi <= 1 "
                         "(fractions of a scene's voxels)")
    return t


def nearest_in_plane(xy: torch.Tensor, batch_index: torch.Tensor, centres: torch.Tensor,
                     keep: torch.Tensor) -> torch.Tensor:
    """Mask (N, C): for every scene b and crop c, the ``keep[b, c]`` rows of scene b nearest to
    row ``centres[b, c]`` in ``xy`` (N, 2) (ties: lower row first).

    Args: xy (N, 2), batch_index (N,) int64, centres (B, C) int64 rows, keep (B, C) int64.
    """
    n = len(xy)
    dist = (xy[:, None, :] - xy[centres][batch_index]).square().sum(-1)  # (N, C)
    by_dist = torch.sort(dist, dim=0, stable=True).indices  # (N, C)
    by_scene = torch.sort(batch_index[by_dist], dim=0, stable=True).indices  # (N, C)
    order = by_dist.gather(0, by_scene)  # (N, C): rows grouped by scene, nearest first
    counts = torch.bincount(batch_index, minlength=len(centres))  # (B,)
    starts = counts.cumsum(0) - counts  # (B,)
    rank_sorted = (torch.arange(n, device=xy.device)[:, None]
                   - starts[batch_index[order]])  # (N, C) rank of order[p, c] in its scene
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (N, C)
    return rank < keep[batch_index]  # (N, C)


def make_crops(world: torch.Tensor, batch_index: torch.Tensor, scales: Sequence[Sequence[float]],
               voxel_size: float, generator: torch.Generator | None = None,
               num_scenes: int | None = None) -> Crops:
    """Random crops of every scene (DCGLR eqs. 4-5), rotated about z and re-quantised.

    Crop c of scene b keeps ``round(r N_b)`` voxels (at least 1), r ~ U(scales[c]), nearest in
    the horizontal plane to a uniformly drawn voxel of the scene; the kept voxel centres are
    rotated about the vertical through that centre by a uniform angle and quantised with
    ``voxel_size``; a cell hit by several voxels keeps the lowest row.

    Args:
        world: (N, 3) voxel centres in metres, z up.
        batch_index: (N,) scene of each row, in [0, B).
        scales: C ranges (lo, hi) of r, one per crop (global crops first).
        voxel_size: grid of the re-quantisation, metres.
        generator: source of randomness (None: torch's global RNG).
        num_scenes: B; ``batch_index.max() + 1`` when None.
    """
    if world.ndim != 2 or world.shape[1] != 3 or len(world) != len(batch_index):
        raise ValueError(f"expected world (N, 3) and batch_index (N,), got "
                         f"{tuple(world.shape)} and {tuple(batch_index.shape)}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0 metres, got {voxel_size}")
    if len(world) == 0:
        raise ValueError("cannot crop an empty view (0 voxels)")
    device = world.device
    ranges = check_scales(scales).to(device)  # (C, 2)
    batch_index = batch_index.long()
    b = int(batch_index.max()) + 1 if num_scenes is None else num_scenes
    c = len(ranges)
    counts = torch.bincount(batch_index, minlength=b)  # (B,)
    if (counts == 0).any():
        raise ValueError(f"scenes {(counts == 0).nonzero()[:, 0].tolist()} have no voxels; "
                         "drop them from the batch")
    by_scene = torch.sort(batch_index, stable=True).indices  # (N,)
    starts = counts.cumsum(0) - counts  # (B,)
    u = torch.rand(b, c, generator=generator, device=device, dtype=torch.float64)
    pick = torch.minimum((u * counts[:, None]).long(), counts[:, None] - 1)  # (B, C)
    centres = by_scene[starts[:, None] + pick]  # (B, C) rows
    ratios = ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * torch.rand(
        b, c, generator=generator, device=device, dtype=torch.float64)  # (B, C)
    keep = torch.round(ratios * counts[:, None]).long().clamp(min=1)  # (B, C)
    angles = 2 * math.pi * torch.rand(b, c, generator=generator, device=device,
                                      dtype=torch.float64)  # (B, C)

    mask = nearest_in_plane(world[:, :2].double(), batch_index, centres, keep)  # (N, C)
    rows, crop = mask.nonzero(as_tuple=True)  # (R,), (R,): row-major, lowest row first
    scene = batch_index[rows]  # (R,)
    rel = world[rows].double() - world[centres[scene, crop]].double()  # (R, 3)
    cos, sin = angles[scene, crop].cos(), angles[scene, crop].sin()  # (R,)
    rotated = torch.stack([cos * rel[:, 0] - sin * rel[:, 1], sin * rel[:, 0] + cos * rel[:, 1],
                           rel[:, 2]], 1)  # (R, 3)
    vox = torch.floor(rotated / voxel_size).long()  # (R, 3)
    keyed = torch.cat([(crop * b + scene)[:, None], vox], 1)  # (R, 4)
    q = unique_voxels(keyed)
    first = q.index[torch.sort(keyed[q.index, 0], stable=True).indices]  # (M,) by crop, scene
    selected = torch.zeros(b, c, dtype=torch.long, device=device).index_add_(
        0, batch_index, mask.long())  # (B, C)
    return Crops(coords=keyed[first].to(torch.int32), origin=rows[first], crop=crop[first],
                 centres=centres, ratios=ratios, angles=angles, selected=selected)


# --- shared points ----------------------------------------------------------------------------

def match_shared_points(origin: torch.Tensor, crop: torch.Tensor, num_teacher_crops: int,
                        num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of crop rows holding the same view row: teacher crop i < I against crop j != i.

    Args:
        origin: (M,) view row of each crop row (unique within a crop).
        crop: (M,) crop of each row.
        num_teacher_crops: I, the crops the teacher sees (crops 0 .. I-1).
        num_rows: rows of the view (``origin < num_rows``).

    Returns: (teacher rows (P,), student rows (P,)), indices into the M crop rows, with
    ``origin[teacher] == origin[student]``, ``crop[teacher] < I`` and
    ``crop[teacher] != crop[student]``.
    """
    i = num_teacher_crops
    teacher_rows = (crop < i).nonzero()[:, 0]  # (M_t,)
    lookup = torch.full((i, num_rows), -1, dtype=torch.long, device=origin.device)  # (I, N)
    lookup[crop[teacher_rows], origin[teacher_rows]] = teacher_rows
    candidate = lookup[:, origin]  # (I, M): row of teacher crop i holding each row's point
    other = crop[None, :] != torch.arange(i, device=crop.device)[:, None]  # (I, M)
    which, student = ((candidate >= 0) & other).nonzero(as_tuple=True)  # (P,), (P,)
    return candidate[which, student], student


def cap_per_group(group: torch.Tensor, cap: int, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Indices of a uniform random subset of at most ``cap`` members of each group (K,).

    ``group`` (P,) int64 labels; shuffle, sort by label (stable), keep the first ``cap`` of each.
    """
    perm = torch.randperm(len(group), generator=generator, device=group.device)  # (P,)
    order = perm[torch.sort(group[perm], stable=True).indices]  # (P,) grouped, shuffled within
    sorted_group = group[order]
    rank = (torch.arange(len(group), device=group.device)
            - torch.searchsorted(sorted_group, sorted_group))  # (P,) position in its group
    return order[rank < cap]
