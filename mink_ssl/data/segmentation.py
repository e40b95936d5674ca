"""Segmentation scenes: the prepared benchmarks (S3DIS, ScanNet, Synthia4D) as voxelised,
augmented, labelled training samples, plus the original points for evaluation.

It reads what segmentation prep writes (schema ``mink_ssl.seg_scenes/1``)::

    <root>/manifest.json   classes, ignore_label (-1), recommended voxel_size, splits, scenes
    <root>/scenes/*.npz    coords (N, 3) float32 metres, colors (N, 3) uint8, labels (N,) int16

Every split, before anything else: with ``prevoxel_size`` (Synthia 7.5 cm, CSC
``PREVOXELIZATION_VOXEL_SIZE``) the scene is thinned to the first point of each cell of that grid.

Training augmentations (what each does, in order): :mod:`mink_ssl.data.seg_augment`.

Limited labels (the data-efficient settings of Contrastive Scene Contexts), both seeded by
``label_seed`` and fixed for the whole run:

- ``scene_fraction``: train on a random fraction of the split's scenes (at least one);
- ``labelled_points``: per scene keep N random labelled points, set every other label to -1.

Voxel labels (``label_rule``): ``uniform`` (the reference: MinkowskiEngine 0.4's
``sparse_quantize(..., labels, ignore_label)`` that the released code calls) gives a voxel the
label its points share and -1 where they differ, an unlabelled (-1) point differing too;
``majority`` (an option) takes the majority label of the voxel's labelled points (-1 where none
is labelled), so a voxel keeps a sparse annotation even when some of its points are unlabelled
or of another class. A voxel's input feature is the colour of its first point.

Evaluation (``eval_scene``): ``points`` protocol, the scene's original points as they are;
``voxels`` protocol (the reference's), the scene after ``prevoxel_size`` and the evaluation crop
``eval_clip_bound`` (Synthia 25 m about the bounding-box centre, CSC ``TEST_CLIP_BOUND``), to be
scored per voxel (:func:`mink_ssl.tasks.segmentation.inference.evaluate_scenes`). Each training
item is a pure function of (seed, epoch, index), as in :mod:`mink_ssl.data.pairs`, and is
independent of the number of loader workers.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mink_ssl.data.features import FEATURE_MODES, feature_mode, make_features
from mink_ssl.data.seg_augment import (Augmentation, augment, augment_scene, crop_mask,
                                       elastic_distortion, rotation_matrix, voxel_dropout)
from mink_ssl.formats.manifest import SEG_SCHEMA, read_manifest
from mink_ssl.sparse import quantize

KNOWN_SCHEMAS = (SEG_SCHEMA,)
FEATURES = tuple(FEATURE_MODES)
UP_AXES = {"x": 0, "y": 1, "z": 2}
LABEL_RULES = ("uniform", "majority")
EVAL_PROTOCOLS = ("voxels", "points")


@dataclass
class SegBatch:
    """Voxelised scenes for segmentation.

    coords: (N, 4) int32 batched voxel coordinates, batch index first
    feats:  (N, C) float32 input features (ones, or RGB in [-0.5, 0.5])
    labels: (N,) int64 class of each voxel in [0, num_classes), -1 = ignore
    names:  the scene of each batch index
    """

    coords: torch.Tensor
    feats: torch.Tensor
    labels: torch.Tensor
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device) -> "SegBatch":
        return SegBatch(self.coords.to(device), self.feats.to(device), self.labels.to(device),
                        self.names)


@dataclass
class SegSample:
    """One voxelised scene before collation: coords (M, 3) int32, feats (M, C), labels (M,)."""

    coords: torch.Tensor
    feats: torch.Tensor
    labels: torch.Tensor
    name: str


def collate_segmentation(samples: list[SegSample]) -> SegBatch:
    """Stack samples into a :class:`SegBatch`, batch index = position in ``samples``."""
    n = torch.tensor([len(s.coords) for s in samples])
    batch = torch.repeat_interleave(torch.arange(len(samples)), n)[:, None].to(torch.int32)
    return SegBatch(coords=torch.cat([batch, torch.cat([s.coords for s in samples])], 1),
                    feats=torch.cat([s.feats for s in samples]),
                    labels=torch.cat([s.labels for s in samples]),
                    names=[s.name for s in samples])


def prevoxel_index(points: np.ndarray, size: float) -> np.ndarray:
    """(M,) int64 index of the first point of each occupied cell of edge ``size`` metres, in
    input order (CSC's prevoxelisation keeps one point per cell)."""
    return np.sort(quantize(points, size).index.numpy())


def voxel_labels(inverse: torch.Tensor, labels: torch.Tensor, num_voxels: int,
                 num_classes: int, rule: str = "uniform") -> torch.Tensor:
    """(M,) int64 label of each voxel. ``inverse`` (N,) voxel of each point, ``labels`` (N,).

    ``uniform`` (the reference): the label all the voxel's points share, -1 where any two differ
    (-1 counting as a label); ``majority``: the majority label of the voxel's labelled points (-1
    where none is labelled; ties go to the smaller class index)."""
    if rule not in LABEL_RULES:
        raise ValueError(f"label rule must be one of {LABEL_RULES}, got {rule!r}")
    labels = labels.long()
    if rule == "uniform":
        inverse = inverse.to(labels.device)
        lo = torch.full((num_voxels,), num_classes, dtype=torch.int64, device=labels.device)
        hi = torch.full((num_voxels,), -1, dtype=torch.int64, device=labels.device)
        lo = lo.scatter_reduce(0, inverse, labels, reduce="amin")  # (M,)
        hi = hi.scatter_reduce(0, inverse, labels, reduce="amax")
        return torch.where(lo == hi, lo, torch.full_like(lo, -1))
    keep = labels >= 0
    counts = torch.zeros(num_voxels * num_classes, dtype=torch.int32, device=labels.device)
    counts.index_add_(0, inverse[keep] * num_classes + labels[keep],
                      torch.ones(int(keep.sum()), dtype=torch.int32, device=labels.device))
    counts = counts.view(num_voxels, num_classes)  # (M, C)
    best, arg = counts.max(1)
    return torch.where(best > 0, arg, torch.full_like(arg, -1))


def limit_labels(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``labels`` (N,) with only ``n`` random labelled points kept (others -1); all
    of them if the scene has no more than ``n``."""
    out = np.full_like(labels, -1)
    labelled = np.flatnonzero(labels >= 0)
    keep = labelled if len(labelled) <= n else rng.choice(labelled, n, replace=False)
    out[keep] = labels[keep]
    return out


def select_scenes(names: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded random ``fraction`` of ``names`` (at least one), in the original order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"scene_fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1:
        return list(names)
    k = max(1, int(round(fraction * len(names))))
    rng = np.random.default_rng([seed, zlib.crc32(b"scene_fraction")])  # apart from label seeds
    chosen = np.sort(rng.permutation(len(names))[:k])
    return [names[i] for i in chosen]


def _scene_seed(seed: int, name: str) -> list[int]:
    return [seed, zlib.crc32(name.encode())]


def read_seg_manifest(root: Path) -> dict:
    """``root/manifest.json`` of segmentation prep, checked (schema, fields, ignore label -1)."""

    manifest = read_manifest(root, KNOWN_SCHEMAS, "segmentation prep (mink-ssl-prep "
                             "s3dis|synthia|scannet-seg)",
                             ("classes", "ignore_label", "splits", "scenes"))
    if manifest["ignore_label"] != -1:
        raise ValueError(f"{Path(root) / 'manifest.json'}: ignore_label is "
                         f"{manifest['ignore_label']!r}, the contract says -1")
    return manifest


class SegmentationDataset(Dataset):
    """Scenes of one split of a prepared benchmark as augmented, voxelised :class:`SegSample`.

    Args:
        root: output directory of segmentation prep (``manifest.json`` + ``scenes/``).
        split: a split of the manifest ('train', 'val', 'test').
        voxel_size: metres; None takes the manifest's recommendation (S3DIS 5 cm, ScanNet 2 cm,
            Synthia 15 cm).
        features: input feature mode (:mod:`mink_ssl.data.features`): 'rgb' (RGB / 255 - 0.5,
            the released segmentation), 'ones', a jitter mode (jitter in training only), 'ones1'.
        augmentation: training augmentations; None for none.
        up_axis: the gravity axis of the scenes' coordinates ('z', or 'y' for raw Synthia).
        scene_fraction: use this seeded fraction of the split's scenes.
        labelled_points: keep this many random labelled points per scene (None: all).
        label_seed: seed of both limited-label selections (fixed for the run).
        seed: base seed of the augmentations.
        prevoxel_size: metres; thin every scene to one point per cell of this size first (CSC's
            Synthia: 0.075); None: off.
        eval_clip_bound: metres; the ``voxels`` evaluation keeps the points within this half
            size of the bounding-box centre (CSC's Synthia: 25); None: all.
        label_rule: voxel labels, ``uniform`` (the reference) or ``majority``
            (:func:`voxel_labels`).
    """

    def __init__(self, root: str | Path, split: str = "train", *, voxel_size: float | None = None,
                 features: str = "rgb", augmentation: Augmentation | None = None,
                 up_axis: str = "z", scene_fraction: float = 1.0,
                 labelled_points: int | None = None, label_seed: int = 0, seed: int = 0,
                 prevoxel_size: float | None = None, eval_clip_bound: float | None = None,
                 label_rule: str = "uniform"):
        feature_mode(features)  # a known mode
        if up_axis not in UP_AXES:
            raise ValueError(f"up_axis must be one of {sorted(UP_AXES)}, got {up_axis!r}")
        if labelled_points is not None and (not isinstance(labelled_points, int)
                                            or labelled_points < 1):
            raise ValueError(f"labelled_points must be a positive int or None (all), got "
                             f"{labelled_points!r}")
        self.root = Path(root)
        self.manifest = read_seg_manifest(self.root)
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"split {split!r} is not in {self.root / 'manifest.json'}; "
                             f"available: {sorted(splits)}")
        self.split = split
        self.voxel_size = float(voxel_size if voxel_size is not None
                                else self.manifest.get("voxel_size") or 0)
        if self.voxel_size <= 0:
            raise ValueError(f"voxel_size must be positive metres, got {voxel_size!r} (and the "
                             f"manifest recommends {self.manifest.get('voxel_size')!r})")
        self.features, self.augmentation = features, augmentation
        self.up_axis = UP_AXES[up_axis]
        self.scene_fraction, self.labelled_points = scene_fraction, labelled_points
        self.label_seed, self.seed = label_seed, seed
        for key, value in (("prevoxel_size", prevoxel_size), ("eval_clip_bound", eval_clip_bound)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{key} must be positive metres or None (off), got {value!r}")
        if label_rule not in LABEL_RULES:
            raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {label_rule!r}")
        self.prevoxel_size, self.eval_clip_bound = prevoxel_size, eval_clip_bound
        self.label_rule = label_rule
        self.scenes = select_scenes(splits[split], scene_fraction, label_seed)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def in_channels(self) -> int:
        return feature_mode(self.features).channels

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The scene's original points (N, 3) float32, colours (N, 3) uint8 and full labels
        (N,) int64, checked against the contract."""
        entry = self.manifest["scenes"].get(name)
        if entry is None:
            raise KeyError(f"scene {name!r} is not in {self.root / 'manifest.json'}")
        path = self.root / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} (scene {name!r}) is missing; rerun segmentation "
                                    "prep, which skips scenes that are complete")
        with np.load(path) as z:
            missing = [k for k in ("coords", "colors", "labels") if k not in z.files]
            if missing:
                raise ValueError(f"{path} lacks arrays {missing} (has {z.files})")
            points, colors, labels = z["coords"], z["colors"], z["labels"]
        n = len(points)
        if points.shape != (n, 3) or colors.shape != (n, 3) or labels.shape != (n,) or n == 0:
            raise ValueError(f"{path}: expected coords (N, 3), colors (N, 3), labels (N,) with "
                             f"N > 0, got {points.shape}, {colors.shape}, {labels.shape}")
        labels = labels.astype(np.int64)
        bad = (labels < -1) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(f"{path}: labels {np.unique(labels[bad])[:5].tolist()} are outside "
                             f"[0, {self.num_classes}) and not -1; fix the label mapping in prep")
        if not np.isfinite(points).all():
            raise ValueError(f"{path}: coords contain non-finite values")
        return points.astype(np.float32), colors.astype(np.uint8), labels

    def training_labels(self, name: str, labels: np.ndarray) -> np.ndarray:
        """``labels`` after the limited-label setting (the same points every epoch)."""
        if self.labelled_points is None:
            return labels
        return limit_labels(labels, self.labelled_points,
                            np.random.default_rng(_scene_seed(self.label_seed, name)))

    def __getitem__(self, key) -> SegSample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        name = self.scenes[index]
        points, colors, labels = self.load(name)
        labels = self.training_labels(name, labels)
        points, colors, labels = self._prevoxelise(points, colors, labels)
        rng = None  # training (augmented) samples only: augmentations and feature jitter
        if self.augmentation is not None:
            rng = np.random.default_rng([self.seed, epoch, index])
            points, colors, labels = augment_scene(points, colors, labels, self.augmentation,
                                                   rng, self.up_axis)
        q = quantize(points, self.voxel_size)
        first, coords = q.index.numpy(), q.coords  # (M,) first point of each voxel, (M, 3)
        vlabels = voxel_labels(q.inverse, torch.from_numpy(labels), len(q.coords),
                               self.num_classes, self.label_rule)
        if rng is not None:  # augmentation 8, dropout of voxels
            kept = voxel_dropout(len(first), self.augmentation.dropout, rng)
            if kept is not None:
                t = torch.from_numpy(kept)
                first, coords, vlabels = first[kept], coords[t], vlabels[t]
        feats = make_features(self.features, colors[first], len(first), rng)
        return SegSample(coords=coords, feats=feats, labels=vlabels, name=name)

    def _prevoxelise(self, points, colors, labels):
        if self.prevoxel_size is None:
            return points, colors, labels
        keep = prevoxel_index(points, self.prevoxel_size)
        return points[keep], colors[keep], labels[keep]

    def eval_scene(self, name: str, protocol: str = "voxels"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A scene's (points, colours, full labels) for evaluation: as they are (``points``), or
        after ``prevoxel_size`` and the ``eval_clip_bound`` crop (``voxels``, the reference)."""
        if protocol not in EVAL_PROTOCOLS:
            raise ValueError(f"eval protocol must be one of {EVAL_PROTOCOLS}, got {protocol!r}")
        points, colors, labels = self.load(name)
        if protocol == "points":
            return points, colors, labels
        points, colors, labels = self._prevoxelise(points, colors, labels)
        if self.eval_clip_bound is not None:
            keep = crop_mask(points, self.eval_clip_bound, np.zeros(3))
            points, colors, labels = points[keep], colors[keep], labels[keep]
        return points, colors, labels

    def scenes_for_eval(self, protocol: str = "points"
                        ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        """(name, points, colours, full labels) of every scene, unaugmented (:meth:`eval_scene`)."""
        for name in self.scenes:
            yield (name, *self.eval_scene(name, protocol))


__all__ = [
    "EVAL_PROTOCOLS", "LABEL_RULES", "SegBatch", "SegSample", "SegmentationDataset",
    "Augmentation", "augment", "augment_scene", "collate_segmentation", "crop_mask",
    "elastic_distortion", "limit_labels", "prevoxel_index", "read_seg_manifest",
    "rotation_matrix", "select_scenes", "voxel_dropout", "voxel_labels"]
