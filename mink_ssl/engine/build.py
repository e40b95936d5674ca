"""Builders every task shares: the backbone, the optimizer and its learning-rate schedule, the
endless resumable loader, and user plug-in imports. Each takes explicit arguments."""
from __future__ import annotations

import importlib
import math
import os
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from mink_ssl.data.samplers import ResumableSampler
from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.models import build_model
from mink_ssl.signals import ignore_stop_signals


def build_backbone(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """The backbone ``cfg`` names, taking ``in_channels`` input features."""
    return build_model(cfg.name, in_channels=in_channels, out_channels=cfg.out_channels,
                       stem_kernel_size=cfg.stem_kernel_size, bn_momentum=cfg.bn_momentum,
                       block_bn_momentum=cfg.block_bn_momentum, init=cfg.init,
                       normalize_output=cfg.normalize_output, engine=cfg.engine)


def import_plugins(modules: list[str]) -> None:
    """Import user modules (e.g. objectives registered with ``@OBJECTIVES.register``)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"imports: cannot import {name!r} ({e}); it must be importable "
                             "from the current PYTHONPATH") from e


def lr_factor(cfg: OptimConfig, max_iterations: int):
    """The learning rate's factor at step t (0-based): ``warmup_iterations`` steps rising
    linearly to 1 ((t + 1) / W), then ``step`` (lr_gamma ** (t // lr_step), counted from the
    start of the run as without warm-up) or ``cosine`` ((1 + cos(pi (t - W) / (T - W))) / 2,
    0 at T = max_iterations)."""
    w, total = cfg.warmup_iterations, max(max_iterations, 1)
    if not isinstance(w, int) or not 0 <= w < total:
        raise ValueError(f"optim.warmup_iterations must be an int in [0, max_iterations="
                         f"{total}), got {w!r}")
    if cfg.schedule not in ("step", "cosine"):
        raise ValueError(f"unknown optim.schedule {cfg.schedule!r}; valid choices: step, cosine")

    def factor(t: int) -> float:
        if t < w:
            return (t + 1) / w
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t - w, total - w) / (total - w)))
        return cfg.lr_gamma ** (t // cfg.lr_step)
    return factor


def describe_schedule(cfg: OptimConfig) -> str:
    """How the learning rate moves, for the run's first line; nothing for the step default."""
    warm = f", {cfg.warmup_iterations} warm-up steps" if cfg.warmup_iterations else ""
    return f"{warm}, {cfg.schedule}" if warm or cfg.schedule != "step" else ""


def build_optimizer(cfg: OptimConfig, params, world_size: int = 1, max_iterations: int = 1):
    """The optimizer and its learning-rate scheduler (stepped once per iteration)."""
    lr = cfg.lr * (world_size if cfg.scale_lr_with_world_size else 1)
    if cfg.name == "sgd":
        if not 0.0 <= cfg.dampening < 1.0:
            raise ValueError(f"optim.dampening must be in [0, 1), got {cfg.dampening!r}")
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, dampening=cfg.dampening,
                              weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    elif cfg.name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}; valid choices: adam, adamw, sgd")
    factor = lr_factor(cfg, max_iterations)
    if cfg.schedule == "step" and cfg.warmup_iterations == 0:  # checkpoints of earlier runs
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step,
                                                    gamma=cfg.lr_gamma)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def resolve_num_workers(value, local_world_size: int = 1) -> int:
    """``"auto"``: the cores of this rank (those the process may run on, shared by the ranks of
    the node) minus one for the training process itself, between 1 and 8; or the integer given.
    More workers than that only steal cycles from the training process."""
    if value == "auto":
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
        return max(1, min(8, cores // max(1, local_world_size) - 1))
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"data.num_workers must be 'auto' or an integer >= 0, got {value!r}")


def build_loader(dataset, batch_size: int, num_workers: int, seed: int, rank: int,
                 world_size: int, start: int, collate_fn: Callable):
    """Endless loader of ``dataset`` for this rank, resuming after ``start`` samples
    (:class:`~mink_ssl.data.samplers.ResumableSampler`), batches made by ``collate_fn``."""
    sampler = ResumableSampler(len(dataset), seed=seed, rank=rank, world_size=world_size,
                               start=start)
    # its own generator: creating the iterator must not draw from the global RNG, which the
    # objectives sample from and a checkpoint restores
    # workers leave SIGINT / SIGTERM to the training process (it stops at a step boundary)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
                      collate_fn=collate_fn, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))
