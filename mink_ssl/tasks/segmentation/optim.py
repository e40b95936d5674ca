"""The optimizer of a segmentation run and the released poly learning-rate schedule."""
from __future__ import annotations

from typing import Callable

import torch

from mink_ssl.engine.build import build_optimizer
from mink_ssl.engine.config import OptimConfig
from mink_ssl.tasks.segmentation.config import SegOptimConfig


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
