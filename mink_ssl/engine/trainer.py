"""The trainer core: one ``run_step`` you can read in one screen, everything else in hooks.

    trainer = Trainer(module, optimizer, scheduler, batches, max_iterations, hooks=[...])
    trainer.train()

``module`` is a :class:`PretrainModule` (backbone + objectives), possibly wrapped in
DistributedDataParallel; its forward returns the objectives' named losses and stats.
Any module with ``forward(batch, iteration, max_iterations) -> {"loss": ..., ...}`` and
batches with ``.to(device)`` work too (fine-tuning uses it with segmentation batches).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

from mink_ssl.objectives.base import Objective, StepContext


class PretrainModule(nn.Module):
    """Backbone plus weighted objectives; ``forward(batch)`` -> losses and stats.

    Objectives share one backbone forward per view (see :class:`StepContext`). Their heads live
    here, so they are optimised, checkpointed and synchronised with the backbone, and dropped
    when the backbone is exported.
    """

    def __init__(self, backbone: nn.Module, objectives: dict[str, Objective],
                 weights: dict[str, float], freeze_bn: bool = False):
        super().__init__()
        self.freeze_bn = freeze_bn
        if not objectives:
            raise ValueError("at least one objective is needed")
        missing = set(objectives) ^ set(weights)
        if missing:
            raise ValueError(f"objectives and weights disagree on {sorted(missing)}")
        self.backbone = backbone
        self.objectives = nn.ModuleDict(objectives)
        self.weights = dict(weights)
        for objective in self.objectives.values():
            objective.attach(backbone)
        exporters = [n for n, o in self.objectives.items() if o.export_backbone() is not None]
        if len(exporters) > 1:
            raise ValueError(f"objectives {exporters} each export their own backbone; combine "
                             "at most one of them in a run")

    def train(self, mode: bool = True) -> "PretrainModule":
        """``freeze_bn``: batch-norm layers stay in eval mode (running statistics, no updates)."""
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def exported_backbone(self) -> nn.Module:
        """What the run exports: an objective's choice (e.g. an EMA teacher) or the backbone."""
        for objective in self.objectives.values():
            chosen = objective.export_backbone()
            if chosen is not None:
                return chosen
        return self.backbone

    def objective_hooks(self) -> list["Hook"]:
        return [h for objective in self.objectives.values() for h in objective.hooks()]

    def forward(self, batch, iteration: int = 0, max_iterations: int = 1) -> dict:
        ctx = StepContext(batch, self.backbone, iteration, max_iterations)
        out: dict[str, torch.Tensor] = {}
        total = None
        for name, objective in self.objectives.items():
            for key, value in objective(ctx).items():
                if key.startswith("stat_"):  # diagnostics: namespaced, objectives may share names
                    key = f"stat_{name}/{key[len('stat_'):]}"
                if key in out:
                    raise KeyError(f"objective {name!r} returned {key!r}, already returned by "
                                   "another objective; give the terms distinct names")
                out[key] = value
                if key.startswith("loss_"):
                    term = self.weights[name] * value
                    total = term if total is None else total + term
        if total is None:
            raise ValueError(f"objectives {list(self.objectives)} returned no loss_* term")
        out["loss"] = total
        return out


@dataclass
class TrainState:
    iteration: int = 0
    samples: int = 0  # samples consumed by this rank (sampler position for resuming)
    skipped_pairs: int = 0  # pairs dropped for too few matches
    skipped_batches: int = 0  # batches with no usable pair
    last_metrics: dict = field(default_factory=dict)


class Hook:
    """Override what you need; the trainer calls these in order of the hook list."""

    def before_train(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...
    # the run stops early at a step boundary (SIGINT / SIGTERM): keep what a resume needs
    def on_interrupt(self, trainer: "Trainer") -> None: ...


class Trainer:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 batches: Iterator, max_iterations: int, batch_size: int,
                 device: torch.device, hooks: list[Hook] = (), state: TrainState | None = None):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.batches, self.max_iterations, self.batch_size = batches, max_iterations, batch_size
        self.device, self.hooks = device, list(hooks)
        self.state = state or TrainState()
        # asked after every step; True stops the run there (hooks' on_interrupt, not
        # after_train) and sets ``stopped`` (see mink_ssl.engine.rundir.stop_check)
        self.should_stop: Callable[[], bool] | None = None
        self.stopped = False

    def _next_batch(self):
        while True:
            batch = next(self.batches)
            self.state.samples += self.batch_size
            if batch is None:  # every pair of the batch had too few matches
                self.state.skipped_batches += 1
                self.state.skipped_pairs += self.batch_size
                continue
            self.state.skipped_pairs += getattr(batch, "skipped", 0)  # pair batches only
            return batch.to(self.device)

    def run_step(self) -> dict[str, float]:
        batch = self._next_batch()
        out = self.module(batch, self.state.iteration, self.max_iterations)
        loss = out["loss"]
        if not torch.isfinite(loss):
            terms = {k: float(v.detach()) for k, v in out.items() if k.startswith("loss")}
            raise FloatingPointError(f"non-finite loss at iteration {self.state.iteration}: "
                                     f"{terms}; lower the learning rate or check the inputs")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        metrics = {k: float(v.detach()) for k, v in out.items()}
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if hasattr(batch, "matches"):  # pair batches
            metrics["matches"] = float(len(batch.matches))
        return metrics

    def train(self) -> TrainState:
        self.module.train()
        for h in self.hooks:
            h.before_train(self)
        while self.state.iteration < self.max_iterations:
            self.state.last_metrics = self.run_step()
            self.state.iteration += 1
            for h in self.hooks:
                h.after_step(self)
            if self.should_stop is not None and self.should_stop():
                self.stopped = True
                for h in self.hooks:
                    h.on_interrupt(self)
                return self.state
        for h in self.hooks:
            h.after_train(self)
        return self.state

