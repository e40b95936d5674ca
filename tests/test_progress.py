"""A run that cannot make a step stops (reliability issue, item 1): pretraining whose pairs all
fall below data.min_matches (or match nothing within data.match_radius) says so in seconds,
naming the keys; the trainer ends a whole pass of skipped batches with NoProgress; a stop signal
is honoured between skipped batches."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.engine.trainer import Hook, NoProgress, Trainer
from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig, pretrain

REPO = Path(__file__).resolve().parents[1]


def _tiny(root, **data) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16),
        data=replace(DataConfig(root=str(root), voxel_size=0.05, num_workers=0, max_matches=2000,
                                features="rgb"), **data),
        optim=OptimConfig(lr=0.05), objectives={"point_info_nce": {"num_matches": 256}},
        max_iterations=4, batch_size=2, device="cpu", checkpoint_every=2, log_every=1,
        progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("data", [{"min_matches": 100_000_000, "max_matches": None},
                                  {"match_radius": 0.0001}])
def test_pretraining_that_can_never_step_stops_at_once_naming_the_keys(synthetic_pairs,
                                                                        tmp_path, data):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"pairs sampled across .* can be trained on: every pair "
                                         r"had fewer than data.min_matches=.*lower "
                                         r"data.min_matches or raise data.match_radius"):
        pretrain(_tiny(synthetic_pairs, **data), tmp_path / "run", print_fn=lambda *a: None)
    assert time.perf_counter() - t0 < 60
    assert not list((tmp_path / "run").glob("checkpoint_*.pth"))


@pytest.mark.slow
def test_cli_with_no_usable_pair_exits_with_the_reason(synthetic_pairs, tmp_path):
    """The real CLI: it ends (it used to loop over empty batches until killed), exit status
    non-zero, the message on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "mink_ssl.cli.pretrain", f"data.root={synthetic_pairs}",
         "model=res16unet14a", "model.out_channels=16", "data.voxel_size=0.05",
         "data.num_workers=0", "data.min_matches=100000000", "max_iterations=4", "batch_size=2",
         "device=cpu", "progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "data.min_matches=100000000" in proc.stderr and "lower data.min_matches" in proc.stderr


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, batch, iteration, max_iterations):
        return {"loss": (self.w * batch).sum()}


def _trainer(batches, hooks=()) -> Trainer:
    module = _Module()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    return Trainer(module, opt, sched, iter(batches), max_iterations=3, batch_size=2,
                   device=torch.device("cpu"), hooks=list(hooks))


def test_a_whole_pass_of_skipped_batches_ends_the_run_with_the_hint():
    tr = _trainer(itertools.chain([torch.ones(2)], itertools.repeat(None)))
    tr.max_skipped, tr.no_progress_hint = 5, "lower data.min_matches"
    with pytest.raises(NoProgress, match=r"last 5 batches \(10 samples, a whole pass over the "
                                         r"data\) were all skipped, at iteration 1; lower "
                                         r"data.min_matches"):
        tr.train()
    assert tr.state.iteration == 1 and tr.state.counts["skipped_batches"] == 5


def test_skipped_batches_between_steps_do_not_add_up():
    """The limit counts skipped batches in a row: a step in between starts the count anew."""
    pattern = [None, None, None, torch.ones(2)] * 3
    tr = _trainer(pattern)
    tr.max_skipped = 4
    tr.train()
    assert tr.state.iteration == 3 and tr.state.counts["skipped_batches"] == 9


def test_a_stop_between_skipped_batches_stops_the_run():
    calls = []

    class Seen(Hook):
        def on_interrupt(self, trainer):
            calls.append(trainer.state.samples)

    tr = _trainer(itertools.repeat(None), [Seen()])
    asked = itertools.count()
    tr.stop_requested = lambda: next(asked) >= 3  # the signal arrives while skipping
    state = tr.train()
    assert tr.stopped and state.iteration == 0 and calls == [8]  # 4 batches of 2 consumed
