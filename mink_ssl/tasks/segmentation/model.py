"""The pieces of a segmentation run: datasets, the model (backbone + classifier), the optimizer
with the released poly schedule, and the trainer's module (cross-entropy over labelled voxels)."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn as nn

from mink_ssl.data.segmentation import Augmentation, SegmentationDataset
from mink_ssl.engine.build import build_backbone, build_optimizer
from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.models.heads import SegmentationModel, check_final_layer
from mink_ssl.sparse import sparse_tensor
from mink_ssl.tasks.segmentation.config import SegDataConfig, SegOptimConfig


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


def build_seg_model(cfg: ModelConfig, in_channels: int, num_classes: int,
                    final_layer: str = "rebuild"):
    """Backbone + classifier; ``final_layer="rebuild"`` builds the backbone with
    ``out_channels=num_classes`` (its final layer is the classifier), ``"keep"`` with
    ``cfg.out_channels`` and a head on top (:mod:`mink_ssl.models.heads`)."""
    if check_final_layer(final_layer) == "rebuild":
        cfg = replace(cfg, out_channels=num_classes)
    return SegmentationModel(build_backbone(cfg, in_channels), num_classes, final_layer)


def poly_lambda(max_iterations: int, power: float) -> Callable[[int], float]:
    """lr factor (1 - t / (T + 1))^power, 0 from T + 1 on: the released code's ``PolyLR``
    (PointContrast / CSC ``downstream/semseg/lib/solvers.py``), so the last step's lr is not 0."""
    def factor(t: int) -> float:
        return max(0.0, 1.0 - t / (max_iterations + 1)) ** power

    return factor


def build_seg_optimizer(cfg: SegOptimConfig, params, max_iterations: int, world_size: int = 1):
    """(optimizer, per-iteration scheduler); the optimizer comes from pretraining's builder."""
    if cfg.scheduler not in ("poly", "step"):
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}; valid choices: poly, step")
    opt, step = build_optimizer(
        OptimConfig(name=cfg.name, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                    weight_decay=cfg.weight_decay, lr_step=cfg.lr_step, lr_gamma=cfg.lr_gamma,
                    scale_lr_with_world_size=cfg.scale_lr_with_world_size), params, world_size)
    if cfg.scheduler == "step":
        return opt, step
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(max(max_iterations, 1),
                                                                   cfg.poly_power))


class SegmentationModule(nn.Module):
    """The trainer's module: ``forward(batch)`` -> cross-entropy over labelled voxels and stats.

    Returns ``loss`` (= ``loss_ce``), ``stat_acc`` (voxel accuracy on labelled voxels) and
    ``stat_labelled`` (labelled voxels in the batch). A batch without any labelled voxel (possible
    with very few labelled points per scene) gives a zero loss that still reaches every weight.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, iteration: int = 0, max_iterations: int = 1) -> dict:
        logits = self.model(sparse_tensor(batch.coords, batch.feats)).F  # (N, C)
        labelled = batch.labels >= 0  # (N,)
        n = labelled.sum()
        if int(n) == 0:
            loss = logits.sum() * 0.0
            acc = torch.zeros((), device=logits.device)
        else:
            target = batch.labels[labelled]
            loss = nn.functional.cross_entropy(logits[labelled], target)
            acc = (logits[labelled].argmax(1) == target).float().mean().detach()
        return {"loss": loss, "loss_ce": loss.detach(), "stat_acc": acc,
                "stat_labelled": n.float()}


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
