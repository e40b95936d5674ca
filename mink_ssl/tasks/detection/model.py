"""The model of a detection run (VoteNet on the backbone), the trainer's module (VoteNet's
loss) and the resume check of the head. Its datasets: :mod:`.datasets`; its optimizer with
VoteNet's epoch schedule: :mod:`.optim`."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from mink_ssl.engine.build import build_backbone
from mink_ssl.engine.checkpoint import unwrap
from mink_ssl.engine.config import ModelConfig
from mink_ssl.models.heads import check_final_layer
from mink_ssl.models.votenet import build_votenet
from mink_ssl.tasks.detection.config import DetHeadConfig
from mink_ssl.tasks.detection.loss import votenet_loss


def build_det_model(cfg: ModelConfig, head: DetHeadConfig, in_channels: int, num_classes: int,
                    mean_sizes):
    rebuild = check_final_layer(head.final_layer) == "rebuild"
    if rebuild:  # the backbone's final layer gives the seed features
        cfg = replace(cfg, out_channels=head.seed_channels)
    return build_votenet(build_backbone(cfg, in_channels), num_classes, mean_sizes,
                         num_heading_bins=head.num_heading_bins, num_seeds=head.num_seeds,
                         seed_channels=head.seed_channels, num_proposals=head.num_proposals,
                         radius=head.radius, group_size=head.group_size,
                         seed_projection=not rebuild)


class DetectionModule(nn.Module):
    """The trainer's module: ``forward(batch)`` -> VoteNet's loss (``loss``), its terms
    (``loss_*``, detached) and statistics (``stat_*``), see
    :func:`mink_ssl.tasks.detection.loss.votenet_loss`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, iteration: int = 0, max_iterations: int = 1) -> dict:
        head = self.model.head
        out = self.model(batch.coords, batch.feats, batch.points)
        losses = votenet_loss(out, votes=batch.votes, vote_mask=batch.vote_mask,
                              boxes=batch.boxes, box_labels=batch.box_labels,
                              box_batch=batch.box_batch, mean_sizes=head.mean_sizes,
                              num_heading_bins=head.num_heading_bins)
        return {k: v if k == "loss" else v.detach() for k, v in losses.items()}


def check_head(ckpt: dict, trainer) -> None:
    """A resumed run's detection head must be the checkpoint's (classes, bins, mean sizes)."""
    want, saved = unwrap(trainer.module).model.head.config(), ckpt["head"]
    diff = [k for k in want if k != "mean_sizes" and saved.get(k) != want[k]]
    if not torch.allclose(torch.tensor(saved["mean_sizes"]), torch.tensor(want["mean_sizes"])):
        diff.append("mean_sizes (the training split's boxes changed?)")
    if diff:
        raise ValueError(f"the checkpoint's detection head differs from the configured one in "
                         f"{diff}; resume with the run's own config and data")
