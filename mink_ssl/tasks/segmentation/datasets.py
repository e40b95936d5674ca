"""The datasets of a segmentation run: a split of a prepared benchmark with the training
augmentations and limited labels, and the check of what ``data.labelled_points`` means on it."""
from __future__ import annotations

from mink_ssl.data.segmentation import Augmentation, SegmentationDataset
from mink_ssl.tasks.segmentation.config import SegDataConfig


def build_seg_dataset(cfg: SegDataConfig, split: str, *, train: bool, seed: int):
    """The split's :class:`~mink_ssl.data.segmentation.SegmentationDataset`; training data gets
    the augmentations and the limited-label settings, evaluation data neither."""
    if cfg.root in ("???", "", None):
        raise ValueError("data.root is not set: pass data.root=<output of segmentation prep>")
    aug = None
    if train and cfg.augment:
        a = cfg.augmentation
        aug = Augmentation(rotation_deg=a.rotation_deg, tilt_deg=a.tilt_deg,
                           scale=tuple(a.scale), flip=a.flip,
                           elastic=tuple(tuple(e) for e in a.elastic),
                           color_auto_contrast=a.color_auto_contrast,
                           color_translation=a.color_translation, color_jitter=a.color_jitter,
                           dropout=a.dropout, clip_bound=a.clip_bound,
                           clip_translation=tuple(a.clip_translation))
    return SegmentationDataset(
        cfg.root, split, voxel_size=cfg.voxel_size, features=cfg.features, augmentation=aug,
        up_axis=cfg.up_axis, scene_fraction=cfg.scene_fraction if train else 1.0,
        labelled_points=cfg.labelled_points if train else None, label_seed=cfg.label_seed,
        seed=seed, prevoxel_size=cfg.prevoxel_size, eval_clip_bound=cfg.eval_clip_bound,
        label_rule=cfg.label_rule)


def check_labelled_points(train_set, n: int | None) -> str:
    """What ``data.labelled_points`` means on ``train_set`` (from the manifest's point
    counts): '' when every training scene has more points; a note naming the smaller scenes
    (they keep all their labels); ValueError when no scene has more (the setting changes
    nothing)."""
    if n is None:
        return ""
    sizes = {s: int(train_set.manifest["scenes"][s]["points"]) for s in train_set.scenes}
    small = sorted((p, s) for s, p in sizes.items() if p <= n)
    if not small:
        return ""
    if len(small) == len(sizes):
        raise ValueError(f"data.labelled_points={n} is at least the size of every training "
                         f"scene (largest: {max(sizes.values())} points), so every label would "
                         "be kept; use data.labelled_points=null for all labels, or a smaller "
                         "number")
    return (f"; {len(small)} of {len(sizes)} training scenes have at most {n} points (smallest: "
            f"{small[0][1]}, {small[0][0]} points) and keep all their labels")
