"""Training checkpoints: self-describing, plain containers only (``weights_only=True`` loads).

A checkpoint holds the backbone's constructor arguments and weights, the objectives' heads,
optimizer, scheduler, the trainer state (iteration, samples consumed: the sampler position),
RNG states (torch, CUDA, numpy, python, and seeded generators of objectives), the resolved
config as plain data, and library versions.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from mink_ssl.engine.trainer import TrainState
from mink_ssl.formats.model_files import CHECKPOINT_FORMAT, load_tagged


def _unwrap(module):
    return module.module if hasattr(module, "module") else module


def _seeded_generators(module) -> dict:
    from mink_ssl.objectives.sampling import SeededGenerator

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


def save_checkpoint(path: Path, trainer, config: dict) -> Path:
    from mink_ssl.io import atomic_torch_save, library_versions

    module = _unwrap(trainer.module)
    s = trainer.state
    ckpt = {
        "format": CHECKPOINT_FORMAT, "versions": library_versions(), "config": config,
        "model": module.backbone.config(),
        "backbone": module.backbone.state_dict(),
        "objectives": module.objectives.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "state": {"iteration": s.iteration, "samples": s.samples,
                  "skipped_pairs": s.skipped_pairs, "skipped_batches": s.skipped_batches},
        "rng": rng_state(module),
    }
    return atomic_torch_save(ckpt, path)


def load_checkpoint(path: Path) -> dict:
    return load_tagged(path, [CHECKPOINT_FORMAT], "a mink-ssl pretraining checkpoint")


def restore(ckpt: dict, trainer) -> TrainState:
    """Put a trainer back where the checkpoint left it (the sampler restarts from samples)."""
    module = _unwrap(trainer.module)
    module.backbone.load_state_dict(ckpt["backbone"], strict=True)
    module.objectives.load_state_dict(ckpt["objectives"], strict=True)
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"], module)
    trainer.state = TrainState(**ckpt["state"])
    return trainer.state


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(Path(directory).glob("checkpoint_*.pth"),
                   key=lambda p: int(p.stem.split("_")[1]))
    return found[-1] if found else None
