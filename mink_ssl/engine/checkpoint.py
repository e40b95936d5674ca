"""Training checkpoints: self-describing, plain containers only (``weights_only=True`` loads).

Every task's checkpoint holds its format tag (:mod:`mink_ssl.formats.model_files`), library
versions, the resolved config as plain data, optimizer, scheduler, the trainer state (iteration,
samples consumed: the sampler position, and the task's tallies), RNG states (torch, CUDA, numpy,
python, and every :class:`~mink_ssl.seeding.SeededGenerator` of the module, e.g. objectives'),
and the task's own parts (weights and the constructor arguments that rebuild them), which the
task names when it saves and restores.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from mink_ssl.engine.trainer import TrainState
from mink_ssl.formats.model_files import load_tagged
from mink_ssl.io import atomic_torch_save, library_versions
from mink_ssl.seeding import SeededGenerator


def unwrap(module):
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") else module


def _seeded_generators(module) -> dict:
    found = {}
    for name, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, SeededGenerator):
                found[f"{name}.{attr}"] = value
    return found


def rng_state(module) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
        "generators": {k: g._generator.get_state() for k, g in _seeded_generators(module).items()
                       if g._generator is not None},
    }


def set_rng_state(state: dict, module) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    gens = _seeded_generators(module)
    for key, gstate in state["generators"].items():
        gens[key](gstate.device if hasattr(gstate, "device") else "cpu")  # create it
        gens[key]._generator.set_state(gstate)


def save_checkpoint(path: Path, trainer, config: dict, fmt: str, parts: dict) -> Path:
    """Everything to resume ``trainer`` exactly, tagged ``fmt``; ``parts``: the task's weights
    and constructor arguments (plain containers), stored as top-level entries."""
    module = unwrap(trainer.module)
    return atomic_torch_save({
        "format": fmt, "versions": library_versions(), "config": config, **parts,
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "state": trainer.state.to_dict(), "rng": rng_state(module),
    }, path)


def load_checkpoint(path: Path, fmt: str, what: str) -> dict:
    """The checkpoint in ``path``; its format must be ``fmt`` (``what`` names it in the error)."""
    return load_tagged(path, [fmt], what)


def restore_training(ckpt: dict, trainer) -> TrainState:
    """Optimizer, scheduler, RNG and trainer state from ``ckpt`` (the task restores its weights
    first); the sampler restarts from the state's ``samples``."""
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"], unwrap(trainer.module))
    trainer.state = TrainState.from_dict(ckpt["state"])
    return trainer.state


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(Path(directory).glob("checkpoint_*.pth"),
                   key=lambda p: int(p.stem.split("_")[1]))
    return found[-1] if found else None
