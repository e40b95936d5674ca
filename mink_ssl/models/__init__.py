"""Models: the Res16UNet family (one definition for every task) and model checkpoints.

    from mink_ssl.models import build_model
    net = build_model("Res16UNet34C", in_channels=3, out_channels=32)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mink_ssl.formats.model_files import MODEL_FORMAT, load_tagged
from mink_ssl.io import atomic_torch_save, library_versions
from mink_ssl.models import res16unet
from mink_ssl.models.registry import MODELS
from mink_ssl.models.res16unet import Res16UNetBase


def build_model(name: str, **kwargs) -> Res16UNetBase:
    """Instantiate a registered network by name; unknown names list the valid ones."""
    return MODELS.get(name)(**kwargs)


def model_from_config(config: dict, engine: str | None = None) -> Res16UNetBase:
    """The network a stored ``model.config()`` describes, on ``engine`` (default: the one the
    config names, else the default engine). Weights do not depend on the engine."""
    cfg = dict(config)
    if engine is not None:
        cfg["engine"] = engine
    return build_model(cfg.pop("name"), **cfg)


def model_state(model: Res16UNetBase) -> dict:
    """A self-describing, plain-container snapshot of a model (loads with weights_only=True)."""
    return {"format": MODEL_FORMAT, "model": model.config(), "versions": library_versions(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def save_model(model: Res16UNetBase, path: str | os.PathLike) -> Path:
    """Write ``model_state(model)`` atomically to ``path``."""
    return atomic_torch_save(model_state(model), path)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu",
               engine: str | None = None) -> Res16UNetBase:
    """Rebuild a model saved by :func:`save_model` (architecture from the file, strict keys),
    on ``engine`` (default: the file's)."""
    state = load_tagged(path, [MODEL_FORMAT], "a mink-ssl model file", map_location)
    model = model_from_config(state["model"], engine)
    model.load_state_dict(state["state_dict"], strict=True)
    return model


__all__ = ["MODELS", "build_model", "model_from_config", "model_state", "save_model", "load_model", "Res16UNetBase"]
