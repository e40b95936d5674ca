"""Fine-tuning for 3D object detection (VoteNet-style head on the Res16UNet backbone), end to
end: build from a :class:`FinetuneDetConfig`, load pretrained backbone weights (strictly) or
start from scratch, train with the shared :class:`~mink_ssl.engine.trainer.Trainer` and hooks,
evaluate (per-class AP at IoU 0.25 / 0.5), write the results.

    from mink_ssl.engine.finetune_det import finetune_det
    finetune_det(config, out_dir=Path("runs/det"))      # what `mink-ssl-finetune-det` calls

The default schedule is VoteNet's, which PointContrast kept: Adam (lr 1e-3, no weight decay)
for 180 epochs, lr x0.1 at epochs 80, 120 and 160, batch-norm momentum 0.5 halved every 20
epochs (floor 0.001). Epochs count samples: one epoch is ``len(train split) / world size``
scenes per process, so epoch ``e`` starts at iteration ``ceil(e * scenes / batch_size)``; the
schedule is stepped every iteration. Benchmark recipes (voxel size, points, augmentations,
heading bins, batch) live in ``configs/detection/<benchmark>.yaml``.

The run directory holds ``config.json``; ``checkpoint_<it>.pth`` (format
``mink_ssl.det_checkpoint/1``: model and head, optimizer, scheduler, iteration, sampler
position, RNG; ``resume=auto`` continues exactly); ``model.pth`` (backbone + head,
:func:`mink_ssl.models.votenet.load_detection_model`); ``tb/`` scalars; ``val_history.json``
(periodic evaluations); ``best/model.pth`` and ``best/best.json`` (the model of the periodic
evaluation with the highest mAP at the first IoU threshold, ``eval.keep_best``); ``results.md`` /
``results.json`` / ``results_pr.png`` (the final evaluation: per-class AP and recall, mAP,
precision/recall curves).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from mink_ssl.engine.config import DistributedConfig, ModelConfig, OptimConfig
from mink_ssl.engine.checkpoint import _unwrap
from mink_ssl.engine.finetune import (EvalHook, load_task_checkpoint, restore_task,
                                      save_task_checkpoint, start_weights)
from mink_ssl.engine.trainer import Hook
from mink_ssl.formats.model_files import DET_CHECKPOINT_FORMAT


# ----------------------------------------------------------------------------------- config

@dataclass
class DetAugmentConfig:
    """VoteNet's training augmentations (:class:`mink_ssl.data.detection.DetAugmentation`)."""

    flip_x: bool = True  # mirror x with probability 0.5
    flip_y: bool = True  # mirror y with probability 0.5 (ScanNet; SUN RGB-D: false)
    rotation_deg: float = 5.0  # about +z, uniform in [-r, r] (ScanNet 5, SUN RGB-D 30)
    scale: list = field(default_factory=lambda: [1.0, 1.0])  # SUN RGB-D [0.85, 1.15]


@dataclass
class DetDataConfig:
    root: str = "???"  # output directory of detection prep (manifest.json + scenes/)
    voxel_size: float = 0.025  # metres (PointContrast's detection runs: 2.5 cm)
    features: str = "ones"  # mink_ssl.data.features mode; ones: PointContrast's detection
    num_points: Optional[int] = 40000  # random points per scene before voxelisation; null: all
    max_votes: int = 1  # ground-truth votes per voxel (VoteNet: 3 for SUN RGB-D)
    train_split: str = "train"
    eval_split: Optional[str] = "val"  # null: no evaluation
    augment: bool = True
    augmentation: DetAugmentConfig = field(default_factory=DetAugmentConfig)
    num_workers: Any = "auto"  # loader processes per rank; auto: free cores - 1, at most 8


@dataclass
class DetHeadConfig:
    """The VoteNet head (:class:`mink_ssl.models.votenet.VoteNetHead`)."""

    num_heading_bins: int = 1  # 1: axis-aligned boxes (ScanNet); SUN RGB-D 12
    size_clusters: str = "reference"  # reference (VoteNet's fixed sizes) | train_mean
    num_seeds: int = 1024
    seed_channels: int = 256
    num_proposals: int = 256
    radius: float = 0.3  # metres, vote aggregation ball
    group_size: int = 16  # votes per ball
    # rebuild: the backbone's final layer gives the seeds' seed_channels (96 -> 256, the released
    # SparseConvBackbone) | keep: the pretrained 96 -> 32 final + Linear/BN/ReLU to seed_channels
    final_layer: str = "rebuild"


@dataclass
class DetOptimConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    lr_steps: list = field(default_factory=lambda: [80, 120, 160])  # epochs
    lr_gamma: float = 0.1
    bn_momentum_init: Optional[float] = 0.5  # VoteNet's batch-norm momentum decay; null: off
    bn_momentum_decay: float = 0.5  # factor every bn_momentum_step epochs
    bn_momentum_step: int = 20
    bn_momentum_min: float = 0.001
    scale_lr_with_world_size: bool = False


@dataclass
class DetEvalConfig:
    every: int = 10  # evaluate on data.eval_split every this many epochs (0: at the end only)
    iou_thresholds: list = field(default_factory=lambda: [0.25, 0.5])
    conf_threshold: float = 0.05  # objectness probability a proposal needs
    nms_iou: float = 0.25  # per-class 3D NMS
    nms: str = "aligned_hull"  # aligned_hull (VoteNet: IoU of axis-aligned hulls) | oriented
    per_class_proposal: bool = True  # each kept box once per class, score p(class) p(object)
    batch_size: int = 4  # scenes per evaluation forward pass
    keep_best: bool = True  # best/model.pth: the best periodic evaluation's (first threshold)


@dataclass
class FinetuneDetConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    head: DetHeadConfig = field(default_factory=DetHeadConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    eval: DetEvalConfig = field(default_factory=DetEvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pretrained: Optional[str] = None  # backbone.pth or a checkpoint; null: from scratch
    seed: int = 0
    epochs: int = 180
    batch_size: int = 8  # scenes per process (global batch = batch_size x world size)
    device: str = "auto"
    checkpoint_every: int = 10  # epochs
    log_every: int = 10  # iterations
    progress: bool = True
    resume: Optional[str] = None  # a checkpoint path, or "auto": the latest in the run dir
    # resume with changed optimizer / schedule settings (recorded in config_history.json)
    resume_override: bool = False


# ---------------------------------------------------------------------------------- builders

def build_det_dataset(cfg: DetDataConfig, split: str, *, train: bool, axis_aligned: bool,
                      seed: int):
    """The split's :class:`~mink_ssl.data.detection.DetectionDataset`; training data gets the
    augmentations, evaluation data none."""
    from mink_ssl.data.detection import DetAugmentation, DetectionDataset

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
    from dataclasses import replace

    from mink_ssl.engine.pretrain import build_backbone
    from mink_ssl.models.heads import check_final_layer
    from mink_ssl.models.votenet import build_votenet

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
    from mink_ssl.engine.pretrain import build_optimizer

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


# ------------------------------------------------------------------------- module, checkpoint

class DetectionModule(nn.Module):
    """The trainer's module: ``forward(batch)`` -> VoteNet's loss (``loss``), its terms
    (``loss_*``, detached) and statistics (``stat_*``), see
    :func:`mink_ssl.models.votenet.votenet_loss`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, iteration: int = 0, max_iterations: int = 1) -> dict:
        from mink_ssl.models.votenet import votenet_loss

        head = self.model.head
        out = self.model(batch.coords, batch.feats, batch.points)
        losses = votenet_loss(out, votes=batch.votes, vote_mask=batch.vote_mask,
                              boxes=batch.boxes, box_labels=batch.box_labels,
                              box_batch=batch.box_batch, mean_sizes=head.mean_sizes,
                              num_heading_bins=head.num_heading_bins)
        return {k: v if k == "loss" else v.detach() for k, v in losses.items()}


def check_head(ckpt: dict, trainer) -> None:
    """A resumed run's detection head must be the checkpoint's (classes, bins, mean sizes)."""
    want, saved = _unwrap(trainer.module).model.head.config(), ckpt["head"]
    diff = [k for k in want if k != "mean_sizes" and saved.get(k) != want[k]]
    if not torch.allclose(torch.tensor(saved["mean_sizes"]), torch.tensor(want["mean_sizes"])):
        diff.append("mean_sizes (the training split's boxes changed?)")
    if diff:
        raise ValueError(f"the checkpoint's detection head differs from the configured one in "
                         f"{diff}; resume with the run's own config and data")


class BNMomentumHook(Hook):
    """VoteNet's batch-norm momentum decay: ``max(init * decay ** (epoch // step), minimum)``
    for every batch-norm layer (backbone and head), set before training and whenever the epoch
    (``iteration / iterations_per_epoch``) changes."""

    def __init__(self, module: nn.Module, iterations_per_epoch: float, init: float,
                 decay: float, step: int, minimum: float):
        if not (0 < init <= 1 and 0 < decay <= 1 and step >= 1 and 0 <= minimum <= init):
            raise ValueError(f"batch-norm momentum schedule needs 0 < init <= 1, 0 < decay <= "
                             f"1, step >= 1, 0 <= minimum <= init; got init={init}, "
                             f"decay={decay}, step={step}, minimum={minimum}")
        self.module, self.ipe = module, iterations_per_epoch
        self.init, self.decay, self.step, self.minimum = init, decay, step, minimum
        self.current: float | None = None

    def momentum(self, epoch: int) -> float:
        return max(self.init * self.decay ** (epoch // self.step), self.minimum)

    def _apply(self, iteration: int) -> None:
        m = self.momentum(int(iteration / self.ipe + 1e-9))
        if m != self.current:
            for layer in self.module.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.momentum = m
            self.current = m

    def before_train(self, trainer) -> None:
        self._apply(trainer.state.iteration)

    def after_step(self, trainer) -> None:
        self._apply(trainer.state.iteration)


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset, device: torch.device, *, batch_size: int = 4,
                      conf_threshold: float = 0.05, nms_iou: float = 0.25,
                      per_class_proposal: bool = True, iou_thresholds=(0.25, 0.5),
                      nms: str = "aligned_hull"):
    """Per-class AP of ``model`` (a :class:`~mink_ssl.models.votenet.VoteNetDetector`) on
    every scene of ``dataset`` (unaugmented), -> :class:`~mink_ssl.eval.detection.
    DetectionResult`. Axis-aligned heads (one heading bin) are scored with axis-aligned IoU."""
    from mink_ssl.data.detection import collate_detection
    from mink_ssl.eval.detection import DetectionEvaluator
    from mink_ssl.models.votenet import detect

    head = model.head
    evaluator = DetectionEvaluator(head.num_classes, dataset.classes, tuple(iou_thresholds))
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(dataset), batch_size):
            batch = collate_detection([dataset[i] for i in range(lo, min(lo + batch_size,
                                                                         len(dataset)))])
            batch = batch.to(device)
            out = model(batch.coords, batch.feats, batch.points)
            det = detect(out, head.mean_sizes, head.num_heading_bins,
                         conf_threshold=conf_threshold, nms_iou=nms_iou,
                         per_class_proposal=per_class_proposal, nms=nms)
            gt = batch.boxes[:, :6] if head.num_heading_bins == 1 else batch.boxes
            evaluator.update(det.boxes, det.scores, det.labels, gt, batch.box_labels,
                             pred_batch=det.batch, gt_batch=batch.box_batch,
                             num_scenes=len(batch))
    finally:
        model.train(was_training)
    return evaluator.compute()


def write_det_results(out_dir: Path, result, extra: dict) -> dict:
    """``results.md`` / ``results_pr.png`` (:func:`~mink_ssl.eval.detection.
    write_detection_report`) and ``results.json`` = ``extra`` plus every number and curve."""
    from mink_ssl.eval.detection import write_detection_report
    from mink_ssl.io import atomic_path

    paths = write_detection_report(result, out_dir, name="results")
    summary = {**extra, **{f"mAP@{t:g}": result.mean_ap(t) for t in result.iou_thresholds},
               **result.to_dict()}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return summary


# ------------------------------------------------------------------------------------- run

def finetune_det(cfg: FinetuneDetConfig, out_dir: Path, print_fn=print) -> dict:
    """Fine-tune as ``cfg`` says, writing into ``out_dir``; returns the final evaluation
    (``results.json``'s content; empty without an evaluation split)."""
    from mink_ssl.engine.distributed import barrier, cleanup, init_distributed, start_run, wrap_ddp
    from mink_ssl.engine.hooks import CheckpointHook, LoggingHook
    from mink_ssl.engine.trainer import Trainer
    from mink_ssl.models.votenet import save_detection_model

    out_dir = Path(out_dir)
    if not isinstance(cfg.epochs, int) or cfg.epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {cfg.epochs!r}")
    from mink_ssl.ops.nms import NMS_MODES

    if cfg.eval.nms not in NMS_MODES:
        raise ValueError(f"eval.nms must be one of {NMS_MODES}, got {cfg.eval.nms!r}")
    info, device = init_distributed(cfg.device, cfg.distributed.backend)
    run = None
    try:
        plain = asdict(cfg)
        run = start_run(out_dir, plain, info, cfg.resume, cfg.resume_override, print_fn,
                        "finetune-det")
        torch.manual_seed(cfg.seed)  # same initial weights on every rank

        axis_aligned = cfg.head.num_heading_bins == 1
        train_set = build_det_dataset(cfg.data, cfg.data.train_split, train=True,
                                      axis_aligned=axis_aligned, seed=cfg.seed)
        if len(train_set) < info.world_size:
            raise ValueError(f"split {cfg.data.train_split!r} of {cfg.data.root} has "
                             f"{len(train_set)} scenes, fewer than {info.world_size} processes")
        eval_set = None
        if cfg.data.eval_split is not None:
            eval_set = build_det_dataset(cfg.data, cfg.data.eval_split, train=False,
                                         axis_aligned=axis_aligned, seed=cfg.seed)
            if len(eval_set) == 0:
                filled = [k for k, v in eval_set.manifest["splits"].items() if v]
                raise ValueError(f"evaluation split {cfg.data.eval_split!r} is empty; choose "
                                 f"data.eval_split from {filled} or null (no evaluation)")
        classes = train_set.classes
        mean_sizes = train_set.size_clusters(cfg.head.size_clusters)  # one per class
        model = build_det_model(cfg.model, cfg.head, train_set.in_channels, len(classes),
                                mean_sizes)

        resume, ckpt = run.load_resume(partial(load_task_checkpoint, fmt=DET_CHECKPOINT_FORMAT))
        resume, pretrained_report = start_weights(model, resume and str(resume), cfg.pretrained,
                                                  out_dir, info.is_main, print_fn)

        module = DetectionModule(model).to(device)
        module = wrap_ddp(module, info, device, cfg.distributed.sync_bn,
                          cfg.distributed.find_unused_parameters)
        if info.is_main and info.world_size > 1 and not (cfg.distributed.sync_bn
                                                         and device.type == "cuda"):
            print_fn(f"finetune-det: batch norm sees {cfg.batch_size} scenes per rank, not the "
                     f"global batch of {cfg.batch_size * info.world_size} (the reference ran one "
                     "process); set distributed.sync_bn=true on CUDA to match it")
        per_rank = len(train_set) // info.world_size
        ipe = per_rank / cfg.batch_size  # iterations per epoch (fractional)
        max_iterations = math.ceil(cfg.epochs * ipe - 1e-9)
        optimizer, scheduler = build_det_optimizer(cfg.optim, module.parameters(), ipe,
                                                   info.world_size)
        if info.is_main:
            print_fn(f"finetune-det: {len(train_set)} {cfg.data.train_split} scenes, "
                     f"{len(eval_set) if eval_set else 0} {cfg.data.eval_split} scenes, "
                     f"{len(classes)} classes, voxel {train_set.voxel_size:g} m, "
                     f"{cfg.model.name}, {'pretrained' if cfg.pretrained else 'from scratch'}, "
                     f"{cfg.epochs} epochs = {max_iterations} iterations of batch "
                     f"{cfg.batch_size} per rank x {info.world_size} ranks, lr "
                     f"{optimizer.param_groups[0]['lr']:g} x{cfg.optim.lr_gamma:g} at epochs "
                     f"{sorted(cfg.optim.lr_steps)}, device {device}, out {out_dir}")

        trainer = Trainer(module, optimizer, scheduler, iter(()), max_iterations,
                          cfg.batch_size, device)
        if resume:
            def restore(ckpt_, trainer_) -> None:
                check_head(ckpt_, trainer_)
                restore_task(ckpt_, trainer_)

            run.restore(ckpt, trainer, restore)
            if info.is_main:
                print_fn(f"resumed from {resume} at iteration {trainer.state.iteration}")
        run.record(trainer.state.iteration, resume)  # the checks passed: config.json now
        from mink_ssl.data.detection import collate_detection
        from mink_ssl.engine.pretrain import build_loader, resolve_num_workers

        workers = resolve_num_workers(cfg.data.num_workers,
                                      int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        loader = build_loader(train_set, cfg.batch_size, workers, cfg.seed, info.rank,
                              info.world_size, trainer.state.samples, collate_detection)
        trainer.batches = iter(loader)

        def evaluate():
            e = cfg.eval
            return evaluate_detector(model, eval_set, device, batch_size=e.batch_size,
                                     conf_threshold=e.conf_threshold, nms_iou=e.nms_iou,
                                     per_class_proposal=e.per_class_proposal,
                                     iou_thresholds=e.iou_thresholds, nms=e.nms)

        def export(trainer_, directory: Path) -> None:
            save_detection_model(model, directory / "model.pth", classes=classes,
                                 voxel_size=train_set.voxel_size, features=cfg.data.features)

        def every(epochs: int) -> int:  # epochs -> iterations (0 stays 0: off)
            return max(1, round(epochs * ipe)) if epochs else 0

        hooks: list[Hook] = []
        if cfg.optim.bn_momentum_init is not None:
            o = cfg.optim
            hooks.append(BNMomentumHook(module, ipe, o.bn_momentum_init, o.bn_momentum_decay,
                                        o.bn_momentum_step, o.bn_momentum_min))
        if eval_set is not None:
            def summary() -> dict[str, float]:
                r = evaluate()
                return {f"mAP@{th:g}": r.mean_ap(th) for th in r.iou_thresholds}

            # the first threshold's mAP ranks evaluations (an empty list: the evaluator's error)
            thresholds = cfg.eval.iou_thresholds
            key = f"mAP@{float(thresholds[0]):g}" if thresholds else None
            hooks.append(EvalHook(summary, every(cfg.eval.every), out_dir, info.is_main,
                                  print_fn, barrier=lambda: barrier(info), key=key,
                                  save_best=(partial(export, None) if cfg.eval.keep_best and key
                                             else None)))
        hooks += [LoggingHook(out_dir, cfg.log_every, info.is_main, cfg.progress, print_fn,
                              desc="finetune-det", report_skipped=False),
                  CheckpointHook(out_dir, every(cfg.checkpoint_every), plain,
                                 enabled=info.is_main,
                                 save_fn=partial(save_task_checkpoint, fmt=DET_CHECKPOINT_FORMAT),
                                 export_fn=export)]
        trainer.hooks = hooks
        from mink_ssl.engine.rundir import stop_check
        from mink_ssl.safety import StopSignals

        with StopSignals("saving a checkpoint at the next step boundary, then stopping") as sig:
            trainer.should_stop = stop_check(sig, info, device)
            trainer.train()
        if trainer.stopped:
            raise run.interrupted(trainer, sig.signum)

        results: dict = {}
        if eval_set is not None and info.is_main:
            result = evaluate()
            extra = {"split": cfg.data.eval_split, "scenes": len(eval_set),
                     "iterations": trainer.state.iteration, "epochs": cfg.epochs,
                     "voxel_size": eval_set.voxel_size, "model": cfg.model.name,
                     "pretrained": cfg.pretrained,
                     "pretrained_loaded_fraction": (pretrained_report.matched_fraction
                                                    if pretrained_report else None),
                     "train_scenes": len(train_set), "mean_sizes": mean_sizes.tolist()}
            results = write_det_results(out_dir, result, extra)
            print_fn(f"finetune-det: {cfg.data.eval_split} " + ", ".join(
                f"mAP@{t:g} {100 * result.mean_ap(t):.1f}" for t in result.iou_thresholds)
                + f" ({len(eval_set)} scenes); {out_dir / 'results.md'}")
        barrier(info)
        return results
    finally:
        if run is not None:
            run.close()
        cleanup(info)
