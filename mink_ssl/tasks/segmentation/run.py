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

from functools import partial
from pathlib import Path

import torch

from mink_ssl.data.segmentation import collate_segmentation
from mink_ssl.engine.distributed import wrap_ddp
from mink_ssl.engine.hooks import EvalHook
from mink_ssl.engine.run import TaskRun, task_run
from mink_ssl.engine.trainer import Hook, Trainer
from mink_ssl.formats.model_files import SEG_CHECKPOINT_FORMAT
from mink_ssl.models.heads import save_segmentation_model
from mink_ssl.tasks.finetune import (load_task_checkpoint, restore_task, save_task_checkpoint,
                                     start_weights)
from mink_ssl.tasks.segmentation.config import FinetuneSegConfig, check_seg_config
from mink_ssl.tasks.segmentation.evaluate import (check_evaluate_only, evaluate_only,
                                                  final_evaluation)
from mink_ssl.tasks.segmentation.inference import evaluate_scenes
from mink_ssl.tasks.segmentation.model import (SegmentationModule, build_seg_dataset,
                                               build_seg_model, build_seg_optimizer,
                                               check_labelled_points)
from mink_ssl.tasks.segmentation.probe import build_probe_model, run_knn_probe


def finetune_seg(cfg: FinetuneSegConfig, out_dir: Path, print_fn=print) -> dict:
    """Fine-tune as ``cfg`` says, writing into ``out_dir``; returns the final evaluation
    (``results.json``'s content; empty without an evaluation split)."""
    out_dir = Path(out_dir)
    notes = check_seg_config(cfg)  # every value, before anything is written
    if cfg.evaluate_only:
        check_evaluate_only(cfg)
    with task_run(cfg, out_dir, "finetune-seg", print_fn) as tr:
        for note in notes:
            tr.say(note)
        # the run's objects (module, loader, trainer) live in the call below and are freed
        # when it returns, before the process group goes
        return _finetune_seg(cfg, tr)


def _finetune_seg(cfg: FinetuneSegConfig, tr: TaskRun) -> dict:
    out_dir, print_fn = tr.out_dir, tr.print_fn
    info, device, run = tr.info, tr.device, tr.run
    if cfg.evaluate_only:  # rank 0 evaluates, the others wait
        results = evaluate_only(cfg, out_dir, device, print_fn) if info.is_main else {}
        run.record()  # after the model's checks passed
        tr.barrier()
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
        model = build_probe_model(cfg, train_set.in_channels, len(classes))
    else:
        model = build_seg_model(cfg.model, train_set.in_channels, len(classes),
                                cfg.final_layer)

    resume, ckpt = run.load_resume(partial(load_task_checkpoint, fmt=SEG_CHECKPOINT_FORMAT))
    resume, pretrained_report = start_weights(model, resume and str(resume), cfg.pretrained,
                                              out_dir, info.is_main, print_fn)
    loaded = pretrained_report.matched_fraction if pretrained_report else None

    if cfg.probe == "knn":  # no training: rank 0 fills the bank and evaluates
        results = run_knn_probe(cfg, model, train_set, eval_set, run, out_dir, device, {
            "model": cfg.model.name, "pretrained": cfg.pretrained, "probe": cfg.probe,
            "pretrained_loaded_fraction": loaded,
            "train_scenes": len(train_set), "scene_fraction": cfg.data.scene_fraction,
            "labelled_points": cfg.data.labelled_points}, print_fn) if info.is_main else {}
        tr.barrier()
        return results
    module = SegmentationModule(model).to(device)
    module = wrap_ddp(module, info, device, cfg.distributed.sync_bn,
                      cfg.distributed.find_unused_parameters)
    trained = [p for p in module.parameters() if p.requires_grad]  # a probe: its head
    optimizer, scheduler = build_seg_optimizer(cfg.optim, trained, cfg.max_iterations,
                                               info.world_size)
    few = check_labelled_points(train_set, cfg.data.labelled_points)  # every rank
    limited = ""
    if cfg.data.scene_fraction < 1 or cfg.data.labelled_points:
        limited = (f" (limited labels: {100 * cfg.data.scene_fraction:g}% of scenes, "
                   f"{cfg.data.labelled_points or 'all'} labelled points per scene, "
                   f"label_seed {cfg.data.label_seed}{few})")
    tr.say(f"finetune-seg: {len(train_set)} {cfg.data.train_split} scenes{limited}, "
           f"{len(eval_set) if eval_set else 0} {cfg.data.eval_split} scenes, "
           f"{len(classes)} classes, voxel {train_set.voxel_size:g} m, "
           f"{cfg.model.name} on {cfg.model.engine}, "
           f"{'pretrained' if cfg.pretrained else 'from scratch'}"
           f"{f', frozen, probe {cfg.probe}' if cfg.probe else ''}, "
           f"batch {cfg.batch_size} per rank x {info.world_size} ranks, lr "
           f"{optimizer.param_groups[0]['lr']:g} {cfg.optim.scheduler}, device "
           f"{device}, out {out_dir}")

    trainer = Trainer(module, optimizer, scheduler, iter(()), cfg.max_iterations,
                      cfg.batch_size, device)
    tr.resume(trainer, resume, ckpt, restore_task)
    tr.attach_loader(trainer, train_set, cfg.batch_size, tr.loader_workers(cfg.data.num_workers),
                     cfg.seed, collate_segmentation)

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
                             barrier=tr.barrier, key="mIoU",
                             save_best=partial(export, None) if cfg.eval.keep_best else None)
        hooks.append(eval_hook)
    trainer.hooks = hooks + tr.standard_hooks(
        cfg, "finetune-seg", partial(save_task_checkpoint, fmt=SEG_CHECKPOINT_FORMAT), export)
    tr.train(trainer)

    results: dict = {}
    if eval_set is not None and info.is_main:
        best = eval_hook.best  # of the periodic evaluations; None without any
        extra = {"iterations": trainer.state.iteration, "model": cfg.model.name,
                 "pretrained": cfg.pretrained, "probe": cfg.probe,
                 "pretrained_loaded_fraction": loaded,
                 "train_scenes": len(train_set), "scene_fraction": cfg.data.scene_fraction,
                 "labelled_points": cfg.data.labelled_points,
                 "best": None if best is None else {"iteration": best["iteration"],
                                                    "mIoU": best["mIoU"]}}
        results = final_evaluation(model, eval_set, cfg, out_dir, device, extra, print_fn)
    tr.barrier()
    return results
