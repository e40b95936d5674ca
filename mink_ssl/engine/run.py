"""The run skeleton every task shares (pretraining, segmentation, detection).

    with task_run(cfg, out_dir, "finetune-seg", print_fn) as tr:   # distributed, run directory
        return _run(cfg, tr)    # the run's objects live (and die) in there

    def _run(cfg, tr):
        torch.manual_seed(cfg.seed)
        ... build data, model, module, optimizer ...
        resume, ckpt = tr.run.load_resume(load_fn)
        trainer = Trainer(...)
        tr.resume(trainer, resume, ckpt, restore_fn)   # and config.json is written
        tr.attach_loader(trainer, train_set, cfg.batch_size,
                         tr.loader_workers(cfg.data.num_workers), cfg.seed, collate_fn)
        trainer.hooks = [... task hooks ..., *tr.standard_hooks(...)]
        tr.train(trainer)                               # stops cleanly on SIGINT / SIGTERM

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

    def resume(self, trainer: Trainer, resume: Path | None, ckpt: dict | None,
               restore_fn: Callable[[dict, Trainer], object]) -> None:
        """Put ``trainer`` back where the checkpoint ``resume`` left it (when there is one),
        then record the run (``config.json``): every check has passed."""
        if resume:
            self.run.restore(ckpt, trainer, restore_fn)
            self.say(f"resumed from {resume} at iteration {trainer.state.iteration}")
        self.run.record(trainer.state.iteration, resume)

    def loader_workers(self, num_workers) -> int:
        """Loader processes of this rank: ``num_workers`` (an int, or ``"auto"``: the rank's
        share of the node's free cores)."""
        return resolve_num_workers(num_workers, self.local_world_size)

    def attach_loader(self, trainer: Trainer, dataset, batch_size: int, workers: int, seed: int,
                      collate_fn: Callable) -> None:
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
def task_run(cfg, out_dir: Path, what: str, print_fn=print) -> Iterator[TaskRun]:
    """Start a run of ``cfg`` in ``out_dir``: the process group (``cfg.distributed``, device
    ``cfg.device``), the run directory locked (rank 0) and checked against ``cfg.resume``;
    both are released when the block ends, however it ends. Keep the run's objects out of the
    block's own scope (build them in a function the block calls), so that they are freed
    before the process group is destroyed."""
    out_dir = Path(out_dir)
    info, device = init_distributed(cfg.device, cfg.distributed.backend)
    run = tr = None
    try:
        plain = asdict(cfg)
        run = start_run(out_dir, plain, info, cfg.resume, cfg.resume_override, print_fn, what)
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
