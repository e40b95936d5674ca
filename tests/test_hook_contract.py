"""The trainer's hook contract (#27 item 5, written in mink_ssl/engine/trainer.py): before_step
once per optimiser step with the batch stepped on, skipped batches on their own path
(on_skipped_batch), metrics passed explicitly (step_metrics -> record_step, no order between
producers and consumers), checkpoint names parsed in one place; and a damaged
val_history.json met by a real resumed run named with the way on (#26)."""
import json
import shutil
from dataclasses import replace

import pytest
import torch

from helpers import tiny_seg_config
from mink_ssl.engine.checkpoint import checkpoint_iteration, checkpoint_path, list_checkpoints
from mink_ssl.engine.hooks import CheckpointHook
from mink_ssl.engine.rundir import RunDir
from mink_ssl.engine.trainer import Hook, Trainer


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, batch, iteration, max_iterations):
        return {"loss": (self.w * batch.sum()).sum(), "stat_x": self.w.detach()[0]}


def trainer(batches, hooks, max_iterations=3, batch_size=2) -> Trainer:
    module = _Module()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    return Trainer(module, opt, sched, iter(batches), max_iterations, batch_size,
                   torch.device("cpu"), hooks=hooks)


class Recorder(Hook):
    def __init__(self, log):
        self.log = log

    def before_step(self, trainer, batch):
        self.log.append(("before_step", trainer.state.iteration, float(batch.sum())))

    def on_skipped_batch(self, trainer):
        self.log.append(("skipped", trainer.state.iteration, trainer.state.samples))

    def after_step(self, trainer):
        self.log.append(("after_step", trainer.state.iteration))

    def record_step(self, trainer, metrics):
        self.log.append(("record_step", trainer.state.iteration, sorted(metrics)))


def test_before_step_fires_once_per_step_with_its_batch_and_skips_have_their_own_path():
    log = []
    b = [torch.full((2,), float(v)) for v in (1, 2, 3)]
    tr = trainer([b[0], None, None, b[1], None, b[2]], [Recorder(log)])
    tr.train()
    assert log == [
        ("before_step", 0, 2.0), ("after_step", 1), ("record_step", 1, ["loss", "lr", "stat_x"]),
        ("skipped", 1, 4), ("skipped", 1, 6),
        ("before_step", 1, 4.0), ("after_step", 2), ("record_step", 2, ["loss", "lr", "stat_x"]),
        ("skipped", 2, 10),
        ("before_step", 2, 6.0), ("after_step", 3), ("record_step", 3, ["loss", "lr", "stat_x"])]
    assert tr.state.counts == {"skipped_batches": 3} and tr.state.samples == 12


def test_metrics_are_passed_explicitly_whatever_the_hook_order():
    seen = []

    class Consumer(Hook):  # listed before the producers, sees their metrics all the same
        def record_step(self, trainer, metrics):
            seen.append(dict(metrics))

    class Producer(Hook):
        def __init__(self, name):
            self.name = name

        def step_metrics(self, trainer):
            return {self.name: float(trainer.state.iteration)}

    b = torch.ones(2)
    tr = trainer([b, b], [Consumer(), Producer("a"), Producer("b")], max_iterations=2)
    tr.train()
    assert [list(m) for m in seen] == [["loss", "stat_x", "lr", "a", "b"]] * 2
    assert [(m["a"], m["b"]) for m in seen] == [(1.0, 1.0), (2.0, 2.0)]
    assert tr.state.last_metrics == seen[-1]
    with pytest.raises(KeyError, match=r"Producer.step_metrics gives 'stat_x', a metric this "
                                       r"step already has"):
        trainer([b], [Producer("stat_x")], max_iterations=1).train()


@pytest.mark.slow
def test_pair_tallies_count_skipped_pairs_of_real_batches(kitchen, tmp_path):
    """Real RedKitchen pairs: a stepped batch that lost one pair, all-skipped batches (None),
    a full batch: skipped_pairs counts each lost pair once, matches are each step's."""
    from data_prep.pairs.prep import PrepParams, run
    from mink_ssl.data.pairs import PairDataset, collate_pairs
    from mink_ssl.tasks.pretrain import PairTallies

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "redkitchen").symlink_to(kitchen)
    run(tmp_path / "raw", tmp_path / "pairs", PrepParams(frame_skip=50), progress=False)
    ds = PairDataset(tmp_path / "pairs", voxel_size=0.05, features="rgb", seed=0)
    s = [ds[(0, i)] for i in range(3)]
    assert all(x is not None for x in s)
    batches = [collate_pairs([s[0], None]), collate_pairs([None, None]),
               collate_pairs([None, None]), collate_pairs([s[1], s[2]])]
    assert batches[1] is None and batches[0].skipped == 1
    logged = []

    class Logged(Hook):
        def record_step(self, trainer, metrics):
            logged.append(metrics["matches"])

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, batch, iteration, max_iterations):
            return {"loss": self.w.sum() * len(batch.matches)}

    module = Module()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    tr = Trainer(module, opt, torch.optim.lr_scheduler.StepLR(opt, 1), iter(batches), 2, 2,
                 torch.device("cpu"), hooks=[Logged(), PairTallies()])
    tr.train()
    assert tr.state.counts == {"skipped_pairs": 1 + 2 + 2, "skipped_batches": 2}
    assert logged == [float(len(s[0].matches)), float(len(s[1].matches) + len(s[2].matches))]


def test_checkpoint_names_are_parsed_in_one_place(tmp_path):
    for name in ("checkpoint_10.pth", "checkpoint_9.pth", "checkpoint_2.pth",
                 "checkpoint_3.pth.damaged", "checkpoint_best.pth", "checkpoint_-1.pth"):
        (tmp_path / name).write_bytes(b"x")
    assert checkpoint_path(tmp_path, 7) == tmp_path / "checkpoint_7.pth"
    assert [checkpoint_iteration(p) for p in ("a/checkpoint_12.pth", "checkpoint_best.pth",
                                              "checkpoint_3.pth.damaged", "model.pth")] == [
        12, None, None, None]
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint_2.pth", "checkpoint_9.pth", "checkpoint_10.pth"]
    # the rotation keeps the newest two by iteration and leaves other files alone
    hook = CheckpointHook(tmp_path, 1, {}, save_fn=lambda p, t, c: p.write_bytes(b"y"),
                          export_fn=lambda t, d: None)
    hook._save(type("T", (), {"state": type("S", (), {"iteration": 11})(),
                              "rank_states": None})())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_-1.pth", "checkpoint_10.pth", "checkpoint_11.pth", "checkpoint_3.pth.damaged",
        "checkpoint_best.pth"]
    # resume=auto takes the newest by iteration, passing over what is not a checkpoint name
    loaded = []
    run = RunDir(tmp_path, {}, "auto", print_fn=lambda s: None)
    path, _ = run.load_resume(lambda p: loaded.append(p.name) or {"ranks": [{}]})
    assert path.name == "checkpoint_11.pth" and loaded == ["checkpoint_11.pth"]


@pytest.mark.slow
def test_a_damaged_val_history_met_on_resume_is_named_with_the_way_on(rooms, tmp_path):
    from mink_ssl.tasks.segmentation import SegEvalConfig, finetune_seg

    cfg = tiny_seg_config(rooms, eval=SegEvalConfig(every=1, ply_scenes=1))
    run = tmp_path / "run"
    finetune_seg(cfg, run, print_fn=lambda s: None)
    history = run / "val_history.json"
    assert [h["iteration"] for h in json.loads(history.read_text())] == [1, 2, 3]
    (run / "checkpoint_4.pth").unlink()  # as if killed after checkpoint_2
    kept = history.read_bytes()
    history.write_bytes(kept[: len(kept) // 2])  # a write cut short by a full disk, say
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError) as e:
        finetune_seg(replace(cfg, resume="auto"), run, print_fn=lambda s: None)
    msg = str(e.value)
    assert msg.startswith(f"{history} is damaged (JSONDecodeError: ")
    assert f"mv {history} {history}.damaged" in msg and "Restore it from a copy" in msg
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written, nothing lost
    # valid JSON of another shape is named the same way
    history.write_text(json.dumps({"iteration": 1}))
    with pytest.raises(ValueError, match=r"val_history.json is damaged \(ValueError: a JSON "
                                         r"dict, not a list of evaluations\)"):
        finetune_seg(replace(cfg, resume="auto"), run, print_fn=lambda s: None)
    # the way on the message gives: moved aside, the run resumes and evaluates again
    shutil.move(history, run / "val_history.json.damaged")
    finetune_seg(replace(cfg, resume="auto"), run, print_fn=lambda s: None)
    assert [h["iteration"] for h in json.loads(history.read_text())] == [3]
    assert (run / "checkpoint_4.pth").is_file()
