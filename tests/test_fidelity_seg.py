"""Reference fidelity of segmentation (docs/fidelity.md rows 8 and 15): our defaults against
numbers computed once with the released Contrastive Scene Contexts code
(``downstream/semseg/datasets/voxelizer.py``, ``dataset.py``, ``transforms.py``) on the fixed
clouds below. Only the inputs and the released code's outputs are kept here.

The clouds are Kronecker sequences (no random generator, so the same numbers on any platform).
MinkowskiEngine 0.4.3, whose ``sparse_quantize(..., labels, ignore_label)`` the released voxelizer
calls, cannot be built here: its label rule (``src/quantization.cpp``, ``quantize_label_np``:
a voxel keeps its first point's label until a point with another label makes it the ignore
label) was transcribed into the throwaway script that ran CSC's ``Voxelizer.voxelize``.
"""
import json

import numpy as np
import pytest
import torch

from mink_ssl.data.segmentation import (Augmentation, SegmentationDataset, augment_scene,
                                        crop_mask, prevoxel_index, voxel_dropout, voxel_labels)
from mink_ssl.tasks.segmentation.inference import evaluate_scenes, reference_voxels


def kronecker(n: int, extent) -> np.ndarray:
    """(n, 3) float32 points of the Kronecker sequence i * (plastic-number powers, sqrt 2 - 1)
    mod 1, scaled to ``extent``: deterministic and evenly spread."""
    i = np.arange(1, n + 1, dtype=np.float64)[:, None]
    a = np.array([0.7548776662466927, 0.5698402909980532, 0.4142135623730951])
    return ((i * a) % 1.0 * np.asarray(extent, np.float64)).astype(np.float32)


# input: Kronecker-sequence clouds (no generator), the same on any platform
ROOM = kronecker(3000, [10.0, 7.0, 3.0])  # metres, an S3DIS-sized room
SMALL_ROOM = kronecker(500, [3.0, 2.5, 2.0])
FRAME_CM = kronecker(4000, [7000.0, 400.0, 6000.0])  # a Synthia frame in CSC's centimetres
BLOCK = kronecker(6000, [2.0, 1.5, 1.0])


def block_labels(ignore: int = -1) -> np.ndarray:
    lab = ((np.floor(BLOCK[:, 0] / 0.23) + 2 * np.floor(BLOCK[:, 1] / 0.31)) % 5).astype(np.int64)
    lab[np.arange(len(BLOCK)) % 23 == 0] = ignore
    return lab


# ---------------------------------------------------- row 8: segmentation augmentations

# golden: facebookresearch/ContrastiveSceneContexts downstream/semseg/datasets/voxelizer.py
# Voxelizer.clip (bounds from datasets/stanford.py CLIP_BOUND 4, synthia.py CLIP_BOUND /
# TEST_CLIP_BOUND) and datasets/dataset.py's prevoxelisation ME.utils.sparse_quantize(coords /
# PREVOXELIZATION_VOXEL_SIZE, return_index=True) (synthia.py: 7.5).
# how: Voxelizer(clip_bound=4).clip(ROOM, None, ratio): kept points and the sum of their
# indices; Voxelizer(clip_bound=((-B, B),) * 3).clip(FRAME_CM, None, ratio), B = 1800 (train) /
# 2500 cm (test); cells = number of indices sparse_quantize returns. Added in 01a57bb. Re-run
# 2026-12-07 on CSC @83515be, MinkowskiEngine 0.5.4 for the cells: equal.
CSC_CLIPS = [
    (ROOM, 4.0, [0.13, -0.07, 0.02], 2311, 3464513),
    (ROOM, 4.0, [-0.2, 0.2, -0.05], 1831, 2743833),
    (FRAME_CM, 1800.0, [0.1, 0.0, -0.1], 1237, 2485138),
    (FRAME_CM, 2500.0, [0.0, 0.0, 0.0], 2382, 4755326)]
CSC_PREVOXEL = [(FRAME_CM, 4000), (kronecker(5000, [300.0, 200.0, 100.0]), 4372)]


@pytest.mark.parametrize("case", range(len(CSC_CLIPS)))
def test_row8_crop_is_cscs_clip(case):
    points, bound, ratio, kept, index_sum = CSC_CLIPS[case]
    mask = crop_mask(points, bound, ratio)
    assert (int(mask.sum()), int(np.flatnonzero(mask).sum())) == (kept, index_sum)
    # CSC returns no crop for a room smaller than the bound: the moved cube holds all of it
    assert crop_mask(SMALL_ROOM, 4.0, [0.2, 0.2, 0.05]).all()


def test_row8_prevoxelisation_dropout_and_the_recipes():
    for points, cells in CSC_PREVOXEL:
        idx = prevoxel_index(points, 7.5)
        assert len(idx) == cells and (np.diff(idx) > 0).all()
        keys = np.floor(points[idx] / np.float32(7.5)).astype(np.int64)
        assert len(np.unique(keys, axis=0)) == cells  # one point per cell
    # RandomDropout(0.2): with probability 0.2, int(N * (1 - 0.2)) of N voxels survive
    rng = np.random.default_rng(0)
    draws = [voxel_dropout(1001, 0.2, rng) for _ in range(2000)]
    fired = [d for d in draws if d is not None]
    assert abs(len(fired) / 2000 - 0.2) < 0.03
    assert all(len(d) == int(1001 * (1 - 0.2)) == 800 and len(set(d.tolist())) == 800
               for d in fired)
    assert voxel_dropout(1001, 0.0, rng) is None
    # the recipes (CSC stanford.py / synthia.py, dataset.py) are the defaults
    from helpers import compose_config
    from omegaconf import OmegaConf

    want = {"s3dis": (4.0, [0.2, 0.05], None, None), "synthia": (18.0, [0.1, 0.0], 0.075, 25.0),
            "scannet": (None, [0.0, 0.0], None, None)}
    for bench, (clip, ratio, prevoxel, eval_clip) in want.items():
        cfg = OmegaConf.to_object(compose_config("finetune_seg", "data.root=/x",
                                                 f"finetune={bench}"))
        a, d = cfg.data.augmentation, cfg.data
        assert (a.dropout, a.clip_bound, a.clip_translation) == (0.2, clip, ratio), bench
        assert (d.prevoxel_size, d.eval_clip_bound, d.label_rule) == (prevoxel, eval_clip,
                                                                      "uniform"), bench
        assert cfg.eval.protocol == "voxels"


def test_row8_training_crop_inside_the_augmentations():
    aug = Augmentation(rotation_deg=0.0, scale=(1.0, 1.0), flip=False, color_auto_contrast=0.0,
                       color_translation=0.0, color_jitter=0.0, dropout=0.0, clip_bound=4.0,
                       clip_translation=(0.2, 0.05))
    labels = np.arange(len(ROOM))
    seen = set()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        p, _, kept = augment_scene(ROOM, np.zeros((len(ROOM), 3), np.uint8), labels, aug, rng)
        # the kept points are those of CSC's clip with the drawn translation ratios
        ratio = np.random.default_rng(seed).uniform(-np.array([0.2, 0.2, 0.05]),
                                                    np.array([0.2, 0.2, 0.05]))
        np.testing.assert_array_equal(kept, np.flatnonzero(crop_mask(ROOM, 4.0, ratio)))
        extent = p.max(0) - p.min(0)
        assert (extent[:2] < 8.0).all() and len(kept) < len(ROOM)
        seen.add(len(kept))
    assert len(seen) > 5  # the crop moves


# ----------------------------------------------- row 15: segmentation evaluation protocol

# golden: facebookresearch/ContrastiveSceneContexts downstream/semseg/datasets/voxelizer.py
# Voxelizer.voxelize, with ME.utils.sparse_quantize(labels=...) given MinkowskiEngine 0.4.3's
# label rule (src/quantization.cpp quantize_label, transcribed: the module docstring).
# how: Voxelizer(voxel_size, clip_bound=None, use_augmentation=False,
# ignore_label=255).voxelize(BLOCK, ones, labels (ignored: 255)): voxels, ignored voxels,
# histogram of the other labels, and checksum = sum(key * (label + 1 | -1 if ignored)),
# key = x + 1000 y + 1e6 z of the voxel coordinates. Added in 01a57bb. Re-run 2026-12-07 on
# CSC @83515be with the rule transcribed again (np.unique per voxel): equal.
CSC_VOXELS = {0.05: (5278, 402, [961, 963, 992, 986, 974], 136479774892),
              0.15: (978, 683, [60, 60, 68, 54, 53], 674682388)}


@pytest.mark.parametrize("size", sorted(CSC_VOXELS))
def test_row15_voxels_and_their_labels_are_cscs(size):
    voxels, ignored, hist, checksum = CSC_VOXELS[size]
    q = reference_voxels(BLOCK, size)
    lab = voxel_labels(q.inverse, torch.from_numpy(block_labels()), len(q.index), 5).numpy()
    c = (q.coords - q.coords.amin(0)).long().numpy()  # CSC shifts the voxels to the origin
    key = c[:, 0] + 1000 * c[:, 1] + 1000000 * c[:, 2]
    assert (len(q.index), int((lab == -1).sum())) == (voxels, ignored)
    assert np.bincount(lab[lab >= 0], minlength=5).tolist() == hist
    assert int((key * np.where(lab == -1, -1, lab + 1)).sum()) == checksum
    # the option: the majority label keeps most mixed voxels
    major = voxel_labels(q.inverse, torch.from_numpy(block_labels()), len(q.index), 5,
                         rule="majority").numpy()
    assert (major == -1).sum() < ignored and (major[lab >= 0] == lab[lab >= 0]).all()


class ColourClassifier(torch.nn.Module):
    """A linear layer on the sparse input that predicts the class c written in a voxel's red
    channel r (features rgb: f = r / 255 - 0.5): logit_c = -(r - c)^2 up to terms constant in c
    = 510 c f + 255 c - c^2."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(3, num_classes, bias=True)
        with torch.no_grad():
            c = torch.arange(num_classes, dtype=torch.float32)
            self.linear.weight.zero_()
            self.linear.weight[:, 0] = 510 * c
            self.linear.bias.copy_(255 * c - c ** 2)

    def forward(self, x):
        return x.replace(self.linear(x.feats))


def write_scene(root, points, labels, colours):
    (root / "scenes").mkdir(parents=True)
    np.savez(root / "scenes" / "s.npz", coords=points, colors=colours, labels=labels)
    manifest = {"schema": "mink_ssl.seg_scenes/1", "benchmark": "block",
                "classes": [f"c{k}" for k in range(5)], "ignore_label": -1, "voxel_size": 0.05,
                "splits": {"val": ["s"]}, "scenes": {"s": {"file": "scenes/s.npz",
                                                           "points": len(points)}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_row15_voxel_protocol_scores_the_reference_voxels(tmp_path):
    labels = block_labels()
    predicted = np.where(labels >= 0, (labels + 1) % 5, 0)  # a point's colour: a wrong class
    predicted[::3] = np.maximum(labels[::3], 0)  # a third right
    colours = np.c_[predicted, np.zeros((len(BLOCK), 2))].astype(np.uint8)
    root = write_scene(tmp_path / "block", BLOCK, labels.astype(np.int16), colours)
    ds = SegmentationDataset(root, "val", voxel_size=0.15, features="rgb")
    model = ColourClassifier(5).eval()
    voxels, ignored, _, _ = CSC_VOXELS[0.15]
    m = evaluate_scenes(model, ds.scenes_for_eval("voxels"), ds.classes, 0.15, 3,
                        protocol="voxels")
    assert int(m.confusion.sum()) == voxels - ignored  # one vote per unmixed voxel
    q = reference_voxels(BLOCK, 0.15)
    vlab = voxel_labels(q.inverse, torch.from_numpy(labels), len(q.index), 5).numpy()
    first = q.index.numpy()
    right = int(((predicted[first] == vlab) & (vlab >= 0)).sum())
    assert int(m.confusion.trace()) == right  # each voxel predicted from its first point
    pts = evaluate_scenes(model, ds.scenes_for_eval("points"), ds.classes, 0.15, 3,
                          protocol="points")
    assert int(pts.confusion.sum()) == int((labels >= 0).sum())  # the option: every point
    with pytest.raises(ValueError, match="eval protocol must be one of"):
        evaluate_scenes(model, ds.scenes_for_eval(), ds.classes, 0.15, 3, protocol="scene")


def test_row15_synthia_voxels_are_evaluated_within_25_m(tmp_path):
    frame = FRAME_CM / np.float32(100.0)  # metres
    labels = np.zeros(len(frame), np.int16)
    root = write_scene(tmp_path / "frame", frame, labels, np.zeros((len(frame), 3), np.uint8))
    ds = SegmentationDataset(root, "val", voxel_size=0.15, eval_clip_bound=25.0)
    points, _, _ = ds.eval_scene("s", "voxels")
    assert len(points) == CSC_CLIPS[3][3]  # CSC's TEST_CLIP_BOUND crop of the same frame
    assert len(ds.eval_scene("s", "points")[0]) == len(frame)  # the option: all points
