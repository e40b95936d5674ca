"""The optimizer of a detection run with VoteNet's schedule in epochs (learning-rate steps)."""
from __future__ import annotations

import math

import torch

from mink_ssl.engine.build import build_optimizer
from mink_ssl.engine.config import OptimConfig
from mink_ssl.tasks.detection.config import DetOptimConfig


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
