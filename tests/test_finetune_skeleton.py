"""The fine-tuning skeleton (mink_ssl/tasks/finetune.py) carries a task it has never seen: a third
task, defined here in one class (per-voxel height regression on the segmentation benchmark's
rooms, its own loss, evaluation, export and results), trains, evaluates, keeps its best model
and resumes exactly through the skeleton alone; and the one split check names the choices."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import tiny_seg_config
from mink_ssl.data.segmentation import collate_segmentation
from mink_ssl.formats.model_files import SEG_CHECKPOINT_FORMAT
from mink_ssl.io import atomic_path
from mink_ssl.models.heads import save_segmentation_model
from mink_ssl.sparse import sparse_tensor
from mink_ssl.tasks.finetune import FinetuneTask, finetune
from mink_ssl.tasks.segmentation import SegEvalConfig, build_seg_dataset, build_seg_model
from mink_ssl.tasks.segmentation.optim import build_seg_optimizer


class HeightModule(nn.Module):
    """Regress each voxel's height (its z voxel index / 10) from its features."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, iteration=0, max_iterations=1):
        pred = self.model(sparse_tensor(batch.coords, batch.feats)).F[:, 0]
        loss = nn.functional.mse_loss(pred, batch.coords[:, 3].float() / 10)
        return {"loss": loss, "loss_mse": loss.detach()}


class HeightTask(FinetuneTask):
    name = "finetune-height"
    checkpoint_format = SEG_CHECKPOINT_FORMAT
    collate_fn = staticmethod(collate_segmentation)

    def dataset(self, split, train):
        return build_seg_dataset(self.cfg.data, split, train=train, seed=self.cfg.seed)

    def build_model(self, train_set):
        return build_seg_model(self.cfg.model, train_set.in_channels, 1, "rebuild")

    def build_module(self, model):
        return HeightModule(model)

    def schedule(self, p, module):
        opt, sched = build_seg_optimizer(self.cfg.optim, module.parameters(),
                                         self.cfg.max_iterations)
        return opt, sched, self.cfg.max_iterations

    @torch.no_grad()
    def _within(self, p) -> float:  # voxels predicted within half a unit
        p.model.eval()
        hits = total = 0
        for i in range(len(p.eval_set)):
            b = collate_segmentation([p.eval_set[i]])
            err = (p.model(sparse_tensor(b.coords, b.feats)).F[:, 0] - b.coords[:, 3] / 10).abs()
            hits, total = hits + int((err < 0.5).sum()), total + len(err)
        p.model.train()
        return hits / total

    def evaluation(self, p):
        return (lambda: {"within": self._within(p)}), 2, "within"

    def export(self, p, directory: Path):
        save_segmentation_model(p.model, directory / "model.pth", classes=["height"],
                                voxel_size=p.train_set.voxel_size,
                                features=self.cfg.data.features)

    def results(self, p, trainer, best):
        out = {"within": self._within(p), "iterations": trainer.state.iteration, "best": best}
        with atomic_path(p.tr.out_dir / "results.json") as tmp:
            tmp.write_text(json.dumps(out))
        return out


def config(rooms, **kw):
    return tiny_seg_config(rooms, max_iterations=6, eval=SegEvalConfig(every=2), **kw)


@pytest.mark.slow
def test_a_task_defined_in_one_class_trains_evaluates_and_resumes_exactly(rooms, tmp_path):
    quiet = []
    straight = tmp_path / "straight"
    results = finetune(HeightTask(config(rooms)), straight, print_fn=quiet.append)
    assert results["iterations"] == 6 and 0 <= results["within"] <= 1
    assert [h["iteration"] for h in json.loads((straight / "val_history.json").read_text())] == [
        2, 4]
    assert (straight / "best" / "model.pth").is_file() and (straight / "model.pth").is_file()
    assert json.loads((straight / "results.json").read_text()) == results
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows if "stat_val_within" in r] == [
        ["iteration", "loss", "loss_mse", "lr", "stat_val_within"]] * 2

    cut = tmp_path / "cut"
    finetune(HeightTask(config(rooms)), cut, print_fn=quiet.append)
    for name in ("checkpoint_6.pth", "model.pth", "results.json"):
        (cut / name).unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(lines[:4]))  # killed after checkpoint_4
    logs = []
    again = finetune(HeightTask(config(rooms, resume="auto")), cut, print_fn=logs.append)
    assert any("at iteration 4" in s for s in logs)
    assert again == results
    a = torch.load(straight / "checkpoint_6.pth", weights_only=True)
    b = torch.load(cut / "checkpoint_6.pth", weights_only=True)
    assert a["state"] == b["state"] and a["scheduler"] == b["scheduler"]
    for k in a["backbone"]:
        torch.testing.assert_close(b["backbone"][k], a["backbone"][k], rtol=0, atol=0, msg=k)
    assert (cut / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()


def test_the_one_split_check_names_the_choices(rooms, tmp_path):
    cfg = config(rooms)
    with pytest.raises(ValueError, match=r"evaluation split 'test' is empty; choose "
                                         r"data.eval_split from \['train', 'val'\] or null"):
        finetune(HeightTask(replace(cfg, data=replace(cfg.data, eval_split="test"))),
                 tmp_path / "a", print_fn=lambda s: None)
    with pytest.raises(ValueError, match=r"split 'test' of .* has no scenes; choose "
                                         r"data.train_split from \['train', 'val'\]"):
        finetune(HeightTask(replace(cfg, data=replace(cfg.data, train_split="test"))),
                 tmp_path / "b", print_fn=lambda s: None)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
