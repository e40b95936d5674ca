"""The model of a segmentation run (backbone + classifier) and the trainer's module
(cross-entropy over labelled voxels). Its datasets: :mod:`.datasets`; its optimizer and the
released poly schedule: :mod:`.optim`."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from mink_ssl.engine.build import build_backbone
from mink_ssl.engine.config import ModelConfig
from mink_ssl.models.heads import SegmentationModel, check_final_layer
from mink_ssl.sparse import sparse_tensor


def build_seg_model(cfg: ModelConfig, in_channels: int, num_classes: int,
                    final_layer: str = "rebuild"):
    """Backbone + classifier; ``final_layer="rebuild"`` builds the backbone with
    ``out_channels=num_classes`` (its final layer is the classifier), ``"keep"`` with
    ``cfg.out_channels`` and a head on top (:mod:`mink_ssl.models.heads`)."""
    if check_final_layer(final_layer) == "rebuild":
        cfg = replace(cfg, out_channels=num_classes)
    return SegmentationModel(build_backbone(cfg, in_channels), num_classes, final_layer)


class SegmentationModule(nn.Module):
    """The trainer's module: ``forward(batch)`` -> cross-entropy over labelled voxels and stats.

    Returns ``loss`` (= ``loss_ce``), ``stat_acc`` (voxel accuracy on labelled voxels) and
    ``stat_labelled`` (labelled voxels in the batch). A batch without any labelled voxel (possible
    with very few labelled points per scene) gives a zero loss that still reaches every weight.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, iteration: int = 0, max_iterations: int = 1) -> dict:
        logits = self.model(sparse_tensor(batch.coords, batch.feats)).F  # (N, C)
        labelled = batch.labels >= 0  # (N,)
        n = labelled.sum()
        if int(n) == 0:
            loss = logits.sum() * 0.0
            acc = torch.zeros((), device=logits.device)
        else:
            target = batch.labels[labelled]
            loss = nn.functional.cross_entropy(logits[labelled], target)
            acc = (logits[labelled].argmax(1) == target).float().mean().detach()
        return {"loss": loss, "loss_ce": loss.detach(), "stat_acc": acc,
                "stat_labelled": n.float()}
