"""The trainer core: one ``run_step`` you can read in one screen, everything else in hooks.

    trainer = Trainer(module, optimizer, scheduler, batches, max_iterations, hooks=[...])
    trainer.train()

Tasks do not assemble a trainer by hand: :meth:`mink_ssl.engine.run.TaskRun.build_trainer`
builds it, restores a resumed run and attaches the loader and hooks, in that order.

``module`` is any module, possibly wrapped in DistributedDataParallel, with
``forward(batch, iteration, max_iterations) -> {"loss": ..., "loss_*": ..., "stat_*": ...}``;
batches have ``.to(device)``. A loader may yield ``None`` for a batch with nothing usable (the
trainer skips it); ``max_skipped`` batches skipped in a row (a whole pass over the data) end the
run with :class:`NoProgress` and the task's ``no_progress_hint``, and a stop signal is honoured
between skipped batches too (``stop_requested``). Each task (:mod:`mink_ssl.tasks`) brings its
module, batches and hooks.

The hook contract (:class:`Hook`; every hook of the list is called in list order, at each point)::

    before_train(trainer)                 once, before the first step (also on a resumed run)
    per batch the loader gives as None:   (no step; the sampler position still advances)
        on_skipped_batch(trainer)         once per such batch, then the trainer counts it
                                          ("skipped_batches")
    per optimiser step:
        before_step(trainer, batch)       once, with the batch the step is made on (on the
                                          device), before the forward pass
        -- forward, backward, optimizer.step(), scheduler.step(); state.iteration += 1 --
        after_step(trainer)               what follows the step (an EMA teacher, a batch-norm
                                          momentum schedule); no metrics here
        step_metrics(trainer) -> dict     the hook's own metrics of this step (an evaluation's,
                                          a tally's), or None; the trainer merges them into
                                          the step's metrics (the module's outputs and "lr"),
                                          in hook order; a name already taken is an error
        record_step(trainer, metrics)     the step's complete metrics, read-only: logs and
                                          checkpoints are written here
    after_train(trainer)                  the run reached max_iterations
    on_interrupt(trainer)                 the run stopped early at a step boundary (a stop
                                          signal): keep what a resume needs

No hook writes another's metrics, so producers (``step_metrics``) and consumers
(``record_step``) need no order between them; ``state.last_metrics`` holds the last step's
complete metrics (the trainer sets it before ``record_step``).
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
    last_metrics: dict = field(default_factory=dict)  # the last step's, set by the trainer

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
    """Override what you need; see the module docstring for when each is called."""

    def before_train(self, trainer: "Trainer") -> None: ...
    # a batch the loader gave as None (nothing usable in it): no step is made on it
    def on_skipped_batch(self, trainer: "Trainer") -> None: ...
    # once per optimiser step, with the batch stepped on
    def before_step(self, trainer: "Trainer", batch) -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def step_metrics(self, trainer: "Trainer") -> dict[str, float] | None: ...
    def record_step(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...
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
            if batch is not None:
                return batch.to(self.device)
            # nothing usable in it (e.g. every pair had too few matches)
            for h in self.hooks:
                h.on_skipped_batch(self)
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
        for h in self.hooks:
            h.before_step(self, batch)
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

    def _step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The step's metrics with every hook's own (:meth:`Hook.step_metrics`)."""
        for h in self.hooks:
            own = h.step_metrics(self)
            for name, value in (own or {}).items():
                if name in metrics:
                    raise KeyError(f"{type(h).__name__}.step_metrics gives {name!r}, a metric "
                                   "this step already has; give it another name")
                metrics[name] = value
        return metrics

    def train(self) -> TrainState:
        self.module.train()
        for h in self.hooks:
            h.before_train(self)
        while self.state.iteration < self.max_iterations:
            metrics = self.run_step()
            if metrics is not None:
                self.state.iteration += 1
                for h in self.hooks:
                    h.after_step(self)
                metrics = self._step_metrics(metrics)
                self.state.last_metrics = metrics
                for h in self.hooks:
                    h.record_step(self, metrics)
            if metrics is None or (self.should_stop is not None and self.should_stop()):
                self.stopped = True
                for h in self.hooks:
                    h.on_interrupt(self)
                return self.state
        for h in self.hooks:
            h.after_train(self)
        return self.state
