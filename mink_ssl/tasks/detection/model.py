"""The pieces of a detection run: datasets, the VoteNet model on the backbone, the optimizer with
VoteNet's epoch schedule, the trainer's module (VoteNet's loss) and the resume check of the
head."""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn

from mink_ssl.data.detection import DetAugmentation, DetectionDataset
from mink_ssl.engine.build import build_backbone, build_optimizer
from mink_ssl.engine.checkpoint import unwrap
from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.models.heads import check_final_layer
from mink_ssl.models.votenet import build_votenet
from mink_ssl.tasks.detection.config import DetDataConfig, DetHeadConfig, DetOptimConfig
from mink_ssl.tasks.detection.loss import votenet_loss


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


def build_det_model(cfg: ModelConfig, head: DetHeadConfig, in_channels: int, num_classes: int,
                    mean_sizes):
    rebuild = check_final_layer(head.final_layer) == "rebuild"
    if rebuild:  # the backbone's final layer gives the seed features
        cfg = replace(cfg, out_channels=head.seed_channels)
    return build_votenet(build_backbone(cfg, in_channels), num_classes, mean_sizes,
                         num_heading_bins=head.num_heading_bins, num_seeds=head.num_seeds,
                         seed_channels=head.seed_channels, num_proposals=head.num_proposals,
                         radius=head.radius, group_size=head.group_size,
                         seed_projection=not rebuild)


def epoch_milestones(epochs: list, iterations_per_epoch: float) -> list[int]:
    """First iteration of each epoch in ``epochs`` (sorted)."""
    return [math.ceil(e * iterations_per_epoch - 1e-9) for e in sorted(epochs)]


def build_det_optimizer(cfg: DetOptimConfig, params, iterations_per_epoch: float,
                        world_size: int = 1):
    """(optimizer, per-iteration scheduler): lr x ``lr_gamma`` at each epoch of ``lr_steps``;
    the optimizer comes from pretraining's builder."""
    opt, _ = build_optimizer(OptimConfig(name=cfg.name, lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay,
                                         scale_lr_with_world_size=cfg.scale_lr_with_world_size),
                             params, world_size)
    bad = [e for e in cfg.lr_steps if not (isinstance(e, int) and e > 0)]
    if bad:
        raise ValueError(f"optim.lr_steps are epochs (positive ints), got {cfg.lr_steps}")
    milestones = epoch_milestones(cfg.lr_steps, iterations_per_epoch)
    gamma = cfg.lr_gamma

    def factor(t: int) -> float:
        return gamma ** sum(t >= m for m in milestones)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class DetectionModule(nn.Module):
    """The trainer's module: ``forward(batch)`` -> VoteNet's loss (``loss``), its terms
    (``loss_*``, detached) and statistics (``stat_*``), see
    :func:`mink_ssl.tasks.detection.loss.votenet_loss`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, iteration: int = 0, max_iterations: int = 1) -> dict:
        head = self.model.head
        out = self.model(batch.coords, batch.feats, batch.points)
        losses = votenet_loss(out, votes=batch.votes, vote_mask=batch.vote_mask,
                              boxes=batch.boxes, box_labels=batch.box_labels,
                              box_batch=batch.box_batch, mean_sizes=head.mean_sizes,
                              num_heading_bins=head.num_heading_bins)
        return {k: v if k == "loss" else v.detach() for k, v in losses.items()}


def check_head(ckpt: dict, trainer) -> None:
    """A resumed run's detection head must be the checkpoint's (classes, bins, mean sizes)."""
    want, saved = unwrap(trainer.module).model.head.config(), ckpt["head"]
    diff = [k for k in want if k != "mean_sizes" and saved.get(k) != want[k]]
    if not torch.allclose(torch.tensor(saved["mean_sizes"]), torch.tensor(want["mean_sizes"])):
        diff.append("mean_sizes (the training split's boxes changed?)")
    if diff:
        raise ValueError(f"the checkpoint's detection head differs from the configured one in "
                         f"{diff}; resume with the run's own config and data")
