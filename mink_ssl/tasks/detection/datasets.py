"""The datasets of a detection run: a split of a prepared benchmark, with VoteNet's training
augmentations."""
from __future__ import annotations

from mink_ssl.data.detection import DetAugmentation, DetectionDataset
from mink_ssl.tasks.detection.config import DetDataConfig


def build_det_dataset(cfg: DetDataConfig, split: str, *, train: bool, axis_aligned: bool,
                      seed: int):
    """The split's :class:`~mink_ssl.data.detection.DetectionDataset`; training data gets the
    augmentations, evaluation data none."""
    if cfg.root in ("???", "", None):
        raise ValueError("data.root is not set: pass data.root=<output of detection prep>")
    aug = None
    if train and cfg.augment:
        a = cfg.augmentation
        aug = DetAugmentation(flip_x=a.flip_x, flip_y=a.flip_y, rotation_deg=a.rotation_deg,
                              scale=tuple(a.scale))
    return DetectionDataset(cfg.root, split, voxel_size=cfg.voxel_size, features=cfg.features,
                            augmentation=aug, num_points=cfg.num_points,
                            max_votes=cfg.max_votes, axis_aligned=axis_aligned, seed=seed)
