"""Detection scenes: prepared ScanNet / SUN RGB-D scenes (``mink-ssl-prep scannet-det|sunrgbd``)
as voxelised, augmented samples with VoteNet's vote targets, for the VoteNet-style detector of
:mod:`mink_ssl.models.votenet`.

It reads the detection prep contract (schema ``mink_ssl.det_scenes/1``)::

    <root>/manifest.json   benchmark, classes, splits {train, val}, scenes {name: {file, ...}}
    <root>/scenes/*.npz    coords (N, 3) float32 metres, colors (N, 3) uint8, boxes (K, 7)
                           float32 (centre, full extents, heading about +z), box_labels (K,)
                           int16, instance (N,) int32 (the point's box, -1 for none)

A sample is made as VoteNet makes one (``scannet/scannet_detection_dataset.py``,
``sunrgbd/sunrgbd_detection_dataset.py``; read for the facts, not copied), then voxelised as
PointContrast's SR-UNet variant of VoteNet does (``votenet_det_new``: 2.5 cm voxels for both
benchmarks, one point represents each voxel, here its first; PointContrast fed constant
features, ``ones`` here):

1. ``num_points`` random points are kept (VoteNet: 40,000 ScanNet, 20,000 SUN RGB-D; here
   without replacement, and all points when a scene has fewer: repeats would fall into the same
   voxels anyway);
2. augmentation, one linear map ``p -> A p`` with ``A = s R_z(theta) F``: ``F`` mirrors x (a
   flip about the YZ plane) and, where enabled, y (about the XZ plane), each with probability
   0.5; ``theta`` is uniform in [-rotation_deg, rotation_deg]; ``s`` is uniform in ``scale``.
   VoteNet's recipes: ScanNet flips x and y, rotates by +-5 degrees, no scaling; SUN RGB-D flips
   x, rotates by +-30 degrees, scales by 0.85-1.15. Box centres map with ``A``, sizes scale by
   ``s``; headings become ``pi - h`` (x flip), ``-h`` (y flip), then ``h + theta``. With
   ``axis_aligned`` (ScanNet, whose boxes have no heading) a rotated box is replaced by the
   axis-aligned box around it, as VoteNet's ``rotate_aligned_boxes`` does;
3. voxelisation at ``voxel_size``; each voxel keeps its first point (``points``) and that
   point's colour (features ``rgb``, or constant ``ones``);
4. vote targets of each voxel: ``centre(box) - point`` for the box of its point (``instance``),
   in the augmented frame (an offset maps with ``A`` like the points do, so it is computed on the
   original scene and mapped). VoteNet's loss takes the nearest of up to three ground-truth votes
   (SUN RGB-D: the boxes a point lies in); with ``max_votes > 1`` the further columns are the
   other boxes whose (oriented) volume contains the point, in box order, and short rows repeat
   the first vote, as VoteNet pads them. Points of no box get no vote (``vote_mask`` False).

Adapted from VoteNet: ScanNet votes point at the object's box centre (VoteNet: the centre of
the object's sampled points, which differs only where a part is missing), and the vote of a
point with several boxes starts with the box prep assigned it.

Each training item is a pure function of (seed, epoch, index), as in :mod:`mink_ssl.data.pairs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mink_ssl.data.det_augment import (DetAugmentation, transform_boxes, transform_matrix,
                                       wrap_angle)
from mink_ssl.data.features import FEATURE_MODES, feature_mode, make_features
from mink_ssl.formats.manifest import DET_SCHEMA, read_manifest
from mink_ssl.geometry import points_in_boxes
from mink_ssl.sparse import quantize

KNOWN_SCHEMAS = (DET_SCHEMA,)
FEATURES = tuple(FEATURE_MODES)
SIZE_CLUSTERS = ("reference", "train_mean")

# VoteNet's fixed size clusters (full extents dx, dy, dz in metres, one row per class in the
# order of the benchmark's classes), the values PointContrast's detection runs used:
# ScanNet: ``scannet/meta_data/scannet_means.npz`` (arr_0, 18 x 3, axis-aligned extents);
# SUN RGB-D: ``type_mean_size`` of ``sunrgbd/model_util_sunrgbd.py`` (l along the heading, w, h).
REFERENCE_SIZE_CLUSTERS: dict[str, tuple[tuple[str, ...], tuple[tuple[float, float, float], ...]]] = {
    "scannet": (
        ("cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
         "counter", "desk", "curtain", "refrigerator", "showercurtrain", "toilet", "sink",
         "bathtub", "garbagebin"),
        ((0.76966726, 0.81160211, 0.92573741), (1.876858, 1.84255952, 1.19315654),
         (0.61327999, 0.61486087, 0.71827014), (1.39550063, 1.51215451, 0.83443565),
         (0.97949596, 1.06751485, 0.63296875), (0.53166301, 0.59555772, 1.75001483),
         (0.96247056, 0.72462326, 1.14818682), (0.83221924, 1.04909355, 1.68756634),
         (0.21132214, 0.4206159, 0.53728459), (1.44400728, 1.89708334, 0.26985747),
         (1.02942616, 1.40407966, 0.87554322), (1.37664116, 0.65521793, 1.68131292),
         (0.66508189, 0.71111926, 1.29885307), (0.41999174, 0.37906947, 1.75139715),
         (0.59359559, 0.59124924, 0.73919014), (0.50867595, 0.50656087, 0.30136236),
         (1.15115265, 1.0546296, 0.49706794), (0.47535286, 0.49249493, 0.58021168))),
    "sunrgbd": (
        ("bed", "table", "sofa", "chair", "toilet", "desk", "dresser", "night_stand",
         "bookshelf", "bathtub"),
        ((2.114256, 1.620300, 0.927272), (0.791118, 1.279516, 0.718182),
         (0.923508, 1.867419, 0.845495), (0.591958, 0.552978, 0.827272),
         (0.699104, 0.454178, 0.756250), (0.695190, 1.346299, 0.736364),
         (0.528526, 1.002642, 1.172878), (0.500618, 0.632163, 0.683424),
         (0.404671, 1.071108, 1.688889), (0.765840, 1.398258, 0.472728))),
}


@dataclass
class DetSample:
    """One voxelised, augmented scene before collation (M voxels, K boxes, V votes a voxel).

    coords:     (M, 3) int32 voxel coordinates
    feats:      (M, C) float32 input features
    points:     (M, 3) float32 metric position of each voxel (its first point, augmented)
    votes:      (M, V, 3) float32 vote targets, box centre minus ``points`` (0 without a box)
    vote_mask:  (M,) bool, the voxel's point belongs to a box
    boxes:      (K, 7) float32 augmented boxes: centre, full extents, heading about +z
    box_labels: (K,) int64 class of each box
    """

    coords: torch.Tensor
    feats: torch.Tensor
    points: torch.Tensor
    votes: torch.Tensor
    vote_mask: torch.Tensor
    boxes: torch.Tensor
    box_labels: torch.Tensor
    name: str


@dataclass
class DetBatch:
    """Voxelised scenes for detection (N voxels and G boxes over the B scenes of the batch).

    coords:     (N, 4) int32 batched voxel coordinates, batch index first
    feats:      (N, C) float32 input features (ones, or RGB in [-0.5, 0.5])
    points:     (N, 3) float32 metric position of each voxel (its first point)
    votes:      (N, V, 3) float32 vote targets (box centre minus ``points``)
    vote_mask:  (N,) bool, the voxel has vote targets
    boxes:      (G, 7) float32 ground-truth boxes (centre, full extents, heading)
    box_labels: (G,) int64 class of each box
    box_batch:  (G,) int64 scene of each box
    names:      the scene of each batch index
    """

    coords: torch.Tensor
    feats: torch.Tensor
    points: torch.Tensor
    votes: torch.Tensor
    vote_mask: torch.Tensor
    boxes: torch.Tensor
    box_labels: torch.Tensor
    box_batch: torch.Tensor
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def to(self, device) -> "DetBatch":
        return DetBatch(self.coords.to(device), self.feats.to(device), self.points.to(device),
                        self.votes.to(device), self.vote_mask.to(device), self.boxes.to(device),
                        self.box_labels.to(device), self.box_batch.to(device), self.names)


def collate_detection(samples: list[DetSample]) -> DetBatch:
    """Stack samples into a :class:`DetBatch`, batch index = position in ``samples``."""
    n = torch.tensor([len(s.coords) for s in samples])
    k = torch.tensor([len(s.boxes) for s in samples])
    scene = torch.arange(len(samples))
    batch = torch.repeat_interleave(scene, n)[:, None].to(torch.int32)
    return DetBatch(coords=torch.cat([batch, torch.cat([s.coords for s in samples])], 1),
                    feats=torch.cat([s.feats for s in samples]),
                    points=torch.cat([s.points for s in samples]),
                    votes=torch.cat([s.votes for s in samples]),
                    vote_mask=torch.cat([s.vote_mask for s in samples]),
                    boxes=torch.cat([s.boxes for s in samples]),
                    box_labels=torch.cat([s.box_labels for s in samples]),
                    box_batch=torch.repeat_interleave(scene, k),
                    names=[s.name for s in samples])


# ---------------------------------------------------------------------------- augmentation


# ------------------------------------------------------------------------------ vote targets

def vote_targets(points: np.ndarray, instance: np.ndarray, boxes: np.ndarray,
                 max_votes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """VoteNet's ground-truth votes of points (N, 3) with their box ``instance`` (N,) (-1: none).

    Returns:
        votes (N, max_votes, 3) float32: column 0 is ``centre[instance] - point``; columns 1..
        the other boxes containing the point (box order), short rows repeat column 0; rows of
        points without a box are 0. mask (N,) bool: the point has a box.
    """
    points = np.asarray(points, np.float32)
    instance = np.asarray(instance, np.int64)
    boxes = np.asarray(boxes, np.float32)
    if not isinstance(max_votes, int) or max_votes < 1:
        raise ValueError(f"max_votes must be a positive int, got {max_votes!r}")
    mask = instance >= 0
    centres = boxes[:, :3]
    first = np.where(mask[:, None], centres[np.maximum(instance, 0)] - points, 0)  # (N, 3)
    votes = np.repeat(first[:, None, :], max_votes, axis=1)  # (N, V, 3)
    if max_votes > 1 and mask.any() and len(boxes) > 1:
        rows = np.flatnonzero(mask)
        inside = points_in_boxes(points[rows], boxes)  # (R, K)
        inside[np.arange(len(rows)), instance[rows]] = False  # the first vote already has it
        rank = np.cumsum(inside, axis=1)  # (R, K) 1-based position among the other boxes
        take = inside & (rank < max_votes)
        r, k = np.nonzero(take)
        votes[rows[r], rank[r, k]] = centres[k] - points[rows[r]]
    return votes.astype(np.float32), mask


# ---------------------------------------------------------------------------------- dataset

def read_det_manifest(root: Path) -> dict:
    """``root/manifest.json`` of detection prep after checking the schema and the fields
    training needs."""

    return read_manifest(root, KNOWN_SCHEMAS, "detection prep (mink-ssl-prep scannet-det|sunrgbd)",
                         ("classes", "splits", "scenes"))


class DetectionDataset(Dataset):
    """Scenes of one split of a prepared detection benchmark as :class:`DetSample`.

    Args:
        root: output directory of detection prep (``manifest.json`` + ``scenes/``).
        split: ``train`` or ``val``.
        voxel_size: metres; None: the manifest's (detection prep writes PointContrast's 0.025
            for ScanNet and SUN RGB-D).
        features: input feature mode (:mod:`mink_ssl.data.features`): ``ones`` (3 channels,
            PointContrast), ``rgb`` (RGB / 255 - 0.5), a jitter mode (training only), ``ones1``.
        augmentation: training augmentations; None for none.
        num_points: random points kept per scene before voxelisation (None: all).
        max_votes: ground-truth votes per voxel (VoteNet: 3; see :func:`vote_targets`).
        axis_aligned: boxes stay axis-aligned under augmentation (ScanNet, heading bins 1);
            a scene with a box heading is then refused.
        seed: base seed of the augmentations and the point sampling.
    """

    def __init__(self, root: str | Path, split: str = "train", *, voxel_size: float | None = None,
                 features: str = "rgb", augmentation: DetAugmentation | None = None,
                 num_points: int | None = None, max_votes: int = 1, axis_aligned: bool = False,
                 seed: int = 0):
        feature_mode(features)  # a known mode
        self.root = Path(root)
        self.manifest = read_det_manifest(self.root)
        if voxel_size is None:
            voxel_size = self.manifest.get("voxel_size")
            if voxel_size is None:
                raise ValueError(f"{self.root / 'manifest.json'} names no voxel_size (written "
                                 "before detection prep recorded it): set data.voxel_size=0.025 "
                                 "(PointContrast's) or rerun the prep")
        if not (isinstance(voxel_size, (int, float)) and voxel_size > 0):
            raise ValueError(f"voxel_size must be positive metres, got {voxel_size!r}")
        if num_points is not None and (not isinstance(num_points, int) or num_points < 1):
            raise ValueError(f"num_points must be a positive int or None (all), got "
                             f"{num_points!r}")
        if not isinstance(max_votes, int) or max_votes < 1:
            raise ValueError(f"max_votes must be a positive int, got {max_votes!r}")
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"split {split!r} is not in {self.root / 'manifest.json'}; "
                             f"available: {sorted(splits)}")
        self.split, self.scenes = split, list(splits[split])
        self.voxel_size, self.features = float(voxel_size), features
        self.augmentation, self.num_points = augmentation, num_points
        self.max_votes, self.axis_aligned, self.seed = max_votes, axis_aligned, seed

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

    def _path(self, name: str) -> Path:
        entry = self.manifest["scenes"].get(name)
        if entry is None:
            raise KeyError(f"scene {name!r} is not in {self.root / 'manifest.json'}")
        path = self.root / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} (scene {name!r}) is missing; rerun detection prep, "
                                    "which skips scenes that are complete")
        return path

    def _check_boxes(self, path: Path, boxes: np.ndarray, labels: np.ndarray) -> None:
        k = len(boxes)
        if boxes.shape != (k, 7) or labels.shape != (k,):
            raise ValueError(f"{path}: expected boxes (K, 7) and box_labels (K,), got "
                             f"{boxes.shape}, {labels.shape}")
        if k and ((labels < 0) | (labels >= self.num_classes)).any():
            bad = np.unique(labels[(labels < 0) | (labels >= self.num_classes)])[:5].tolist()
            raise ValueError(f"{path}: box_labels {bad} are outside [0, {self.num_classes})")
        if k and (~np.isfinite(boxes).all() or (boxes[:, 3:6] <= 0).any()):
            raise ValueError(f"{path}: boxes must be finite with sizes > 0")
        if self.axis_aligned and k and (boxes[:, 6] != 0).any():
            raise ValueError(f"{path}: box headings up to {np.abs(boxes[:, 6]).max():.3f} rad but "
                             "the dataset is axis-aligned (one heading bin); use heading bins > 1 "
                             "(model head num_heading_bins) for oriented boxes")

    def load(self, name: str) -> dict[str, np.ndarray]:
        """The scene's arrays (coords, colors, boxes, box_labels int64, instance int64),
        checked against the contract."""
        path = self._path(name)
        with np.load(path) as z:
            missing = [k for k in ("coords", "colors", "boxes", "box_labels", "instance")
                       if k not in z.files]
            if missing:
                raise ValueError(f"{path} lacks arrays {missing} (has {z.files})")
            d = {k: z[k] for k in ("coords", "colors", "boxes", "box_labels", "instance")}
        n = len(d["coords"])
        if n == 0 or d["coords"].shape != (n, 3) or d["colors"].shape != (n, 3) \
                or d["instance"].shape != (n,):
            raise ValueError(f"{path}: expected coords (N, 3), colors (N, 3), instance (N,) with "
                             f"N > 0, got {d['coords'].shape}, {d['colors'].shape}, "
                             f"{d['instance'].shape}")
        d["box_labels"] = d["box_labels"].astype(np.int64)
        d["instance"] = d["instance"].astype(np.int64)
        self._check_boxes(path, d["boxes"], d["box_labels"])
        if ((d["instance"] < -1) | (d["instance"] >= len(d["boxes"]))).any():
            raise ValueError(f"{path}: instance must be in [-1, {len(d['boxes'])})")
        if not np.isfinite(d["coords"]).all():
            raise ValueError(f"{path}: coords contain non-finite values")
        return d

    def boxes_of(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (K, 7) float32 and labels (K,) int64 of a scene, without reading its points."""
        path = self._path(name)
        with np.load(path) as z:
            boxes, labels = z["boxes"], z["box_labels"].astype(np.int64)
        self._check_boxes(path, boxes, labels)
        return boxes, labels

    def size_clusters(self, source: str = "reference") -> np.ndarray:
        """(C, 3) float32 size clusters of the head, one per class.

        ``reference``: VoteNet's fixed values for the manifest's benchmark
        (:data:`REFERENCE_SIZE_CLUSTERS`, what the papers' runs used); ``train_mean``: the
        per-class mean extents of this split (:meth:`mean_sizes`), an option for other data.
        """
        if source not in SIZE_CLUSTERS:
            raise ValueError(f"size clusters must be one of {SIZE_CLUSTERS}, got {source!r}")
        if source == "train_mean":
            return self.mean_sizes()
        bench = self.manifest.get("benchmark")
        if bench not in REFERENCE_SIZE_CLUSTERS:
            raise ValueError(f"{self.root / 'manifest.json'}: benchmark {bench!r} has no "
                             f"reference size clusters (known: {sorted(REFERENCE_SIZE_CLUSTERS)});"
                             " set head.size_clusters=train_mean")
        classes, sizes = REFERENCE_SIZE_CLUSTERS[bench]
        if tuple(self.classes) != classes:
            raise ValueError(f"{self.root / 'manifest.json'}: classes {self.classes} are not "
                             f"VoteNet's {bench} classes {list(classes)} (in order); set "
                             "head.size_clusters=train_mean")
        return np.array(sizes, dtype=np.float32)

    def mean_sizes(self) -> np.ndarray:
        """(C, 3) float32 mean full extents of each class's boxes over the split (VoteNet's
        size clusters, one per class). A class without boxes gets the mean over all boxes
        (1 m where the split has no box at all)."""
        parts = [self.boxes_of(n) for n in self.scenes]
        boxes = np.concatenate([b for b, _ in parts]) if parts else np.zeros((0, 7), np.float32)
        labels = np.concatenate([l for _, l in parts]) if parts else np.zeros(0, np.int64)
        counts = np.bincount(labels, minlength=self.num_classes).astype(np.float64)  # (C,)
        sums = np.stack([np.bincount(labels, boxes[:, 3 + d].astype(np.float64),
                                     minlength=self.num_classes) for d in range(3)], 1)  # (C, 3)
        overall = boxes[:, 3:6].mean(0) if len(boxes) else np.ones(3)
        means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], overall)
        return means.astype(np.float32)

    def __getitem__(self, key) -> DetSample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        name = self.scenes[index]
        d = self.load(name)
        rng = np.random.default_rng([self.seed, epoch, index])
        points, colors, instance = d["coords"], d["colors"], d["instance"]
        if self.num_points is not None and len(points) > self.num_points:
            keep = np.sort(rng.choice(len(points), self.num_points, replace=False))
            points, colors, instance = points[keep], colors[keep], instance[keep]
        boxes = d["boxes"].astype(np.float32)
        A = np.eye(3)
        if self.augmentation is not None:
            params = self.augmentation.draw(rng)
            A = transform_matrix(*params)
            boxes = transform_boxes(boxes, *params, axis_aligned=self.axis_aligned)
        moved = (points.astype(np.float64) @ A.T).astype(np.float32)  # (N, 3)
        q = quantize(moved, self.voxel_size)
        first = q.index.numpy()  # (M,) the point representing each voxel
        votes, mask = vote_targets(points[first], instance[first], d["boxes"], self.max_votes)
        votes = (votes.astype(np.float64) @ A.T).astype(np.float32)  # offsets map like points
        feats = make_features(self.features, colors[first], len(first),
                              rng if self.augmentation is not None else None)  # jitter: training
        return DetSample(coords=q.coords, feats=feats, points=torch.from_numpy(moved[first]),
                         votes=torch.from_numpy(votes), vote_mask=torch.from_numpy(mask),
                         boxes=torch.from_numpy(boxes), box_labels=torch.from_numpy(
                             d["box_labels"]), name=name)


__all__ = ["DetAugmentation", "DetBatch", "DetSample", "DetectionDataset", "collate_detection",
           "points_in_boxes", "read_det_manifest", "transform_boxes", "transform_matrix",
           "vote_targets", "wrap_angle"]
