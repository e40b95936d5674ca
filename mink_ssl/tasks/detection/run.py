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
schedule is stepped every iteration. ``checkpoint_every`` counts iterations, as in every
task (until #27 it counted epochs here); ``eval.every`` counts epochs. Benchmark recipes (voxel size, points, augmentations,
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
from pathlib import Path

from mink_ssl.data.detection import collate_detection
from mink_ssl.engine.hooks import BNMomentumHook
from mink_ssl.errors import RESUME
from mink_ssl.formats.model_files import DET_CHECKPOINT_FORMAT
from mink_ssl.models.votenet import save_detection_model
from mink_ssl.tasks.detection.config import FinetuneDetConfig, check_det_config
from mink_ssl.tasks.detection.datasets import build_det_dataset
from mink_ssl.tasks.detection.inference import evaluate_detector, write_det_results
from mink_ssl.tasks.detection.model import DetectionModule, build_det_model, check_head
from mink_ssl.tasks.detection.optim import build_det_optimizer
from mink_ssl.tasks.finetune import FinetuneParts, FinetuneTask, finetune
from mink_ssl.tasks.finetune_checkpoint import restore_task


def finetune_det(cfg: FinetuneDetConfig, out_dir: Path, print_fn=print) -> dict:
    """Fine-tune as ``cfg`` says, writing into ``out_dir``; returns the final evaluation
    (``results.json``'s content; empty without an evaluation split)."""
    return finetune(DetectionTask(cfg), out_dir, print_fn)


class DetectionTask(FinetuneTask):
    """3D object detection's parts of the fine-tuning skeleton (:mod:`mink_ssl.tasks.finetune`):
    VoteNet on the backbone, its loss, its epoch schedule, per-class AP."""

    name = "finetune-det"
    checkpoint_format = DET_CHECKPOINT_FORMAT
    collate_fn = staticmethod(collate_detection)
    cfg: FinetuneDetConfig

    def __init__(self, cfg: FinetuneDetConfig):
        super().__init__(cfg)
        self.ipe = 1.0  # iterations per epoch (fractional), once the split is known
        self.mean_sizes = None  # one box size per class, from the training split

    def check(self) -> list[str]:
        return check_det_config(self.cfg)

    def dataset(self, split: str, train: bool):
        return build_det_dataset(self.cfg.data, split, train=train,
                                 axis_aligned=self.cfg.head.num_heading_bins == 1,
                                 seed=self.cfg.seed)

    def build_model(self, train_set):
        cfg = self.cfg
        self.mean_sizes = train_set.size_clusters(cfg.head.size_clusters)
        return build_det_model(cfg.model, cfg.head, train_set.in_channels,
                               len(train_set.classes), self.mean_sizes)

    def build_module(self, model):
        return DetectionModule(model)

    def schedule(self, p: FinetuneParts, module) -> tuple:
        cfg, info = self.cfg, p.tr.info
        if info.world_size > 1 and not (cfg.distributed.sync_bn and p.tr.device.type == "cuda"):
            p.tr.say(f"finetune-det: batch norm sees {cfg.batch_size} scenes per rank, not the "
                     f"global batch of {cfg.batch_size * info.world_size} (the reference ran "
                     "one process); set distributed.sync_bn=true on CUDA to match it")
        self.ipe = len(p.train_set) // info.world_size / cfg.batch_size
        optimizer, scheduler = build_det_optimizer(cfg.optim, module.parameters(), self.ipe,
                                                   info.world_size)
        return optimizer, scheduler, math.ceil(cfg.epochs * self.ipe - 1e-9)

    def announce(self, p: FinetuneParts, optimizer) -> None:
        cfg, tr = self.cfg, p.tr
        tr.say(f"finetune-det: {len(p.train_set)} {cfg.data.train_split} scenes, "
               f"{len(p.eval_set) if p.eval_set else 0} {cfg.data.eval_split} scenes, "
               f"{len(p.train_set.classes)} classes, voxel {p.train_set.voxel_size:g} m, "
               f"{cfg.model.name} on {cfg.model.engine}, "
               f"{'pretrained' if cfg.pretrained else 'from scratch'}, {cfg.epochs} epochs = "
               f"{p.max_iterations} iterations of batch {cfg.batch_size} per rank x "
               f"{tr.info.world_size} ranks, lr {optimizer.param_groups[0]['lr']:g} "
               f"x{cfg.optim.lr_gamma:g} at epochs {sorted(cfg.optim.lr_steps)}, device "
               f"{tr.device}, out {tr.out_dir}")

    def hooks(self, p: FinetuneParts):
        o = self.cfg.optim
        if o.bn_momentum_init is None:
            return []
        return [BNMomentumHook(p.module, self.ipe, o.bn_momentum_init, o.bn_momentum_decay,
                               o.bn_momentum_step, o.bn_momentum_min)]

    def _evaluate(self, p: FinetuneParts):
        e = self.cfg.eval
        return evaluate_detector(p.model, p.eval_set, p.tr.device, batch_size=e.batch_size,
                                 conf_threshold=e.conf_threshold, nms_iou=e.nms_iou,
                                 per_class_proposal=e.per_class_proposal,
                                 iou_thresholds=e.iou_thresholds, nms=e.nms)

    def evaluation(self, p: FinetuneParts):
        def summary() -> dict[str, float]:
            r = self._evaluate(p)
            return {f"mAP@{th:g}": r.mean_ap(th) for th in r.iou_thresholds}

        # eval.every counts epochs (0 stays 0: at the end only); the first threshold's mAP
        # ranks evaluations (an empty list: the evaluator's error)
        every = self.cfg.eval.every
        thresholds = self.cfg.eval.iou_thresholds
        key = f"mAP@{float(thresholds[0]):g}" if thresholds else None
        return summary, max(1, round(every * self.ipe)) if every else 0, key

    def restore(self, ckpt: dict, trainer) -> None:
        check_head(ckpt, trainer)
        restore_task(ckpt, trainer)

    def export(self, p: FinetuneParts, directory: Path) -> None:
        save_detection_model(p.model, directory / "model.pth", classes=p.train_set.classes,
                             voxel_size=p.train_set.voxel_size, features=self.cfg.data.features)

    def results(self, p: FinetuneParts, trainer, best: dict | None) -> dict:
        cfg, eval_set, out_dir = self.cfg, p.eval_set, p.tr.out_dir
        result = self._evaluate(p)
        extra = {"split": cfg.data.eval_split, "scenes": len(eval_set),
                 "iterations": trainer.state.iteration, "epochs": cfg.epochs,
                 "voxel_size": eval_set.voxel_size, "model": cfg.model.name,
                 "pretrained": cfg.pretrained, "pretrained_loaded_fraction": p.loaded_fraction,
                 "train_scenes": len(p.train_set), "mean_sizes": self.mean_sizes.tolist()}
        results = write_det_results(out_dir, result, extra, then=RESUME)
        p.tr.print_fn(f"finetune-det: {cfg.data.eval_split} " + ", ".join(
            f"mAP@{t:g} {100 * result.mean_ap(t):.1f}" for t in result.iou_thresholds)
            + f" ({len(eval_set)} scenes); {out_dir / 'results.md'}")
        return results
