"""Fine-tuning for semantic segmentation, end to end: build from a :class:`FinetuneSegConfig`,
load pretrained backbone weights (strictly) or start from scratch, train with the shared
:class:`~mink_ssl.engine.trainer.Trainer` and hooks, evaluate on the original points, write the
results.

    from mink_ssl.engine.finetune_seg import finetune_seg
    finetune_seg(config, out_dir=Path("runs/seg"))      # what `mink-ssl-finetune-seg` calls

The default schedule is the PointContrast / CSC fine-tuning protocol (``downstream/semseg``
``config/default.yaml``, ``lib/solvers.py``): SGD (momentum 0.9, dampening 0.1, weight decay 1e-4,
no Nesterov; lr per benchmark: 0.1, ScanNet 0.8), poly decay lr_t = lr (1 - t / (T + 1))^0.9
stepped every iteration,
cross-entropy over labelled voxels (label -1 ignored); batch size and iterations per benchmark
live in ``configs/finetune/<benchmark>.yaml``.

The run directory holds ``config.json``; ``checkpoint_<it>.pth`` (format
``mink_ssl.seg_checkpoint/1``: model, optimizer, scheduler, iteration, sampler position, RNG;
``resume=auto`` continues exactly); ``model.pth`` (backbone + head,
:func:`mink_ssl.models.heads.load_segmentation_model`); ``tb/`` scalars; ``val_history.json``
(periodic evaluations); ``best/model.pth`` and ``best/best.json`` (the model of the periodic
evaluation with the highest mIoU, ``eval.keep_best``); ``results.md`` / ``results.json`` /
``results_iou.png`` (the final evaluation) and ``predictions/<scene>.ply``.

``evaluate_only=<model.pth or checkpoint>`` trains nothing: it evaluates that fine-tuned model on
``data.eval_split`` as the final evaluation does and writes the same results.

``probe=linear|linear_multiscale|knn`` keeps the backbone frozen and trains (or, for kNN, fits)
only a probe on its features (:mod:`mink_ssl.engine.probe_seg`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from mink_ssl.engine.config import DistributedConfig, ModelConfig, OptimConfig
from mink_ssl.engine.finetune import (EvalHook, load_task_checkpoint, restore_task,
                                      save_task_checkpoint, start_weights)
from mink_ssl.engine.trainer import Hook
from mink_ssl.formats.model_files import SEG_CHECKPOINT_FORMAT, SEG_MODEL_FORMAT, load_tagged


# ----------------------------------------------------------------------------------- config

@dataclass
class AugmentConfig:
    """Training augmentations (list and order: :mod:`mink_ssl.data.segmentation`)."""

    rotation_deg: float = 180.0  # about gravity, uniform in [-r, r]
    tilt_deg: float = 0.0  # about the horizontal axes (S3DIS 5.625 = pi/32, ScanNet pi/64)
    scale: list = field(default_factory=lambda: [0.9, 1.1])
    flip: bool = True  # mirror each horizontal axis with probability 0.5
    elastic: list = field(default_factory=list)  # [[granularity, magnitude], ...] metres
    color_auto_contrast: float = 0.2  # probability
    color_translation: float = 0.1  # ratio of 255
    color_jitter: float = 0.05  # std, ratio of 255
    dropout: float = 0.2  # CSC RandomDropout: with this probability keep int(M (1 - p)) voxels
    clip_bound: Optional[float] = None  # metres, half size of the training crop (S3DIS 4)
    clip_translation: list = field(default_factory=lambda: [0.0, 0.0])  # crop centre shift
    #   ratios of the scene's extent (horizontal, vertical): S3DIS [0.2, 0.05], Synthia [0.1, 0]


@dataclass
class SegDataConfig:
    root: str = "???"  # output directory of segmentation prep (manifest.json + scenes/)
    voxel_size: Optional[float] = None  # metres; null: the manifest's recommendation
    features: str = "rgb"  # mink_ssl.data.features mode; rgb: the released normalize_color
    up_axis: str = "z"  # gravity axis of the prepared coordinates
    train_split: str = "train"
    eval_split: Optional[str] = "val"  # null: no evaluation
    augment: bool = True
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    scene_fraction: float = 1.0  # limited labels: this seeded fraction of training scenes
    labelled_points: Optional[int] = None  # limited labels: N random labelled points per scene
    label_seed: int = 0  # seed of both limited-label selections
    num_workers: Any = "auto"  # loader processes per rank; auto: free cores - 1, at most 8
    prevoxel_size: Optional[float] = None  # metres, thin scenes first (Synthia 0.075); all splits
    eval_clip_bound: Optional[float] = None  # metres, voxels evaluation crop (Synthia 25)
    label_rule: str = "uniform"  # voxel labels: uniform (mixed voxels ignored) | majority


@dataclass
class SegOptimConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.1  # sgd only: the released downstream configs' sgd_dampening
    weight_decay: float = 1e-4
    scheduler: str = "poly"  # poly: lr (1 - t/(T+1))^poly_power | step: x lr_gamma every lr_step
    poly_power: float = 0.9
    lr_step: int = 1000
    lr_gamma: float = 0.5
    scale_lr_with_world_size: bool = False


@dataclass
class SegEvalConfig:
    every: int = 1000  # evaluate on data.eval_split every this many iterations (0: at the end)
    rotations: int = 1  # final evaluation: average logits over this many rotations (TTA)
    ply_scenes: int = 2  # final evaluation: PLY files of predictions for the first k scenes
    keep_best: bool = True  # best/model.pth: the model of the best periodic evaluation (mIoU)
    protocol: str = "voxels"  # voxels (the reference: one vote per voxel) | points


@dataclass
class FinetuneSegConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pretrained: Optional[str] = None  # backbone.pth or a checkpoint; null: from scratch
    # rebuild: the backbone's final layer becomes the classifier (96 -> C, the released code;
    # model.out_channels is then the class count) | keep: a new head on the 96 -> 32 final
    final_layer: str = "rebuild"
    # a frozen backbone (mink_ssl.engine.probe_seg): null (fine-tune everything) | linear (a
    # linear layer on the output features) | linear_multiscale (on the decoder stages) | knn
    probe: Optional[str] = None
    knn_k: int = 20  # probe=knn: neighbours that vote
    knn_bank: int = 200000  # probe=knn: most labelled training voxels kept (seeded subset)
    seed: int = 0
    max_iterations: int = 10000
    batch_size: int = 6  # scenes per process (global batch = batch_size x world size)
    device: str = "auto"
    checkpoint_every: int = 1000
    log_every: int = 10
    progress: bool = True
    resume: Optional[str] = None  # a checkpoint path, or "auto": the latest in the run dir
    # resume with changed optimizer / schedule settings (recorded in config_history.json)
    resume_override: bool = False
    evaluate_only: Optional[str] = None  # a fine-tuned model.pth or checkpoint: evaluate it only


# ---------------------------------------------------------------------------------- builders

def build_seg_dataset(cfg: SegDataConfig, split: str, *, train: bool, seed: int):
    """The split's :class:`~mink_ssl.data.segmentation.SegmentationDataset`; training data gets
    the augmentations and the limited-label settings, evaluation data neither."""
    from mink_ssl.data.segmentation import Augmentation, SegmentationDataset

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
    from dataclasses import replace

    from mink_ssl.engine.pretrain import build_backbone
    from mink_ssl.models.heads import SegmentationModel, check_final_layer

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
    from mink_ssl.engine.pretrain import build_optimizer

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


# ------------------------------------------------------------------------- module, checkpoint

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
        from mink_ssl.sparse import sparse_tensor

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


def load_fine_tuned(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The whole fine-tuned model (backbone + head, strict keys) in ``model.pth`` (format
    ``mink_ssl.seg_model/1``) or in a fine-tuning checkpoint (``mink_ssl.seg_checkpoint/1``),
    and what the file says about its input: ``classes``, ``voxel_size``, ``features`` and
    ``iterations``, None where it does not say (a checkpoint has no class names, and no voxel
    size when its run took the manifest's; ``model.pth`` has no iteration, but the
    ``best.json`` next to ``best/model.pth`` has)."""
    from mink_ssl.models.heads import segmentation_model_from_state

    path = Path(path)
    state = load_tagged(path, [SEG_MODEL_FORMAT, SEG_CHECKPOINT_FORMAT],
                        "a segmentation model (model.pth of fine-tuning) or a segmentation "
                        "checkpoint", missing="; pass a fine-tuned model.pth or a "
                        "checkpoint_<it>.pth of segmentation fine-tuning to evaluate_only=")
    if state["format"] == SEG_MODEL_FORMAT:
        best = path.parent / "best.json"
        meta = {k: state[k] for k in ("classes", "voxel_size", "features")}
        meta["iterations"] = json.loads(best.read_text())["iteration"] if best.is_file() else None
    else:
        data = state.get("config", {}).get("data", {})
        meta = {"classes": None, "voxel_size": data.get("voxel_size"),
                "features": data.get("features"), "iterations": state["state"]["iteration"]}
    return segmentation_model_from_state(state), meta


def check_fine_tuned(path: str, meta: dict, num_classes: int, eval_set, cfg: SegDataConfig
                     ) -> None:
    """The model in ``path`` must have been fine-tuned on what ``eval_set`` gives it: the same
    classes (in order), voxel size and input features; each difference is an error that says
    which setting to change."""
    classes = eval_set.classes
    if num_classes != len(classes) or meta["classes"] not in (None, classes):
        has = meta["classes"] if meta["classes"] is not None else f"{num_classes} classes"
        raise ValueError(f"evaluate_only={path} predicts {has} but {cfg.root} has {classes}; "
                         f"evaluate it on the benchmark it was fine-tuned on (data.root=...)")
    size = meta["voxel_size"]
    if size is not None and not math.isclose(size, eval_set.voxel_size, rel_tol=1e-6):
        raise ValueError(f"evaluate_only={path} was fine-tuned on {size:g} m voxels but the data "
                         f"config gives {eval_set.voxel_size:g} m (data.voxel_size="
                         f"{'null' if cfg.voxel_size is None else cfg.voxel_size}; null: the "
                         f"manifest's); set data.voxel_size={size:g}")
    if meta["features"] is not None and meta["features"] != cfg.features:
        raise ValueError(f"evaluate_only={path} was fine-tuned on {meta['features']!r} features "
                         f"but data.features={cfg.features!r}; set "
                         f"data.features={meta['features']}")


def final_evaluation(model: nn.Module, eval_set, cfg: FinetuneSegConfig, out_dir: Path,
                     device, extra: dict, print_fn=print) -> dict:
    """Evaluate ``model`` on every scene of ``eval_set`` (original points, ``eval.rotations``,
    PLY files of the first ``eval.ply_scenes``), write ``results.md`` / ``results.json`` (with
    ``extra``) / ``results_iou.png``; returns ``results.json``'s numbers and ``extra``."""
    from mink_ssl.eval.segmentation import evaluate_scenes, write_results

    e = cfg.eval
    metrics = evaluate_scenes(model, eval_set.scenes_for_eval(e.protocol), eval_set.classes,
                              eval_set.voxel_size, eval_set.features, rotations=e.rotations,
                              up_axis=eval_set.up_axis, device=device,
                              ply_dir=out_dir / "predictions", ply_scenes=e.ply_scenes,
                              protocol=e.protocol, label_rule=eval_set.label_rule)
    extra = {"split": cfg.data.eval_split, "scenes": len(eval_set), **extra,
             "rotations": e.rotations, "voxel_size": eval_set.voxel_size,
             "protocol": e.protocol}
    title = f"{eval_set.manifest.get('benchmark', 'segmentation')} {cfg.data.eval_split}"
    write_results(out_dir, metrics, title=title, extra=extra)
    print_fn(f"finetune-seg: {cfg.data.eval_split} mIoU {100 * metrics.miou:.1f}, mAcc "
             f"{100 * metrics.macc:.1f}, oAcc {100 * metrics.oacc:.1f} ({len(eval_set)} scenes, "
             f"{e.rotations} rotation(s)); {out_dir / 'results.md'}")
    return {**extra, **metrics.to_dict()}


def check_evaluate_only(cfg: FinetuneSegConfig) -> None:
    """``evaluate_only`` evaluates a finished model: it needs an evaluation split and takes
    neither starting weights nor a run to continue."""
    given = [f"{k}={v}" for k, v in (("pretrained", cfg.pretrained), ("resume", cfg.resume)) if v]
    if given:
        unset = " and ".join(f"{g.split('=')[0]}=null" for g in given)
        raise ValueError(f"evaluate_only={cfg.evaluate_only} evaluates that model as it is, so "
                         f"{' and '.join(given)} cannot go with it; set {unset} (or drop "
                         "evaluate_only to train)")
    if cfg.data.eval_split is None:
        from mink_ssl.data.segmentation import read_seg_manifest

        splits = ""
        if cfg.data.root not in ("???", "", None):
            filled = [k for k, v in read_seg_manifest(Path(cfg.data.root))["splits"].items() if v]
            splits = f" (splits of {cfg.data.root}: {filled})"
        raise ValueError(f"evaluate_only={cfg.evaluate_only} needs an evaluation split but "
                         f"data.eval_split is null; set data.eval_split=<split>{splits}")


def evaluate_only(cfg: FinetuneSegConfig, out_dir: Path, device, print_fn=print) -> dict:
    """Evaluate the fine-tuned model ``cfg.evaluate_only`` (no training), as the final
    evaluation of a run does; returns ``results.json``'s content."""
    path = cfg.evaluate_only
    model, meta = load_fine_tuned(path)
    eval_set = build_seg_dataset(cfg.data, cfg.data.eval_split, train=False, seed=cfg.seed)
    if len(eval_set) == 0:
        filled = [k for k, v in eval_set.manifest["splits"].items() if v]
        raise ValueError(f"evaluation split {cfg.data.eval_split!r} is empty; choose "
                         f"data.eval_split from {filled}")
    check_fine_tuned(path, meta, model.num_classes, eval_set, cfg.data)
    width = model.backbone.config()["in_channels"]
    if width != eval_set.in_channels:  # e.g. a 1-channel 'ones' model from before 'ones1'
        raise ValueError(f"evaluate_only={path} takes {width}-channel input but data.features="
                         f"{cfg.data.features!r} gives {eval_set.in_channels} channels; every "
                         f"constant mode but ones1 has 3 channels: set data.features=ones1")
    name = model.backbone.config()["name"]
    print_fn(f"finetune-seg: evaluating {path} ({name}, "
             f"{meta['iterations'] if meta['iterations'] is not None else 'unknown'} iterations) "
             f"on {len(eval_set)} {cfg.data.eval_split} scenes, voxel "
             f"{eval_set.voxel_size:g} m, device {device}, out {out_dir}")
    return final_evaluation(model.to(device), eval_set, cfg, out_dir, device,
                            {"evaluated": str(path), "iterations": meta["iterations"],
                             "model": name}, print_fn)


# ------------------------------------------------------------------------------------- run

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


def finetune_seg(cfg: FinetuneSegConfig, out_dir: Path, print_fn=print) -> dict:
    """Fine-tune as ``cfg`` says, writing into ``out_dir``; returns the final evaluation
    (``results.json``'s content; empty without an evaluation split)."""
    from mink_ssl.engine.distributed import barrier, cleanup, init_distributed, start_run, wrap_ddp
    from mink_ssl.engine.hooks import CheckpointHook, LoggingHook
    from mink_ssl.engine.trainer import Trainer
    from mink_ssl.eval.segmentation import evaluate_scenes
    from mink_ssl.models.heads import save_segmentation_model

    out_dir = Path(out_dir)
    if cfg.evaluate_only:
        check_evaluate_only(cfg)
    info, device = init_distributed(cfg.device, cfg.distributed.backend)
    run = None
    try:
        plain = asdict(cfg)
        run = start_run(out_dir, plain, info, cfg.resume, cfg.resume_override, print_fn,
                        "finetune-seg")
        if cfg.evaluate_only:  # rank 0 evaluates, the others wait
            results = evaluate_only(cfg, out_dir, device, print_fn) if info.is_main else {}
            run.record()  # after the model's checks passed
            barrier(info)
            return results
        torch.manual_seed(cfg.seed)  # same initial weights on every rank

        train_set = build_seg_dataset(cfg.data, cfg.data.train_split, train=True, seed=cfg.seed)
        if len(train_set) == 0:
            raise ValueError(f"split {cfg.data.train_split!r} of {cfg.data.root} has no scenes")
        eval_set = None
        if cfg.data.eval_split is not None:
            eval_set = build_seg_dataset(cfg.data, cfg.data.eval_split, train=False,
                                         seed=cfg.seed)
            if len(eval_set) == 0:
                filled = [k for k, v in eval_set.manifest["splits"].items() if v]
                raise ValueError(f"evaluation split {cfg.data.eval_split!r} is empty; choose "
                                 f"data.eval_split from {filled} or null (no evaluation)")
        classes = train_set.classes
        if cfg.probe:
            from mink_ssl.engine.probe_seg import build_probe_model

            model = build_probe_model(cfg, train_set.in_channels, len(classes))
        else:
            model = build_seg_model(cfg.model, train_set.in_channels, len(classes),
                                    cfg.final_layer)

        resume, ckpt = run.load_resume(partial(load_task_checkpoint, fmt=SEG_CHECKPOINT_FORMAT))
        resume, pretrained_report = start_weights(model, resume and str(resume), cfg.pretrained,
                                                  out_dir, info.is_main, print_fn)

        if cfg.probe == "knn":  # no training: rank 0 fills the bank and evaluates
            from mink_ssl.engine.probe_seg import run_knn_probe

            results = run_knn_probe(cfg, model, train_set, eval_set, run, out_dir, device, {
                "model": cfg.model.name, "pretrained": cfg.pretrained, "probe": cfg.probe,
                "pretrained_loaded_fraction": (pretrained_report.matched_fraction
                                               if pretrained_report else None),
                "train_scenes": len(train_set), "scene_fraction": cfg.data.scene_fraction,
                "labelled_points": cfg.data.labelled_points}, print_fn) if info.is_main else {}
            barrier(info)
            return results
        module = SegmentationModule(model).to(device)
        module = wrap_ddp(module, info, device, cfg.distributed.sync_bn,
                          cfg.distributed.find_unused_parameters)
        trained = [p for p in module.parameters() if p.requires_grad]  # a probe: its head
        optimizer, scheduler = build_seg_optimizer(cfg.optim, trained, cfg.max_iterations,
                                                   info.world_size)
        few = check_labelled_points(train_set, cfg.data.labelled_points)  # every rank
        if info.is_main:
            limited = ""
            if cfg.data.scene_fraction < 1 or cfg.data.labelled_points:
                limited = (f" (limited labels: {100 * cfg.data.scene_fraction:g}% of scenes, "
                           f"{cfg.data.labelled_points or 'all'} labelled points per scene, "
                           f"label_seed {cfg.data.label_seed}{few})")
            print_fn(f"finetune-seg: {len(train_set)} {cfg.data.train_split} scenes{limited}, "
                     f"{len(eval_set) if eval_set else 0} {cfg.data.eval_split} scenes, "
                     f"{len(classes)} classes, voxel {train_set.voxel_size:g} m, "
                     f"{cfg.model.name}, {'pretrained' if cfg.pretrained else 'from scratch'}"
                     f"{f', frozen, probe {cfg.probe}' if cfg.probe else ''}, "
                     f"batch {cfg.batch_size} per rank x {info.world_size} ranks, lr "
                     f"{optimizer.param_groups[0]['lr']:g} {cfg.optim.scheduler}, device "
                     f"{device}, out {out_dir}")

        trainer = Trainer(module, optimizer, scheduler, iter(()), cfg.max_iterations,
                          cfg.batch_size, device)
        if resume:
            run.restore(ckpt, trainer, restore_task)
            if info.is_main:
                print_fn(f"resumed from {resume} at iteration {trainer.state.iteration}")
        run.record(trainer.state.iteration, resume)  # the checks passed: config.json now
        from mink_ssl.data.segmentation import collate_segmentation
        from mink_ssl.engine.pretrain import build_loader, resolve_num_workers

        workers = resolve_num_workers(cfg.data.num_workers,
                                      int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        loader = build_loader(train_set, cfg.batch_size, workers, cfg.seed, info.rank,
                              info.world_size, trainer.state.samples, collate_segmentation)
        trainer.batches = iter(loader)

        def export(trainer_, directory: Path) -> None:
            save_segmentation_model(model, directory / "model.pth", classes=classes,
                                    voxel_size=train_set.voxel_size, features=cfg.data.features)

        hooks: list[Hook] = []
        eval_hook = None
        if eval_set is not None:
            def summary() -> dict[str, float]:  # periodic: one rotation, no PLY files
                m = evaluate_scenes(model, eval_set.scenes_for_eval(cfg.eval.protocol),
                                    classes, eval_set.voxel_size, eval_set.features,
                                    up_axis=eval_set.up_axis, device=device,
                                    protocol=cfg.eval.protocol, label_rule=eval_set.label_rule)
                return {"mIoU": m.miou, "mAcc": m.macc, "oAcc": m.oacc}

            eval_hook = EvalHook(summary, cfg.eval.every, out_dir, info.is_main, print_fn,
                                 barrier=lambda: barrier(info), key="mIoU",
                                 save_best=partial(export, None) if cfg.eval.keep_best else None)
            hooks.append(eval_hook)
        hooks += [LoggingHook(out_dir, cfg.log_every, info.is_main, cfg.progress, print_fn,
                              desc="finetune-seg", report_skipped=False),
                  CheckpointHook(out_dir, cfg.checkpoint_every, plain, enabled=info.is_main,
                                 save_fn=partial(save_task_checkpoint, fmt=SEG_CHECKPOINT_FORMAT),
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
            best = eval_hook.best  # of the periodic evaluations; None without any
            extra = {"iterations": trainer.state.iteration, "model": cfg.model.name,
                     "pretrained": cfg.pretrained, "probe": cfg.probe,
                     "pretrained_loaded_fraction": (pretrained_report.matched_fraction
                                                    if pretrained_report else None),
                     "train_scenes": len(train_set), "scene_fraction": cfg.data.scene_fraction,
                     "labelled_points": cfg.data.labelled_points,
                     "best": None if best is None else {"iteration": best["iteration"],
                                                        "mIoU": best["mIoU"]}}
            results = final_evaluation(model, eval_set, cfg, out_dir, device, extra, print_fn)
        barrier(info)
        return results
    finally:
        if run is not None:
            run.close()
        cleanup(info)
