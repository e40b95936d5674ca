"""TaskRun.build_trainer owns the start / resume order (#27 item 1): on real pretraining runs of
real 7-Scenes pairs, the calls on the real pieces (the run directory, the loader, the task's
restore, the hooks) come in the one order a resume needs, config.json is recorded only after a
restore succeeded, and a run resumed through the builder ends bit for bit where an
uninterrupted run ends, with the loader, the hooks (tallies of skipped pairs, logs) and a
learning-rate schedule that moves every step in place."""
import json
from dataclasses import replace

import pytest
import torch

import mink_ssl.engine.run as engine_run
import mink_ssl.tasks.pretrain as pretrain_task
from mink_ssl.engine.config import ModelConfig, OptimConfig
from mink_ssl.engine.hooks import CheckpointHook, LoggingHook, read_metrics
from mink_ssl.engine.rundir import RunDir
from mink_ssl.engine.trainer import Trainer
from mink_ssl.tasks.pretrain import DataConfig, PairTallies, PretrainConfig, pretrain


@pytest.fixture(scope="module")
def kitchen_pairs(kitchen, tmp_path_factory):
    """Pair prep of the real 7-Scenes RedKitchen frames (20 fragments, 118 pairs)."""
    from data_prep.pairs.prep import PrepParams, run

    raw = tmp_path_factory.mktemp("raw")
    (raw / "redkitchen").symlink_to(kitchen)
    out = tmp_path_factory.mktemp("pairs")
    run(raw, out, PrepParams(frame_skip=25), progress=False)
    return out


def config(root, **kw) -> PretrainConfig:
    """4 steps of batch 2; about a third of the pairs have fewer than 22000 matches (skipped,
    whole batches too), and the learning rate halves every step (a schedule restored wrong
    shows in the weights)."""
    cfg = PretrainConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16),
        data=DataConfig(root=str(root), voxel_size=0.05, num_workers=0, features="rgb",
                        min_matches=22000, max_matches=30000),
        optim=OptimConfig(lr=0.05, lr_step=1, lr_gamma=0.5),
        objectives={"point_info_nce": {"num_matches": 512}}, max_iterations=4, batch_size=2,
        device="cpu", checkpoint_every=2, log_every=1, progress=False)
    return replace(cfg, **kw)


def quiet(_s):
    pass


@pytest.fixture(scope="module")
def straight(kitchen_pairs, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    pretrain(config(kitchen_pairs), run, print_fn=quiet)
    return run


def cut_at_2(straight, tmp_path):
    """A copy of the finished run as a run killed right after checkpoint_2 leaves it."""
    import shutil

    run = tmp_path / "cut"
    shutil.copytree(straight, run)
    (run / "checkpoint_4.pth").unlink()
    (run / "backbone.pth").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]))
    return run


@pytest.mark.slow
def test_the_builder_restores_then_records_then_loads_then_hooks(kitchen_pairs, straight,
                                                                 tmp_path, monkeypatch):
    run = cut_at_2(straight, tmp_path)
    saved = torch.load(run / "checkpoint_2.pth", weights_only=True)["state"]
    assert saved["skipped_pairs"] > 0 and saved["samples"] > 4  # whole batches were skipped
    calls = []

    def spy(name, fn, what=lambda *a, **k: None):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            calls.append((name, what(*a, **k)))
            return out
        return wrapped

    task_restore = pretrain_task.restore

    def restore_fn(ckpt, trainer):  # the task's restore, with what the trainer has then
        calls.append(("task restore", {"hooks": list(trainer.hooks),
                                       "batches": list(trainer.batches),
                                       "iteration": trainer.state.iteration,
                                       "config.json": (run / "config.json").exists()}))
        return task_restore(ckpt, trainer)

    monkeypatch.setattr(pretrain_task, "restore", restore_fn)
    (run / "config.json").unlink()  # so that its writing shows
    monkeypatch.setattr(RunDir, "load_resume", spy("load", RunDir.load_resume))
    monkeypatch.setattr(RunDir, "restore", spy("restore", RunDir.restore,
                                               lambda self, ckpt, trainer, fn: dict(
                                                   trainer.state.to_dict())))
    monkeypatch.setattr(RunDir, "record", spy("record", RunDir.record,
                                              lambda self, it=0, path=None: (it, path)))
    monkeypatch.setattr(engine_run, "build_loader", spy(
        "loader", engine_run.build_loader, lambda *a, **k: a[6]))  # its start sample
    seen = {}
    train = Trainer.train

    def train_spy(trainer):
        seen["hooks"] = [type(h) for h in trainer.hooks]
        seen["samples"] = trainer.state.samples
        return train(trainer)

    monkeypatch.setattr(Trainer, "train", train_spy)
    pretrain(config(kitchen_pairs, resume="auto"), run, print_fn=quiet)

    assert [name for name, _ in calls] == ["load", "task restore", "restore", "record", "loader"]
    during = calls[1][1]
    # the task restores a bare trainer: no hooks, no batches, the fresh state, no config.json
    assert during == {"hooks": [], "batches": [], "iteration": 0, "config.json": False}
    assert calls[2][1] == saved  # restored: the checkpoint's position and tallies
    assert calls[3][1] == (2, run / "checkpoint_2.pth")  # recorded after the restore
    assert calls[4][1] == saved["samples"]  # the loader starts where the checkpoint left it
    assert seen == {"hooks": [PairTallies, LoggingHook, CheckpointHook],
                    "samples": saved["samples"]}
    assert json.loads((run / "config.json").read_text())["resume"] == "auto"


@pytest.mark.slow
def test_a_failed_restore_records_nothing(kitchen_pairs, straight, tmp_path, monkeypatch):
    run = cut_at_2(straight, tmp_path)
    (run / "config.json").unlink()
    recorded = []
    monkeypatch.setattr(RunDir, "record", lambda self, *a: recorded.append(a))

    def broken(ckpt, trainer):
        raise ValueError("the checkpoint's head does not fit")

    monkeypatch.setattr(pretrain_task, "restore", broken)
    with pytest.raises(ValueError, match="does not fit"):
        pretrain(config(kitchen_pairs, resume="auto"), run, print_fn=quiet)
    assert recorded == [] and not (run / "config.json").exists()
    assert (run / "checkpoint_2.pth").is_file()  # the run is still resumable


@pytest.mark.slow
def test_a_run_resumed_by_the_builder_is_bit_identical(kitchen_pairs, straight, tmp_path):
    run = cut_at_2(straight, tmp_path)
    logs = []
    pretrain(config(kitchen_pairs, resume="auto"), run, print_fn=logs.append)
    assert any("resumed from" in s and "at iteration 2" in s for s in logs)
    a = torch.load(straight / "checkpoint_4.pth", weights_only=True)
    b = torch.load(run / "checkpoint_4.pth", weights_only=True)
    assert a["state"] == b["state"] and a["state"]["skipped_batches"] > 0
    for part in ("backbone", "objectives"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=0, atol=0, msg=k)
    assert a["scheduler"] == b["scheduler"]
    assert [g["lr"] for g in b["optimizer"]["param_groups"]] == [0.05 * 0.5 ** 4]
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][k][name], value, rtol=0, atol=0)
    torch.testing.assert_close(b["ranks"][0]["rng"]["torch"], a["ranks"][0]["rng"]["torch"],
                               rtol=0, atol=0)
    # the logs: the resumed run wrote iterations 3 and 4 as the uninterrupted run did
    assert (run / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()
    assert list(read_metrics(run)) == [1, 2, 3, 4]
