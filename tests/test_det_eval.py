"""Detection evaluation (mink_ssl.eval.detection): box IoU against hand-computed cases and a
brute-force polygon intersection, AP against hand-worked precision/recall and a sequential
VOC-protocol loop, on object boxes of procedural rooms; the report files on disk."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull

from data_prep.synthetic import make_room
from mink_ssl.eval.detection import (DetectionEvaluator, average_precision, evaluate_detection,
                                     write_detection_report)
from mink_ssl.ops.boxes import (bev_intersection_area, bev_intersection_polygon, box_corners,
                                box_iou, iou_aligned, iou_oriented, paired_iou)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SQRT2 = math.sqrt(2)


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# ---- IoU: hand-computed cases -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_iou_hand_computed_cases(device):
    cube = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    a = t([cube]).to(device)
    half = t([[0.5, 0.0, 0.0, 1.0, 1.0, 1.0]]).to(device)  # shifted by half an extent
    far = t([[3.0, 0.0, 0.0, 1.0, 1.0, 1.0]]).to(device)
    touch = t([[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]]).to(device)  # shares a face: no volume
    for fn in (iou_aligned, iou_oriented):
        assert fn(a, a).item() == pytest.approx(1.0, abs=1e-12)
        assert fn(a, half).item() == pytest.approx(1 / 3, abs=1e-12)  # 0.5 / (2 - 0.5)
        assert fn(a, far).item() == 0.0
        assert fn(a, touch).item() == pytest.approx(0.0, abs=1e-12)
    # a unit cube rotated by 45 degrees about z: against itself 1; against the aligned cube the
    # BEV intersection is the regular octagon 1 - 4 * (sqrt2/2 - 1/2)^2 = 2 (sqrt2 - 1), so
    # IoU = 2 (sqrt2 - 1) / (2 - 2 (sqrt2 - 1)) = 1 / sqrt2
    rot = t([cube + [math.pi / 4]]).to(device)
    a7 = t([cube + [0.0]]).to(device)
    assert bev_intersection_area(rot, a7).item() == pytest.approx(2 * (SQRT2 - 1), abs=1e-12)
    assert iou_oriented(rot, rot).item() == pytest.approx(1.0, abs=1e-12)
    assert iou_oriented(rot, a7).item() == pytest.approx(1 / SQRT2, abs=1e-12)
    assert iou_oriented(a7, rot).item() == pytest.approx(1 / SQRT2, abs=1e-12)
    # ... and half the height overlapping: intersection halves, union 2 - I/2
    up = t([[0.0, 0.0, 0.5, 1.0, 1.0, 1.0, math.pi / 4]]).to(device)
    inter = (SQRT2 - 1)
    assert iou_oriented(up, a7).item() == pytest.approx(inter / (2 - inter), abs=1e-12)
    # a 2 x 1 box turned by 90 degrees against the unturned one: 1 x 1 overlap, IoU 1 / 3
    long = t([[0.0, 0.0, 0.0, 2.0, 1.0, 1.0, 0.0]]).to(device)
    turned = t([[0.0, 0.0, 0.0, 2.0, 1.0, 1.0, math.pi / 2]]).to(device)
    assert iou_oriented(long, turned).item() == pytest.approx(1 / 3, abs=1e-12)
    # heading pi describes the same box; a 6-column box meets a 7-column one with heading 0
    assert iou_oriented(long, long + t([[0, 0, 0, 0, 0, 0, math.pi]]).to(device)).item() \
        == pytest.approx(1.0, abs=1e-12)
    assert box_iou(long[:, :6], turned).item() == pytest.approx(1 / 3, abs=1e-12)


def test_intersection_polygons_have_the_hand_counted_vertices():
    # 45-degree square on the aligned one: the regular octagon, vertices where the edges cross
    a7 = t([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    rot = t([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, math.pi / 4]])
    poly, count = bev_intersection_polygon(rot, a7)
    assert count.tolist() == [8]
    h, r = 0.5, SQRT2 / 2  # the square's half side; the diamond |x| + |y| = r
    expected = {(h, r - h), (r - h, h)}
    expected = {(sx * x, sy * y) for x, y in expected for sx in (1, -1) for sy in (1, -1)}
    got = {tuple(np.round(v, 12) + 0.0) for v in poly[0, :8].numpy()}
    assert got == {tuple(np.round(v, 12) + 0.0) for v in expected}
    # identical rotated rectangles far from the origin, in float32: exactly their 4 corners
    # (vertices on a clip line up to rounding are on it, not near-duplicate crossings)
    rng = np.random.default_rng(3)
    boxes = torch.from_numpy(np.concatenate([rng.random((500, 3)) * 10, rng.random((500, 3)) + 0.2,
                                             rng.uniform(-math.pi, math.pi, (500, 1))], 1)).float()
    poly, count = bev_intersection_polygon(boxes, boxes)
    assert (count == 4).all()
    area = bev_intersection_area(boxes, boxes)
    torch.testing.assert_close(area, boxes[:, 3] * boxes[:, 4], rtol=1e-5, atol=0)


def test_box_corners_order_and_rotation():
    c = box_corners(t([[1.0, 2.0, 3.0, 2.0, 4.0, 6.0]]))[0]
    assert c.tolist() == [[2, 4, 0], [0, 4, 0], [0, 0, 0], [2, 0, 0],
                          [2, 4, 6], [0, 4, 6], [0, 0, 6], [2, 0, 6]]
    r = box_corners(t([[0.0, 0.0, 0.0, SQRT2, SQRT2, 2.0, math.pi / 4]]))[0]
    np.testing.assert_allclose(r[:4, :2].numpy(), [[0, 1], [-1, 0], [0, -1], [1, 0]], atol=1e-12)


# ---- oriented IoU against brute force -----------------------------------------------------------

def bev_polygon(box):
    c, s = math.cos(box[6]), math.sin(box[6])
    local = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]]) * np.asarray(box[3:5]) / 2
    return local @ np.array([[c, s], [-s, c]]) + np.asarray(box[:2])


def bev_intersection_brute(a, b) -> float:
    """Convex hull of: corners of each rectangle inside the other, and all edge crossings."""
    pa, pb = bev_polygon(a), bev_polygon(b)

    def inside(p, poly):
        e = np.roll(poly, -1, axis=0) - poly
        r = p - poly
        return (e[:, 0] * r[:, 1] - e[:, 1] * r[:, 0] >= -1e-12).all()

    pts = [p for p in pa if inside(p, pb)] + [p for p in pb if inside(p, pa)]
    for i in range(4):
        p, r = pa[i], pa[(i + 1) % 4] - pa[i]
        for j in range(4):
            q, s = pb[j], pb[(j + 1) % 4] - pb[j]
            den = r[0] * s[1] - r[1] * s[0]
            if abs(den) < 1e-15:
                continue
            u = ((q - p)[0] * s[1] - (q - p)[1] * s[0]) / den
            v = ((q - p)[0] * r[1] - (q - p)[1] * r[0]) / den
            if 0 <= u <= 1 and 0 <= v <= 1:
                pts.append(p + u * r)
    if len(pts) < 3:
        return 0.0
    try:
        return float(ConvexHull(np.array(pts)).volume)  # 2-D hull "volume" is its area
    except Exception:  # all points collinear: no area
        return 0.0


def iou_brute(a, b) -> float:
    h = max(0.0, min(a[2] + a[5] / 2, b[2] + b[5] / 2) - max(a[2] - a[5] / 2, b[2] - b[5] / 2))
    inter = bev_intersection_brute(a, b) * h
    return inter / (np.prod(a[3:6]) + np.prod(b[3:6]) - inter)


def random_boxes(rng, n, spread=1.0):
    c = rng.random((n, 3)) * spread
    s = rng.random((n, 3)) * 1.2 + 0.3
    return np.concatenate([c, s, rng.uniform(-math.pi, math.pi, (n, 1))], axis=1)


@pytest.mark.parametrize("device", DEVICES)
def test_oriented_iou_equals_brute_force_polygon_intersection(device):
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 300), random_boxes(rng, 300)
    b[:20] = a[:20]  # identical pairs
    b[20:40, :6] = a[20:40, :6]  # same box, other heading
    ours = paired_iou(torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)).cpu()
    expected = np.array([iou_brute(x, y) for x, y in zip(a, b)])
    assert (expected > 0.05).sum() > 150  # mostly overlapping pairs
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-9)
    # float32 agrees to float32 precision; the matrix form equals the paired form
    ours32 = paired_iou(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    np.testing.assert_allclose(ours32.numpy(), expected, atol=2e-5)
    m = box_iou(torch.from_numpy(a[:30]), torch.from_numpy(b[:25]))
    assert m.shape == (30, 25)
    assert m[7, 7].item() == pytest.approx(expected[7], abs=1e-12)
    assert m[3, 11].item() == pytest.approx(iou_brute(a[3], b[11]), abs=1e-9)
    # with heading 0 the oriented IoU is the axis-aligned one
    a0, b0 = a.copy(), b.copy()
    a0[:, 6] = b0[:, 6] = 0
    np.testing.assert_allclose(paired_iou(torch.from_numpy(a0), torch.from_numpy(b0)).numpy(),
                               paired_iou(torch.from_numpy(a0[:, :6]),
                                          torch.from_numpy(b0[:, :6])).numpy(), atol=1e-12)


def test_oriented_iou_matches_monte_carlo_volume():
    rng = np.random.default_rng(1)
    a, b = random_boxes(rng, 6, spread=0.5), random_boxes(rng, 6, spread=0.5)
    ours = paired_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    n = 400_000
    for i in range(6):
        u = rng.random((n, 3)) - 0.5  # uniform in box a: local coordinates to world
        c, s = math.cos(a[i, 6]), math.sin(a[i, 6])
        local = u * a[i, 3:6]
        world = np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1],
                          local[:, 2]], 1) + a[i, :3]
        rel = world - b[i, :3]  # into b's frame
        cb, sb = math.cos(b[i, 6]), math.sin(b[i, 6])
        lb = np.stack([cb * rel[:, 0] + sb * rel[:, 1], -sb * rel[:, 0] + cb * rel[:, 1],
                       rel[:, 2]], 1)
        frac = (np.abs(lb) <= b[i, 3:6] / 2).all(axis=1).mean()
        inter = frac * np.prod(a[i, 3:6])
        mc = inter / (np.prod(a[i, 3:6]) + np.prod(b[i, 3:6]) - inter)
        assert ours[i] == pytest.approx(mc, abs=4e-3), i


def test_iou_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"shape \(K, 6\)"):
        box_iou(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="row 1 .* size <= 0"):
        box_iou(t([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 1]]), t([[0, 0, 0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="use iou_oriented"):
        iou_aligned(t([[0, 0, 0, 1, 1, 1, 0.3]]), t([[0, 0, 0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="as many boxes"):
        paired_iou(t([[0, 0, 0, 1, 1, 1]]), torch.zeros(0, 6))


# ---- AP -----------------------------------------------------------------------------------------

def unit(x, y=0.0, z=0.0):
    return [x, y, z, 1.0, 1.0, 1.0]


def run_eval(preds, gts, num_classes=1, **kw):
    """preds: (scene, label, box, score); gts: (scene, label, box)."""
    pb = t([p[2] for p in preds]).reshape(-1, 6)
    gb = t([g[2] for g in gts]).reshape(-1, 6)
    return evaluate_detection(
        pb, t([p[3] for p in preds]), torch.tensor([p[1] for p in preds], dtype=torch.long),
        torch.tensor([p[0] for p in preds], dtype=torch.long), gb,
        torch.tensor([g[1] for g in gts], dtype=torch.long),
        torch.tensor([g[0] for g in gts], dtype=torch.long), num_classes, **kw)


def test_average_precision_of_a_hand_worked_curve():
    # precision 1, .5, 2/3, .5, .6 at recall 1/3, 1/3, 2/3, 2/3, 1: the envelope is
    # 1, 2/3, 2/3, .6, .6 -> AP = 1/3 (1 + 2/3 + 3/5) = 34/45
    rec = t([1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0])
    prec = t([1.0, 0.5, 2 / 3, 0.5, 0.6])
    assert average_precision(rec, prec) == pytest.approx(34 / 45, abs=1e-12)
    assert average_precision(t([]), t([])) == 0.0


def test_ap_hand_worked_example_over_two_scenes():
    gts = [(0, 0, unit(0)), (0, 0, unit(5)), (1, 0, unit(0))]
    preds = [
        (0, 0, unit(5.5), 0.5),  # IoU 1/3 with the box at x=5: TP at 0.25, FP at 0.5
        (0, 0, unit(0), 0.9),  # exact: TP
        (0, 0, unit(0.1), 0.6),  # duplicate on the box at x=0 (IoU 0.9/1.1): FP
        (1, 0, unit(0), 0.7),  # exact, scene 1: TP
        (0, 0, unit(10), 0.8),  # nothing there: FP
    ]
    res = run_eval(preds, gts)
    # ranked TP/FP at 0.25: 1 0 1 0 1 -> AP 34/45 (see the curve above), recall 1
    assert res.ap(0.25)[0] == pytest.approx(34 / 45, abs=1e-12)
    assert res.recall(0.25)[0] == pytest.approx(1.0)
    np.testing.assert_allclose(res.curves[0.25][0].precision, [1, 0.5, 2 / 3, 0.5, 0.6])
    np.testing.assert_allclose(res.curves[0.25][0].recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    # at 0.5: 1 0 1 0 0 -> precision 1, .5, 2/3, .5, .4 at recall 1/3, 1/3, 2/3, 2/3, 2/3:
    # AP = 1/3 * 1 + 1/3 * 2/3 = 5/9, recall 2/3
    assert res.ap(0.5)[0] == pytest.approx(5 / 9, abs=1e-12)
    assert res.recall(0.5)[0] == pytest.approx(2 / 3)
    assert res.mean_ap(0.5) == pytest.approx(5 / 9, abs=1e-12)
    # the same boxes as oriented boxes with heading 0 give the same numbers
    res7 = evaluate_detection(
        torch.cat([t([p[2] for p in preds]), torch.zeros(5, 1, dtype=torch.float64)], 1),
        t([p[3] for p in preds]), torch.zeros(5, dtype=torch.long),
        torch.tensor([p[0] for p in preds]), t([g[2] for g in gts]),
        torch.zeros(3, dtype=torch.long), torch.tensor([g[0] for g in gts]), 1)
    assert res7.ap(0.25)[0] == pytest.approx(34 / 45, abs=1e-12)
    assert res7.ap(0.5)[0] == pytest.approx(5 / 9, abs=1e-12)


def test_a_true_positive_needs_iou_strictly_above_the_threshold():
    # predictions inside larger boxes: IoU = volume ratio, exactly 0.5 and 0.25
    gts = [(0, 0, [0.0, 0.0, 0.0, 2.0, 1.0, 1.0]), (1, 0, [0.0, 0.0, 0.0, 4.0, 1.0, 1.0])]
    preds = [(0, 0, unit(0.5), 0.9), (1, 0, unit(1.5), 0.8)]
    res = run_eval(preds, gts, iou_thresholds=(0.25, 0.4999, 0.5))
    assert res.recall(0.25)[0] == 0.5  # 0.5 > 0.25 counts; 0.25 > 0.25 does not
    assert res.recall(0.4999)[0] == 0.5 and res.recall(0.5)[0] == 0.0


def test_each_box_is_matched_once_and_a_taken_box_is_not_replaced():
    # the second prediction's best box (IoU 2/3) is taken; its IoU 0.43 with the free box does
    # not count (VOC / VoteNet): FP. TP/FP = 1 0 over 2 boxes -> AP 1/2
    gts = [(0, 0, unit(0)), (0, 0, unit(0.6))]
    preds = [(0, 0, unit(0), 0.9), (0, 0, unit(0.2), 0.8)]
    res = run_eval(preds, gts)
    assert res.ap(0.25)[0] == pytest.approx(0.5) and res.recall(0.25)[0] == pytest.approx(0.5)


def test_ap_with_classes_missing_predictions_and_duplicates():
    gts = [(0, 0, unit(0)), (0, 0, unit(3)), (1, 1, unit(0)), (1, 1, unit(3)),
           (2, 1, unit(0)), (2, 1, unit(3))]
    perfect = [(s, c, b, 0.5 + 0.05 * i) for i, (s, c, b) in enumerate(gts)]
    res = run_eval(perfect, gts, num_classes=3, class_names=["a", "b", "c"])
    for thr in (0.25, 0.5):
        assert res.ap(thr)[:2].tolist() == [1.0, 1.0] and res.mean_ap(thr) == 1.0
        assert math.isnan(res.ap(thr)[2])  # no ground truth: no AP, left out of the mean
    assert res.num_gt.tolist() == [2, 4, 0]
    # predictions missing for half the boxes of class 1: recall and AP 1/2; mAP (1 + 1/2) / 2
    res = run_eval(perfect[:2] + perfect[2:6:2], gts, num_classes=3)
    assert res.recall(0.5)[1] == pytest.approx(0.5) and res.ap(0.5)[1] == pytest.approx(0.5)
    assert res.mean_ap(0.5) == pytest.approx(0.75)
    # no prediction of class 1 at all: AP 0, counted in the mean
    res = run_eval(perfect[:2], gts, num_classes=3)
    assert res.ap(0.5)[1] == 0.0 and res.mean_ap(0.5) == pytest.approx(0.5)
    # each class-0 box predicted twice, the duplicate just below its original: TP/FP 1 0 1 0,
    # precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1 -> AP 1/2 + 1/2 * 2/3 = 5/6
    dup = [(0, 0, unit(0), 0.9), (0, 0, unit(0), 0.85), (0, 0, unit(3), 0.8),
           (0, 0, unit(3.05), 0.75)]
    res = run_eval(dup, gts, num_classes=3)
    assert res.ap(0.5)[0] == pytest.approx(5 / 6) and res.recall(0.5)[0] == 1.0
    # predictions of another class or scene never match
    res = run_eval([(0, 1, unit(0), 0.9), (1, 0, unit(0), 0.9)], gts, num_classes=3)
    assert res.ap(0.25)[0] == 0.0 and res.ap(0.25)[1] == 0.0


def test_ap_bad_inputs_name_the_problem():
    gts = [(0, 0, unit(0))]
    with pytest.raises(ValueError, match=r"pred_labels must lie in \[0, 2\)"):
        run_eval([(0, 2, unit(0), 0.5)], gts, num_classes=2)
    with pytest.raises(ValueError, match="class_names has 1 names but num_classes=2"):
        run_eval([(0, 0, unit(0), 0.5)], gts, num_classes=2, class_names=["x"])
    with pytest.raises(ValueError, match="iou_thresholds"):
        run_eval([(0, 0, unit(0), 0.5)], gts, iou_thresholds=(1.5,))


# ---- AP on procedural rooms against a sequential VOC loop ---------------------------------------

FURNITURE = {3: 0, 4: 1, 5: 2, 6: 3, 7: 4, 10: 5, 14: 6}  # NYU40 id -> class index
NAMES = ["cabinet", "bed", "chair", "sofa", "table", "bookshelf", "desk"]


def room_objects(seed):
    """Object boxes (K, 6) and class indices of a procedural room (furniture only)."""
    room = make_room(seed)
    boxes, labels = [], []
    for inst in np.unique(room.instances):
        part = room.instances == inst
        label = int(room.labels[part][0])
        if label in FURNITURE:
            lo, hi = room.boxes[part, 0].min(0), room.boxes[part, 1].max(0)
            boxes.append(np.concatenate([(lo + hi) / 2, hi - lo]))
            labels.append(FURNITURE[label])
    return np.array(boxes), np.array(labels)


def noisy_predictions(rng, boxes, labels):
    """Jittered, rotated, duplicated, missing and spurious predictions of a room's objects."""
    keep = rng.random(len(boxes)) > 0.2
    b = boxes[keep].copy()
    b[:, :3] += rng.normal(0, 0.15, (len(b), 3))
    b[:, 3:6] *= rng.uniform(0.8, 1.2, (len(b), 3))
    lab = labels[keep]
    dup = rng.random(len(b)) < 0.4
    spurious = np.concatenate([rng.random((4, 3)) * 5, rng.random((4, 3)) + 0.3], 1)
    b = np.concatenate([b, b[dup] + rng.normal(0, 0.05, (dup.sum(), 6)) * [1, 1, 1, 0, 0, 0],
                        spurious])
    lab = np.concatenate([lab, lab[dup], rng.integers(0, 7, 4)])
    b = np.concatenate([b, rng.uniform(-0.4, 0.4, (len(b), 1))], 1)  # headings
    return b, lab, rng.random(len(b))


def voc_loop(pred_boxes, scores, pred_labels, pred_scene, gt_boxes, gt_labels, gt_scene, c, thr):
    """VoteNet's eval_det_cls for one class, prediction by prediction."""
    iou = box_iou(torch.from_numpy(pred_boxes), torch.from_numpy(gt_boxes)).numpy()
    order = sorted(np.flatnonzero(pred_labels == c), key=lambda i: -scores[i])  # stable
    npos = int((gt_labels == c).sum())
    taken = set()
    tp = []
    for i in order:
        cand = [j for j in range(len(gt_boxes))
                if gt_labels[j] == c and gt_scene[j] == pred_scene[i]]
        ovmax, jmax = -np.inf, -1
        for j in cand:
            if iou[i, j] > ovmax:
                ovmax, jmax = iou[i, j], j
        hit = ovmax > thr and jmax not in taken
        if hit:
            taken.add(jmax)
        tp.append(1.0 if hit else 0.0)
    tp = np.array(tp)
    rec = np.cumsum(tp) / npos
    prec = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for k in range(len(mpre) - 2, -1, -1):
        mpre[k] = max(mpre[k], mpre[k + 1])
    k = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(((mrec[k + 1] - mrec[k]) * mpre[k + 1]).sum())


@pytest.fixture(scope="module")
def rooms():
    rng = np.random.default_rng(7)
    scenes = []
    for seed in range(5):
        gb, gl = room_objects(seed)
        pb, pl, ps = noisy_predictions(rng, gb, gl)
        scenes.append((gb, gl, pb, pl, ps))
    return scenes


def test_room_scenes_ap_equals_the_sequential_voc_loop(rooms):
    cat = lambda i: np.concatenate([s[i] for s in rooms])  # noqa: E731
    gb, gl, pb, pl, ps = (cat(i) for i in range(5))
    gs = np.concatenate([np.full(len(s[0]), k) for k, s in enumerate(rooms)])
    sc = np.concatenate([np.full(len(s[2]), k) for k, s in enumerate(rooms)])
    tt = torch.from_numpy
    res = evaluate_detection(tt(pb), tt(ps), tt(pl), tt(sc), tt(gb), tt(gl), tt(gs), 7,
                             class_names=NAMES)
    checked = 0
    for thr in (0.25, 0.5):
        for c in range(7):
            if (gl == c).sum() == 0:
                assert math.isnan(res.ap(thr)[c])
                continue
            assert res.ap(thr)[c] == pytest.approx(voc_loop(pb, ps, pl, sc, gb, gl, gs, c, thr),
                                                   abs=1e-12), (thr, NAMES[c])
            checked += 1
    assert checked >= 8
    assert 0.1 < res.mean_ap(0.5) < res.mean_ap(0.25) < 1.0  # noisy: neither 0 nor perfect
    # perfect predictions of the same rooms: every AP is 1
    perfect = evaluate_detection(tt(gb), tt(np.linspace(1, 0, len(gb))), tt(gl), tt(gs), tt(gb),
                                 tt(gl), tt(gs), 7)
    assert perfect.mean_ap(0.25) == perfect.mean_ap(0.5) == 1.0


def test_evaluator_over_batches_equals_one_call_and_report_files(rooms, tmp_path):
    names = NAMES + ["lamp"]  # a class without ground truth (nor predictions)
    ev = DetectionEvaluator(8, class_names=names)
    for k in range(0, 5, 2):  # batches of up to two scenes
        batch = rooms[k:k + 2]
        cat = lambda i: torch.from_numpy(np.concatenate([s[i] for s in batch]))  # noqa: E731
        pbatch = torch.cat([torch.full((len(s[2]),), j) for j, s in enumerate(batch)])
        gbatch = torch.cat([torch.full((len(s[0]),), j) for j, s in enumerate(batch)])
        ev.update(cat(2), cat(4), cat(3), cat(0), cat(1), pred_batch=pbatch, gt_batch=gbatch)
    res = ev.compute()
    cat = lambda i: np.concatenate([s[i] for s in rooms])  # noqa: E731
    gs = np.concatenate([np.full(len(s[0]), k) for k, s in enumerate(rooms)])
    sc = np.concatenate([np.full(len(s[2]), k) for k, s in enumerate(rooms)])
    tt = torch.from_numpy
    ref = evaluate_detection(tt(cat(2)), tt(cat(4)), tt(cat(3)), tt(sc), tt(cat(0)), tt(cat(1)),
                             tt(gs), 8, class_names=names)
    for thr in (0.25, 0.5):
        np.testing.assert_array_equal(res.ap(thr), ref.ap(thr))
        assert math.isnan(res.ap(thr)[7]) and not np.isnan(res.ap(thr)[:7]).any()
    # the report: markdown table, JSON numbers, a PNG plot; written atomically
    (tmp_path / "detection.md").write_text("stale")
    paths = write_detection_report(res, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detection.json", "detection.md",
                                                         "detection_pr.png"]
    md = paths["markdown"].read_text()
    assert "| class | GT | pred | AP@0.25 | AR@0.25 | AP@0.5 | AR@0.5 |" in md
    assert f"{100 * res.mean_ap(0.5):.2f}" in md and "| chair |" in md
    data = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["results"]["0.5"]["mAP"] == pytest.approx(res.mean_ap(0.5))
    assert data["results"]["0.25"]["ap"]["chair"] == pytest.approx(res.ap(0.25)[2])
    assert data["num_gt"] == res.num_gt.tolist()
    assert len(data["results"]["0.25"]["curves"]["chair"]["recall"]) == res.num_pred[2]
    assert data["results"]["0.5"]["ap"]["lamp"] is None  # no ground truth: null, not NaN
    assert "| lamp | 0 | 0 | n/a | n/a | n/a | n/a |" in md
    from PIL import Image

    with Image.open(paths["plot"]) as img:
        assert img.format == "PNG" and img.size == (int(5.5 * 2 * 110), 5 * 110)
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 10
