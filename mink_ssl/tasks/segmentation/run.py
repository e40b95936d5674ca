"""Fine-tuning for semantic segmentation, end to end: build from a :class:`FinetuneSegConfig`,
load pretrained backbone weights (strictly) or start from scratch, train with the shared
:class:`~mink_ssl.engine.trainer.Trainer` and hooks, evaluate on the original points, write the
results.

    from mink_ssl.tasks.segmentation import finetune_seg
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
only a probe on its features (:mod:`mink_ssl.tasks.segmentation.probe`).
"""
from __future__ import annotations

from pathlib import Path

from mink_ssl.data.segmentation import collate_segmentation
from mink_ssl.formats.model_files import SEG_CHECKPOINT_FORMAT
from mink_ssl.models.heads import save_segmentation_model
from mink_ssl.tasks.finetune import FinetuneParts, FinetuneTask, finetune
from mink_ssl.tasks.segmentation.config import FinetuneSegConfig, check_seg_config
from mink_ssl.tasks.segmentation.datasets import build_seg_dataset, check_labelled_points
from mink_ssl.tasks.segmentation.evaluate import (check_evaluate_only, evaluate_only,
                                                  final_evaluation)
from mink_ssl.tasks.segmentation.inference import evaluate_scenes
from mink_ssl.tasks.segmentation.model import SegmentationModule, build_seg_model
from mink_ssl.tasks.segmentation.optim import build_seg_optimizer
from mink_ssl.tasks.segmentation.probe import build_probe_model, run_knn_probe


def finetune_seg(cfg: FinetuneSegConfig, out_dir: Path, print_fn=print) -> dict:
    """Fine-tune as ``cfg`` says, writing into ``out_dir``; returns the final evaluation
    (``results.json``'s content; empty without an evaluation split)."""
    return finetune(SegmentationTask(cfg), out_dir, print_fn)


class SegmentationTask(FinetuneTask):
    """Semantic segmentation's parts of the fine-tuning skeleton
    (:mod:`mink_ssl.tasks.finetune`)."""

    name = "finetune-seg"
    checkpoint_format = SEG_CHECKPOINT_FORMAT
    collate_fn = staticmethod(collate_segmentation)
    cfg: FinetuneSegConfig

    def check(self) -> list[str]:
        notes = check_seg_config(self.cfg)
        if self.cfg.evaluate_only:
            check_evaluate_only(self.cfg)
        return notes

    def instead_of_training(self, tr) -> dict | None:
        if not self.cfg.evaluate_only:
            return None
        # rank 0 evaluates, the others wait
        results = (evaluate_only(self.cfg, tr.out_dir, tr.device, tr.print_fn)
                   if tr.info.is_main else {})
        tr.run.record()  # after the model's checks passed
        tr.barrier()
        return results

    def dataset(self, split: str, train: bool):
        return build_seg_dataset(self.cfg.data, split, train=train, seed=self.cfg.seed)

    def build_model(self, train_set):
        cfg, classes = self.cfg, train_set.classes
        if cfg.probe:
            return build_probe_model(cfg, train_set.in_channels, len(classes))
        return build_seg_model(cfg.model, train_set.in_channels, len(classes), cfg.final_layer)

    def _extra(self, p: FinetuneParts) -> dict:
        cfg = self.cfg
        return {"model": cfg.model.name, "pretrained": cfg.pretrained, "probe": cfg.probe,
                "pretrained_loaded_fraction": p.loaded_fraction,
                "train_scenes": len(p.train_set), "scene_fraction": cfg.data.scene_fraction,
                "labelled_points": cfg.data.labelled_points}

    def without_training(self, p: FinetuneParts) -> dict | None:
        if self.cfg.probe != "knn":
            return None
        tr = p.tr  # no training: rank 0 fills the bank and evaluates
        results = run_knn_probe(self.cfg, p.model, p.train_set, p.eval_set, tr.run, tr.out_dir,
                                tr.device, self._extra(p), tr.print_fn) if tr.info.is_main else {}
        tr.barrier()
        return results

    def build_module(self, model):
        return SegmentationModule(model)

    def schedule(self, p: FinetuneParts, module) -> tuple:
        trained = [q for q in module.parameters() if q.requires_grad]  # a probe: its head
        cfg = self.cfg
        optimizer, scheduler = build_seg_optimizer(cfg.optim, trained, cfg.max_iterations,
                                                   p.tr.info.world_size)
        return optimizer, scheduler, cfg.max_iterations

    def announce(self, p: FinetuneParts, optimizer) -> None:
        cfg, tr = self.cfg, p.tr
        few = check_labelled_points(p.train_set, cfg.data.labelled_points)  # every rank
        limited = ""
        if cfg.data.scene_fraction < 1 or cfg.data.labelled_points:
            limited = (f" (limited labels: {100 * cfg.data.scene_fraction:g}% of scenes, "
                       f"{cfg.data.labelled_points or 'all'} labelled points per scene, "
                       f"label_seed {cfg.data.label_seed}{few})")
        tr.say(f"finetune-seg: {len(p.train_set)} {cfg.data.train_split} scenes{limited}, "
               f"{len(p.eval_set) if p.eval_set else 0} {cfg.data.eval_split} scenes, "
               f"{len(p.train_set.classes)} classes, voxel {p.train_set.voxel_size:g} m, "
               f"{cfg.model.name} on {cfg.model.engine}, "
               f"{'pretrained' if cfg.pretrained else 'from scratch'}"
               f"{f', frozen, probe {cfg.probe}' if cfg.probe else ''}, "
               f"batch {cfg.batch_size} per rank x {tr.info.world_size} ranks, lr "
               f"{optimizer.param_groups[0]['lr']:g} {cfg.optim.scheduler}, device "
               f"{tr.device}, out {tr.out_dir}")

    def evaluation(self, p: FinetuneParts):
        cfg, eval_set = self.cfg, p.eval_set

        def summary() -> dict[str, float]:  # periodic: one rotation, no PLY files
            m = evaluate_scenes(p.model, eval_set.scenes_for_eval(cfg.eval.protocol),
                                p.train_set.classes, eval_set.voxel_size, eval_set.features,
                                up_axis=eval_set.up_axis, device=p.tr.device,
                                protocol=cfg.eval.protocol, label_rule=eval_set.label_rule)
            return {"mIoU": m.miou, "mAcc": m.macc, "oAcc": m.oacc}

        return summary, cfg.eval.every, "mIoU"

    def export(self, p: FinetuneParts, directory: Path) -> None:
        save_segmentation_model(p.model, directory / "model.pth", classes=p.train_set.classes,
                                voxel_size=p.train_set.voxel_size,
                                features=self.cfg.data.features)

    def results(self, p: FinetuneParts, trainer, best: dict | None) -> dict:
        extra = {"iterations": trainer.state.iteration, **self._extra(p),
                 "best": None if best is None else {"iteration": best["iteration"],
                                                    "mIoU": best["mIoU"]}}
        return final_evaluation(p.model, p.eval_set, self.cfg, p.tr.out_dir, p.tr.device,
                                extra, p.tr.print_fn)
