"""What an objective sees and returns.

An objective is an ``nn.Module`` registered in ``OBJECTIVES`` under a name. It owns its heads
(projectors, cluster heads, an EMA teacher, ...), takes a :class:`StepContext` and returns a
dict of named scalars: ``loss_*`` terms (the trainer sums them, after the config's weights) and
``stat_*`` diagnostics (logged only, as ``stat_<objective>/<name>``). The trainer knows nothing
about any particular objective.

Objectives that need the backbone's features of a view ask the context, which runs the
backbone once per view and step however many objectives ask (so PointInfoNCE + GMM on the same
views cost one forward pass). Objectives that need other inputs (crops, perturbed clouds) call
``ctx.backbone`` themselves.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mink_ssl.sparse import sparse_tensor


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
            v = self.batch.views[view]
            x = sparse_tensor(v.coords, v.feats)
            self._features[view] = self.backbone(x).F
        return self._features[view]


class Objective(nn.Module):
    """Base class: subclasses implement ``forward(ctx) -> {"loss_...": t, "stat_...": t}``.

    Three optional methods let an objective reach beyond its loss without the trainer knowing
    about it (the distillation objective uses all three for its EMA teacher):

    - ``attach(backbone)``: called once by :class:`~mink_ssl.tasks.pretrain.PretrainModule`
      before training, e.g. to build a teacher copy of the backbone as a submodule (so it is
      moved, checkpointed and restored with the objective's heads);
    - ``hooks()``: trainer hooks (:class:`~mink_ssl.engine.trainer.Hook`) to run after every
      optimizer step, before checkpointing, e.g. the teacher's EMA update;
    - ``export_backbone()``: the network to export as the pretrained backbone instead of the
      trained one (at most one objective of a run may return one).
    """

    def attach(self, backbone: nn.Module) -> None:
        """Called once with the backbone being trained; the default does nothing."""

    def hooks(self) -> list:
        """Trainer hooks this objective needs; the default has none."""
        return []

    def export_backbone(self) -> nn.Module | None:
        """The backbone to export in place of the trained one; ``None`` (default): the trained."""
        return None

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError
