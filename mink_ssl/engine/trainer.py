"""The trainer core: one ``run_step`` you can read in one screen, everything else in hooks.

    trainer = Trainer(module, optimizer, scheduler, batches, max_iterations, hooks=[...])
    trainer.train()

``module`` is any module, possibly wrapped in DistributedDataParallel, with
``forward(batch, iteration, max_iterations) -> {"loss": ..., "loss_*": ..., "stat_*": ...}``;
batches have ``.to(device)``. A loader may yield ``None`` for a batch with nothing usable (the
trainer skips it); ``max_skipped`` batches skipped in a row (a whole pass over the data) end the
run with :class:`NoProgress` and the task's ``no_progress_hint``, and a stop signal is honoured
between skipped batches too (``stop_requested``). Each task (:mod:`mink_ssl.tasks`) brings its
module, batches and hooks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn


class NoProgress(RuntimeError):
    """The loader gave nothing to train on for a whole pass: the run cannot make a step."""


@dataclass
class TrainState:
    iteration: int = 0
    samples: int = 0  # samples consumed by this rank (sampler position for resuming)
    # tallies, by name: the trainer's "skipped_batches" (batches the loader gave as None,
    # nothing usable in them) and a task's own (its hooks keep them)
    counts: dict[str, int] = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def to_dict(self) -> dict:
        """What a checkpoint keeps: the position and the tallies (flat)."""
        return {"iteration": self.iteration, "samples": self.samples, **self.counts}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(iteration=int(d["iteration"]), samples=int(d["samples"]),
                   counts={k: int(v) for k, v in d.items() if k not in ("iteration", "samples")})


class Hook:
    """Override what you need; the trainer calls these in order of the hook list."""

    def before_train(self, trainer: "Trainer") -> None: ...
    # every batch the loader gives, before its step; None: a batch the trainer skips
    def before_step(self, trainer: "Trainer", batch) -> None: ...
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
        # asked between skipped batches (no step boundary, no collective): this process got a
        # stop signal; True stops the run as should_stop does. Single process only: a rank that
        # stopped alone could not save the other ranks' states (they are in a collective)
        self.stop_requested: Callable[[], bool] | None = None
        self.stopped = False
        # every rank's own state (RNG, sampler position), gathered to rank 0 by the checkpoint
        # hook for the checkpoint it writes (mink_ssl.engine.checkpoint); None between saves
        self.rank_states: list[dict] | None = None
        # batches skipped in a row that end the run (None: no limit), and what to tell the user
        self.max_skipped: int | None = None
        self.no_progress_hint = "check the data and the settings that drop samples"

    def _next_batch(self):
        """The next usable batch on the device; None when a stop was requested while batches
        were being skipped."""
        skipped = 0
        while True:
            batch = next(self.batches)
            self.state.samples += self.batch_size
            for h in self.hooks:
                h.before_step(self, batch)
            if batch is not None:
                return batch.to(self.device)
            # nothing usable in it (e.g. every pair had too few matches)
            self.state.count("skipped_batches")
            skipped += 1
            if self.max_skipped is not None and skipped >= self.max_skipped:
                raise NoProgress(
                    f"no step can be made: the last {skipped} batches ({skipped * self.batch_size}"
                    f" samples, a whole pass over the data) were all skipped, at iteration "
                    f"{self.state.iteration}; {self.no_progress_hint}")
            if self.stop_requested is not None and self.stop_requested():
                return None

    def run_step(self) -> dict[str, float] | None:
        """One optimiser step; None (and no step) when a stop came while skipping batches."""
        batch = self._next_batch()
        if batch is None:
            return None
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
        return metrics

    def train(self) -> TrainState:
        self.module.train()
        for h in self.hooks:
            h.before_train(self)
        while self.state.iteration < self.max_iterations:
            metrics = self.run_step()
            if metrics is not None:
                self.state.last_metrics = metrics
                self.state.iteration += 1
                for h in self.hooks:
                    h.after_step(self)
            if metrics is None or (self.should_stop is not None and self.should_stop()):
                self.stopped = True
                for h in self.hooks:
                    h.on_interrupt(self)
                return self.state
        for h in self.hooks:
            h.after_train(self)
        return self.state

