"""The run skeleton every task shares (pretraining, segmentation, detection).

    with task_run(cfg, out_dir, "finetune-seg", print_fn) as tr:   # distributed, run directory
        return _run(cfg, tr)    # the run's objects live (and die) in there

    def _run(cfg, tr):
        torch.manual_seed(cfg.seed)
        ... build data, model, module, optimizer, the task's hooks ...
        trainer = tr.build_trainer(cfg, module, optimizer, scheduler, ...)  # the pieces
        tr.train(trainer)                               # stops cleanly on SIGINT / SIGTERM

:meth:`TaskRun.build_trainer` takes the pieces and owns their order, which a resume depends
on: (1) the checkpoint to continue from is read (:meth:`TaskRun.resume_point`: once, so a
task that must know it earlier, e.g. to load pretrained weights only on a fresh start, asks
first and gets the same), (2) the trainer is made without batches or hooks, (3) the
checkpoint restores weights, optimizer, scheduler, trainer state and RNG states, and changed
optimiser settings (``resume_override``) are re-applied from the resumed iteration
(:meth:`~mink_ssl.engine.rundir.RunDir.restore`), (4) only then ``config.json`` is recorded
(every check passed), (5) the loader starts from the restored sampler position
(``state.samples``), (6) the task's hooks and the standard ones (logging, checkpoints) are
attached. A loader made before the restore would replay the first batches; hooks attached
before it could see the fresh state.

``cfg`` extends :class:`~mink_ssl.engine.config.RunConfig` (``device``, ``distributed``,
``resume``, ``resume_override``, ``log_every``, ``checkpoint_every``, ``progress``); it is
recorded as plain data.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from mink_ssl.engine.build import build_loader, resolve_num_workers
from mink_ssl.engine.checkpoint import gather_rank_states
from mink_ssl.engine.distributed import DistInfo, barrier, cleanup, init_distributed, start_run
from mink_ssl.engine.hooks import CheckpointHook, LoggingHook
from mink_ssl.engine.rundir import RunDir, stop_check
from mink_ssl.engine.trainer import Hook, Trainer
from mink_ssl.signals import StopSignals


@dataclass
class TaskRun:
    """One started run: its ranks (``info``), ``device``, locked run directory (``run``) and
    the config as plain data (``config``, what checkpoints and ``config.json`` hold)."""
    info: DistInfo
    device: torch.device
    run: RunDir
    config: dict
    out_dir: Path
    print_fn: Callable[[str], None]
    steps: int = 0  # optimiser steps this start made (a failed start with none leaves no trace)
    _resume: tuple | None = None  # (path, checkpoint) once read, see resume_point

    def say(self, line: str) -> None:
        """Print on rank 0 only."""
        if self.info.is_main:
            self.print_fn(line)

    def barrier(self) -> None:
        barrier(self.info)

    @property
    def local_world_size(self) -> int:
        """Ranks on this node (they share its cores)."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    def resume_point(self, load_fn: Callable[[Path], dict]) -> tuple[Path | None, dict | None]:
        """(checkpoint path, its content) this run continues from, or (None, None) for a fresh
        start: ``cfg.resume`` read once with ``load_fn`` (``resume=auto``: the newest intact
        checkpoint, :meth:`~mink_ssl.engine.rundir.RunDir.load_resume`)."""
        if self._resume is None:
            self._resume = self.run.load_resume(load_fn)
        return self._resume

    def build_trainer(self, cfg, module, optimizer, scheduler, *, max_iterations: int,
                      batch_size: int, dataset, collate_fn: Callable, workers: int, seed: int,
                      load_fn: Callable[[Path], dict], restore_fn: Callable[[dict, Trainer], object],
                      save_fn: Callable, export_fn: Callable, desc: str,
                      hooks: list[Hook] = (), checkpoint_every: int | None = None,
                      counts: dict[str, str] | None = None,
                      no_progress_hint: str | None = None) -> Trainer:
        """A trainer ready to :meth:`train`, started or resumed in the order the module
        docstring gives. The pieces: ``module`` / ``optimizer`` / ``scheduler`` as built;
        ``dataset`` and ``collate_fn`` make this rank's endless loader of ``batch_size`` in
        ``workers`` processes (:meth:`loader_workers`), shuffled with ``seed``;
        ``load_fn(path) -> checkpoint`` and ``restore_fn(checkpoint, trainer)`` read and
        restore the task's checkpoint, ``save_fn(path, trainer, config)`` writes one and
        ``export_fn(trainer, out_dir)`` what the run delivers; ``hooks`` are the task's (they
        run before logging and checkpoints); ``desc``, ``counts`` and ``checkpoint_every``
        (default ``cfg.checkpoint_every``, in iterations) go to :meth:`standard_hooks`;
        ``no_progress_hint`` is what to tell the user when no batch is usable."""
        resume, ckpt = self.resume_point(load_fn)
        trainer = Trainer(module, optimizer, scheduler, iter(()), max_iterations, batch_size,
                          self.device)
        if resume:
            self.run.restore(ckpt, trainer, restore_fn)
            self.say(f"resumed from {resume} at iteration {trainer.state.iteration}")
        self.run.record(trainer.state.iteration, resume)  # every check has passed
        self._attach_loader(trainer, dataset, batch_size, workers, seed, collate_fn)
        if no_progress_hint is not None:
            trainer.no_progress_hint = no_progress_hint
        trainer.hooks = [*hooks, *self.standard_hooks(cfg, desc, save_fn, export_fn,
                                                      checkpoint_every, counts)]
        return trainer

    def loader_workers(self, num_workers) -> int:
        """Loader processes of this rank: ``num_workers`` (an int, or ``"auto"``: the rank's
        share of the node's free cores)."""
        return resolve_num_workers(num_workers, self.local_world_size)

    def _attach_loader(self, trainer: Trainer, dataset, batch_size: int, workers: int,
                       seed: int, collate_fn: Callable) -> None:
        """The endless loader of this rank's share of ``dataset`` in ``workers`` processes
        (:meth:`loader_workers`), from the trainer's sampler position."""
        trainer.batches = iter(build_loader(dataset, batch_size, workers, seed, self.info.rank,
                                            self.info.world_size, trainer.state.samples,
                                            collate_fn))
        # a whole pass of this rank's share skipped in a row: no step can be made
        per_rank = -(-len(dataset) // self.info.world_size)
        trainer.max_skipped = max(-(-per_rank // batch_size), 1)

    def standard_hooks(self, cfg, desc: str, save_fn: Callable, export_fn: Callable,
                       checkpoint_every: int | None = None,
                       counts: dict[str, str] | None = None) -> list[Hook]:
        """Logging (``cfg.log_every``, ``cfg.progress``) and checkpoints (every
        ``checkpoint_every`` iterations, default ``cfg.checkpoint_every``), rank 0 only."""
        every = cfg.checkpoint_every if checkpoint_every is None else checkpoint_every
        return [LoggingHook(self.out_dir, cfg.log_every, self.info.is_main, cfg.progress,
                            self.print_fn, desc=desc, counts=counts),
                CheckpointHook(self.out_dir, every, self.config, save_fn=save_fn,
                               export_fn=export_fn, writer=self.info.is_main,
                               gather=gather_rank_states)]

    def train(self, trainer: Trainer) -> None:
        """Train to the end; a stop signal ends the run at the next step boundary, with a
        checkpoint, as :class:`~mink_ssl.errors.Interrupted`."""
        first = trainer.state.iteration
        with StopSignals("saving a checkpoint at the next step boundary, then stopping") as sig:
            trainer.should_stop = stop_check(sig, self.info, self.device)
            # between skipped batches only on one process: with several, every rank stops at
            # the same step boundary, so that the checkpoint holds every rank's state
            trainer.stop_requested = None if self.info.enabled else (lambda: sig.requested)
            try:
                trainer.train()
            finally:
                self.steps = trainer.state.iteration - first
        if trainer.stopped:
            raise self.run.interrupted(trainer, sig.signum)


@contextmanager
def task_run(cfg, out_dir: Path, what: str, print_fn=print,
             comparable: Callable[[dict], dict] | None = None) -> Iterator[TaskRun]:
    """Start a run of ``cfg`` in ``out_dir``: the process group (``cfg.distributed``, device
    ``cfg.device``), the run directory locked (rank 0) and checked against ``cfg.resume``
    (configs compared in the task's ``comparable`` form, as plain data);
    both are released when the block ends, however it ends. Keep the run's objects out of the
    block's own scope (build them in a function the block calls), so that they are freed
    before the process group is destroyed."""
    out_dir = Path(out_dir)
    info, device = init_distributed(cfg.device, cfg.distributed.backend)
    run = tr = None
    try:
        plain = asdict(cfg)
        run = start_run(out_dir, plain, info, cfg.resume, cfg.resume_override, print_fn, what,
                        comparable)
        tr = TaskRun(info, device, run, plain, out_dir, print_fn)
        try:
            yield tr
        except BaseException:
            if not tr.steps:  # failed before its first step: remove what this start wrote
                run.discard_created()
            raise
        # a run that ended well: the module (DDP and its reducer) must be gone, and every rank
        # done, before the process group is destroyed; gloo aborts the process ("terminate
        # called without an active exception") when it goes with work still referenced
        gc.collect()
        barrier(info)
    finally:
        if run is not None:
            run.close()
        cleanup(info)
