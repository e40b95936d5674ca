"""VoteNet-style detection: the dataset on prepared synthetic ScanNet scenes (contract, vote
targets, augmentations), box coding, the head and VoteNet's loss terms (on a real network and
by hand), detection (NMS, per-class proposals), strict pretrained loading, the schedule,
configs, exact resume, and the CLI end to end learning synthetic rooms far above an untrained
model."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_config, pretrained_backbone as _pretrained_backbone
import torch

from data_prep.detection import scannet_det
from data_prep.synthetic import generate_scenes
from mink_ssl.data.detection import (DetAugmentation, DetectionDataset, collate_detection,
                                     points_in_boxes, transform_boxes, vote_targets)
from mink_ssl.engine.config import ModelConfig
from mink_ssl.engine.hooks import BNMomentumHook
from mink_ssl.models import build_model
from mink_ssl.models.pretrained import load_pretrained
from mink_ssl.models.votenet import (VoteNetOutput, angle_to_class, build_votenet,
                                     decode_boxes, detect, encode_boxes, select_seeds)
from mink_ssl.tasks.detection import (DetDataConfig, DetEvalConfig, DetHeadConfig, DetOptimConfig,
                                      FinetuneDetConfig, build_det_model, build_det_optimizer,
                                      evaluate_detector, finetune_det)
from mink_ssl.tasks.detection.loss import votenet_loss

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TSV = "scannetv2-labels.combined.tsv"
VOXEL = 0.25  # coarse, so that CPU training is quick
NOT_DETECTED = ("chair", "desk")  # mapped to NYU40 'otherprop': clutter without boxes


# ------------------------------------------------------------------------ synthetic scenes

@pytest.fixture(scope="module")
def det_root(tmp_path_factory):
    """Two generated ScanNet scans prepared by `scannet-det` (train), plus one in val. The
    label map leaves chairs and desks (desks are shaped like tables) without boxes, so the
    rooms hold a few box classes (cabinet, bed, sofa, table, bookshelf) and some clutter."""
    base = tmp_path_factory.mktemp("det")
    raw = base / "scans"
    generate_scenes(raw, 3, seed=100, n_frames=1, image_size=(40, 30), workers=1, n_objects=8)
    lines = (raw / TSV).read_text().splitlines()
    head = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    for r in rows:
        if r[head.index("raw_category")] in NOT_DETECTED:
            r[head.index("nyu40id")] = "40"
    (raw / TSV).write_text("\n".join([lines[0]] + ["\t".join(r) for r in rows]) + "\n")
    splits = base / "splits"
    splits.mkdir()
    (splits / "scannetv2_train.txt").write_text("scene0000_00\nscene0001_00\n")
    (splits / "scannetv2_val.txt").write_text("scene0002_00\n")
    scannet_det.run(raw, base / "prep", raw / TSV, splits_dir=splits, progress=False,
                    log=lambda s: None)
    return base / "prep"


def tiny_config(root, **kw) -> FinetuneDetConfig:
    cfg = FinetuneDetConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16, normalize_output=False),
        data=DetDataConfig(root=str(root), voxel_size=VOXEL, num_points=None, num_workers=0),
        head=DetHeadConfig(num_heading_bins=1, num_seeds=64, num_proposals=32),
        eval=DetEvalConfig(every=0), epochs=2, batch_size=1, device="cpu", checkpoint_every=2,
        log_every=1, progress=False)
    return replace(cfg, **kw)


# --------------------------------------------------------------------------------- dataset

def test_the_voxel_size_comes_from_the_prepared_manifest(det_root, tmp_path):
    import json
    import shutil

    from data_prep.detection.writer import VOXEL_SIZE

    manifest = json.loads((det_root / "manifest.json").read_text())
    assert manifest["voxel_size"] == VOXEL_SIZE == 0.025  # written by the prep
    assert DetectionDataset(det_root, "train").voxel_size == 0.025
    assert DetectionDataset(det_root, "train", voxel_size=0.05).voxel_size == 0.05
    old = tmp_path / "old"  # a manifest from before the prep recorded it
    shutil.copytree(det_root, old)
    del manifest["voxel_size"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="names no voxel_size.*data.voxel_size=0.025"):
        DetectionDataset(old, "train")
    assert DetectionDataset(old, "train", voxel_size=0.025).voxel_size == 0.025


def test_dataset_reads_the_contract_and_checks_it(det_root, tmp_path):
    ds = DetectionDataset(det_root, "train", voxel_size=VOXEL, axis_aligned=True)
    assert len(ds) == 2 and len(ds.classes) == 18 and ds.classes[1] == "bed"
    s = ds[(0, 1)]
    m, k = len(s.coords), len(s.boxes)
    assert s.name == "scene0001_00" and s.coords.dtype == torch.int32 and s.coords.shape == (m, 3)
    assert s.feats.shape == (m, 3) and s.feats.abs().max() <= 0.5  # rgb
    assert s.points.shape == (m, 3) and s.votes.shape == (m, 1, 3) and s.vote_mask.shape == (m,)
    assert 0.05 < s.vote_mask.float().mean() < 0.6 and (s.votes[~s.vote_mask] == 0).all()
    assert k >= 3 and s.boxes.shape == (k, 7) and (s.boxes[:, 6] == 0).all()
    assert set(s.box_labels.tolist()) <= {0, 1, 3, 4, 7}  # chairs and desks have no boxes
    # without augmentation a voxel's point is one of the scene's points, on its voxel
    d = ds.load(s.name)
    assert np.isin(s.points[:, 0].numpy(), d["coords"][:, 0]).all()
    assert torch.equal(s.coords, torch.floor(s.points / VOXEL).int())
    b = collate_detection([ds[0], s])
    assert b.coords.shape == (len(ds[0].coords) + m, 4)
    assert b.coords[:, 0].unique().tolist() == [0, 1]
    assert b.box_batch.tolist() == [0] * len(ds[0].boxes) + [1] * k and b.names[1] == s.name
    ones = DetectionDataset(det_root, "train", voxel_size=VOXEL, features="ones")[0]
    assert ones.feats.shape == (len(ones.coords), 3) and (ones.feats == 1).all()  # row 7
    few = DetectionDataset(det_root, "train", voxel_size=0.05, num_points=500)[0]
    full = DetectionDataset(det_root, "train", voxel_size=0.05)[0]
    assert len(few.coords) <= 500 < len(full.coords)

    # mean sizes: per class over the split's boxes; a class without boxes gets the overall mean
    boxes = np.concatenate([ds.load(n)["boxes"] for n in ds.scenes])
    labels = np.concatenate([ds.load(n)["box_labels"] for n in ds.scenes])
    means = ds.mean_sizes()
    assert means.shape == (18, 3)
    for c in range(18):
        want = boxes[labels == c, 3:6].mean(0) if (labels == c).any() else boxes[:, 3:6].mean(0)
        np.testing.assert_allclose(means[c], want, rtol=1e-5)

    manifest = json.loads((det_root / "manifest.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(det_root, bad)
    (bad / "manifest.json").write_text(json.dumps({**manifest, "schema": "mink_ssl.seg_scenes/1"}))
    with pytest.raises(ValueError, match="schema 'mink_ssl.seg_scenes/1'.*mink_ssl.det_scenes/1"):
        DetectionDataset(bad)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"split 'test' .*available: \['train', 'val'\]"):
        DetectionDataset(bad, "test")
    z = dict(np.load(bad / "scenes" / "scene0000_00.npz"))
    z["boxes"][0, 6] = 0.3
    np.savez(bad / "scenes" / "scene0000_00.npz", **z)
    with pytest.raises(ValueError, match="headings up to 0.300 rad.*num_heading_bins"):
        DetectionDataset(bad, axis_aligned=True)[0]
    z["box_labels"][0] = 18
    np.savez(bad / "scenes" / "scene0000_00.npz", **z)
    with pytest.raises(ValueError, match=r"box_labels \[18\] are outside \[0, 18\)"):
        DetectionDataset(bad)[0]
    (bad / "scenes" / "scene0000_00.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"scene0000_00.npz \(scene 'scene0000_00'\)"):
        DetectionDataset(bad)[0]


def test_vote_targets_on_a_hand_case():
    # box A: axis-aligned 2 x 2 x 1 at the origin; box B: 1 x 1 x 1 at x = 1, turned 45 deg
    boxes = np.array([[0, 0, 0.5, 2, 2, 1, 0], [1, 0, 0.5, 1, 1, 1, np.pi / 4]], np.float32)
    points = np.array([[0.9, 0, 0.5], [-0.5, 0.5, 0.5], [5, 5, 5], [1.4, 0.2, 0.5]], np.float32)
    instance = np.array([0, 0, -1, 1])
    votes, mask = vote_targets(points, instance, boxes)
    assert mask.tolist() == [True, True, False, True] and votes.shape == (4, 1, 3)
    np.testing.assert_allclose(votes[:, 0], [[-0.9, 0, 0], [0.5, -0.5, 0], [0, 0, 0],
                                             [-0.4, -0.2, 0]], atol=1e-6)
    # up to three votes: the point's own box first, then the other boxes it lies in; short
    # rows repeat the first vote. (1.4, 0.2) is in B only: in B's frame it is at
    # (0.42, -0.14), but outside A (x > 1).
    votes, _ = vote_targets(points, instance, boxes, max_votes=3)
    np.testing.assert_allclose(votes[0], [[-0.9, 0, 0], [0.1, 0, 0], [-0.9, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(votes[1], [[0.5, -0.5, 0]] * 3, atol=1e-6)
    np.testing.assert_allclose(votes[3], [[-0.4, -0.2, 0]] * 3, atol=1e-6)
    inside = points_in_boxes(points, boxes)
    assert inside.tolist() == [[True, True], [True, False], [False, False], [False, True]]
    # along B's own axes: 0.45 along dx (half extent 0.5) is in, 0.55 is out
    u = np.array([np.cos(np.pi / 4), np.sin(np.pi / 4), 0])
    assert points_in_boxes(np.array([[1, 0, 0.5] + 0.45 * u, [1, 0, 0.5] + 0.55 * u]),
                           boxes[1:]).ravel().tolist() == [True, False]


def test_augmentations_move_points_boxes_and_votes_together(det_root):
    box = np.array([[1, 2, 0.5, 2, 1, 1, 0.3]], np.float32)
    # 90 degrees: centre (1, 2) -> (-2, 1); an axis-aligned box swaps its extents
    np.testing.assert_allclose(transform_boxes(box, False, False, np.pi / 2, 1.0, True),
                               [[-2, 1, 0.5, 1, 2, 1, 0]], atol=1e-6)
    # mirror x first: (1, 2) -> (-1, 2) -> (-2, -1); oriented: heading pi - h, then + theta
    np.testing.assert_allclose(transform_boxes(box, True, False, np.pi / 2, 1.1, False),
                               [[-2.2, -1.1, 0.55, 2.2, 1.1, 1.1, np.pi - 0.3 + np.pi / 2
                                 - 2 * np.pi]], atol=1e-5)
    np.testing.assert_allclose(transform_boxes(box, False, True, 0.0, 1.0, False)[0, [1, 6]],
                               [-2, -0.3], atol=1e-6)
    # axis-aligned after 30 degrees: the box around the rotated one
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    np.testing.assert_allclose(transform_boxes(box, False, False, np.pi / 6, 1.0, True)[0, 3:5],
                               [2 * c + s, 2 * s + c], atol=1e-6)

    aug = DetAugmentation(flip_x=True, flip_y=True, rotation_deg=30, scale=(0.85, 1.15))
    for axis_aligned in (False, True):
        ds = DetectionDataset(det_root, "train", voxel_size=VOXEL, augmentation=aug,
                              axis_aligned=axis_aligned)
        plain = DetectionDataset(det_root, "train", voxel_size=VOXEL)[(0, 0)]
        s = ds[(3, 0)]
        assert not torch.allclose(s.boxes, plain.boxes)  # something moved
        assert torch.equal(s.coords, ds[(3, 0)].coords)  # a pure function of (epoch, index)
        assert not torch.equal(s.coords, ds[(4, 0)].coords)
        # every voted point still points at the centre of a box that contains it
        m = s.vote_mask
        target = s.points[m] + s.votes[m, 0]  # (n, 3)
        d = (target[:, None, :] - s.boxes[None, :, :3]).norm(dim=2)  # (n, K)
        near = d.argmin(1)
        assert d.min(1).values.max() < 1e-4
        grown = s.boxes.numpy().copy()
        grown[:, 3:6] += 1e-3
        inside = points_in_boxes(s.points[m].numpy(), grown)
        assert inside[np.arange(len(near)), near.numpy()].all()
        if axis_aligned:
            assert (s.boxes[:, 6] == 0).all()
        else:  # volumes scale with s^3 for one scale factor
            ratio = (s.boxes[:, 3:6].prod(1) / plain.boxes[:, 3:6].prod(1)) ** (1 / 3)
            assert 0.85 - 1e-4 < float(ratio[0]) < 1.15 + 1e-4
            assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-4)
    with pytest.raises(ValueError, match=r"scale must be a range .* got \(1.1, 0.9\)"):
        DetAugmentation(scale=(1.1, 0.9))


# ------------------------------------------------------------------------------ box coding

def test_box_coding_round_trips():
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(5, 3, generator=g) + 0.3
    labels = torch.randint(0, 5, (200,), generator=g)
    boxes = torch.cat([torch.randn(200, 3, generator=g), torch.rand(200, 3, generator=g) + 0.1,
                       (torch.rand(200, 1, generator=g) * 2 - 1) * math.pi], 1)
    t = encode_boxes(boxes, labels, mean, 12)
    assert t["heading_class"].min() >= 0 and t["heading_class"].max() <= 11
    assert t["heading_residual"].abs().max() <= math.pi / 12 + 1e-6
    assert torch.equal(t["size_class"], labels)
    out = decode_boxes(boxes[:, :3], t["heading_class"], t["heading_residual"], t["size_class"],
                       t["size_residual"], mean, 12)
    torch.testing.assert_close(out[:, :6], boxes[:, :6])
    dh = torch.remainder(out[:, 6] - boxes[:, 6] + math.pi, 2 * math.pi) - math.pi
    assert dh.abs().max() < 1e-5
    # bins of 30 degrees centred on multiples of 30: 15 degrees opens bin 1, 345 is bin 0
    cls, res = angle_to_class(torch.tensor([0.0, math.pi / 12 + 1e-4, -math.pi / 12 + 1e-4,
                                            math.pi]), 12)
    assert cls.tolist() == [0, 1, 0, 6]
    torch.testing.assert_close(res, torch.tensor([0.0, -math.pi / 12 + 1e-4, -math.pi / 12 + 1e-4,
                                                  0.0]), atol=1e-5, rtol=0)
    # one heading bin: axis-aligned, heading targets 0, decoded boxes without a heading column
    flat = boxes.clone()
    flat[:, 6] = 0
    t1 = encode_boxes(flat, labels, mean, 1)
    assert (t1["heading_class"] == 0).all() and (t1["heading_residual"] == 0).all()
    out1 = decode_boxes(flat[:, :3], t1["heading_class"], t1["heading_residual"],
                        t1["size_class"], t1["size_residual"], mean, 1)
    torch.testing.assert_close(out1, flat[:, :6])


# ------------------------------------------------------------------------- head and losses

def test_head_shapes_loss_terms_and_gradients_on_a_real_batch(det_root):
    ds = DetectionDataset(det_root, "train", voxel_size=VOXEL)
    b = collate_detection([ds[0], ds[1]])
    torch.manual_seed(0)
    # Kaiming init: with this seed MinkowskiEngine's default init leaves no proposal near a box,
    # and every loss term needs a positive one
    model = build_votenet(build_model("Res16UNet14A", in_channels=3, out_channels=16,
                                      init="kaiming"), 18,
                          ds.mean_sizes(), num_heading_bins=12, num_seeds=64, num_proposals=32,
                          seed_projection=True)  # the earlier variant: every layer kind
    out = model(b.coords, b.feats, b.points)
    assert out.seed_rows.shape == (2, 64) and out.vote_xyz.shape == (2, 64, 3)
    assert (b.coords[out.seed_rows, 0].long() == torch.arange(2)[:, None]).all()  # own scene
    assert all(len(r.unique()) == 64 for r in out.seed_rows)
    torch.testing.assert_close(out.seed_xyz, b.points[out.seed_rows])
    assert out.proposal_xyz.shape == (2, 32, 3) and out.objectness.shape == (2, 32, 2)
    assert out.heading_scores.shape == out.heading_residuals.shape == (2, 32, 12)
    assert out.size_scores.shape == (2, 32, 18) and out.size_residuals.shape == (2, 32, 18, 3)
    assert out.sem_scores.shape == (2, 32, 18) and out.center.shape == (2, 32, 3)
    # every proposal centre is one of its scene's votes
    d = (out.proposal_xyz[:, :, None] - out.vote_xyz[:, None]).norm(dim=-1).min(-1).values
    assert d.max() < 1e-6

    losses = votenet_loss(out, votes=b.votes, vote_mask=b.vote_mask, boxes=b.boxes,
                          box_labels=b.box_labels, box_batch=b.box_batch,
                          mean_sizes=model.head.mean_sizes, num_heading_bins=12)
    for k in ("loss_vote", "loss_objectness", "loss_center", "loss_heading_cls",
              "loss_size_cls", "loss_sem_cls"):
        assert torch.isfinite(losses[k]) and losses[k] > 0, k
    box = (losses["loss_center"] + 0.1 * losses["loss_heading_cls"] + losses["loss_heading_reg"]
           + 0.1 * losses["loss_size_cls"] + losses["loss_size_reg"])
    torch.testing.assert_close(losses["loss"], 10 * (losses["loss_vote"] + 0.5 * losses[
        "loss_objectness"] + box + 0.1 * losses["loss_sem_cls"]))
    losses["loss"].backward()
    for name in ("backbone.conv0p1s1.kernel", "backbone.block4.0.conv1.kernel",
                 "backbone.final.kernel", "head.seed_proj.layers.0.weight",
                 "head.aggregation.layers.0.weight", "head.proposal_out.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def _hand_output(**kw) -> VoteNetOutput:
    """One scene, two seeds, two proposals, two classes, one heading bin."""
    base = dict(
        seed_rows=torch.tensor([[0, 1]]), seed_xyz=torch.tensor([[[0.0, 0, 0], [5, 5, 0]]]),
        vote_xyz=torch.tensor([[[0.5, 0, 0], [9, 9, 9]]]),
        proposal_xyz=torch.tensor([[[1.1, 0, 0], [3, 0, 0]]]),
        objectness=torch.zeros(1, 2, 2), center=torch.tensor([[[1.0, 0.2, 0], [3, 0, 0]]]),
        heading_scores=torch.zeros(1, 2, 1), heading_residuals=torch.tensor([[[0.5], [0.0]]]),
        size_scores=torch.zeros(1, 2, 2),
        size_residuals=torch.tensor([[[[0.1, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]]]),
        sem_scores=torch.tensor([[[0.0, math.log(3)], [0, 0]]]))
    base.update(kw)
    return VoteNetOutput(**base)


def test_loss_terms_match_a_hand_computation():
    targets = dict(votes=torch.tensor([[[1.0, 0, 0]], [[0, 0, 0]]]),
                   vote_mask=torch.tensor([True, False]),
                   boxes=torch.tensor([[1.0, 0, 0, 1, 1, 1, 0]]), box_labels=torch.tensor([0]),
                   box_batch=torch.tensor([0]), mean_sizes=torch.tensor([[1.0, 1, 1], [2, 2, 2]]),
                   num_heading_bins=1)
    losses = votenet_loss(_hand_output(), **targets)
    log2 = math.log(2)
    want = {"loss_vote": 0.5,  # seed 0 votes (0.5, 0, 0) for (1, 0, 0); seed 1 has no box
            # proposal 0 is 0.1 m from the centre (object), proposal 1 2 m (background):
            # weights 0.8 / 0.2 on log 2 each, averaged over the two counted proposals
            "loss_objectness": (0.8 + 0.2) * log2 / 2,
            "loss_center": 0.04 + 0.04,  # positive -> box and box -> nearest centre, squared
            "loss_heading_cls": 0.0, "loss_heading_reg": 0.5 * 0.5 ** 2,  # Huber of 0.5
            "loss_size_cls": log2, "loss_size_reg": 0.5 * 0.1 ** 2 / 3,  # size = mean: target 0
            "loss_sem_cls": math.log(4)}  # p(class 0) = 1 / (1 + 3)
    for k, v in want.items():
        assert float(losses[k]) == pytest.approx(v, abs=1e-5), k
    box = 0.08 + 0.125 + 0.1 * log2 + 0.005 / 3
    assert float(losses["loss"]) == pytest.approx(
        10 * (0.5 + 0.5 * want["loss_objectness"] + box + 0.1 * math.log(4)), abs=1e-4)
    assert float(losses["stat_pos_ratio"]) == 0.5 and float(losses["stat_neg_ratio"]) == 0.5
    # between 0.3 and 0.6 m a proposal is not counted; a perfect proposal costs nothing
    out = _hand_output(proposal_xyz=torch.tensor([[[1.0, 0, 0], [1.45, 0, 0]]]),
                       center=torch.tensor([[[1.0, 0, 0], [1.45, 0, 0]]]),
                       heading_residuals=torch.zeros(1, 2, 1), size_residuals=torch.zeros(
                           1, 2, 2, 3), objectness=torch.tensor([[[-20.0, 20], [0, 0]]]),
                       size_scores=torch.tensor([[[20.0, -20], [0, 0]]]),
                       sem_scores=torch.tensor([[[20.0, -20], [0, 0]]]),
                       vote_xyz=torch.tensor([[[1.0, 0, 0], [9, 9, 9]]]))
    perfect = votenet_loss(out, **targets)
    assert float(perfect["loss"]) < 1e-5
    # a batch without any box: every proposal is background, nothing else is counted
    empty = votenet_loss(_hand_output(), **{**targets, "boxes": torch.zeros(0, 7),
                                            "box_labels": torch.zeros(0, dtype=torch.long),
                                            "box_batch": torch.zeros(0, dtype=torch.long)})
    assert float(empty["loss_objectness"]) == pytest.approx(0.2 * log2, abs=1e-6)
    assert float(empty["loss_center"]) == 0 and float(empty["loss_sem_cls"]) == 0
    assert torch.isfinite(empty["loss"])


def test_detect_suppresses_overlaps_and_reports_every_class():
    out = _hand_output(
        objectness=torch.tensor([[[0.0, math.log(9)], [0.0, math.log(4)]]]),  # p 0.9, 0.8
        center=torch.tensor([[[1.0, 0, 0], [1.1, 0, 0]]]), size_residuals=torch.zeros(1, 2, 2, 3),
        heading_residuals=torch.zeros(1, 2, 1), sem_scores=torch.tensor([[[0.0, math.log(3)],
                                                                          [0.0, math.log(3)]]]))
    mean = torch.tensor([[1.0, 1, 1], [2, 2, 2]])
    det = detect(out, mean, 1)  # the second box overlaps the first (IoU 0.82): suppressed
    torch.testing.assert_close(det.boxes, torch.tensor([[1.0, 0, 0, 1, 1, 1]] * 2))
    assert det.labels.tolist() == [0, 1] and det.batch.tolist() == [0, 0]
    torch.testing.assert_close(det.scores, torch.tensor([0.25 * 0.9, 0.75 * 0.9]))
    one = detect(out, mean, 1, per_class_proposal=False)
    assert one.labels.tolist() == [1] and one.scores.tolist() == pytest.approx([0.9])
    apart = replace(out, center=torch.tensor([[[1.0, 0, 0], [4, 0, 0]]]))
    assert len(detect(apart, mean, 1, per_class_proposal=False).boxes) == 2
    low = replace(out, objectness=torch.tensor([[[0.0, math.log(9)], [0.0, -5.0]]]))
    assert len(detect(low, mean, 1, per_class_proposal=False).boxes) == 1  # p 0.007 < 0.05


def test_seeds_are_farthest_points_of_each_scene_and_small_scenes_repeat():
    from mink_ssl.ops import farthest_point_sampling

    g = torch.Generator().manual_seed(1)
    big = torch.unique(torch.randint(0, 30, (300, 3), generator=g), dim=0)  # > 16 voxels
    small = torch.tensor([[0, 0, 0], [5, 0, 0], [0, 5, 0]])
    coords = torch.cat([torch.cat([torch.ones(len(big), 1, dtype=torch.long), big], 1),
                        torch.cat([torch.zeros(3, 1, dtype=torch.long), small], 1)]).int()
    rows = select_seeds(coords, 16, 2)
    assert rows.shape == (2, 16)
    assert rows[0].tolist() == [len(big) + i % 3 for i in range(16)]  # all 3, cyclically
    assert torch.equal(rows[1], farthest_point_sampling(big.float(), 16)[0])
    with pytest.raises(ValueError, match="scene 1 of the batch has no voxel"):
        select_seeds(coords[coords[:, 0] == 0], 4, 2)


# --------------------------------------------------------------------- pretrained weights


def test_pretrained_weights_load_strictly_into_the_detector(tmp_path):
    saved = _pretrained_backbone(tmp_path / "backbone.pth")

    def fresh():
        torch.manual_seed(0)
        return build_det_model(ModelConfig(name="Res16UNet14A", out_channels=16),
                               DetHeadConfig(num_seeds=64, num_proposals=32, final_layer="keep"),
                               3, 4, np.ones((4, 3), np.float32))

    scratch = {k: v.clone() for k, v in fresh().state_dict().items()}
    model = fresh()
    report = load_pretrained(model, tmp_path / "backbone.pth")
    state = model.state_dict()
    for k, v in saved.items():
        torch.testing.assert_close(state["backbone." + k], v, rtol=0, atol=0)
    assert sum(not torch.equal(scratch["backbone." + k], v) for k, v in saved.items()) > 50
    head = [k for k in state if k.startswith("head.")]
    assert head and all(torch.equal(state[k], scratch[k]) for k in head)  # head: from scratch
    assert sorted(report.allowed_missing) == sorted(head)
    # keys with a wrapper prefix load, said; a missing backbone tensor: loud, nothing loaded
    torch.save({"state_dict": {"module." + k: v for k, v in saved.items()}}, tmp_path / "ddp.pth")
    assert "prefix 'module.' removed" in load_pretrained(fresh(), tmp_path / "ddp.pth").source
    model = fresh()
    torch.save({k: v for k, v in saved.items() if k != "final.bias"}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing from the file.*backbone\.final\.bias"):
        load_pretrained(model, tmp_path / "partial.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, scratch[k]), k


# ------------------------------------------------------------------- schedule and configs

def test_schedule_steps_by_epoch_and_bn_momentum_decays():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt, sched = build_det_optimizer(DetOptimConfig(lr_steps=[2, 4]), params, 2.5)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["weight_decay"] == 0
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 2.5 iterations per epoch: epoch 2 starts at iteration 5, epoch 4 at iteration 10
    assert lrs == pytest.approx([1e-3] * 5 + [1e-4] * 5 + [1e-5] * 2)
    with pytest.raises(ValueError, match="lr_steps are epochs"):
        build_det_optimizer(DetOptimConfig(lr_steps=[0.5]), params, 2.5)

    net = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
    hook = BNMomentumHook(net, 2.0, 0.5, 0.5, 20, 0.001)
    assert [hook.momentum(e) for e in (0, 19, 20, 40, 200)] == [0.5, 0.5, 0.25, 0.125, 0.001]

    class T:  # what the hook reads of a trainer
        class state:
            iteration = 80  # epoch 40

    hook.before_train(T)
    assert [m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)] == [0.125] * 2


def compose(*overrides):
    return compose_config("finetune_det", *overrides)


def test_configs_follow_votenet_and_pointcontrast_and_reject_bad_keys():
    from omegaconf import OmegaConf

    scannet = OmegaConf.to_object(compose("data.root=/x"))
    assert isinstance(scannet, FinetuneDetConfig) and scannet.model.name == "Res16UNet34C"
    o = scannet.optim
    assert (o.name, o.lr, o.weight_decay, o.lr_steps, o.lr_gamma) == ("adam", 1e-3, 0, [80, 120,
                                                                                     160], 0.1)
    assert (o.bn_momentum_init, o.bn_momentum_decay, o.bn_momentum_step) == (0.5, 0.5, 20)
    # the voxel size is set in one place, the prep's manifest (null: the manifest's)
    assert scannet.epochs == 180 and scannet.data.voxel_size is None
    assert scannet.data.num_points == 40000 and scannet.head.num_heading_bins == 1
    a = scannet.data.augmentation
    assert (a.flip_x, a.flip_y, a.rotation_deg, a.scale) == (True, True, 5.0, [1.0, 1.0])
    h = scannet.head
    assert (h.num_seeds, h.seed_channels, h.num_proposals, h.radius, h.group_size) == (
        1024, 256, 256, 0.3, 16)
    e = scannet.eval
    assert (e.conf_threshold, e.nms_iou, e.per_class_proposal, e.iou_thresholds) == (
        0.05, 0.25, True, [0.25, 0.5])
    sun = OmegaConf.to_object(compose("data.root=/x", "detection=sunrgbd", "batch_size=8"))
    a = sun.data.augmentation
    assert (a.flip_x, a.flip_y, a.rotation_deg, a.scale) == (True, False, 30.0, [0.85, 1.15])
    assert sun.head.num_heading_bins == 12 and sun.data.max_votes == 3 and sun.batch_size == 8
    assert sun.data.num_points == 20000 and sun.data.voxel_size is None
    with pytest.raises(Exception, match="lrr"):
        compose("data.root=/x", "optim.lrr=0.1")
    with pytest.raises(Exception, match="(?s)Available options in 'detection'.*scannet"):
        compose("data.root=/x", "detection=scanet")


# ------------------------------------------------------------------------ engine and CLI

def test_resumed_run_ends_like_an_uninterrupted_one(det_root, tmp_path):
    cfg = tiny_config(det_root, data=replace(tiny_config(det_root).data, eval_split=None,
                                             voxel_size=0.5))
    assert finetune_det(cfg, tmp_path / "straight", print_fn=lambda s: None) == {}
    run = tmp_path / "cut"
    finetune_det(cfg, run, print_fn=lambda s: None)
    (run / "checkpoint_4.pth").unlink()  # as if killed after checkpoint_2
    (run / "model.pth").unlink()
    logs = []
    finetune_det(replace(cfg, resume="auto"), run, print_fn=logs.append)
    assert any("checkpoint_2.pth at iteration 2" in s for s in logs)
    a = torch.load(tmp_path / "straight" / "checkpoint_4.pth", weights_only=True)
    b = torch.load(run / "checkpoint_4.pth", weights_only=True)
    assert a["state"] == b["state"] == {"iteration": 4, "samples": 4}
    assert a["format"] == "mink_ssl.det_checkpoint/1" and len(a["head"]["mean_sizes"]) == 18
    for part in ("backbone", "head_state"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-5, atol=1e-6, msg=k)
    # the run directory's config.json refuses it first (mink_ssl.engine.rundir)
    with pytest.raises(ValueError, match=r"cannot resume the run in .*head.num_proposals: "
                                         r"32 -> 16"):
        finetune_det(replace(cfg, resume="auto", epochs=3, head=replace(cfg.head,
                                                                        num_proposals=16)),
                     run, print_fn=lambda s: None)
    with pytest.raises(ValueError, match=r"split 'test' is not in .*available: \['train', 'val'\]"):
        finetune_det(replace(cfg, data=replace(cfg.data, eval_split="test")), tmp_path / "e",
                     print_fn=lambda s: None)


@pytest.mark.slow
def test_cli_trains_a_detector_far_above_an_untrained_one(det_root, tmp_path):
    """`python -m mink_ssl.cli.finetune_det` from a pretrained backbone.pth on two synthetic
    rooms: a short schedule (50 epochs of batch 1, 100 iterations) reaches an mAP@0.25 on those
    rooms far above the same model untrained, and the run writes config, checkpoints, model,
    evaluation history, results table, JSON and PR plot."""
    from mink_ssl.models.votenet import load_detection_model

    _pretrained_backbone(tmp_path / "backbone.pth")
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "mink_ssl.cli.finetune_det", f"data.root={det_root}",
         "model=res16unet14a", "model.out_channels=16", f"pretrained={tmp_path / 'backbone.pth'}",
         f"data.voxel_size={VOXEL}", "data.num_points=null", "data.num_workers=0",
         "data.eval_split=train", "data.augment=false", "head.num_seeds=256",
         "head.num_proposals=256", "optim.lr=3e-3", "epochs=50", "batch_size=1",
         "eval.every=25", "checkpoint_every=50", "device=cpu", "progress=false",
         f"hydra.run.dir={run}"], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"pretrained: .*backbone.pth \(mink_ssl.model/1, entry 'state_dict'\): "
                     r"loaded \d+/\d+ tensors", done.stdout)
    assert "50 epochs = 100 iterations" in done.stdout
    assert "iteration 50: val mAP@0.25" in done.stdout

    assert json.loads((run / "config.json").read_text())["pretrained"].endswith("backbone.pth")
    assert sorted(p.name for p in run.glob("checkpoint_*.pth")) == ["checkpoint_100.pth",
                                                                   "checkpoint_50.pth"]
    history = json.loads((run / "val_history.json").read_text())
    assert [h["iteration"] for h in history] == [50]
    best = json.loads((run / "best" / "best.json").read_text())  # the one periodic evaluation
    assert best == {"metric": "mAP@0.25", **history[0]}
    assert load_detection_model(run / "best" / "model.pth")[1]["voxel_size"] == VOXEL
    results = json.loads((run / "results.json").read_text())
    assert results["split"] == "train" and results["iterations"] == 100
    assert "| bed |" in (run / "results.md").read_text()
    assert (run / "results_pr.png").stat().st_size > 5000

    model, meta = load_detection_model(run / "model.pth")
    final = torch.load(run / "checkpoint_100.pth", weights_only=True)
    torch.testing.assert_close(model.head.state_dict(), final["head_state"], rtol=0, atol=0)
    assert meta["voxel_size"] == VOXEL and len(meta["classes"]) == 18
    # the same detector untrained: its boxes hardly ever match
    ds = DetectionDataset(det_root, "train", voxel_size=VOXEL, axis_aligned=True,
                          features=meta["features"])  # the run's input (the config's "ones")
    torch.manual_seed(0)
    untrained = build_det_model(ModelConfig(name="Res16UNet14A", out_channels=16),
                                DetHeadConfig(num_seeds=256, num_proposals=256), 3, 18,
                                ds.mean_sizes())
    chance = evaluate_detector(untrained, ds, torch.device("cpu")).mean_ap(0.25)
    trained = results["mAP@0.25"]
    assert trained == pytest.approx(evaluate_detector(model, ds, torch.device("cpu"))
                                    .mean_ap(0.25), abs=1e-6)  # the saved model is the one
    assert chance < 0.15 and trained > max(0.5, 5 * chance), (trained, chance)
