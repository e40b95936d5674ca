"""The pair dataset: two overlapping fragments of a scene as independently transformed,
voxelised views with their voxel correspondences.

It reads what ``mink-ssl-prep scannet`` wrote (``manifest.json``, ``pairs.txt`` and the
fragment stores) and refuses a manifest schema it does not know. Each item is a pure function
of ``(seed, epoch, index)``, so augmentation does not depend on the number of loader workers
and a resumed run sees the same data as an uninterrupted one.

At ScanNet's size (1,513 scenes, ~850K pairs) nothing a process holds grows with the scenes it
has read: the pair list is a :class:`~mink_ssl.data.pair_list.PairList` (int32 arrays, 12
bytes a pair, shared copy-on-write by forked loader workers) and each process keeps at most
:data:`STORES_OPEN` fragment stores open (:class:`~mink_ssl.formats.fragments.StoreCache`);
docs/scale.md has the measured figures.

With ``frame_size=(h, w)`` every view also carries the camera it was measured with, for
rendering objectives: the fragment's RGB frame downscaled to (h, w), the depth intrinsics
scaled to it and the camera-to-world pose (all three are in the fragment store already).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mink_ssl.data.batch import PairBatch, View
from mink_ssl.data.correspondence import (find_matches, random_similarity_transform,
                                          self_check_matches, to_tensor)
from mink_ssl.data.features import FEATURE_MODES, feature_mode, make_features
from mink_ssl.data.pair_list import PairList
from mink_ssl.formats import manifest
from mink_ssl.formats.fragments import FragmentStore, StoreCache, check_scene_files
from mink_ssl.formats.manifest import PAIRS_SCHEMA
from mink_ssl.sparse import quantize

KNOWN_SCHEMAS = (PAIRS_SCHEMA,)
FEATURES = tuple(FEATURE_MODES)
# fragment stores each process keeps open (one descriptor each), the most recently used: a pair
# reads one scene, so a worker needs one; what grows with the scenes it touched would exhaust
# a node's `ulimit -n` (1024) on ScanNet's 1,513 scenes
STORES_OPEN = 8


@dataclass
class PairSample:
    """One pair before collation (per view: coords (N, 3) int32, feats (N, C), world (N, 3);
    with frames also frames (h, w, 3) uint8, intrinsics (3, 3), poses (4, 4))."""

    views: tuple[View, View]
    matches: torch.Tensor  # (M, 2) int64
    names: tuple[str, str]
    voxel_size: float | None = None  # metres, the grid of the views' coords


def read_manifest(root: Path) -> dict:
    """``root/manifest.json`` of ScanNet pair prep, schema checked."""
    return manifest.read_manifest(root, KNOWN_SCHEMAS, "`mink-ssl-prep scannet`")


class PairDataset(Dataset):
    """Pairs of ``root/pairs.txt`` as :class:`PairSample` (None when too few matches).

    Args:
        root: output directory of ScanNet pair prep.
        voxel_size: metres (2.5 cm for pretraining).
        rotation_deg: each view is rotated by up to this angle (360: any) ...
        rotation_axis: ... about a random axis ('random', the original) or gravity ('z').
        scale: uniform scale range per view ((1, 1): none, the original).
        translation: uniform translation range per view, metres.
        features: input feature mode (:mod:`mink_ssl.data.features`): ``ones_jitter``
            (PointContrast), ``rgb_jitter`` (CSC), ``ones``, ``rgb`` or ``ones1``.
        match_radius: correspondence radius in voxels (1.5).
        max_matches: cap on matches per pair (random subset), None for all.
        min_matches: a pair with fewer matches is skipped (returned as None) and counted.
        max_depth: ignore depth beyond this many metres when loading fragments.
        seed: base seed of the augmentation.
        frame_size: (h, w): add each view's RGB frame resized to h x w, its intrinsics and
            pose (see :class:`~mink_ssl.data.batch.View`); ``None`` (default): no frames.
        verify_matches: pairs whose correspondences are checked against brute force when the
            dataset is built (a few hundred voxels each; 0: off). A disagreement raises.
    """

    def __init__(self, root: str | Path, *, voxel_size: float = 0.025, rotation_deg: float = 360.0,
                 rotation_axis: str = "random", scale: Sequence[float] = (1.0, 1.0),
                 translation: float = 0.0, features: str = "rgb", match_radius: float = 1.5,
                 max_matches: int | None = None, min_matches: int = 32,
                 max_depth: float | None = None, seed: int = 0,
                 frame_size: Sequence[int] | None = None, verify_matches: int = 2):
        feature_mode(features)  # a known mode
        if voxel_size <= 0 or match_radius <= 0:
            raise ValueError(f"voxel_size and match_radius must be positive, got {voxel_size}, "
                             f"{match_radius}")
        if rotation_axis not in ("random", "z"):
            raise ValueError(f"rotation_axis must be 'random' or 'z', got {rotation_axis!r}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be a range (lo, hi) with 0 < lo <= hi, got {scale}")
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.voxel_size, self.rotation_deg, self.rotation_axis = voxel_size, rotation_deg, rotation_axis
        self.scale, self.translation, self.features = tuple(scale), translation, features
        self.match_radius, self.max_matches, self.min_matches = match_radius, max_matches, min_matches
        self.max_depth, self.seed = max_depth, seed
        self.frame_size = check_frame_size(frame_size)
        self.pairs = PairList.read(self.root / self.manifest.get("pairs_file", "pairs.txt"))
        check_scene_files(self.root, self.pairs.scenes)  # missing / truncated stores, named now
        self._stores = StoreCache(self.root, STORES_OPEN)
        self.match_check = self.verify_matches(verify_matches)

    def verify_matches(self, n: int) -> dict:
        """Check the correspondence search of ``n`` seeded pairs against brute force
        (:func:`~mink_ssl.data.correspondence.self_check_matches`); raises on a disagreement."""
        rng = np.random.default_rng([self.seed, 2**31])  # apart from the items' streams
        total = {"pairs_checked": 0, "rows_checked": 0, "matches_checked": 0}
        for index in rng.choice(len(self.pairs), min(n, len(self.pairs)), replace=False):
            scene, fa, fb = self.pairs[index]
            v0, v1 = self._view(scene, fa, rng), self._view(scene, fb, rng)
            w0, w1 = v0.world.numpy(), v1.world.numpy()
            radius = self.match_radius * self.voxel_size
            got = self_check_matches(w0, w1, radius, find_matches(w0, w1, radius), rng=rng)
            total = {"pairs_checked": total["pairs_checked"] + 1,
                     **{k: total[k] + v for k, v in got.items()}}
        self._stores.clear()  # loader workers open their own
        return total

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def in_channels(self) -> int:
        return feature_mode(self.features).channels

    def __getstate__(self) -> dict:  # a spawned worker opens its own stores
        return {**vars(self), "_stores": StoreCache(self.root, self._stores.capacity)}

    def _store(self, scene: str) -> FragmentStore:
        return self._stores.get(scene)

    def _view(self, scene: str, frame: int, rng: np.random.Generator) -> View:
        frag = self._store(scene).by_frame(
            frame, color=feature_mode(self.features).colour or self.frame_size is not None)
        points, colors = frag.points(self.max_depth)  # (P, 3) world, (P, 3) uint8
        T = random_similarity_transform(rng, self.rotation_deg, self.rotation_axis, self.scale,
                                   self.translation)
        centred = points - points.mean(axis=0)
        moved = centred @ T[:3, :3].T.astype(np.float32) + T[:3, 3].astype(np.float32)
        q = quantize(moved, self.voxel_size)
        index = q.index.numpy()  # (N,) a point of each voxel
        feats = make_features(self.features, None if colors is None else colors[index],
                              len(index), rng)  # jitter modes draw from the pair's rng
        view = View(coords=q.coords, feats=feats, world=to_tensor(points[index], torch.float32))
        if self.frame_size is not None:
            view.frames, view.intrinsics = resize_frame(frag.color, frag.intrinsics,
                                                        self.frame_size)
            view.poses = to_tensor(frag.pose, torch.float32)
        return view

    def __getitem__(self, key) -> PairSample | None:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        scene, fa, fb = self.pairs[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        v0, v1 = self._view(scene, fa, rng), self._view(scene, fb, rng)
        matches = find_matches(v0.world.numpy(), v1.world.numpy(),
                               self.match_radius * self.voxel_size, self.max_matches, rng)
        if len(matches) < self.min_matches:
            return None
        return PairSample((v0, v1), torch.from_numpy(matches),
                          (f"{scene}/{fa:06d}", f"{scene}/{fb:06d}"), self.voxel_size)


def check_frame_size(frame_size: Sequence[int] | None) -> tuple[int, int] | None:
    """``frame_size`` as (h, w) ints, or None; ``ValueError`` naming a bad value."""
    if frame_size is None:
        return None
    try:
        size = tuple(frame_size)
        ok = len(size) == 2 and all(float(v).is_integer() and v >= 1 for v in size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"frame_size must be (height, width) in pixels, e.g. (60, 80), or None "
                         f"for no frames; got {frame_size!r}")
    return int(size[0]), int(size[1])


def resize_frame(color: np.ndarray, intrinsics: np.ndarray, size_hw: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """An (H, W, 3) uint8 frame resized to (h, w) (antialiased bilinear) and its 3x3 (or 4x4)
    pinhole ``intrinsics`` scaled to match: (h, w, 3) uint8 and (3, 3) float32.

    Pixel centres sit at integer coordinates (the convention of
    :func:`mink_ssl.geometry.backproject`), so a continuous coordinate maps as
    ``u' = (u + 0.5) * w / W - 0.5``: fx' = fx w / W, cx' = (cx + 0.5) w / W - 0.5 (same for y).
    """
    from PIL import Image

    H, W = color.shape[:2]
    h, w = size_hw
    frame = color if (H, W) == (h, w) else np.array(
        Image.fromarray(color).resize((w, h), Image.BILINEAR))
    K = np.asarray(intrinsics, np.float64)[:3, :3].copy()
    sx, sy = w / W, h / H
    K[0, 0], K[0, 1], K[0, 2] = K[0, 0] * sx, K[0, 1] * sx, (K[0, 2] + 0.5) * sx - 0.5
    K[1, 1], K[1, 2] = K[1, 1] * sy, (K[1, 2] + 0.5) * sy - 0.5
    return torch.from_numpy(np.ascontiguousarray(frame)), torch.from_numpy(K.astype(np.float32))


def collate_pairs(samples: list[PairSample | None]) -> PairBatch | None:
    """Batch samples: coordinates get their batch index, matches their row offsets; frames,
    intrinsics and poses (when the dataset adds them) are stacked to (B, ...).

    Skipped samples (None) are dropped and counted in ``batch.skipped``; an all-skipped batch
    is None.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    views = []
    for v in range(2):
        parts = [s.views[v] for s in kept]
        n = torch.tensor([len(p.coords) for p in parts])
        batch = torch.repeat_interleave(torch.arange(len(parts)), n)[:, None].to(torch.int32)
        camera = {}
        if parts[0].has_frames:  # one dataset made every sample: all have frames or none
            camera = {name: torch.stack([getattr(p, name) for p in parts])
                      for name in ("frames", "intrinsics", "poses")}
        views.append(View(coords=torch.cat([batch, torch.cat([p.coords for p in parts])], 1),
                          feats=torch.cat([p.feats for p in parts]),
                          world=torch.cat([p.world for p in parts]), **camera))
    offsets = torch.stack([torch.tensor([0] + [len(s.views[v].coords) for s in kept[:-1]])
                           .cumsum(0) for v in range(2)], 1)  # (B, 2) row offsets per view
    matches = torch.cat([s.matches + offsets[k] for k, s in enumerate(kept)])  # (M, 2)
    return PairBatch((views[0], views[1]), matches, [s.names for s in kept],
                     skipped=len(samples) - len(kept), voxel_size=kept[0].voxel_size)


