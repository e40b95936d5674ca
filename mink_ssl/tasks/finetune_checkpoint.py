"""Checkpoints of a fine-tuning run: a backbone with a task head (exact resume).

A fine-tuning module has ``.model.backbone`` and ``.model.head`` (each with ``config()``); its
checkpoint holds both constructor configs and weights besides what every checkpoint holds
(:mod:`mink_ssl.engine.checkpoint`), tagged with the task's format
(``mink_ssl.seg_checkpoint/1``, ``mink_ssl.det_checkpoint/1``).
"""
from __future__ import annotations

from pathlib import Path

from mink_ssl.engine.checkpoint import load_checkpoint, restore_training, save_checkpoint, unwrap
from mink_ssl.engine.trainer import TrainState


def save_task_checkpoint(path: Path, trainer, config: dict, fmt: str) -> Path:
    """Everything to resume a fine-tuning run exactly (plain containers only)."""
    model = unwrap(trainer.module).model
    return save_checkpoint(path, trainer, config, fmt, {
        "model": model.backbone.config(), "head": model.head.config(),
        "backbone": model.backbone.state_dict(), "head_state": model.head.state_dict()})


def load_task_checkpoint(path: Path, fmt: str) -> dict:
    return load_checkpoint(path, fmt, "a checkpoint of this fine-tuning task")


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
    model = unwrap(trainer.module).model
    check_layout(ckpt, model)
    model.backbone.load_state_dict(ckpt["backbone"], strict=True)
    model.head.load_state_dict(ckpt["head_state"], strict=True)
    return restore_training(ckpt, trainer)
