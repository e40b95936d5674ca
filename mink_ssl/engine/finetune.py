"""What segmentation and detection fine-tuning share: checkpoints of a backbone with a task head
(exact resume) and the periodic evaluation hook.

A fine-tuning module has ``.model.backbone`` and ``.model.head`` (each with ``config()``); its
checkpoint holds both constructor configs and weights, optimizer, scheduler, trainer state and
RNG, tagged with the task's format (``mink_ssl.seg_checkpoint/1``, ``mink_ssl.det_checkpoint/1``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

from mink_ssl.engine.checkpoint import _unwrap
from mink_ssl.engine.trainer import Hook, TrainState
from mink_ssl.formats.model_files import load_tagged


def save_task_checkpoint(path: Path, trainer, config: dict, fmt: str) -> Path:
    """Everything to resume a fine-tuning run exactly (plain containers only)."""
    from mink_ssl.engine.checkpoint import rng_state
    from mink_ssl.io import atomic_torch_save, library_versions

    module = _unwrap(trainer.module)
    model = module.model
    return atomic_torch_save({
        "format": fmt, "versions": library_versions(), "config": config,
        "model": model.backbone.config(), "head": model.head.config(),
        "backbone": model.backbone.state_dict(), "head_state": model.head.state_dict(),
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "state": {"iteration": trainer.state.iteration, "samples": trainer.state.samples},
        "rng": rng_state(module),
    }, path)


def load_task_checkpoint(path: Path, fmt: str) -> dict:
    return load_tagged(path, [fmt], "a checkpoint of this fine-tuning task")


def check_layout(ckpt: dict, model) -> None:
    """The checkpoint's task layer must be the configured one (``final_layer``): a checkpoint
    written before ``final_layer`` existed holds a ``keep`` model."""
    def layout(head: dict) -> str:
        if "seed_projection" in head:  # detection
            return "keep" if head["seed_projection"] else "rebuild"
        return head.get("final_layer", "keep")

    saved, want = layout(ckpt["head"]), layout(model.head.config())
    if saved != want:
        raise ValueError(f"the checkpoint (format {ckpt.get('format')!r}) holds a "
                         f"final_layer={saved!r} model but final_layer={want!r} is configured; "
                         f"resume with final_layer={saved}")


def restore_task(ckpt: dict, trainer) -> TrainState:
    """Put a trainer back where the checkpoint left it (the sampler restarts from samples)."""
    from mink_ssl.engine.checkpoint import set_rng_state

    module = _unwrap(trainer.module)
    check_layout(ckpt, module.model)
    module.model.backbone.load_state_dict(ckpt["backbone"], strict=True)
    module.model.head.load_state_dict(ckpt["head_state"], strict=True)
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"], module)
    trainer.state = TrainState(iteration=ckpt["state"]["iteration"],
                               samples=ckpt["state"]["samples"])
    return trainer.state


def start_weights(model, resume: str | None, pretrained: str | None, out_dir: Path,
                  is_main: bool, print_fn=print):
    """Where a fine-tuning run starts: ``(resume checkpoint or None, pretrained report or
    None)``. ``resume="auto"`` is the run directory's latest checkpoint; otherwise
    ``pretrained`` weights are loaded strictly into ``model`` (a resumed run restores its own)."""
    from mink_ssl.engine.checkpoint import latest_checkpoint
    from mink_ssl.models.pretrained import load_pretrained

    if resume == "auto":
        resume = latest_checkpoint(out_dir)
    report = None
    if pretrained and not resume:
        report = load_pretrained(model, pretrained)
        if is_main:
            print_fn(report.summary())
    return resume, report


def stat_name(metric: str) -> str:
    """``"mIoU"`` -> ``"stat_val_miou"``, ``"mAP@0.25"`` -> ``"stat_val_map025"``."""
    return "stat_val_" + re.sub(r"[^a-z0-9]", "", metric.lower())


class EvalHook(Hook):
    """Every ``every`` iterations (not at the last one: the final evaluation follows), rank 0
    runs ``evaluate() -> {metric: value in [0, 1]}`` (e.g. ``{"mIoU": .., "mAcc": ..}``), adds
    them to the step's metrics (``stat_val_<metric>``), rewrites ``val_history.json`` and prints
    them; the other ranks wait at a barrier. A resumed run keeps the earlier evaluations.

    With a ``key`` metric the hook tracks the best evaluation (``self.best``, the first of
    equals); with ``save_best`` too, each strictly better one calls ``save_best(out_dir /
    "best")`` and writes ``best/best.json`` = ``{"iteration", "metric": key, **metrics}``, so the
    best model survives a final one that overfits. A resumed run takes the best so far from the
    kept history, so it never replaces a better earlier best with a worse one."""

    def __init__(self, evaluate: Callable[[], dict[str, float]], every: int, out_dir: Path,
                 enabled: bool, print_fn=print, barrier: Callable[[], None] = lambda: None,
                 key: str | None = None, save_best: Callable[[Path], None] | None = None):
        if save_best is not None and key is None:
            raise ValueError("EvalHook(save_best=...) needs key=<the metric that ranks "
                             "evaluations>, e.g. key='mIoU'")
        self.evaluate, self.every, self.out_dir = evaluate, every, Path(out_dir)
        self.enabled, self.print_fn, self.barrier = enabled, print_fn, barrier
        self.key, self.save_best = key, save_best
        self.history: list[dict] = []
        self.best: dict | None = None  # the history entry with the highest key metric

    def before_train(self, trainer) -> None:
        path = self.out_dir / "val_history.json"
        if self.enabled and path.is_file():
            self.history = [h for h in json.loads(path.read_text())
                            if h["iteration"] <= trainer.state.iteration]
        if self.key is not None:
            for h in self.history:
                if self.key in h and (self.best is None or h[self.key] > self.best[self.key]):
                    self.best = h

    def _keep_best(self, entry: dict) -> None:
        from mink_ssl.io import atomic_path

        if self.key not in entry:
            raise ValueError(f"the best-model metric {self.key!r} is not among the evaluation's "
                             f"metrics {sorted(k for k in entry if k != 'iteration')}; pass one "
                             "of them as key")
        if self.best is not None and not entry[self.key] > self.best[self.key]:
            return
        before, self.best = self.best, entry
        if self.save_best is None:
            return
        best_dir = self.out_dir / "best"
        best_dir.mkdir(parents=True, exist_ok=True)
        self.save_best(best_dir)
        with atomic_path(best_dir / "best.json") as tmp:  # after the model: it describes it
            tmp.write_text(json.dumps({"iteration": entry["iteration"], "metric": self.key,
                                       **{k: v for k, v in entry.items() if k != "iteration"}},
                                      indent=1))
        was = (f" (was {100 * before[self.key]:.1f} at iteration {before['iteration']})"
               if before else "")
        self.print_fn(f"iteration {entry['iteration']}: best {self.key} so far "
                      f"{100 * entry[self.key]:.1f}{was}, saved to {best_dir}")

    def after_step(self, trainer) -> None:
        it = trainer.state.iteration
        if not self.every or it % self.every or it >= trainer.max_iterations:
            return
        if self.enabled:
            from mink_ssl.io import atomic_path

            metrics = self.evaluate()
            self.history.append({"iteration": it, **metrics})
            with atomic_path(self.out_dir / "val_history.json") as tmp:
                tmp.write_text(json.dumps(self.history, indent=1))
            for name, value in metrics.items():
                trainer.state.last_metrics[stat_name(name)] = value
            self.print_fn(f"iteration {it}: val " + ", ".join(
                f"{name} {100 * value:.1f}" for name, value in metrics.items()))
            if self.key is not None:
                self._keep_best(self.history[-1])
        self.barrier()
