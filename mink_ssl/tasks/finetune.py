"""The fine-tuning skeleton every downstream task shares; a task brings its parts.

    class MyTask(FinetuneTask):          # one module per task (segmentation/run.py, detection/run.py)
        name, checkpoint_format, collate_fn = "finetune-my", MY_CHECKPOINT_FORMAT, collate_my
        def dataset(self, split, train): ...              # a split of the prepared data
        def build_model(self, train_set): ...             # backbone + head (.backbone, .head)
        def build_module(self, model): ...                # the trainer's module: the loss
        def schedule(self, p, module): ...                # (optimizer, scheduler, iterations)
        def evaluation(self, p): ...                      # (summary(), every, best-model key)
        def export(self, p, directory): ...               # model.pth
        def results(self, p, trainer, best): ...          # the final evaluation

    finetune(MyTask(cfg), out_dir)                       # and a config group + CLI for it

:func:`finetune` runs the parts in one order, the same for every task: the config checks
(:meth:`FinetuneTask.check`, before anything is written), the run directory
(:func:`~mink_ssl.engine.run.task_run`), the seed, the training and evaluation splits (an empty
one is an error naming the choices), the model, the start weights (the run's own checkpoint
when resuming, else ``cfg.pretrained`` loaded strictly), the module on the device (DDP with
several ranks), the optimizer and schedule, the start line, the task's hooks and the periodic
evaluation (:class:`~mink_ssl.engine.hooks.EvalHook`, keeping the best model), the trainer
(:meth:`~mink_ssl.engine.run.TaskRun.build_trainer`: resume, loader, hooks), training, and the
final evaluation on rank 0. Two optional parts leave the skeleton early:
:meth:`FinetuneTask.instead_of_training` before anything is built (segmentation's
``evaluate_only``) and :meth:`FinetuneTask.without_training` once the model has its start weights
(segmentation's kNN probe).

``cfg`` extends :class:`~mink_ssl.engine.config.RunConfig` with ``seed``, ``pretrained``,
``batch_size``, ``data.root`` / ``train_split`` / ``eval_split`` / ``num_workers``, ``model``
and ``distributed``; ``checkpoint_every`` counts iterations, as in every task.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from mink_ssl.engine.distributed import wrap_ddp
from mink_ssl.engine.hooks import EvalHook
from mink_ssl.engine.run import TaskRun, task_run
from mink_ssl.engine.trainer import Hook, Trainer
from mink_ssl.models.pretrained import LoadReport, load_pretrained
from mink_ssl.tasks.finetune_checkpoint import (load_task_checkpoint, restore_task,
                                                save_task_checkpoint)


@dataclass
class FinetuneParts:
    """What the skeleton has built so far, handed to the task's parts."""
    cfg: Any
    tr: TaskRun
    train_set: Any
    eval_set: Any  # None: no evaluation split
    model: nn.Module
    pretrained: LoadReport | None  # what loading cfg.pretrained found; None: not loaded
    module: nn.Module | None = None  # the trainer's module (DDP-wrapped with several ranks)
    max_iterations: int = 0

    @property
    def loaded_fraction(self) -> float | None:
        return self.pretrained.matched_fraction if self.pretrained else None


class FinetuneTask:
    """A fine-tuning task's parts. Override the ones without a default; the skeleton
    (:func:`finetune`) calls them in its order. ``self.cfg`` is the task's config."""

    # class attributes every task sets:
    name: str  # the run's name: logs, progress bar, run-directory lock ("finetune-seg")
    checkpoint_format: str  # mink_ssl.formats.model_files tag of its checkpoints
    collate_fn: Callable  # samples -> batch (a staticmethod)

    def __init__(self, cfg):
        self.cfg = cfg

    # -- before the run directory is opened ---------------------------------------------------
    def check(self) -> list[str]:
        """Every config value, before anything is written (a ConfigError names each bad key);
        notes for values that run but deserve a word."""
        return []

    # -- parts the skeleton calls in order ----------------------------------------------------
    def instead_of_training(self, tr: TaskRun) -> dict | None:
        """A result that replaces the run (nothing is built or trained), or None."""
        return None

    def dataset(self, split: str, train: bool):
        """The split's dataset (``train``: with the training augmentations); it has
        ``classes``, ``in_channels``, ``voxel_size`` and a ``manifest`` with ``splits``."""
        raise NotImplementedError

    def build_model(self, train_set) -> nn.Module:
        """The model (``.backbone`` and ``.head``, each with ``config()``), on the CPU."""
        raise NotImplementedError

    def without_training(self, p: FinetuneParts) -> dict | None:
        """A result made from the model with its start weights, instead of training; or None."""
        return None

    def build_module(self, model: nn.Module) -> nn.Module:
        """The trainer's module: ``forward(batch, iteration, max_iterations)`` -> the loss."""
        raise NotImplementedError

    def schedule(self, p: FinetuneParts, module: nn.Module) -> tuple:
        """(optimizer, per-iteration scheduler, max_iterations) for ``module``'s parameters."""
        raise NotImplementedError

    def announce(self, p: FinetuneParts, optimizer) -> None:
        """The run's first lines (``p.tr.say``)."""

    def hooks(self, p: FinetuneParts) -> list[Hook]:
        """The task's own trainer hooks (before the periodic evaluation)."""
        return []

    def evaluation(self, p: FinetuneParts) -> tuple[Callable[[], dict], int, str | None]:
        """(summary() -> {metric: value}, every this many iterations (0: never), the metric
        that ranks evaluations for the best model (None: no best model))."""
        raise NotImplementedError

    def keep_best(self) -> bool:
        """Save the best periodic evaluation's model (``best/``)."""
        return bool(self.cfg.eval.keep_best)

    def restore(self, ckpt: dict, trainer: Trainer) -> None:
        """Put the trainer back where the checkpoint left it."""
        restore_task(ckpt, trainer)

    def export(self, p: FinetuneParts, directory: Path) -> None:
        """Write what the run delivers into ``directory`` (``model.pth``)."""
        raise NotImplementedError

    def results(self, p: FinetuneParts, trainer: Trainer, best: dict | None) -> dict:
        """The final evaluation (rank 0, with an evaluation split), written into the run
        directory; returns ``results.json``'s content. ``best``: the best periodic one."""
        raise NotImplementedError


def finetune(task: FinetuneTask, out_dir: Path, print_fn=print) -> dict:
    """Fine-tune as ``task.cfg`` says, writing into ``out_dir``; returns the final evaluation
    (``results.json``'s content; empty without an evaluation split)."""
    out_dir = Path(out_dir)
    notes = task.check()  # every value, before anything is written
    with task_run(task.cfg, out_dir, task.name, print_fn) as tr:
        for note in notes:
            tr.say(note)
        # the run's objects (module, loader, trainer) live in the call below and are freed
        # when it returns, before the process group goes
        return _finetune(task, tr)


def check_split(dataset, cfg, split: str, what: str, at_least: int = 1) -> None:
    """A split must hold at least ``at_least`` scenes (one per process for training); the
    error names the splits that have scenes."""
    if len(dataset) >= at_least:
        return
    filled = [k for k, v in dataset.manifest["splits"].items() if v]
    if what == "evaluation":
        raise ValueError(f"evaluation split {split!r} is empty; choose data.eval_split from "
                         f"{filled} or null (no evaluation)")
    have = "no scenes" if len(dataset) == 0 else f"{len(dataset)} scenes"
    ranks = f", fewer than {at_least} processes" if len(dataset) and at_least > 1 else ""
    raise ValueError(f"split {split!r} of {cfg.data.root} has {have}{ranks}; choose "
                     f"data.train_split from {filled}")


def _finetune(task: FinetuneTask, tr: TaskRun) -> dict:
    cfg, info, device = task.cfg, tr.info, tr.device
    early = task.instead_of_training(tr)
    if early is not None:
        return early
    torch.manual_seed(cfg.seed)  # same initial weights on every rank

    train_set = task.dataset(cfg.data.train_split, train=True)
    check_split(train_set, cfg, cfg.data.train_split, "training", at_least=info.world_size)
    eval_set = None
    if cfg.data.eval_split is not None:
        eval_set = task.dataset(cfg.data.eval_split, train=False)
        check_split(eval_set, cfg, cfg.data.eval_split, "evaluation")
    model = task.build_model(train_set)
    load_fn = partial(load_task_checkpoint, fmt=task.checkpoint_format)
    resume, _ = tr.resume_point(load_fn)
    report = None
    if cfg.pretrained and not resume:  # a resumed run restores its own weights
        report = load_pretrained(model, cfg.pretrained)
        tr.say(report.summary())
    p = FinetuneParts(cfg, tr, train_set, eval_set, model, report)
    done = task.without_training(p)
    if done is not None:
        return done

    module = task.build_module(model).to(device)
    p.module = wrap_ddp(module, info, device, cfg.distributed.sync_bn,
                        cfg.distributed.find_unused_parameters)
    optimizer, scheduler, p.max_iterations = task.schedule(p, p.module)
    task.announce(p, optimizer)

    def export(trainer_, directory: Path) -> None:
        task.export(p, directory)

    hooks = task.hooks(p)
    eval_hook = None
    if eval_set is not None:
        summary, every, key = task.evaluation(p)
        eval_hook = EvalHook(summary, every, tr.out_dir, info.is_main, tr.print_fn,
                             barrier=tr.barrier, key=key,
                             save_best=(partial(export, None) if task.keep_best() and key
                                        else None))
        hooks.append(eval_hook)
    trainer = tr.build_trainer(
        cfg, p.module, optimizer, scheduler, max_iterations=p.max_iterations,
        batch_size=cfg.batch_size, dataset=train_set, collate_fn=task.collate_fn,
        workers=tr.loader_workers(cfg.data.num_workers), seed=cfg.seed, load_fn=load_fn,
        restore_fn=task.restore, save_fn=partial(save_task_checkpoint,
                                                 fmt=task.checkpoint_format),
        export_fn=export, desc=task.name, hooks=hooks)
    tr.train(trainer)

    results: dict = {}
    if eval_set is not None and info.is_main:
        results = task.results(p, trainer, eval_hook.best)
    tr.barrier()
    return results
