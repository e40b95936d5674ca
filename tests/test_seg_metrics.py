"""Segmentation evaluation: confusion matrix and metrics against hand-computed values (absent
classes, ignore label), predictions on original points through the inverse map with a real
network, rotation test-time augmentation, and the results table / plot / PLY products."""
import json
import math

import numpy as np
import pytest
import torch

from mink_ssl.eval.segmentation import (class_palette, confusion_matrix, segmentation_metrics,
                                        write_prediction_ply, write_results)
from mink_ssl.tasks.segmentation.inference import evaluate_scenes, predict_points, tta_angles

CLASSES = ["floor", "wall", "table", "lamp"]

# 9 points, 4 classes. The last two have the ignore label: their predictions (3 and 2) must not
# count. Class 2 is predicted once but absent from the ground truth; class 3 is predicted only at
# an ignored point, so it has no union at all.
TARGET = [0, 0, 0, 0, 1, 1, 1, -1, -1]
PRED = [0, 0, 1, 2, 1, 1, 0, 3, 2]
CM = [[2, 1, 1, 0],  # rows: ground truth, columns: prediction
      [1, 2, 0, 0],
      [0, 0, 0, 0],
      [0, 0, 0, 0]]


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(torch.tensor(PRED), torch.tensor(TARGET), 4)
    assert cm.dtype == torch.int64 and cm.tolist() == CM
    # numpy inputs, another ignore label
    cm2 = confusion_matrix(np.array(PRED), np.where(np.array(TARGET) < 0, 255, TARGET), 4,
                           ignore_label=255)
    assert cm2.tolist() == CM


def test_metrics_by_hand_with_absent_classes():
    m = segmentation_metrics(torch.tensor(CM), CLASSES)
    # IoU = TP / (TP + FP + FN): floor 2 / (4 + 3 - 2), wall 2 / (3 + 3 - 2), table 0 / 1
    assert m.iou[:3].tolist() == pytest.approx([2 / 5, 2 / 4, 0.0])
    assert math.isnan(m.iou[3])  # neither in GT nor predicted: left out of mIoU
    assert m.miou == pytest.approx((0.4 + 0.5 + 0.0) / 3)  # table (predicted, not in GT) counts
    assert m.acc[:2].tolist() == pytest.approx([2 / 4, 2 / 3])
    assert math.isnan(m.acc[2]) and math.isnan(m.acc[3])  # not in the ground truth
    assert m.macc == pytest.approx((0.5 + 2 / 3) / 2)
    assert m.oacc == pytest.approx(4 / 7)
    assert m.gt_points.tolist() == [4, 3, 0, 0] and m.pred_points.tolist() == [3, 3, 1, 0]
    d = m.to_dict()
    assert d["per_class"]["lamp"]["iou"] is None and d["per_class"]["table"]["iou"] == 0.0
    assert d["points"] == 7 and d["confusion"] == CM
    json.dumps(d)  # plain data, no NaN
    perfect = segmentation_metrics(torch.diag(torch.tensor([5, 3, 0, 2])))
    assert perfect.miou == 1.0 and perfect.macc == 1.0 and perfect.oacc == 1.0
    assert perfect.classes == ["class_0", "class_1", "class_2", "class_3"]


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"labels \[7\] outside \[0, 4\).*ignore label -1"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([7, 1]), 4)
    with pytest.raises(ValueError, match=r"pred has classes \[-1\]"):
        confusion_matrix(torch.tensor([-1, 1]), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="integer class indices.*argmax"):
        confusion_matrix(torch.rand(2, ), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match=r"equal length, got shapes \(3,\) and \(2,\)"):
        confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="3 class names for a 4x4"):
        segmentation_metrics(torch.tensor(CM), CLASSES[:3])
    with pytest.raises(ValueError, match="rotations must be an int >= 1, got 0"):
        tta_angles(0)


@pytest.fixture(scope="module")
def net():
    from mink_ssl.models import build_model
    from mink_ssl.models.heads import SegmentationModel

    torch.manual_seed(0)
    model = SegmentationModel(build_model("Res16UNet14A", in_channels=3, out_channels=8), 4,
                              final_layer="keep")  # a head on top, as when this was written
    for p in model.parameters():  # non-zero head so that logits vary between voxels
        p.data.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def scene():
    """~6000 points in a 1.2 x 1.2 x 0.6 m block: several points per 10 cm voxel."""
    rng = np.random.default_rng(0)
    points = (rng.random((6000, 3)) * [1.2, 1.2, 0.6]).astype(np.float32)
    colors = rng.integers(0, 256, (6000, 3)).astype(np.uint8)
    labels = rng.integers(-1, 4, 6000)
    return points, colors, labels


def test_point_predictions_come_from_their_voxel(net, scene):
    from mink_ssl.sparse import batched_coordinates, quantize, sparse_tensor

    points, colors, _ = scene
    logits = predict_points(net, points, colors, 0.1, 3)
    assert logits.shape == (6000, 4)
    q = quantize(points - points.mean(0), 0.1)
    assert len(q.coords) < 2000  # many points share a voxel
    # every point carries exactly the logits of its voxel (through the inverse map) ...
    torch.testing.assert_close(logits, logits[q.index][q.inverse], rtol=0, atol=0)
    # ... which are the network's output for the voxel, fed its first point's colour
    feats = torch.from_numpy(colors[q.index.numpy()].astype(np.float32)) / 255 - 0.5
    with torch.no_grad():
        voxel = net(sparse_tensor(batched_coordinates([q.coords]), feats)).F
    torch.testing.assert_close(logits[q.index], voxel, rtol=1e-5, atol=1e-6)


def test_rotation_tta_averages_logits_over_rotations(net, scene):
    points, colors, labels = scene
    angles = tta_angles(4)
    assert angles == pytest.approx([0, math.pi / 2, math.pi, 3 * math.pi / 2])
    single = [predict_points(net, points, colors, 0.1, 3, angles=[a]) for a in angles]
    assert (single[0] - single[1]).abs().max() > 1e-3  # a rotation changes the voxelisation
    tta = predict_points(net, points, colors, 0.1, 3, angles=angles)
    torch.testing.assert_close(tta, torch.stack(single).mean(0), rtol=1e-5, atol=1e-6)
    # another gravity axis (raw Synthia is y up) gives another rotation
    about_y = predict_points(net, points, colors, 0.1, 3, angles=[math.pi / 2], up_axis=1)
    assert about_y.shape == (6000, 4) and not torch.allclose(about_y, single[1])

    # evaluation counts original labelled points, not voxels, and uses the TTA prediction
    m = evaluate_scenes(net, [("a/b", points, colors, labels)], CLASSES, 0.1, 3, rotations=4)
    assert int(m.confusion.sum()) == int((labels >= 0).sum())
    expected = confusion_matrix(tta.argmax(1), torch.from_numpy(labels), 4)
    assert torch.equal(m.confusion, expected)
    assert not net.training  # evaluation leaves the mode as it found it


def test_results_table_plot_and_ply(tmp_path, scene):
    from PIL import Image
    from plyfile import PlyData

    m = segmentation_metrics(torch.tensor(CM), CLASSES)
    paths = write_results(tmp_path / "run", m, title="toy val", extra={"split": "val"})
    md = paths["markdown"].read_text()
    assert "mIoU 30.0 | mAcc 58.3 | oAcc 57.1 | 7 points" in md
    assert "| floor | 40.0 | 50.0 | 4 | 3 |" in md
    assert "| table | 0.0 | n/a | 0 | 1 |" in md and "| lamp | n/a | n/a | 0 | 0 |" in md
    js = json.loads(paths["json"].read_text())
    assert js["split"] == "val" and js["miou"] == pytest.approx(0.3)
    assert js["per_class"]["lamp"]["iou"] is None
    with Image.open(paths["plot"]) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 100
        rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(rgb, axis=0)) > 5  # bars were drawn
    assert not list((tmp_path / "run").glob(".*.tmp"))  # atomic writes leave nothing behind

    points, _, labels = scene
    pred = np.random.default_rng(1).integers(0, 4, len(points))
    write_prediction_ply(tmp_path / "p.ply", points, pred, labels, 4)
    v = PlyData.read(str(tmp_path / "p.ply"))["vertex"]
    np.testing.assert_array_equal(v["pred"], pred)
    np.testing.assert_array_equal(v["label"], labels)
    np.testing.assert_array_equal(np.stack([v["x"], v["y"], v["z"]], 1), points)
    rgb = np.stack([v["red"], v["green"], v["blue"]], 1)
    np.testing.assert_array_equal(rgb, class_palette(4)[pred])
    assert len({tuple(c) for c in class_palette(20)}) == 20  # distinct colours per class
    with pytest.raises(ValueError, match=r"predictions must be in \[0, 4\), got \[0, 9\]"):
        write_prediction_ply(tmp_path / "bad.ply", points[:2], np.array([0, 9]), None, 4)
