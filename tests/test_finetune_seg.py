"""Segmentation fine-tuning: the dataset on contract-format scenes (voxel labels, augmentations,
limited labels), strict pretrained loading, exact resume, configs, and the CLI end to end
learning synthetic rooms far above chance."""
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from helpers import (SEG_CLASSES as CLASSES, SEG_VOXEL as VOXEL, REPO, compose_config,
                      pretrained_backbone as _pretrained_backbone, tiny_seg_config as tiny_config)
import torch

from mink_ssl.data.segmentation import (Augmentation, SegmentationDataset, augment,
                                        collate_segmentation, limit_labels, voxel_labels)
from mink_ssl.engine.config import ModelConfig
from mink_ssl.models import build_model, save_model
from mink_ssl.models.pretrained import load_pretrained
from mink_ssl.tasks.segmentation import (FinetuneSegConfig, SegDataConfig, SegEvalConfig,
                                         SegOptimConfig, build_seg_dataset, build_seg_model,
                                         finetune_seg)

CONFIGS = REPO / "configs"


# ------------------------------------------------------------------------------- dataset

def test_dataset_reads_the_contract_and_checks_it(rooms, tmp_path):
    ds = SegmentationDataset(rooms, "train")
    assert len(ds) == 6 and ds.classes == CLASSES and ds.voxel_size == VOXEL  # manifest's
    points, colors, labels = ds.load("Area_1/room_3")  # file Area_1__room_3.npz
    assert points.dtype == np.float32 and colors.dtype == np.uint8 and labels.dtype == np.int64
    s = ds[(0, 3)]
    assert s.name == "Area_1/room_3" and s.coords.dtype == torch.int32 and s.coords.shape[1] == 3
    assert s.feats.shape == (len(s.coords), 3) and s.feats.abs().max() <= 0.5
    assert s.labels.dtype == torch.int64 and set(s.labels.unique().tolist()) == {-1, 0, 1, 2, 3}
    b = collate_segmentation([ds[(0, 0)], s])
    assert b.coords.shape == (len(ds[(0, 0)].coords) + len(s.coords), 4)
    assert b.coords[:, 0].unique().tolist() == [0, 1] and b.names[1] == "Area_1/room_3"
    ones = SegmentationDataset(rooms, "train", voxel_size=0.5, features="ones")[0]
    assert ones.feats.shape == (len(ones.coords), 3) and len(ones.coords) < len(ds[0].coords)
    assert (ones.feats == 1).all()  # 3-channel constant ones (fidelity row 7)

    manifest = json.loads((rooms / "manifest.json").read_text())
    bad = tmp_path / "bad"
    (bad / "scenes").mkdir(parents=True)
    (bad / "manifest.json").write_text(json.dumps({**manifest, "schema": "seg/0"}))
    with pytest.raises(ValueError, match="schema 'seg/0'.*mink_ssl.seg_scenes/1"):
        SegmentationDataset(bad)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"split 'tset'.*available: \['test', 'train', 'val'\]"):
        SegmentationDataset(bad, "tset")
    with pytest.raises(FileNotFoundError, match=r"Area_1__room_0.npz \(scene 'Area_1/room_0'\)"):
        SegmentationDataset(bad)[0]
    np.savez(bad / "scenes" / "Area_1__room_0.npz", coords=points, colors=colors,
             labels=np.where(labels == 3, 7, labels).astype(np.int16))
    with pytest.raises(ValueError, match=r"labels \[7\] are outside \[0, 4\) and not -1"):
        SegmentationDataset(bad)[0]


def test_voxel_labels_uniform_by_default_majority_as_option():
    inverse = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    labels = torch.tensor([-1, 2, 2, -1, -1, 1, 0, 3, -1, 1, 1])
    # uniform (the reference): only voxel 4's points agree; an unlabelled point mixes too
    assert voxel_labels(inverse, labels, 5, 4).tolist() == [-1, -1, -1, -1, 1]
    # majority: voxel 0: first point unlabelled, majority 2; voxel 1: nothing labelled;
    # voxel 2: a tie (smaller class wins); voxel 3: one labelled point
    assert voxel_labels(inverse, labels, 5, 4, rule="majority").tolist() == [2, -1, 0, 3, 1]
    with pytest.raises(ValueError, match="label rule must be one of"):
        voxel_labels(inverse, labels, 5, 4, rule="first")


def test_augmentations(rooms):
    ds = SegmentationDataset(rooms, "train", augmentation=Augmentation())
    a, again, other = ds[(0, 1)], ds[(0, 1)], ds[(1, 1)]
    # a pure function of (seed, epoch, index)
    assert torch.equal(a.coords, again.coords) and torch.equal(a.feats, again.feats)
    assert not (len(a.coords) == len(other.coords) and torch.equal(a.coords, other.coords))

    points, colors, _ = ds.load("Area_1/room_1")
    rng = np.random.default_rng(0)
    centred = points - points.mean(0)
    # gravity rotation, flips: heights and horizontal distances are kept
    p, c = augment(points, colors, Augmentation(scale=(1, 1), color_auto_contrast=0,
                                                color_translation=0, color_jitter=0), rng)
    np.testing.assert_allclose(p[:, 2], centred[:, 2], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(p[:100, :2] - p[100:200, :2], axis=1),
                               np.linalg.norm(centred[:100, :2] - centred[100:200, :2], axis=1),
                               atol=1e-4)
    assert np.abs(p[:, :2] - centred[:, :2]).max() > 0.1 and np.array_equal(c, colors)
    # y up (raw Synthia): y is kept instead; scaling scales
    p, _ = augment(points, colors, Augmentation(scale=(1.2, 1.2)), rng, up_axis=1)
    np.testing.assert_allclose(p[:, 1], 1.2 * centred[:, 1], atol=1e-4)
    # tilt moves heights a little
    p, _ = augment(points, colors, Augmentation(tilt_deg=5, scale=(1, 1)), rng)
    assert 0.01 < np.abs(p[:, 2] - centred[:, 2]).max() < 0.5
    # elastic distortion: a smooth displacement of the expected size
    none = Augmentation.none()
    p0, _ = augment(points, colors, none, np.random.default_rng(3))
    np.testing.assert_allclose(p0, centred, atol=1e-5)
    pe, _ = augment(points, colors, replace(none, elastic=((0.2, 0.4),)), np.random.default_rng(3))
    disp = np.linalg.norm(pe - p0, axis=1)
    assert 0.02 < disp.mean() < 0.4
    from scipy.spatial import cKDTree

    near = cKDTree(p0).query_pairs(0.02, output_type="ndarray")  # (K, 2) neighbours
    d = pe - p0
    near_diff = np.linalg.norm(d[near[:, 0]] - d[near[:, 1]], axis=1)
    far_diff = np.linalg.norm(d[:1000] - d[-1000:], axis=1)  # mostly metres apart
    assert len(near) > 100 and near_diff.max() < 0.2 * disp.max()  # smooth ...
    assert far_diff.mean() > 5 * near_diff.mean()  # ... but not a global shift
    # colours: stay in [0, 255], are changed, and the scene-wide translation moves the mean
    _, cc = augment(points, colors, replace(none, color_translation=0.1, color_jitter=0.05),
                    np.random.default_rng(1))
    assert cc.min() >= 0 and cc.max() <= 255 and np.abs(cc - colors).mean() > 3
    with pytest.raises(ValueError, match=r"scale must be a range .* got \(1.1, 0.9\)"):
        Augmentation(scale=(1.1, 0.9))


def test_limited_labels_are_seeded_and_fixed(rooms):
    full = SegmentationDataset(rooms, "train")
    few = SegmentationDataset(rooms, "train", labelled_points=5, label_seed=0,
                              label_rule="majority")
    name = few.scenes[2]
    _, _, labels = few.load(name)
    kept = few.training_labels(name, labels)
    assert (kept >= 0).sum() == 5 and np.array_equal(kept[kept >= 0], labels[kept >= 0])
    assert np.array_equal(kept, few.training_labels(name, labels))  # the same points every time
    other = SegmentationDataset(rooms, "train", labelled_points=5, label_seed=1)
    assert not np.array_equal(kept, other.training_labels(name, labels))
    s = few[(3, 2)]  # any epoch: at most 5 labelled voxels (two points may share one)
    assert 1 <= int((s.labels >= 0).sum()) <= 5 < int((full[(3, 2)].labels >= 0).sum())
    # the reference rule ignores a labelled point's voxel when unlabelled points share it
    uniform = SegmentationDataset(rooms, "train", labelled_points=5, label_seed=0)[(3, 2)]
    assert int((uniform.labels >= 0).sum()) <= int((s.labels >= 0).sum())
    assert (limit_labels(labels, 10 ** 9, np.random.default_rng(0)) == labels).all()

    half = SegmentationDataset(rooms, "train", scene_fraction=0.5, label_seed=0)
    assert len(half) == 3 and set(half.scenes) < set(full.scenes)
    assert half.scenes == SegmentationDataset(rooms, "train", scene_fraction=0.5).scenes
    assert half.scenes != SegmentationDataset(rooms, "train", scene_fraction=0.5,
                                              label_seed=1).scenes
    # the evaluation data keeps every scene and every label
    cfg = SegDataConfig(root=str(rooms), labelled_points=5, scene_fraction=0.5)
    ev = build_seg_dataset(cfg, "train", train=False, seed=0)
    assert len(ev) == 6 and ev.augmentation is None
    assert np.array_equal(ev.training_labels(name, labels), labels)
    assert len(build_seg_dataset(cfg, "train", train=True, seed=0)) == 3


# ---------------------------------------------------------------------- pretrained weights


def _fresh_model():
    """final_layer="keep": every pretrained tensor loads, the head starts from scratch (the
    default "rebuild", which drops the pretrained final layer, has its golden test in
    test_fidelity_models.py)."""
    torch.manual_seed(0)
    return build_seg_model(ModelConfig(name="Res16UNet14A", out_channels=16), 3, 4,
                           final_layer="keep")


def test_pretrained_weights_replace_the_scratch_initialisation(tmp_path):
    from mink_ssl.engine.build import build_optimizer
    from mink_ssl.engine.config import OptimConfig
    from mink_ssl.engine.trainer import Trainer
    from mink_ssl.models.heads import save_segmentation_model
    from mink_ssl.tasks.pretrain import PretrainModule, build_objectives, save_checkpoint

    saved = _pretrained_backbone(tmp_path / "backbone.pth")
    scratch = {k: v.clone() for k, v in _fresh_model().state_dict().items()}
    model = _fresh_model()
    report = load_pretrained(model, tmp_path / "backbone.pth")
    state = model.state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(state["backbone." + k], v, rtol=0, atol=0)
    changed = [k for k in saved if not torch.equal(scratch["backbone." + k], saved[k])]
    assert changed == [k for k in saved if saved[k].is_floating_point()]
    assert torch.equal(state["head.conv.kernel"], scratch["head.conv.kernel"])  # head: scratch
    assert report.allowed_missing == ["head.conv.kernel", "head.conv.bias"]
    assert report.matched_fraction == pytest.approx(len(saved) / (len(saved) + 2))
    assert 0.99 < report.matched_elements < 1.0
    assert "left at initialisation (task layers): 2 tensors of head" in report.summary()

    # a pretraining checkpoint (its "backbone" entry) loads the same way
    torch.manual_seed(5)
    backbone = build_model("Res16UNet14A", in_channels=3, out_channels=16)
    objectives, weights = build_objectives({"point_info_nce": {}}, 16)
    module = PretrainModule(backbone, objectives, weights)
    opt, sched = build_optimizer(OptimConfig(), module.parameters())
    save_checkpoint(tmp_path / "checkpoint_7.pth",
                    Trainer(module, opt, sched, iter(()), 7, 1, torch.device("cpu")), {})
    model = _fresh_model()
    report = load_pretrained(model, tmp_path / "checkpoint_7.pth")
    assert "mink_ssl.checkpoint/1, entry 'backbone'" in report.source
    torch.testing.assert_close(model.backbone.state_dict(), backbone.state_dict(), rtol=0, atol=0)
    # and so do a fine-tuned segmentation model and an untagged {"state_dict": ...}
    save_segmentation_model(model, tmp_path / "model.pth", classes=CLASSES, voxel_size=0.05,
                            features="rgb")
    torch.save({"state_dict": saved, "iteration": 3}, tmp_path / "untagged.pth")
    for name, expected in (("untagged.pth", saved), ("model.pth", backbone.state_dict())):
        load_pretrained(model, tmp_path / name)
        torch.testing.assert_close(model.backbone.state_dict(), expected, rtol=0, atol=0)


def test_pretrained_loading_is_strict_and_loud(tmp_path):
    saved = _pretrained_backbone(tmp_path / "backbone.pth")
    model = _fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="nope.pth do not exist.*pretrained=null"):
        load_pretrained(model, tmp_path / "nope.pth")
    # keys saved from a DDP wrapper ("module.") or from the task model ("backbone."): the
    # backbone is found by its stem, the prefix removed and said
    torch.save({"state_dict": {"module." + k: v for k, v in saved.items()}}, tmp_path / "ddp.pth")
    report = load_pretrained(_fresh_model(), tmp_path / "ddp.pth")
    assert "prefix 'module.' removed" in report.summary() and len(report.loaded) == len(saved)
    state = torch.load(tmp_path / "backbone.pth", weights_only=True)
    del state["checksum"]  # edited below: a file without a checksum, as before checksums
    state["state_dict"] = {"backbone." + k: v for k, v in saved.items()}
    torch.save(state, tmp_path / "prefixed.pth")
    assert "prefix 'backbone.'" in load_pretrained(_fresh_model(), tmp_path / "prefixed.pth").source
    # a prefix on some keys only: those keys are outside the backbone, and missing from it
    mixed = {("module." + k if k.startswith("block8") else k): v for k, v in saved.items()}
    torch.save(mixed, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"missing from the file.*backbone\.block8\.0"):
        load_pretrained(model, tmp_path / "mixed.pth")
    # a backbone tensor missing from the file: only the head may be missing
    state["state_dict"] = {k: v for k, v in saved.items() if k != "final.bias"}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"1 model key\(s\) missing from the file \(only "
                                         r"\['head\.'\] may be\): backbone\.final\.bias"):
        load_pretrained(model, tmp_path / "partial.pth")
    # another architecture, recorded in the file / visible only in the shapes
    torch.manual_seed(0)
    save_model(build_model("Res16UNet14A", in_channels=3, out_channels=32), tmp_path / "c32.pth")
    with pytest.raises(ValueError, match="out_channels: file 32 vs model 16"):
        load_pretrained(model, tmp_path / "c32.pth")
    bare = dict(saved, **{"final.bias": torch.zeros(1, 5)})
    torch.save(bare, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match=r"shape mismatch.*final\.bias \(1, 5\) vs \(1, 16\)"):
        load_pretrained(model, tmp_path / "bare.pth")
    torch.save({"format": "something/2"}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="format 'something/2'.*mink_ssl.checkpoint/1"):
        load_pretrained(model, tmp_path / "other.pth")
    for k, v in model.state_dict().items():  # nothing was loaded partially
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------ engine and CLI

@pytest.mark.slow
def test_resumed_run_ends_like_an_uninterrupted_one(rooms, tmp_path):
    cfg = tiny_config(rooms, optim=SegOptimConfig(), data=replace(
        tiny_config(rooms).data, eval_split=None, labelled_points=200))
    assert finetune_seg(cfg, tmp_path / "straight", print_fn=lambda s: None) == {}
    run = tmp_path / "cut"
    finetune_seg(cfg, run, print_fn=lambda s: None)
    (run / "checkpoint_4.pth").unlink()  # as if killed after checkpoint_2
    (run / "model.pth").unlink()
    logs = []
    finetune_seg(replace(cfg, resume="auto"), run, print_fn=logs.append)
    assert any("resumed from" in s and "checkpoint_2.pth at iteration 2" in s for s in logs)
    a = torch.load(tmp_path / "straight" / "checkpoint_4.pth", weights_only=True)
    b = torch.load(run / "checkpoint_4.pth", weights_only=True)
    assert a["state"] == b["state"] == {"iteration": 4, "samples": 8}
    assert b["scheduler"]["last_epoch"] == 4  # the released PolyLR: (1 - t / (T + 1))^0.9
    assert b["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * (1 - 4 / 5) ** 0.9)
    for part in ("backbone", "head_state"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(cfg.seed)
    init = build_seg_model(cfg.model, 3, 4).state_dict()  # the run really trained
    # the classifier is the backbone's rebuilt final layer (final_layer="rebuild")
    assert a["head_state"] == {} and a["backbone"]["final.kernel"].shape == (96, 4)
    assert not torch.allclose(a["backbone"]["final.kernel"], init["backbone.final.kernel"])

    with pytest.raises(ValueError, match=r"evaluation split 'test' is empty; choose "
                                         r"data.eval_split from \['train', 'val'\]"):
        finetune_seg(replace(cfg, data=replace(cfg.data, eval_split="test")), tmp_path / "e",
                     print_fn=lambda s: None)


def test_eval_hook_keeps_the_best_model_and_a_resumed_run_keeps_an_earlier_best(tmp_path):
    from types import SimpleNamespace

    from mink_ssl.engine.hooks import EvalHook
    from mink_ssl.engine.trainer import TrainState

    scores = {1: 0.3, 2: 0.5, 3: 0.5, 4: 0.4, 5: 0.45, 6: 0.6}  # 3: a tie is no better
    saved, logs = [], []

    def run(first: int, last: int) -> EvalHook:
        trainer = SimpleNamespace(state=TrainState(iteration=first - 1), max_iterations=9)
        hook = EvalHook(lambda: {"mAcc": 0.9, "mIoU": scores[trainer.state.iteration]}, 1,
                        tmp_path, True, logs.append, key="mIoU",
                        save_best=lambda d: saved.append((trainer.state.iteration, d)))
        hook.before_train(trainer)
        for it in range(first, last + 1):
            trainer.state.iteration = it
            own = hook.step_metrics(trainer)  # the evaluation: the step's metrics
            assert own == {"stat_val_macc": 0.9, "stat_val_miou": scores[it]}
        return hook

    hook = run(1, 4)
    assert saved == [(1, tmp_path / "best"), (2, tmp_path / "best")]
    assert hook.best == {"iteration": 2, "mAcc": 0.9, "mIoU": 0.5}
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best == {"iteration": 2, "metric": "mIoU", "mAcc": 0.9, "mIoU": 0.5}
    assert "iteration 2: best mIoU so far 50.0 (was 30.0 at iteration 1), saved to" in logs[3]
    saved.clear()
    hook = run(5, 6)  # resumed at iteration 4: 0.45 does not replace the best of iteration 2
    assert saved == [(6, tmp_path / "best")] and hook.best["iteration"] == 6
    assert json.loads((tmp_path / "best" / "best.json").read_text())["iteration"] == 6
    with pytest.raises(ValueError, match=r"'mAP@0.25' is not among .*\['mAcc', 'mIoU'\]"):
        EvalHook(lambda: {"mAcc": 0.9, "mIoU": 0.1}, 1, tmp_path / "x", True, key="mAP@0.25"
                 ).step_metrics(SimpleNamespace(state=TrainState(iteration=1), max_iterations=9))
    with pytest.raises(ValueError, match="needs key="):
        EvalHook(lambda: {}, 1, tmp_path, True, save_best=lambda d: None)


@pytest.fixture(scope="module")
def evaluated_run(rooms, tmp_path_factory):
    """A short run with a periodic evaluation after each of iterations 1-3 and a final
    evaluation over two rotations."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    cfg = tiny_config(rooms, eval=SegEvalConfig(every=1, rotations=2, ply_scenes=1))
    logs = []
    results = finetune_seg(cfg, run, print_fn=logs.append)
    return cfg, run, results, logs


@pytest.mark.slow
def test_the_best_periodic_evaluation_keeps_its_model(rooms, evaluated_run, tmp_path):
    from mink_ssl.models.heads import load_segmentation_model

    cfg, run, results, logs = evaluated_run
    history = json.loads((run / "val_history.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2, 3]
    top = max(h["mIoU"] for h in history)
    first = next(h for h in history if h["mIoU"] == top)  # a later tie is not better
    best = json.loads((run / "best" / "best.json").read_text())
    assert best == {"metric": "mIoU", **first}
    assert results["best"] == {"iteration": first["iteration"], "mIoU": top}
    assert json.loads((run / "results.json").read_text())["best"] == results["best"]
    assert any(f"iteration {first['iteration']}: best mIoU so far" in s for s in logs)
    model, meta = load_segmentation_model(run / "best" / "model.pth")
    assert meta["classes"] == CLASSES and meta["voxel_size"] == VOXEL
    # the model kept is the one evaluated then: it scores the same again (one rotation)
    again = finetune_seg(replace(cfg, evaluate_only=str(run / "best" / "model.pth"),
                                 eval=replace(cfg.eval, rotations=1)),
                         tmp_path / "again", print_fn=lambda s: None)
    assert again["miou"] == pytest.approx(top, abs=1e-12)
    assert again["iterations"] == first["iteration"]  # from best.json next to it

    off = tiny_config(rooms, max_iterations=2,
                      eval=SegEvalConfig(every=1, ply_scenes=0, keep_best=False))
    results = finetune_seg(off, tmp_path / "off", print_fn=lambda s: None)
    assert not (tmp_path / "off" / "best").exists()
    assert results["best"]["iteration"] == 1  # still reported: the history's best
    results = finetune_seg(replace(off, eval=replace(off.eval, every=0)), tmp_path / "none",
                           print_fn=lambda s: None)
    assert results["best"] is None and not (tmp_path / "none" / "best").exists()


def test_evaluate_only_scores_a_saved_model_like_its_run(evaluated_run, tmp_path):
    cfg, run, results, _ = evaluated_run
    only = replace(cfg, evaluate_only=str(run / "model.pth"), max_iterations=10 ** 6)
    logs = []
    got = finetune_seg(only, tmp_path / "model", print_fn=logs.append)
    assert got["miou"] == pytest.approx(results["miou"], abs=1e-12) and got["rotations"] == 2
    assert got["evaluated"] == str(run / "model.pth") and got["iterations"] is None
    assert any("finetune-seg: evaluating" in s for s in logs)
    assert not any("iteration" in s and "val mIoU" in s for s in logs)  # no training
    written = json.loads((tmp_path / "model" / "results.json").read_text())
    assert written["miou"] == got["miou"] and written["evaluated"] == got["evaluated"]
    assert (tmp_path / "model" / "results.md").is_file()
    assert (tmp_path / "model" / "predictions" / "Area_5__room_0.ply").is_file()
    assert not list((tmp_path / "model").glob("checkpoint_*.pth"))
    # the final checkpoint holds the same model
    got = finetune_seg(replace(only, evaluate_only=str(run / "checkpoint_4.pth")),
                       tmp_path / "ckpt", print_fn=lambda s: None)
    assert got["miou"] == pytest.approx(results["miou"], abs=1e-12) and got["iterations"] == 4


def test_evaluate_only_rejects_what_does_not_fit(rooms, evaluated_run, tmp_path):
    from mink_ssl.models.heads import (SegmentationModel, load_segmentation_model,
                                       save_segmentation_model)

    cfg, run, _, _ = evaluated_run
    only = replace(cfg, evaluate_only=str(run / "model.pth"))

    def fails(c, match, error=ValueError):
        with pytest.raises(error, match=match):
            finetune_seg(c, tmp_path / "e", print_fn=lambda s: None)

    fails(replace(only, data=replace(cfg.data, eval_split=None)),
          r"data.eval_split is null; set data.eval_split=<split> \(splits of .*: "
          r"\['train', 'val'\]\)")
    fails(replace(only, resume="auto", pretrained="b.pth"),
          r"pretrained=b.pth and resume=auto cannot go with it; set pretrained=null and "
          r"resume=null")
    fails(replace(only, resume="auto"), r"resume=auto cannot go with it; set resume=null \(")
    fails(replace(only, evaluate_only=str(tmp_path / "no.pth")), "no.pth does not exist",
          FileNotFoundError)
    model, _ = load_segmentation_model(run / "model.pth")
    for name, kw, match in (
            ("classes", dict(classes=["floor", "wall", "chair", "sofa"], voxel_size=VOXEL,
                             features="rgb"),
             r"predicts \['floor', 'wall', 'chair', 'sofa'\] but .* has \['floor', 'wall', "
             r"'table', 'cabinet'\]"),
            ("voxel", dict(classes=CLASSES, voxel_size=0.05, features="rgb"),
             r"fine-tuned on 0.05 m voxels but the data config gives 0.25 m .*set "
             r"data.voxel_size=0.05"),
            ("features", dict(classes=CLASSES, voxel_size=VOXEL, features="ones"),
             "fine-tuned on 'ones' features but data.features='rgb'; set data.features=ones")):
        save_segmentation_model(model, tmp_path / name / "model.pth", **kw)
        fails(replace(only, evaluate_only=str(tmp_path / name / "model.pth")), match)
    # a model fine-tuned on 1-channel ones (written before every constant mode had 3 channels)
    one = SegmentationModel(build_model("Res16UNet14A", in_channels=1, out_channels=4), 4)
    save_segmentation_model(one, tmp_path / "ones1" / "model.pth", classes=CLASSES,
                            voxel_size=VOXEL, features="ones")
    fails(replace(only, evaluate_only=str(tmp_path / "ones1" / "model.pth"),
                  data=replace(cfg.data, features="ones")),
          r"takes 1-channel input but data.features='ones' gives 3 channels; .*ones1")
    torch.save({"format": "mink_ssl.model/1"}, tmp_path / "backbone.pth")
    fails(replace(only, evaluate_only=str(tmp_path / "backbone.pth")),
          r"format 'mink_ssl.model/1', expected a segmentation model .*or a segmentation "
          r"checkpoint")


def compose(*overrides):
    return compose_config("finetune_seg", *overrides)


def test_configs_follow_the_protocol_and_reject_bad_keys():
    from omegaconf import OmegaConf

    s3dis = OmegaConf.to_object(compose("data.root=/x"))
    assert isinstance(s3dis, FinetuneSegConfig) and s3dis.model.name == "Res16UNet34C"
    assert (s3dis.optim.name, s3dis.optim.lr, s3dis.optim.momentum, s3dis.optim.weight_decay,
            s3dis.optim.scheduler, s3dis.optim.poly_power) == ("sgd", 0.1, 0.9, 1e-4, "poly", 0.9)
    # the voxel size is set in one place, the prep's manifest (null: the manifest's)
    assert s3dis.data.voxel_size is None and s3dis.batch_size == 6
    assert s3dis.max_iterations == 10000 and not s3dis.model.normalize_output
    scannet = OmegaConf.to_object(compose("data.root=/x", "finetune=scannet", "batch_size=2"))
    assert scannet.data.voxel_size is None and scannet.max_iterations == 20000
    assert scannet.batch_size == 2 and scannet.data.augmentation.elastic == [[0.2, 0.4], [0.8, 1.6]]
    synthia = OmegaConf.to_object(compose("data.root=/x", "finetune=synthia"))
    assert synthia.data.voxel_size is None and synthia.batch_size == 9
    from data_prep.segmentation import s3dis as s3dis_prep, scannet_seg, synthia as synthia_prep
    assert (s3dis_prep.VOXEL_SIZE, scannet_seg.VOXEL_SIZE, synthia_prep.VOXEL_SIZE) == (
        0.05, 0.02, 0.15)  # the released recipes' voxels, written into each manifest
    assert synthia.data.up_axis == "z"  # prep rotates Synthia to z-up
    assert s3dis.data.eval_split == "test"  # Area 5
    assert s3dis.eval.keep_best and s3dis.evaluate_only is None
    only = OmegaConf.to_object(compose("data.root=/x", "evaluate_only=/runs/seg/best/model.pth"))
    assert only.evaluate_only == "/runs/seg/best/model.pth"
    with pytest.raises(Exception, match="lrr"):
        compose("data.root=/x", "optim.lrr=0.1")
    with pytest.raises(Exception, match="(?s)Available options in 'finetune'.*s3dis"):
        compose("data.root=/x", "finetune=s3dsi")


@pytest.mark.slow
def test_cli_fine_tunes_from_a_pretrained_backbone_end_to_end(rooms, tmp_path):
    """`python -m mink_ssl.cli.finetune_seg` from a pretrained backbone.pth: a short run on the
    synthetic rooms reaches an mIoU far above chance (about 0.15: four classes, walls hold
    half of the points) and writes config, checkpoints, model, results, plot and PLY."""
    from plyfile import PlyData

    from mink_ssl.models.heads import load_segmentation_model

    _pretrained_backbone(tmp_path / "backbone.pth")
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "mink_ssl.cli.finetune_seg", f"data.root={rooms}",
         "model=res16unet14a", "model.out_channels=16", f"pretrained={tmp_path / 'backbone.pth'}",
         f"data.voxel_size={VOXEL}", "data.num_workers=0", "data.eval_split=val",
         "optim.name=adam", "optim.lr=3e-3", "max_iterations=20", "batch_size=2",
         "checkpoint_every=10", "eval.every=10",
         "eval.rotations=2", "eval.ply_scenes=1", "device=cpu", "progress=false",
         f"hydra.run.dir={run}"], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"pretrained: .*backbone.pth \(mink_ssl.model/1, entry 'state_dict'\): "
                     r"loaded \d+/\d+ tensors", done.stdout)
    assert "iteration 10: val mIoU" in done.stdout and "finetune-seg: 20 iterations" in done.stdout

    assert json.loads((run / "config.json").read_text())["pretrained"].endswith("backbone.pth")
    assert sorted(p.name for p in run.glob("checkpoint_*.pth")) == ["checkpoint_10.pth",
                                                                   "checkpoint_20.pth"]
    assert [h["iteration"] for h in json.loads((run / "val_history.json").read_text())] == [10]
    results = json.loads((run / "results.json").read_text())
    assert results["split"] == "val" and results["rotations"] == 2
    assert results["best"]["iteration"] == 10 and (run / "best" / "model.pth").is_file()
    # all but the rebuilt final layer (kernel, bias), which the loader drops from the file
    assert results["pretrained_loaded_fraction"] == pytest.approx(192 / 194)
    assert "dropped from the file (task layer rebuilt): final.kernel, final.bias" in done.stdout
    assert results["miou"] > 0.5, results  # chance: about 0.15
    # the reference protocol: one vote per voxel whose points share a label
    from mink_ssl.tasks.segmentation.inference import reference_voxels

    manifest = json.loads((rooms / "manifest.json").read_text())
    val = SegmentationDataset(rooms, "val", voxel_size=VOXEL)
    voxels = sum(len(reference_voxels(val.load(n)[0], VOXEL).index) for n in val.scenes)
    points = sum(manifest["scenes"][n]["points"] for n in val.scenes)
    assert results["protocol"] == "voxels" and results["oacc"] > 0.8
    assert 1000 < results["points"] <= voxels < points  # counted voxels, unmixed ones only
    assert "| wall |" in (run / "results.md").read_text()
    assert (run / "results_iou.png").stat().st_size > 5000
    ply = PlyData.read(str(run / "predictions" / "Area_5__room_0.ply"))["vertex"]
    room = val.load("Area_5/room_0")[0]
    assert len(ply["pred"]) == len(reference_voxels(room, VOXEL).index)  # one vertex a voxel
    assert set(np.unique(ply["label"])) == {-1, 0, 1, 2, 3}
    model, meta = load_segmentation_model(run / "model.pth")
    assert meta["classes"] == CLASSES and meta["voxel_size"] == VOXEL
    final = torch.load(run / "checkpoint_20.pth", weights_only=True)
    torch.testing.assert_close(model.head.state_dict(), final["head_state"], rtol=0, atol=0)


def test_cli_errors_exit_2_naming_the_problem(rooms, tmp_path, monkeypatch, capsys):
    from mink_ssl.cli.finetune_seg import main

    for args, message in (
            (["model=res16unet99"], "unknown model 'res16unet99'; available: res16unet14a"),
            ([f"data.root={rooms}", "model=res16unet14a", f"pretrained={tmp_path / 'no.pth'}",
              "device=cpu", "data.eval_split=val", f"hydra.run.dir={tmp_path / 'run'}"],
             f"pretrained weights {tmp_path / 'no.pth'} do not exist")):
        monkeypatch.setattr(sys, "argv", ["mink-ssl-finetune-seg", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
