"""What an objective sees and returns.

An objective is an ``nn.Module`` registered in ``OBJECTIVES`` under a name. It owns its heads
(projectors, cluster heads, an EMA teacher, ...), takes a :class:`StepContext` and returns a
dict of named scalars: ``loss_*`` terms (the trainer sums them, after the config's weights) and
``stat_*`` diagnostics (logged only). The trainer knows nothing about any particular objective.

Objectives that need the backbone's features of a view ask the context, which runs the
backbone once per view and step however many objectives ask (so PointInfoNCE + GMM on the same
views cost one forward pass). Objectives that need other inputs (crops, perturbed clouds) call
``ctx.backbone`` themselves.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class StepContext:
    """One training step's inputs, with the backbone's features computed on demand.

    Attributes:
        batch: the collated batch (e.g. :class:`mink_ssl.data.pairs.PairBatch`).
        backbone: the network being trained; ``backbone(sparse_tensor)`` -> sparse tensor.
        iteration: global step (objectives with schedules, e.g. EMA momentum, read it).
        max_iterations: length of the run, for schedules.
    """

    def __init__(self, batch, backbone: nn.Module, iteration: int = 0, max_iterations: int = 1):
        self.batch, self.backbone = batch, backbone
        self.iteration, self.max_iterations = iteration, max_iterations
        self._features: dict[int, torch.Tensor] = {}

    def features(self, view: int) -> torch.Tensor:
        """Backbone output (N_view, C) for ``batch.views[view]``, one row per voxel, cached."""
        if view not in self._features:
            from mink_ssl.sparse import sparse_tensor

            v = self.batch.views[view]
            x = sparse_tensor(v.coords, v.feats)
            self._features[view] = self.backbone(x).F
        return self._features[view]


class Objective(nn.Module):
    """Base class: subclasses implement ``forward(ctx) -> {"loss_...": t, "stat_...": t}``."""

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError
