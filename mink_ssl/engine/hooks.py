"""Trainer hooks: checkpointing, TensorBoard scalars and a progress bar (rank 0 only)."""
from __future__ import annotations

import json
from pathlib import Path

from mink_ssl.engine.trainer import Hook


class CheckpointHook(Hook):
    """``checkpoint_<iteration>.pth`` every ``every`` iterations and at the end, keeping the last
    ``keep``; the backbone alone (heads dropped) is exported to ``backbone.pth`` at the end
    (the trained backbone, or the one an objective chooses, e.g. distillation's EMA teacher).

    Other trainings pass ``save_fn(path, trainer, config)`` (default: pretraining's
    ``save_checkpoint``) and ``export_fn(trainer, out_dir)`` (default: the backbone export)."""

    def __init__(self, out_dir: Path, every: int, config: dict, keep: int = 2,
                 enabled: bool = True, save_fn=None, export_fn=None):
        self.out_dir, self.every, self.config = Path(out_dir), every, config
        self.keep, self.enabled = keep, enabled
        self.save_fn, self.export_fn = save_fn, export_fn

    def _save(self, trainer) -> None:
        from mink_ssl.engine.checkpoint import save_checkpoint

        it = trainer.state.iteration
        (self.save_fn or save_checkpoint)(self.out_dir / f"checkpoint_{it}.pth", trainer,
                                          self.config)
        old = sorted(self.out_dir.glob("checkpoint_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
        for p in old[: -self.keep]:
            p.unlink()

    def after_step(self, trainer) -> None:
        if self.enabled and self.every and trainer.state.iteration % self.every == 0:
            self._save(trainer)

    def on_interrupt(self, trainer) -> None:
        if self.enabled and not (self.out_dir / f"checkpoint_{trainer.state.iteration}.pth"
                                 ).exists():
            self._save(trainer)

    def after_train(self, trainer) -> None:
        if not self.enabled:
            return
        if not (self.out_dir / f"checkpoint_{trainer.state.iteration}.pth").exists():
            self._save(trainer)
        if self.export_fn is not None:
            self.export_fn(trainer, self.out_dir)
            return
        from mink_ssl.engine.checkpoint import _unwrap
        from mink_ssl.models import save_model

        save_model(_unwrap(trainer.module).exported_backbone(), self.out_dir / "backbone.pth")


class LoggingHook(Hook):
    """TensorBoard scalars every ``every`` iterations, the same metrics as lines of
    ``metrics.jsonl`` (``{"iteration": i, "loss": ..., ...}``; read them with
    :func:`read_metrics`), a tqdm bar, a final summary line."""

    def __init__(self, out_dir: Path, every: int = 10, enabled: bool = True,
                 progress: bool = True, print_fn=print, desc: str = "pretrain",
                 report_skipped: bool = True):
        self.out_dir, self.every, self.enabled = Path(out_dir), every, enabled
        self.progress, self.print_fn = progress and enabled, print_fn
        self.desc, self.report_skipped = desc, report_skipped  # bar / summary; pair skips
        self.writer = self.bar = self.jsonl = None

    def before_train(self, trainer) -> None:
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboard is a dependency
            raise ImportError("TensorBoard logging needs `pip install tensorboard`") from e
        self.writer = SummaryWriter(str(self.out_dir / "tb"))
        self.jsonl = _open_metrics(self.out_dir / "metrics.jsonl")
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.max_iterations, initial=trainer.state.iteration,
                            desc=self.desc, unit="it", dynamic_ncols=True)

    def after_step(self, trainer) -> None:
        if not self.enabled:
            return
        it, m = trainer.state.iteration, trainer.state.last_metrics
        if self.every and it % self.every == 0:
            for k, v in m.items():
                group = "loss" if k.startswith("loss") else "stat"
                self.writer.add_scalar(f"{group}/{k}", v, it)
            if self.report_skipped:
                self.writer.add_scalar("stat/skipped_pairs", trainer.state.skipped_pairs, it)
            row = {"iteration": it, **{k: float(v) for k, v in m.items()}}
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.3g}")

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.jsonl.close()

    def on_interrupt(self, trainer) -> None:
        if self.enabled:
            self._close()

    def after_train(self, trainer) -> None:
        if not self.enabled:
            return
        self._close()
        s = trainer.state
        skipped = (f", {s.skipped_pairs} pairs skipped (too few matches)"
                   if self.report_skipped else "")
        self.print_fn(f"{self.desc}: {s.iteration} iterations, final loss "
                      f"{s.last_metrics.get('loss', float('nan')):.4f}{skipped}")


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
