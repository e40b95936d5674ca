"""Fine-tuning for 3D object detection (VoteNet-style head on the Res16UNet backbone), end to
end: build from a :class:`FinetuneDetConfig`, load pretrained backbone weights (strictly) or
start from scratch, train with the shared :class:`~mink_ssl.engine.trainer.Trainer` and hooks,
evaluate (per-class AP at IoU 0.25 / 0.5), write the results.

    from mink_ssl.tasks.detection import finetune_det
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

import math
from functools import partial
from pathlib import Path

import torch

from mink_ssl.data.detection import collate_detection
from mink_ssl.engine.distributed import wrap_ddp
from mink_ssl.engine.hooks import BNMomentumHook, EvalHook
from mink_ssl.engine.run import TaskRun, task_run
from mink_ssl.engine.trainer import Hook, Trainer
from mink_ssl.formats.model_files import DET_CHECKPOINT_FORMAT
from mink_ssl.models.votenet import save_detection_model
from mink_ssl.errors import RESUME
from mink_ssl.tasks.detection.config import FinetuneDetConfig, check_det_config
from mink_ssl.tasks.detection.inference import evaluate_detector, write_det_results
from mink_ssl.tasks.detection.model import (DetectionModule, build_det_dataset, build_det_model,
                                            build_det_optimizer, check_head)
from mink_ssl.tasks.finetune import (load_task_checkpoint, restore_task, save_task_checkpoint,
                                     start_weights)


def finetune_det(cfg: FinetuneDetConfig, out_dir: Path, print_fn=print) -> dict:
    """Fine-tune as ``cfg`` says, writing into ``out_dir``; returns the final evaluation
    (``results.json``'s content; empty without an evaluation split)."""
    out_dir = Path(out_dir)
    notes = check_det_config(cfg)  # every value, before anything is written
    with task_run(cfg, out_dir, "finetune-det", print_fn) as tr:
        for note in notes:
            tr.say(note)
        # the run's objects (module, loader, trainer) live in the call below and are freed
        # when it returns, before the process group goes
        return _finetune_det(cfg, tr)


def _finetune_det(cfg: FinetuneDetConfig, tr: TaskRun) -> dict:
    out_dir, print_fn = tr.out_dir, tr.print_fn
    info, device, run = tr.info, tr.device, tr.run
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
    if info.world_size > 1 and not (cfg.distributed.sync_bn and device.type == "cuda"):
        tr.say(f"finetune-det: batch norm sees {cfg.batch_size} scenes per rank, not the "
               f"global batch of {cfg.batch_size * info.world_size} (the reference ran one "
               "process); set distributed.sync_bn=true on CUDA to match it")
    per_rank = len(train_set) // info.world_size
    ipe = per_rank / cfg.batch_size  # iterations per epoch (fractional)
    max_iterations = math.ceil(cfg.epochs * ipe - 1e-9)
    optimizer, scheduler = build_det_optimizer(cfg.optim, module.parameters(), ipe,
                                               info.world_size)
    tr.say(f"finetune-det: {len(train_set)} {cfg.data.train_split} scenes, "
           f"{len(eval_set) if eval_set else 0} {cfg.data.eval_split} scenes, "
           f"{len(classes)} classes, voxel {train_set.voxel_size:g} m, "
           f"{cfg.model.name} on {cfg.model.engine}, "
           f"{'pretrained' if cfg.pretrained else 'from scratch'}, {cfg.epochs} epochs = {max_iterations} iterations of batch "
           f"{cfg.batch_size} per rank x {info.world_size} ranks, lr "
           f"{optimizer.param_groups[0]['lr']:g} x{cfg.optim.lr_gamma:g} at epochs "
           f"{sorted(cfg.optim.lr_steps)}, device {device}, out {out_dir}")

    trainer = Trainer(module, optimizer, scheduler, iter(()), max_iterations,
                      cfg.batch_size, device)

    def restore(ckpt_, trainer_) -> None:
        check_head(ckpt_, trainer_)
        restore_task(ckpt_, trainer_)

    tr.resume(trainer, resume, ckpt, restore)
    tr.attach_loader(trainer, train_set, cfg.batch_size, tr.loader_workers(cfg.data.num_workers),
                     cfg.seed, collate_detection)

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
                              print_fn, barrier=tr.barrier, key=key,
                              save_best=(partial(export, None) if cfg.eval.keep_best and key
                                         else None)))
    trainer.hooks = hooks + tr.standard_hooks(
        cfg, "finetune-det", partial(save_task_checkpoint, fmt=DET_CHECKPOINT_FORMAT), export,
        checkpoint_every=every(cfg.checkpoint_every))
    tr.train(trainer)

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
        results = write_det_results(out_dir, result, extra, then=RESUME)
        print_fn(f"finetune-det: {cfg.data.eval_split} " + ", ".join(
            f"mAP@{t:g} {100 * result.mean_ap(t):.1f}" for t in result.iou_thresholds)
            + f" ({len(eval_set)} scenes); {out_dir / 'results.md'}")
    tr.barrier()
    return results
