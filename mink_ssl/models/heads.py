"""Task heads on the shared Res16UNet backbone, and the segmentation model (backbone + head).

Two ways to put a classifier on a pretrained backbone (``final_layer``):

- ``rebuild`` (default, the released code: PointContrast / CSC ``downstream/semseg``
  ``ddp_main.py`` build ``Res16UNet34C(in_channels, num_classes)`` and load the pretrained weights
  of matching shape): the backbone's own ``final`` 1x1x1 convolution is the classifier, rebuilt
  as last-block width -> C (96 -> C for Res16UNet34C) with MinkowskiEngine's default
  initialisation. Loading pretrained weights drops the file's ``final.*`` (see
  :mod:`mink_ssl.models.pretrained`); the head (:class:`FinalLayerHead`) has no weights.
  State-dict keys: ``backbone.<backbone keys>``.
- ``keep`` (our earlier variant): the pretrained ``final`` layer (96 -> 32) is kept and a new
  1x1x1 convolution (:class:`SegmentationHead`, 32 -> C, with bias) goes on top, so every
  pretrained tensor is used. State-dict keys: ``backbone.<backbone keys>``,
  ``head.conv.{kernel,bias}``.

``model.task_layers`` names the model keys that start from scratch (``backbone.final.`` or
``head.``); they are the only keys that pretrained loading may leave unset.

Files written before ``final_layer`` existed hold a ``head`` config without it: they are ``keep``
models and still load.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from mink_ssl.formats.model_files import SEG_MODEL_FORMAT, load_tagged
from mink_ssl.io import atomic_torch_save, library_versions
from mink_ssl.models import model_from_config
from mink_ssl.models.probe import FrozenProbe
from mink_ssl.sparse import SparseVoxels
#: ways to attach the task layer: rebuild the backbone's final layer (released) | keep it + head
FINAL_LAYERS = ("rebuild", "keep")


def check_final_layer(final_layer: str) -> str:
    if final_layer not in FINAL_LAYERS:
        raise ValueError(f"final_layer must be one of {FINAL_LAYERS} (rebuild: the backbone's "
                         f"final layer becomes the task layer, as the released code; keep: a "
                         f"new head on the pretrained final layer), got {final_layer!r}")
    return final_layer


class PointwiseConv(nn.Module):
    """A 1x1x1 convolution in MinkowskiEngine's parameter layout (``kernel`` (C_in, C_out),
    ``bias`` (1, C_out)), on any engine's output: ``feats @ kernel + bias``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(1, out_channels))

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        return x.replace(x.feats @ self.kernel + self.bias)  # (N, C_out)


class SegmentationHead(nn.Module):
    """Per-voxel linear classifier: sparse (N, in_channels) -> sparse (N, num_classes)."""

    def __init__(self, in_channels: int, num_classes: int, dimension: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_channels, self.num_classes, self.dimension = in_channels, num_classes, dimension
        self.conv = PointwiseConv(in_channels, num_classes)
        nn.init.normal_(self.conv.kernel, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def config(self) -> dict:
        return {"final_layer": "keep", "in_channels": self.in_channels,
                "num_classes": self.num_classes, "dimension": self.dimension}

    def forward(self, x):
        return self.conv(x)


class FinalLayerHead(nn.Module):
    """The head of a ``rebuild`` model: the backbone's final layer already gives the logits,
    so this passes them through (no weights)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def config(self) -> dict:
        return {"final_layer": "rebuild", "num_classes": self.num_classes}

    def forward(self, x):
        return x


class SegmentationModel(nn.Module):
    """``backbone`` (a Res16UNet) and its classifier (see the module docstring).

    ``forward(x)``: sparse tensor (N, in_channels) at stride 1 -> logits (N, num_classes) on the
    same coordinates. With ``final_layer="rebuild"`` the backbone must have been built with
    ``out_channels=num_classes``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, final_layer: str = "rebuild"):
        super().__init__()
        self.final_layer = check_final_layer(final_layer)
        self.backbone = backbone
        if final_layer == "rebuild":
            if backbone.out_channels != num_classes:
                raise ValueError(f"final_layer='rebuild' makes the backbone's final layer the "
                                 f"classifier: build the backbone with out_channels={num_classes}"
                                 f" (got {backbone.out_channels})")
            self.head = FinalLayerHead(num_classes)
        else:
            self.head = SegmentationHead(backbone.out_channels, num_classes, backbone.dimension)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def task_layers(self) -> tuple[str, ...]:
        """Model key prefixes that start from scratch (never from pretrained weights)."""
        return ("backbone.final.",) if self.final_layer == "rebuild" else ("head.",)

    def forward(self, x):
        return self.head(self.backbone(x))


def save_segmentation_model(model: SegmentationModel, path: str | os.PathLike, *,
                            classes: list[str], voxel_size: float, features: str) -> Path:
    """Write a self-describing segmentation model (plain containers, atomically): backbone and
    head constructor arguments and weights, class names and the input it expects."""
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a head with {model.num_classes} classes")
    return atomic_torch_save({
        "format": SEG_MODEL_FORMAT, "versions": library_versions(),
        "model": model.backbone.config(), "head": model.head.config(),
        "classes": list(classes), "voxel_size": float(voxel_size), "features": features,
        "backbone": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
        "head_state": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
    }, path)


def load_segmentation_model(path: str | os.PathLike, map_location="cpu",
                            engine: str | None = None) -> tuple[SegmentationModel, dict]:
    """Rebuild a model written by :func:`save_segmentation_model` (strict keys), on ``engine``
    (default: the file's); returns it and the file's metadata (classes, voxel_size, features)."""
    state = load_tagged(path, [SEG_MODEL_FORMAT], "a mink-ssl segmentation model", map_location)
    meta = {k: state[k] for k in ("classes", "voxel_size", "features")}
    return segmentation_model_from_state(state, engine), meta


def segmentation_model_from_state(state: dict, engine: str | None = None) -> SegmentationModel:
    """The model in ``state`` (strict keys): its ``model`` / ``head`` constructor configs and
    ``backbone`` / ``head_state`` weights, entries that a segmentation model file and a
    segmentation fine-tuning checkpoint (``mink_ssl.seg_checkpoint/1``) both hold. A ``head``
    config without ``final_layer`` (written before it existed) is a ``keep`` model; one with
    ``probe`` is a :class:`~mink_ssl.models.probe.FrozenProbe`. The backbone runs on
    ``engine`` (default: the one the config names)."""
    head = state["head"]
    if "probe" in head:  # a frozen backbone with a probe head (mink_ssl.models.probe)

        model = FrozenProbe(model_from_config(state["model"], engine), head["num_classes"],
                            head["probe"], **({"knn_k": head["k"]} if "k" in head else {}),
                            norm=head.get("norm", False))  # files made before it: none
        model.backbone.load_state_dict(state["backbone"], strict=True)
        model.head.load_state_dict(state["head_state"], strict=True)
        return model
    model = SegmentationModel(model_from_config(state["model"], engine), head["num_classes"],
                              head.get("final_layer", "keep"))
    model.backbone.load_state_dict(state["backbone"], strict=True)
    model.head.load_state_dict(state["head_state"], strict=True)
    return model
