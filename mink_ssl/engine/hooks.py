"""The generic trainer hooks: checkpoints and the final export, TensorBoard scalars with
``metrics.jsonl`` and a progress bar, periodic evaluation keeping the best model, and a
batch-norm momentum schedule. Rank 0 writes; the others wait where they must. Every write
error is an :class:`~mink_ssl.errors.OutputError` naming the file, with ``resume=auto`` as the
way on once it is fixed."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch.nn as nn

from mink_ssl.engine.checkpoint import checkpoint_path, list_checkpoints
from mink_ssl.engine.events import EventFile
from mink_ssl.engine.trainer import Hook
from mink_ssl.io import output_file
from mink_ssl.errors import RESUME, output_error


class CheckpointHook(Hook):
    """``checkpoint_<iteration>.pth`` every ``every`` iterations, when the run is stopped, and at
    the end, keeping the last ``keep``; then the task's export (``backbone.pth``, ``model.pth``).

    ``save_fn(path, trainer, config)`` writes a checkpoint; ``export_fn(trainer, out_dir)``
    writes what the run delivers; only the ``writer`` (rank 0) writes. ``gather(trainer)``
    (e.g. :func:`~mink_ssl.engine.checkpoint.gather_rank_states`) collects every rank's own
    state for the checkpoint: a collective, so every rank's hook calls it at every save point
    (save points are the same on every rank: the iteration, the agreed stop, the end), and the
    writer hands the result to ``save_fn`` as ``trainer.rank_states``."""

    def __init__(self, out_dir: Path, every: int, config: dict, *,
                 save_fn: Callable, export_fn: Callable, keep: int = 2, writer: bool = True,
                 gather: Callable | None = None):
        self.out_dir, self.every, self.config = Path(out_dir), every, config
        self.keep, self.writer, self.gather = keep, writer, gather
        self.save_fn, self.export_fn = save_fn, export_fn

    def _save(self, trainer, unless_saved: bool = False) -> None:
        states = self.gather(trainer) if self.gather is not None else None  # every rank
        if not self.writer:
            return
        path = checkpoint_path(self.out_dir, trainer.state.iteration)
        if unless_saved and path.exists():
            return
        trainer.rank_states = states
        try:
            self.save_fn(path, trainer, self.config)
        finally:
            trainer.rank_states = None
        for p in list_checkpoints(self.out_dir)[: -self.keep]:
            try:
                p.unlink()
            except OSError as e:
                raise output_error(e, p, f"cannot remove the old checkpoint {p}",
                                   RESUME) from None

    def record_step(self, trainer, metrics) -> None:
        if self.every and trainer.state.iteration % self.every == 0:
            self._save(trainer)

    def on_interrupt(self, trainer) -> None:
        self._save(trainer, unless_saved=True)

    def after_train(self, trainer) -> None:
        self._save(trainer, unless_saved=True)
        if self.writer:
            self.export_fn(trainer, self.out_dir)


class LoggingHook(Hook):
    """TensorBoard scalars every ``every`` iterations, the same metrics as lines of
    ``metrics.jsonl`` (``{"iteration": i, "loss": ..., ...}``; read them with
    :func:`read_metrics`), a tqdm bar, a final summary line.

    ``counts``: the trainer state's tallies to report, name -> what it counts (e.g.
    ``{"skipped_pairs": "pairs skipped (too few matches)"}``): a ``stat/<name>`` scalar, and
    in the summary line."""

    def __init__(self, out_dir: Path, every: int = 10, enabled: bool = True,
                 progress: bool = True, print_fn=print, desc: str = "train",
                 counts: dict[str, str] | None = None):
        self.out_dir, self.every, self.enabled = Path(out_dir), every, enabled
        self.progress, self.print_fn = progress and enabled, print_fn
        self.desc, self.counts = desc, dict(counts or {})  # bar and summary; tallies
        self.writer = self.bar = self.jsonl = None

    def before_train(self, trainer) -> None:
        if not self.enabled:
            return
        self.writer = EventFile(self.out_dir / "tb")  # I/O errors name the file (OutputError)
        path = self.out_dir / "metrics.jsonl"
        try:
            self.jsonl = _open_metrics(path)
        except OSError as e:
            raise output_error(e, path, f"cannot open {path} for appending", RESUME) from None
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.max_iterations, initial=trainer.state.iteration,
                            desc=self.desc, unit="it", dynamic_ncols=True)

    def record_step(self, trainer, metrics) -> None:
        if not self.enabled:
            return
        it, m = trainer.state.iteration, metrics
        if self.every and it % self.every == 0:
            for k, v in m.items():
                group = "loss" if k.startswith("loss") else "stat"
                self.writer.scalar(f"{group}/{k}", v, it)
            for name in self.counts:
                self.writer.scalar(f"stat/{name}", trainer.state.counts.get(name, 0), it)
            self.writer.flush()
            row = {"iteration": it, **{k: float(v) for k, v in m.items()}}
            path = self.out_dir / "metrics.jsonl"
            try:
                self.jsonl.write(json.dumps(row) + "\n")
                self.jsonl.flush()
            except OSError as e:  # disk full, a file-size limit: the path and what to do
                raise output_error(e, path, f"cannot append iteration {it} to {path}",
                                   RESUME) from None
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.3g}")

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        path = self.out_dir / "metrics.jsonl"
        try:
            self.writer.close()
        finally:
            try:
                self.jsonl.close()
            except OSError as e:
                raise output_error(e, path, f"cannot write {path}", RESUME) from None

    def on_interrupt(self, trainer) -> None:
        if self.enabled:
            self._close()

    def after_train(self, trainer) -> None:
        if not self.enabled:
            return
        self._close()
        s = trainer.state
        tallies = "".join(f", {s.counts.get(name, 0)} {what}" for name, what in self.counts.items())
        if "loss" not in s.last_metrics:  # resumed at its last iteration: no step ran here
            self.print_fn(f"{self.desc}: the run had already made its {s.iteration} iterations; "
                          f"nothing to train (raise max_iterations with resume_override=true to "
                          f"train on){tallies}")
            return
        self.print_fn(f"{self.desc}: {s.iteration} iterations, final loss "
                      f"{s.last_metrics['loss']:.4f}{tallies}")


def stat_name(metric: str) -> str:
    """``"mIoU"`` -> ``"stat_val_miou"``, ``"mAP@0.25"`` -> ``"stat_val_map025"``."""
    return "stat_val_" + re.sub(r"[^a-z0-9]", "", metric.lower())


class EvalHook(Hook):
    """Every ``every`` iterations (not at the last one: the final evaluation follows), rank 0
    runs ``evaluate() -> {metric: value in [0, 1]}`` (e.g. ``{"mIoU": .., "mAcc": ..}``), gives
    them as the step's metrics (``stat_val_<metric>``, :meth:`step_metrics`), rewrites ``val_history.json`` and prints
    them; the other ranks wait at a barrier. A resumed run keeps the earlier evaluations.

    With a ``key`` metric the hook tracks the best evaluation (``self.best``, the first of
    equals); with ``save_best`` too, each strictly better one calls ``save_best(out_dir /
    "best")`` and writes ``best/best.json`` = ``{"iteration", "metric": key, **metrics}``, so the
    best model survives a final one that overfits. A resumed run takes the best so far from the
    kept history, so it never replaces a better earlier best with a worse one."""

    def __init__(self, evaluate: Callable[[], dict[str, float]], every: int, out_dir: Path,
                 enabled: bool, print_fn=print, barrier: Callable[[], None] = lambda: None,
                 key: str | None = None, save_best: Callable[[Path], None] | None = None):
        if save_best is not None and key is None:
            raise ValueError("EvalHook(save_best=...) needs key=<the metric that ranks "
                             "evaluations>, e.g. key='mIoU'")
        self.evaluate, self.every, self.out_dir = evaluate, every, Path(out_dir)
        self.enabled, self.print_fn, self.barrier = enabled, print_fn, barrier
        self.key, self.save_best = key, save_best
        self.history: list[dict] = []
        self.best: dict | None = None  # the history entry with the highest key metric

    def before_train(self, trainer) -> None:
        path = self.out_dir / "val_history.json"
        if self.enabled and path.is_file():
            self.history = [h for h in read_val_history(path)
                            if h["iteration"] <= trainer.state.iteration]
        if self.key is not None:
            for h in self.history:
                if self.key in h and (self.best is None or h[self.key] > self.best[self.key]):
                    self.best = h

    def _keep_best(self, entry: dict) -> None:
        if self.key not in entry:
            raise ValueError(f"the best-model metric {self.key!r} is not among the evaluation's "
                             f"metrics {sorted(k for k in entry if k != 'iteration')}; pass one "
                             "of them as key")
        if self.best is not None and not entry[self.key] > self.best[self.key]:
            return
        before, self.best = self.best, entry
        if self.save_best is None:
            return
        best_dir = self.out_dir / "best"
        try:
            best_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(e, best_dir, f"cannot create {best_dir}", RESUME) from None
        self.save_best(best_dir)
        with output_file(best_dir / "best.json", then=RESUME) as tmp:  # after the model
            tmp.write_text(json.dumps({"iteration": entry["iteration"], "metric": self.key,
                                       **{k: v for k, v in entry.items() if k != "iteration"}},
                                      indent=1))
        was = (f" (was {100 * before[self.key]:.1f} at iteration {before['iteration']})"
               if before else "")
        self.print_fn(f"iteration {entry['iteration']}: best {self.key} so far "
                      f"{100 * entry[self.key]:.1f}{was}, saved to {best_dir}")

    def step_metrics(self, trainer) -> dict[str, float] | None:
        it = trainer.state.iteration
        if not self.every or it % self.every or it >= trainer.max_iterations:
            return None
        own = {}
        if self.enabled:
            metrics = self.evaluate()
            self.history.append({"iteration": it, **metrics})
            with output_file(self.out_dir / "val_history.json", then=RESUME) as tmp:
                tmp.write_text(json.dumps(self.history, indent=1))
            own = {stat_name(name): value for name, value in metrics.items()}
            self.print_fn(f"iteration {it}: val " + ", ".join(
                f"{name} {100 * value:.1f}" for name, value in metrics.items()))
            if self.key is not None:
                self._keep_best(self.history[-1])
        self.barrier()
        return own


class BNMomentumHook(Hook):
    """VoteNet's batch-norm momentum decay: ``max(init * decay ** (epoch // step), minimum)``
    for every batch-norm layer (backbone and head), set before training and whenever the epoch
    (``iteration / iterations_per_epoch``) changes."""

    def __init__(self, module: nn.Module, iterations_per_epoch: float, init: float,
                 decay: float, step: int, minimum: float):
        if not (0 < init <= 1 and 0 < decay <= 1 and step >= 1 and 0 <= minimum <= init):
            raise ValueError(f"batch-norm momentum schedule needs 0 < init <= 1, 0 < decay <= "
                             f"1, step >= 1, 0 <= minimum <= init; got init={init}, "
                             f"decay={decay}, step={step}, minimum={minimum}")
        self.module, self.ipe = module, iterations_per_epoch
        self.init, self.decay, self.step, self.minimum = init, decay, step, minimum
        self.current: float | None = None

    def momentum(self, epoch: int) -> float:
        return max(self.init * self.decay ** (epoch // self.step), self.minimum)

    def _apply(self, iteration: int) -> None:
        m = self.momentum(int(iteration / self.ipe + 1e-9))
        if m != self.current:
            for layer in self.module.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    layer.momentum = m
            self.current = m

    def before_train(self, trainer) -> None:
        self._apply(trainer.state.iteration)

    def after_step(self, trainer) -> None:
        self._apply(trainer.state.iteration)


def read_val_history(path: Path) -> list[dict]:
    """The evaluations in ``val_history.json`` (a list of ``{"iteration": int, metric:
    value}``); a damaged file is a ValueError naming it and the way on."""
    try:
        history = json.loads(path.read_bytes())
        if not isinstance(history, list):
            raise ValueError(f"a JSON {type(history).__name__}, not a list of evaluations")
        for entry in history:
            if not (isinstance(entry, dict) and isinstance(entry.get("iteration"), int)):
                raise ValueError(f"an entry without an integer 'iteration': {str(entry)[:80]}")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(
            f"{path} is damaged ({type(e).__name__}: {str(e)[:200]}); it holds the periodic "
            f"evaluations this resumed run continues. Restore it from a copy, or move it aside "
            f"(e.g. mv {path} {path}.damaged) to continue without the earlier evaluations: "
            "the best model so far (best/) is then judged from the evaluations after the "
            "resumed iteration only") from None
    return history


def _open_metrics(path: Path):
    """``path`` opened for appending, without the partial last line a killed run may have left
    (its iteration is logged again by the resumed run)."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])
    return open(path, "a")


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """iteration -> metrics, from a run's ``metrics.jsonl`` (or its folder). A resumed run
    appends again from its checkpoint: a later line for the same iteration replaces the
    earlier one, as the resumed run's values are the ones its result continues from."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows: dict[int, dict[str, float]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[int(row.pop("iteration"))] = row
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}:{n} is not a metrics line ({e}): {line[:80]!r}") from e
    return dict(sorted(rows.items()))
