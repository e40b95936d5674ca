"""Pretraining, end to end: build the pieces from a :class:`PretrainConfig`, train, export.

    from mink_ssl.engine.pretrain import pretrain
    pretrain(config, out_dir=Path("runs/pt"))     # what `mink-ssl-pretrain` calls

One build function per plug-in point; each takes explicit arguments.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from mink_ssl.engine.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig


def build_backbone(cfg: ModelConfig, in_channels: int) -> nn.Module:
    from mink_ssl.models import build_model

    return build_model(cfg.name, in_channels=in_channels, out_channels=cfg.out_channels,
                       stem_kernel_size=cfg.stem_kernel_size, bn_momentum=cfg.bn_momentum,
                       block_bn_momentum=cfg.block_bn_momentum, init=cfg.init,
                       normalize_output=cfg.normalize_output)


def build_objectives(spec: dict, feature_channels: int | None = None) -> tuple[dict, dict]:
    """``{name: {weight, **kwargs}}`` -> (objectives, weights); unknown names or arguments
    are errors that list the valid choices. Objectives with heads get ``in_channels`` =
    ``feature_channels`` (the backbone's output width) unless the spec sets it."""
    import mink_ssl.objectives  # noqa: F401  (registers the objectives)
    from mink_ssl.objectives import OBJECTIVES

    if not spec:
        raise ValueError(f"no objective configured; choose from {OBJECTIVES.names()}")
    objectives, weights = {}, {}
    for name, args in spec.items():
        cls = OBJECTIVES.get(name)
        args = dict(args or {})
        weights[name] = float(args.pop("weight", 1.0))
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise ValueError(f"objective {name!r} has no argument(s) {unknown}; valid: "
                             f"{['weight'] + params}")
        if "in_channels" in params and args.get("in_channels") is None and feature_channels:
            args["in_channels"] = feature_channels
        objectives[name] = cls(**args)
    return objectives, weights


def import_plugins(modules: list[str]) -> None:
    """Import user modules (e.g. objectives registered with ``@OBJECTIVES.register``)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"imports: cannot import {name!r} ({e}); it must be importable "
                             "from the current PYTHONPATH") from e


def build_dataset(cfg: DataConfig, seed: int):
    from mink_ssl.data.pairs import PairDataset

    if cfg.root in ("???", "", None):
        raise ValueError("data.root is not set: pass data.root=<output of mink-ssl-prep scannet>")
    return PairDataset(cfg.root, voxel_size=cfg.voxel_size, rotation_deg=cfg.rotation_deg,
                       rotation_axis=cfg.rotation_axis, scale=tuple(cfg.scale),
                       translation=cfg.translation, features=cfg.features,
                       match_radius=cfg.match_radius, max_matches=cfg.max_matches,
                       min_matches=cfg.min_matches, max_depth=cfg.max_depth, seed=seed,
                       frame_size=None if cfg.frame_size is None else tuple(cfg.frame_size))


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


def _schedule(cfg: OptimConfig) -> str:
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
                 world_size: int, start: int, collate_fn=None):
    """Endless loader of ``dataset`` for this rank, resuming after ``start`` samples
    (:class:`~mink_ssl.data.pairs.ResumableSampler`); ``collate_fn`` defaults to pairs'."""
    from torch.utils.data import DataLoader

    from mink_ssl.data.pairs import ResumableSampler, collate_pairs

    sampler = ResumableSampler(len(dataset), seed=seed, rank=rank, world_size=world_size,
                               start=start)
    # its own generator: creating the iterator must not draw from the global RNG, which the
    # objectives sample from and a checkpoint restores
    from mink_ssl.safety import ignore_stop_signals

    # workers leave SIGINT / SIGTERM to the training process (it stops at a step boundary)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
                      collate_fn=collate_fn or collate_pairs, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))


def pretrain(cfg: PretrainConfig, out_dir: Path, print_fn=print) -> Path:
    """Train as ``cfg`` says, writing into ``out_dir``; returns the exported backbone's path."""
    from mink_ssl.engine import checkpoint as ck
    from mink_ssl.engine.distributed import cleanup, init_distributed, start_run, wrap_ddp
    from mink_ssl.engine.hooks import CheckpointHook, LoggingHook
    from mink_ssl.engine.rundir import stop_check
    from mink_ssl.engine.trainer import PretrainModule, Trainer
    from mink_ssl.safety import StopSignals

    out_dir = Path(out_dir)
    if cfg.max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {cfg.max_iterations} (0 would export "
                         "an untrained backbone)")
    info, device = init_distributed(cfg.device, cfg.distributed.backend)
    run = None
    try:
        plain = asdict(cfg)
        run = start_run(out_dir, plain, info, cfg.resume, cfg.resume_override, print_fn,
                        "pretraining")
        torch.manual_seed(cfg.seed)  # same initial weights on every rank

        import_plugins(cfg.imports)
        dataset = build_dataset(cfg.data, cfg.seed)
        workers = resolve_num_workers(cfg.data.num_workers,
                                      int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        backbone = build_backbone(cfg.model, dataset.in_channels)
        objectives, weights = build_objectives(cfg.objectives, cfg.model.out_channels)
        module = PretrainModule(backbone, objectives, weights, cfg.freeze_bn).to(device)
        module = wrap_ddp(module, info, device, cfg.distributed.sync_bn,
                          cfg.distributed.find_unused_parameters)
        trainable = [p for p in module.parameters() if p.requires_grad]  # not an EMA teacher
        optimizer, scheduler = build_optimizer(cfg.optim, trainable, info.world_size,
                                               cfg.max_iterations)
        if info.is_main:
            scaling = (f"{cfg.optim.lr:g} x {info.world_size} ranks (linear scaling)"
                       if cfg.optim.scale_lr_with_world_size and info.world_size > 1
                       else "not scaled with world size")
            print_fn(f"pretrain: {len(dataset)} pairs, {cfg.model.name}, objectives "
                     f"{weights}, batch {cfg.batch_size} per rank x {info.world_size} ranks = "
                     f"{cfg.batch_size * info.world_size} global, lr "
                     f"{optimizer.defaults['lr']:g} ({scaling}{_schedule(cfg.optim)}), "
                     f"{workers} loader workers, "
                     f"device {device}, out {out_dir}")

        trainer = Trainer(module, optimizer, scheduler, iter(()), cfg.max_iterations,
                          cfg.batch_size, device)
        resume, ckpt = run.load_resume(ck.load_checkpoint)
        if resume:
            run.restore(ckpt, trainer, ck.restore)
            if info.is_main:
                print_fn(f"resumed from {resume} at iteration {trainer.state.iteration}")
        run.record(trainer.state.iteration, resume)  # the checks passed: config.json now
        loader = build_loader(dataset, cfg.batch_size, workers, cfg.seed, info.rank,
                              info.world_size, trainer.state.samples)
        trainer.batches = iter(loader)
        # objectives' hooks (e.g. an EMA teacher update) run right after the optimizer step,
        # so that logs and checkpoints see their result
        trainer.hooks = [*ck._unwrap(module).objective_hooks(),
                         LoggingHook(out_dir, cfg.log_every, info.is_main, cfg.progress, print_fn),
                         CheckpointHook(out_dir, cfg.checkpoint_every, plain,
                                        enabled=info.is_main)]
        with StopSignals("saving a checkpoint at the next step boundary, then stopping") as sig:
            trainer.should_stop = stop_check(sig, info, device)
            trainer.train()
        if trainer.stopped:
            raise run.interrupted(trainer, sig.signum)
        return out_dir / "backbone.pth"
    finally:
        if run is not None:
            run.close()
        cleanup(info)
