"""A run directory belongs to one run: its lock, its config, and how a run may continue in it.

    run = RunDir(out_dir, asdict(cfg), cfg.resume, cfg.resume_override, is_main).open()
    path, ckpt = run.load_resume(load_fn)     # resume=auto: the newest intact checkpoint
    ...restore...
    run.record(iteration, path)               # only now config.json is (re)written
    ...train...
    run.close()

Rules (checked before anything is written; :class:`RunConflict` names the differing keys):

- a directory holding a run (``config.json`` or checkpoints) is not started over: without
  ``resume`` the run is refused (it would overwrite that run's checkpoints and exports);
- with ``resume``, model, objectives, data, seed and batch size must match the run's config (and
  the checkpoint's); optimizer and schedule changes (``optim.*`` but the optimizer type,
  ``max_iterations``, ``epochs``, ``distributed.*``) need ``resume_override=true``, apply from
  the resumed iteration and are recorded in ``config_history.json``; so does another sparse
  engine (``model.engine``: the same network and weights, but not bit-identical), and another
  number of ranks than the checkpoint's (each rank restores its own random state and data
  position, so only the same number continues the run exactly);
  logging, progress, device, checkpoint frequency, loader workers and evaluation settings may
  change freely (also recorded);
- one run at a time per directory (:class:`mink_ssl.locks.DirLock`, rank 0);
- temporaries of a killed write of ours (``.<our file>.mink-ssl-<pid>-<8 random>.tmp``, e.g.
  ``.checkpoint_4.pth.mink-ssl-4121-k2x9q0_a.tmp``; :data:`OUR_TEMPORARY`) are removed; other files, hidden
  ``.tmp`` ones included, are never touched;
- a start that fails before its first step (a bad value, a refused resume, unreadable data)
  removes what it created in the directory (``config.json``, logs), nothing else
  (:meth:`RunDir.discard_created`);
- ``resume=auto`` passes over a damaged newest checkpoint (named, kept as ``<name>.damaged``).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from mink_ssl.engine.checkpoint import (CHECKPOINT_NAME, checkpoint_iteration, checkpoint_path,
                                        list_checkpoints)
from mink_ssl.io import atomic_path
from mink_ssl.errors import Interrupted, output_error
from mink_ssl.locks import DirLock

#: config keys (dotted prefixes) that do not change what a run computes
FREE = ("resume", "resume_override", "progress", "log_every", "checkpoint_every", "device",
        "data.num_workers", "eval.")
#: optimizer and schedule: may change on resume with resume_override=true (not the optimizer
#: type: its saved state would not fit)
OVERRIDABLE = ("optim.", "max_iterations", "epochs", "distributed.", "model.engine")
NEVER = ("optim.name",)
#: the temporary of an atomic write (mink_ssl.io.atomic_path: ``.<name>.mink-ssl-<pid>-<8>.tmp``;
#: before that ``.<name>.<8>.tmp``) of a file a run writes into its directory or ``best/``
OUR_TEMPORARY = re.compile(r"\.(" + CHECKPOINT_NAME.pattern + r"|config\.json|"
                           r"config_history\.json|"
                           r"val_history\.json|best\.json|model\.pth|backbone\.pth|"
                           r"results\.json|results\.md|results_iou\.png|results_pr\.png)"
                           r"\.(mink-ssl-\d+-)?[a-z0-9_]{8}\.tmp")
#: the same for the exported predictions (``predictions/<scene>.ply``)
OUR_PREDICTION_TEMPORARY = re.compile(r"\.[^/]+\.ply\.(mink-ssl-\d+-)?[a-z0-9_]{8}\.tmp")
#: what a start writes before and at its first step: removed again by a start that fails there
#: (only those this start created)
START_OUTPUTS = ("config.json", "config_history.json", "metrics.jsonl", "tb")


class RunConflict(ValueError):
    """Starting or resuming here would mix two runs."""


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
    """``{dotted key: (old, new)}`` for every key whose value differs (``<absent>`` if missing)."""
    a, b = flatten(json.loads(json.dumps(old))), flatten(json.loads(json.dumps(new)))
    missing = "<absent>"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)}


def _kind(key: str) -> str:
    def hit(prefixes):
        return any(key == p or (p.endswith(".") and key.startswith(p))
                   or key.startswith(p + ".") for p in prefixes)

    if hit(NEVER):
        return "fixed"
    return "free" if hit(FREE) else "override" if hit(OVERRIDABLE) else "fixed"


def _fmt(diff: dict) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def check_resume_compatible(old: dict, new: dict, override: bool, where: str) -> dict:
    """The differences between the run's config ``old`` and ``new`` a resume may take (all of
    them, for the record); RunConflict if any is not allowed."""
    diff = config_diff(old, new)
    fixed = {k: v for k, v in diff.items() if _kind(k) == "fixed"}
    if fixed:
        raise RunConflict(f"cannot resume {where}: it was made with another config, and a resumed "
                          f"run must keep its model, objectives, data, seed and batch size. "
                          f"Differences: {_fmt(fixed)}. Start a new run in a new directory "
                          "instead (e.g. hydra.run.dir=<new dir>), or resume with the run's own "
                          "settings.")
    changed = {k: v for k, v in diff.items() if _kind(k) == "override"}
    if "model.engine" in changed and not override:
        old_e, new_e = changed["model.engine"]
        raise RunConflict(f"resuming {where} on another sparse engine ({old_e} -> {new_e}): the "
                          "engines run the same network with the same weights, but not bit for "
                          "bit (float rounding), so the run would not continue exactly as it "
                          f"would have on {old_e}. Resume with model.engine={old_e}, or pass "
                          "resume_override=true to continue on the new engine (recorded in "
                          "config_history.json).")
    if changed and not override:
        raise RunConflict(f"resuming {where} would change its optimizer / schedule: "
                          f"{_fmt(changed)}. Pass resume_override=true to continue with the new "
                          "settings (recorded in config_history.json), or drop these changes.")
    return diff


class RunDir:
    def __init__(self, out_dir: Path, config: dict, resume: str | None, override: bool = False,
                 is_main: bool = True, print_fn=print, what: str = "training run",
                 world_size: int = 1, comparable: Callable[[dict], dict] | None = None):
        self.dir, self.config, self.resume = Path(out_dir), config, resume
        # a config as the checks compare it: the task's form in which configs that build the
        # same run are equal (e.g. arguments a run recorded before they had defaults filled in)
        self.comparable = comparable or (lambda c: c)
        self.world_size = world_size  # ranks of this run: a checkpoint's must match
        self.override, self.is_main, self.print_fn, self.what = override, is_main, print_fn, what
        self.lock: DirLock | None = None
        self.previous: dict | None = None  # the config.json found here
        self.changes: dict = {}
        self.damaged: list[Path] = []  # checkpoints resume=auto passed over
        self.found: set[str] | None = None  # the directory's entries when the run started

    # -- before anything is built --------------------------------------------------------------
    def open(self) -> "RunDir":
        """Lock (rank 0) and check the directory against the config; writes nothing but the
        lock file."""
        if self.is_main:
            self.lock = DirLock(self.dir, self.what, notice=self.print_fn)
            self.lock.acquire()
        try:
            self._check()
            if self.is_main:
                self.found = {p.name for p in self.dir.iterdir()}
                for sub, ours in ((self.dir, OUR_TEMPORARY), (self.dir / "best", OUR_TEMPORARY),
                                  (self.dir / "predictions", OUR_PREDICTION_TEMPORARY)):
                    for stale in sub.glob(".*.tmp"):  # a killed atomic write's temporary
                        if ours.fullmatch(stale.name) and not stale.is_symlink():
                            stale.unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise
        return self

    def _existing(self) -> list[str]:
        found = sorted(p.name for p in list_checkpoints(self.dir))
        return (["config.json"] if (self.dir / "config.json").is_file() else []) + found

    def _check(self) -> None:
        path = self.dir / "config.json"
        if path.is_file():
            try:
                self.previous = json.loads(path.read_text())
            except ValueError as e:
                raise RunConflict(f"{path} is not readable JSON ({e}); this directory's run "
                                  "cannot be checked: start the run in a new directory") from None
        existing = self._existing()
        if not self.resume:
            if existing:
                diff = (config_diff(self.comparable(self.previous), self.comparable(self.config))
                        if self.previous else {})
                same = {k: v for k, v in diff.items() if _kind(k) != "free"}
                how = (f"whose config differs: {_fmt(same)}" if same
                       else "with the same config" if self.previous else "")
                raise RunConflict(f"{self.dir} already holds a run ({', '.join(existing[:4])}"
                                  f"{' ...' if len(existing) > 4 else ''}) {how}; starting here "
                                  "would overwrite it. Continue it with resume=auto, or start a "
                                  "new run in a new directory (e.g. hydra.run.dir=<new dir>).")
            return
        if self.previous is not None:
            self.changes = check_resume_compatible(
                self.comparable(self.previous), self.comparable(self.config), self.override,
                f"the run in {self.dir}")

    # -- resume ---------------------------------------------------------------------------------
    def load_resume(self, load_fn: Callable[[Path], dict]) -> tuple[Path | None, dict | None]:
        """The checkpoint to continue from and its content, or (None, None). ``resume=auto``
        takes the newest checkpoint here that loads, naming any damaged newer one it passes
        over; an explicit path must load. The checkpoint's own config must be compatible."""
        if not self.resume:
            return None, None
        if self.resume == "auto":
            found = list_checkpoints(self.dir)
            if not found:
                if self.is_main:
                    self.print_fn(f"resume=auto: no checkpoint in {self.dir}; starting from "
                                  "iteration 0")
                return None, None
            for path in reversed(found):
                try:
                    ckpt = load_fn(path)
                except Exception as e:  # a damaged file: torch raises several types
                    self.damaged.append(path)  # set aside by record(), once the checks pass
                    if self.is_main:
                        self.print_fn(f"warning: checkpoint {path} is damaged "
                                      f"({type(e).__name__}: {str(e)[:200]}); trying the "
                                      "previous one")
                    continue
                return path, self._checked(path, ckpt)
            raise RunConflict(f"resume=auto: every checkpoint in {self.dir} is damaged "
                              f"({[p.name for p in found]}); start a new run in a new directory")
        path = Path(self.resume)
        here = path.parent.resolve() == self.dir.resolve()
        given = checkpoint_iteration(path)
        newer = [p.name for p in list_checkpoints(self.dir)
                 if here and checkpoint_iteration(p) > (-1 if given is None else given)]
        if newer:
            raise RunConflict(f"resume={path}: {self.dir} holds newer checkpoints {sorted(newer)} "
                              "of this run, which the resumed run's checkpoint rotation would mix "
                              "with its own; resume=auto continues from the newest, or move the "
                              "newer ones out of the directory first")
        try:
            ckpt = load_fn(path)
        except FileNotFoundError:
            raise
        except ValueError as e:  # damaged (named by the reader), or another file's format
            raise RunConflict(f"resume={path}: cannot read the checkpoint: {e}") from None
        except Exception as e:
            raise RunConflict(f"resume={path}: cannot read the checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}); it is damaged or not a checkpoint: resume from "
                              "another one (resume=<path> or resume=auto)") from None
        return path, self._checked(path, ckpt)

    def restore(self, ckpt: dict, trainer, restore_fn: Callable) -> None:
        """``restore_fn(ckpt, trainer)``; with ``resume_override`` and changed ``optim.*`` or run
        length (``max_iterations``, ``epochs``), the new optimizer settings and schedule then
        apply from the resumed iteration, its first step included (the optimizer's state, e.g.
        momentum buffers, is kept)."""
        import copy
        import warnings

        fresh_groups = [{k: v for k, v in g.items() if k != "params"}
                        for g in trainer.optimizer.param_groups]
        fresh_schedule = copy.deepcopy(trainer.scheduler.state_dict())
        restore_fn(ckpt, trainer)
        # the schedule depends on optim.* and on the run's length (cosine, poly): either changed
        # means the new schedule from the resumed iteration, its first step included
        if not any(k.startswith("optim.") or k in ("max_iterations", "epochs")
                   for k in self.changes):
            return
        for group, fresh in zip(trainer.optimizer.param_groups, fresh_groups):
            group.update(fresh)
        trainer.scheduler.load_state_dict(fresh_schedule)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore")
            for _ in range(trainer.state.iteration):  # the new schedule, at this iteration
                trainer.scheduler.step()

    def _checked(self, path: Path, ckpt: dict) -> dict:
        old = ckpt.get("config") if isinstance(ckpt, dict) else None
        if isinstance(old, dict):
            diff = check_resume_compatible(self.comparable(old), self.comparable(self.config),
                                           self.override, f"from {path}")
            if self.previous is None:
                self.changes = diff
        self._check_ranks(path, ckpt)
        return ckpt

    def _check_ranks(self, path: Path, ckpt: dict) -> None:
        """Each rank restores its own RNG states and sampler position: the same number of ranks
        continues the run exactly; another number only with ``resume_override``."""
        ranks = ckpt.get("ranks") if isinstance(ckpt, dict) else None
        saved = len(ranks) if isinstance(ranks, list) else None
        here = self.world_size
        if saved is None:
            if here > 1 and self.is_main:
                self.print_fn(f"warning: {path} was written before checkpoints held every rank's "
                              f"state: each of the {here} ranks continues from rank 0's random "
                              "state, so the resumed run is not bit-identical to an "
                              "uninterrupted one")
            return
        if saved == here:
            return
        what = (f"{path} was written by a run on {saved} rank(s) (processes) and this run has "
                f"{here}")
        if not self.override:
            raise RunConflict(
                f"cannot resume: {what}. Each rank saved its own random state and data position, "
                f"so only {saved} rank(s) continue the run exactly: resume with {saved} "
                f"(e.g. torchrun --nproc_per_node {saved} ...), or pass resume_override=true to "
                f"continue on {here} (each rank r < {saved} then takes rank r's state and the "
                "others rank 0's; the data order is split anew, so the run does not continue "
                "as it would have)")
        if self.is_main:
            self.print_fn(f"warning: {what} (resume_override=true): ranks below {saved} take "
                          "their own saved state, the others rank 0's, and the data order is "
                          "split anew; the run continues, but not as it would have on "
                          f"{saved} rank(s)")

    # -- after a successful start ---------------------------------------------------------------
    def record(self, iteration: int = 0, resumed_from: Path | None = None) -> None:
        """Write ``config.json`` (rank 0, atomically) and, when a resume changed settings,
        append them to ``config_history.json``."""
        if not self.is_main:
            return
        try:
            self._record(iteration, resumed_from)
        except OSError as e:
            raise output_error(e, self.dir, f"cannot write the run's config into {self.dir}"
                               ) from None

    def _record(self, iteration: int, resumed_from: Path | None) -> None:
        for path in self.damaged:  # out of the checkpoint rotation, but not deleted
            if path.exists():
                path.rename(path.with_name(path.name + ".damaged"))
                self.print_fn(f"the damaged {path.name} is kept as {path.name}.damaged")
        if resumed_from is not None and self.changes:
            hist_path = self.dir / "config_history.json"
            history = json.loads(hist_path.read_text()) if hist_path.is_file() else []
            history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "iteration": iteration, "resumed_from": str(resumed_from),
                            "changes": {k: list(v) for k, v in self.changes.items()}})
            with atomic_path(hist_path) as tmp:
                tmp.write_text(json.dumps(history, indent=1))
            self.print_fn(f"resume: settings changed from the run's config (recorded in "
                          f"{hist_path}): {_fmt(self.changes)}")
        with atomic_path(self.dir / "config.json") as tmp:
            tmp.write_text(json.dumps(self.config, indent=1))

    def discard_created(self) -> list[str]:
        """After a start that failed before its first step: remove what this start created
        here (:data:`START_OUTPUTS` that were not in the directory when it was opened), so that
        the corrected command starts afresh; nothing if the start wrote a checkpoint (a stop
        signal at iteration 0: it is resumable). Returns the names removed."""
        if not self.is_main or self.found is None or not self.dir.is_dir():
            return []
        now = {p.name for p in self.dir.iterdir()}
        if any(checkpoint_iteration(n) is not None for n in now - self.found):
            return []
        removed = []
        for name in START_OUTPUTS:
            path = self.dir / name
            if name in self.found or name not in now:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(name)
        return removed

    def interrupted(self, trainer, signum: int | None):
        """The :class:`~mink_ssl.errors.Interrupted` a run stopped by a signal ends with."""
        import signal

        signum = signum or signal.SIGTERM  # another rank got the signal
        it = trainer.state.iteration
        return Interrupted(f"{self.what} stopped by {signal.Signals(signum).name} at iteration "
                           f"{it} of {trainer.max_iterations}; checkpoint "
                           f"{checkpoint_path(self.dir, it)} saved. Resume with the same "
                           f"command plus resume=auto hydra.run.dir={self.dir}", signum)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def stop_check(signals, info, device) -> Callable[[], bool]:
    """``trainer.should_stop``: whether a stop signal arrived (``signals``, a
    :class:`~mink_ssl.signals.StopSignals`); with several ranks, whether any rank got one, so all
    stop at the same step."""
    if not info.enabled:
        return lambda: signals.requested

    def agreed() -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if signals.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return agreed
