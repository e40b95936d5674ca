"""Task heads on the shared Res16UNet backbone, and the segmentation model (backbone + head).

The segmentation head reads the backbone's output features (the ``final`` layer's
``out_channels``, 32 in PointContrast pretraining) and maps each voxel to class logits with a
1x1x1 ``MinkowskiConvolution`` (with bias). Keeping the pretrained ``final`` layer and adding the
head on top means every pretrained tensor is used; only the head starts from scratch (it is the
one allow-listed missing part when pretrained weights are loaded, see
:mod:`mink_ssl.models.pretrained`).

State-dict keys of :class:`SegmentationModel`: ``backbone.<backbone keys>`` and
``head.conv.{kernel,bias}``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

SEG_MODEL_FORMAT = "mink_ssl.seg_model/1"


class SegmentationHead(nn.Module):
    """Per-voxel linear classifier: sparse (N, in_channels) -> sparse (N, num_classes)."""

    def __init__(self, in_channels: int, num_classes: int, dimension: int = 3):
        super().__init__()
        import MinkowskiEngine as ME

        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_channels, self.num_classes, self.dimension = in_channels, num_classes, dimension
        self.conv = ME.MinkowskiConvolution(in_channels, num_classes, kernel_size=1, bias=True,
                                            dimension=dimension)
        nn.init.normal_(self.conv.kernel, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes,
                "dimension": self.dimension}

    def forward(self, x):
        return self.conv(x)


class SegmentationModel(nn.Module):
    """``backbone`` (a Res16UNet) followed by a :class:`SegmentationHead`.

    ``forward(x)``: sparse tensor (N, in_channels) at stride 1 -> logits (N, num_classes) on the
    same coordinates.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = SegmentationHead(backbone.out_channels, num_classes, backbone.dimension)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, x):
        return self.head(self.backbone(x))


def save_segmentation_model(model: SegmentationModel, path: str | os.PathLike, *,
                            classes: list[str], voxel_size: float, features: str) -> Path:
    """Write a self-describing segmentation model (plain containers, atomically): backbone and
    head constructor arguments and weights, class names and the input it expects."""
    from mink_ssl.io import atomic_torch_save, library_versions

    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a head with {model.num_classes} classes")
    return atomic_torch_save({
        "format": SEG_MODEL_FORMAT, "versions": library_versions(),
        "model": model.backbone.config(), "head": model.head.config(),
        "classes": list(classes), "voxel_size": float(voxel_size), "features": features,
        "backbone": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
        "head_state": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
    }, path)


def load_segmentation_model(path: str | os.PathLike, map_location="cpu"
                            ) -> tuple[SegmentationModel, dict]:
    """Rebuild a model written by :func:`save_segmentation_model` (strict keys); returns it
    and the file's metadata (classes, voxel_size, features)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentation model {path} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != SEG_MODEL_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a mink-ssl segmentation model (format {found!r}, "
                         f"expected {SEG_MODEL_FORMAT!r})")
    meta = {k: state[k] for k in ("classes", "voxel_size", "features")}
    return segmentation_model_from_state(state), meta


def segmentation_model_from_state(state: dict) -> SegmentationModel:
    """The model in ``state`` (strict keys): its ``model`` / ``head`` constructor configs and
    ``backbone`` / ``head_state`` weights, entries that a segmentation model file and a
    segmentation fine-tuning checkpoint (``mink_ssl.seg_checkpoint/1``) both hold. A ``head``
    config with ``probe`` is a :class:`~mink_ssl.models.probe.FrozenProbe`."""
    from mink_ssl.models import build_model

    cfg = dict(state["model"])
    head = state["head"]
    if "probe" in head:  # a frozen backbone with a probe head (mink_ssl.models.probe)
        from mink_ssl.models.probe import FrozenProbe

        model = FrozenProbe(build_model(cfg.pop("name"), **cfg), head["num_classes"],
                            head["probe"], **({"knn_k": head["k"]} if "k" in head else {}))
        model.backbone.load_state_dict(state["backbone"], strict=True)
        model.head.load_state_dict(state["head_state"], strict=True)
        return model
    model = SegmentationModel(build_model(cfg.pop("name"), **cfg), state["head"]["num_classes"])
    model.backbone.load_state_dict(state["backbone"], strict=True)
    model.head.load_state_dict(state["head_state"], strict=True)
    return model
