"""FPS, ball query and 3D NMS (mink_ssl.ops) against brute-force NumPy versions written from
their definitions, on random inputs, a real depth frame and the output of a real ME network."""
import math

import numpy as np
import pytest
import torch

from data_prep.synthetic import make_room, sample_room_points
from mink_ssl.ops import ball_query, farthest_point_sampling, nms_3d
from mink_ssl.ops.boxes import box_iou

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---- brute-force references (definitions, no incremental state) --------------------------------

def fps_brute(x: np.ndarray, num: int, start: int = 0) -> list[int]:
    """Each step: the unselected point whose distance to the selected set is largest (first on
    ties), the distance to the set recomputed from scratch."""
    sel = [start]
    for _ in range(num - 1):
        d = ((x[:, None, :] - x[None, sel, :]) ** 2).sum(-1).min(axis=1)  # (n,)
        d[sel] = -1
        sel.append(int(np.argmax(d)))
    return sel


def ball_brute(points: np.ndarray, centre: np.ndarray, radius: float, k: int):
    """First k points (index order) with squared distance < radius^2, padded with the first."""
    found = [i for i in range(len(points)) if ((points[i] - centre) ** 2).sum() < radius ** 2][:k]
    if not found:
        return [-1] * k, 0
    return found + [found[0]] * (k - len(found)), len(found)


def aligned_iou_brute(a, b) -> float:
    inter = 1.0
    for d in range(3):
        lo = max(a[d] - a[d + 3] / 2, b[d] - b[d + 3] / 2)
        hi = min(a[d] + a[d + 3] / 2, b[d] + b[d + 3] / 2)
        inter *= max(0.0, hi - lo)
    return inter / (np.prod(a[3:6]) + np.prod(b[3:6]) - inter)


def nms_brute(scores, iou, thr, groups=None) -> list[int]:
    """Greedy NMS over a list: take the best remaining box, drop those it overlaps > thr."""
    remaining = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    while remaining:
        i = remaining.pop(0)
        keep.append(i)
        remaining = [j for j in remaining
                     if not (iou(i, j) > thr and (groups is None or groups[i] == groups[j]))]
    return keep


def random_scenes(rng, sizes, d=3):
    """Packed points of scenes with the given sizes, rows of the scenes interleaved."""
    batch = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(batch)
    return rng.random((len(batch), d)) * [4.0, 3.0, 2.0][:d], batch


# ---- farthest point sampling --------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_fps_padded_batch_equals_brute_force(device):
    rng = np.random.default_rng(0)
    x = rng.random((3, 300, 3))
    out = farthest_point_sampling(torch.from_numpy(x).to(device), 40)
    assert out.shape == (3, 40) and out.dtype == torch.int64 and out.device.type == device
    for b in range(3):
        assert out[b].tolist() == fps_brute(x[b], 40)
    # float32 coordinates pick the same points here
    assert torch.equal(farthest_point_sampling(torch.from_numpy(x).float().to(device), 40), out)


@pytest.mark.parametrize("device", DEVICES)
def test_fps_packed_scenes_return_rows_of_their_own_scene(device):
    rng = np.random.default_rng(1)
    x, batch = random_scenes(rng, [120, 45, 300])
    out = farthest_point_sampling(torch.from_numpy(x).to(device), 45,
                                  batch_index=torch.from_numpy(batch).to(device))
    assert out.shape == (3, 45)
    for b in range(3):
        rows = np.flatnonzero(batch == b)  # the scene's rows, in order: start is rows[0]
        expected = rows[fps_brute(x[rows], 45)]
        assert out[b].cpu().tolist() == expected.tolist()
        assert (batch[out[b].cpu().numpy()] == b).all()


def test_fps_random_start_from_a_generator():
    rng = np.random.default_rng(2)
    x, batch = random_scenes(rng, [60, 80])
    xt, bt = torch.from_numpy(x), torch.from_numpy(batch)
    runs = [farthest_point_sampling(xt, 10, batch_index=bt,
                                    generator=torch.Generator().manual_seed(s)) for s in range(6)]
    again = farthest_point_sampling(xt, 10, batch_index=bt,
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(runs[0], again)  # seeded: reproducible
    starts = {tuple(r[:, 0].tolist()) for r in runs}
    assert len(starts) > 1  # the start moves with the seed
    for r in runs:
        for b in range(2):
            rows = np.flatnonzero(batch == b)
            local = int(np.flatnonzero(rows == int(r[b, 0]))[0])
            assert r[b].tolist() == rows[fps_brute(x[rows], 10, start=local)].tolist()


def test_fps_ties_duplicates_and_all_points():
    # unit square corners plus a duplicate of point 0, hand-worked: start 0, then the far
    # corner 3 (d^2 = 2), then 1 and 2 tie at d^2 = 1 (lowest index first), then the
    # duplicate 4 (distance 0, yet never a repeat of an already selected point)
    sq = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    assert farthest_point_sampling(sq[None], 5)[0].tolist() == [0, 3, 1, 2, 4]
    # all points identical: every index once, in order
    same = torch.ones(1, 6, 3)
    assert farthest_point_sampling(same, 6)[0].tolist() == [0, 1, 2, 3, 4, 5]
    # on an integer grid (many exact ties) the result equals brute force
    g = np.stack(np.meshgrid(np.arange(4), np.arange(4), np.arange(2)), -1).reshape(-1, 3)
    g = g.astype(np.float64)
    assert farthest_point_sampling(torch.from_numpy(g)[None], 20)[0].tolist() == fps_brute(g, 20)


def test_fps_bad_inputs_name_the_problem():
    x = torch.rand(10, 3)
    batch = torch.tensor([0] * 7 + [1] * 3)
    with pytest.raises(ValueError, match=r"scene 1 has 3 points, fewer than num=5"):
        farthest_point_sampling(x, 5, batch_index=batch)
    with pytest.raises(ValueError, match=r"scene 0 has 10 points, fewer than num=11"):
        farthest_point_sampling(x[None], 11)
    with pytest.raises(ValueError, match="num must be a positive int"):
        farthest_point_sampling(x, 0)
    with pytest.raises(ValueError, match="floating point"):
        farthest_point_sampling(torch.ones(1, 5, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"batch_index must have shape \(10,\)"):
        farthest_point_sampling(x, 2, batch_index=batch[:4])
    with pytest.raises(ValueError, match="already a padded batch"):
        farthest_point_sampling(x[None], 2, batch_index=batch)


# ---- ball query ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_ball_query_padded_equals_brute_force_and_chunking_changes_nothing(device):
    rng = np.random.default_rng(3)
    pts, ctr = rng.random((2, 400, 3)), rng.random((2, 30, 3))
    ctr[0, 0] = [5.0, 5.0, 5.0]  # an empty ball
    p, c = torch.from_numpy(pts).to(device), torch.from_numpy(ctr).to(device)
    idx, count = ball_query(p, c, 0.15, 8)
    assert idx.shape == (2, 30, 8) and count.shape == (2, 30) and idx.device.type == device
    for b in range(2):
        for m in range(30):
            exp_idx, exp_n = ball_brute(pts[b], ctr[b, m], 0.15, 8)
            assert idx[b, m].tolist() == exp_idx and int(count[b, m]) == exp_n
    assert idx[0, 0].tolist() == [-1] * 8 and int(count[0, 0]) == 0
    assert (count == 8).any() and ((count > 0) & (count < 8)).any()  # full and padded rows
    small = ball_query(p, c, 0.15, 8, chunk_elems=7)  # one centre at a time
    assert torch.equal(small[0], idx) and torch.equal(small[1], count)


@pytest.mark.parametrize("device", DEVICES)
def test_ball_query_packed_stays_in_scene(device):
    rng = np.random.default_rng(4)
    pts, pb = random_scenes(rng, [150, 90])
    ctr, cb = random_scenes(rng, [12, 9])
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    idx, count = ball_query(t(pts), t(ctr), 0.6, 5, points_batch=t(pb), centres_batch=t(cb),
                            chunk_elems=100)
    for m in range(len(ctr)):
        rows = np.flatnonzero(pb == cb[m])
        exp_idx, exp_n = ball_brute(pts[rows], ctr[m], 0.6, 5)
        assert idx[m].cpu().tolist() == [int(rows[i]) if i >= 0 else -1 for i in exp_idx]
        assert int(count[m]) == exp_n


def test_ball_query_boundary_is_strict_and_padding_repeats_first():
    pts = torch.tensor([[0.5, 0, 0], [1.0, 0, 0], [0, 0, 0], [0, -0.5, 0], [3, 0, 0]])
    idx, count = ball_query(pts[None], torch.zeros(1, 1, 3), 1.0, 5)
    # point 1 lies exactly at the radius: out (d^2 < r^2); 0, 2, 3 in, in index order
    assert idx[0, 0].tolist() == [0, 2, 3, 0, 0] and int(count[0, 0]) == 3
    idx, count = ball_query(pts[None], torch.zeros(1, 1, 3), 1.0, 2)
    assert idx[0, 0].tolist() == [0, 2] and int(count[0, 0]) == 2  # the first k only


def test_ball_query_bad_inputs_name_the_problem():
    p, c = torch.rand(1, 10, 3), torch.rand(1, 4, 3)
    with pytest.raises(ValueError, match="radius must be a positive number"):
        ball_query(p, c, 0.0, 4)
    with pytest.raises(ValueError, match="k must be a positive int"):
        ball_query(p, c, 0.1, 0)
    with pytest.raises(ValueError, match="both be padded"):
        ball_query(p, c[0], 0.1, 4)
    with pytest.raises(ValueError, match="pass both points_batch and centres_batch"):
        ball_query(p[0], c[0], 0.1, 4, points_batch=torch.zeros(10, dtype=torch.long))


# ---- real inputs: a depth frame and a real ME network's output ----------------------------------

def test_fps_and_ball_query_on_a_real_depth_frame(kitchen_frame):
    from mink_ssl.geometry import backproject

    depth, K, pose = kitchen_frame
    pts, _ = backproject(depth, K, 1000.0, pose, stride=10)  # (~3000, 3) metres, world frame
    x = pts.astype(np.float64)
    seeds = farthest_point_sampling(torch.from_numpy(x), 64)
    assert seeds[0].tolist() == fps_brute(x, 64)
    idx, count = ball_query(torch.from_numpy(x), torch.from_numpy(x[seeds[0].numpy()]), 0.2, 16)
    assert (count >= 1).all()  # a seed is in its own ball
    for m in range(0, 64, 8):
        exp_idx, exp_n = ball_brute(x, x[int(seeds[0, m])], 0.2, 16)
        assert idx[m].tolist() == exp_idx and int(count[m]) == exp_n
    # FPS spreads seeds: their smallest pairwise distance beats 64 random points' by far
    d = torch.cdist(torch.from_numpy(x[seeds[0].numpy()]), torch.from_numpy(x[seeds[0].numpy()]))
    rnd = torch.from_numpy(x[np.random.default_rng(0).choice(len(x), 64, replace=False)])
    d_rnd = torch.cdist(rnd, rnd)
    off = ~torch.eye(64, dtype=torch.bool)
    assert d[off].min() > 3 * d_rnd[off].min()


def test_vote_style_grouping_of_real_network_features():
    """Seeds by FPS on the voxels of a real Res16UNet14A output (two scenes, packed as ME
    returns them), neighbourhoods by ball query, features gathered per group."""
    from mink_ssl.models import build_model
    from mink_ssl.sparse import batched_coordinates, quantize, sparse_tensor

    voxel = 0.1
    coords, feats = [], []
    for seed in (0, 1):
        pts, colors, _, _ = sample_room_points(make_room(seed), 6000, seed=seed)
        q = quantize(pts, voxel)
        coords.append(q.coords)
        feats.append(torch.from_numpy(colors[q.index.numpy()]).float() / 255 - 0.5)
    torch.manual_seed(0)
    net = build_model("Res16UNet14A", in_channels=3, out_channels=8).eval()
    with torch.no_grad():
        out = net(sparse_tensor(batched_coordinates(coords), torch.cat(feats)))
    batch = out.C[:, 0].long()
    # voxel units: distances on the grid are exact, so its many exact ties are reproducible
    # (in metres, rounding would break them differently in any two implementations)
    xyz = out.C[:, 1:].double()
    seeds = farthest_point_sampling(xyz, 32, batch_index=batch)  # (2, 32) rows of out
    idx, count = ball_query(xyz, xyz[seeds.reshape(-1)], 3.5, 12, points_batch=batch,
                            centres_batch=batch[seeds.reshape(-1)])
    grouped = out.F[idx]  # (64, 12, 8) features of each seed's neighbourhood
    assert grouped.shape == (64, 12, 8) and (count >= 1).all()
    x_np, b_np = xyz.numpy(), batch.numpy()
    for s in range(2):
        rows = np.flatnonzero(b_np == s)
        assert seeds[s].tolist() == rows[fps_brute(x_np[rows], 32)].tolist()
    for m in range(0, 64, 7):
        rows = np.flatnonzero(b_np == b_np[int(seeds.reshape(-1)[m])])
        exp_idx, _ = ball_brute(x_np[rows], x_np[int(seeds.reshape(-1)[m])], 3.5, 12)
        assert idx[m].tolist() == rows[exp_idx].tolist()
        assert torch.equal(grouped[m], out.F[rows[exp_idx]])


# ---- 3D NMS -------------------------------------------------------------------------------------

def random_boxes(rng, n, heading=False):
    c = rng.random((n, 3)) * [3.0, 3.0, 1.0]
    s = rng.random((n, 3)) * 0.8 + 0.3
    cols = [c, s] + ([rng.uniform(-math.pi, math.pi, (n, 1))] if heading else [])
    return np.concatenate(cols, axis=1)


@pytest.mark.parametrize("device", DEVICES)
def test_nms_axis_aligned_equals_brute_force(device):
    rng = np.random.default_rng(5)
    boxes, scores = random_boxes(rng, 120), rng.random(120)
    labels = rng.integers(0, 3, 120)
    iou = lambda i, j: aligned_iou_brute(boxes[i], boxes[j])  # noqa: E731
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    for thr in (0.05, 0.25, 0.5):
        keep = nms_3d(t(boxes), t(scores), thr)
        assert keep.device.type == device
        assert keep.tolist() == nms_brute(scores, iou, thr)
        per_class = nms_3d(t(boxes), t(scores), thr, labels=t(labels))
        assert per_class.tolist() == nms_brute(scores, iou, thr, groups=labels)
        assert len(per_class) > len(keep)  # classes do not suppress each other
    assert len(nms_3d(t(boxes), t(scores), 0.05)) < 120 // 2  # something was suppressed


def test_nms_oriented_per_scene_equals_greedy_over_the_iou_matrix():
    rng = np.random.default_rng(6)
    boxes, scores = random_boxes(rng, 80, heading=True), rng.random(80)
    scene = rng.integers(0, 2, 80)
    m = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy()  # (80, 80) oriented
    keep = nms_3d(torch.from_numpy(boxes), torch.from_numpy(scores), 0.2,
                  batch_index=torch.from_numpy(scene), mode="oriented")
    assert keep.tolist() == nms_brute(scores, lambda i, j: m[i, j], 0.2, groups=scene)
    # heading matters: dropping it changes the kept set
    aligned = nms_3d(torch.from_numpy(boxes[:, :6]), torch.from_numpy(scores), 0.2,
                     batch_index=torch.from_numpy(scene))
    assert aligned.tolist() != keep.tolist()


def test_nms_ties_duplicates_and_edge_cases():
    box = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    boxes = torch.tensor([box, box, [5.0, 5.0, 5.0, 1.0, 1.0, 1.0], box])
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5])
    # exact duplicates: only the best survives; equal scores keep input order (0 before 2)
    assert nms_3d(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms_3d(boxes, torch.full((4,), 0.3), 0.5).tolist() == [0, 2]
    # IoU 1/3 (shift by half a side): suppressed at 0.3, kept at exactly 1/3 (strictly above only)
    shifted = torch.tensor([box, [1.5, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert nms_3d(shifted, torch.tensor([0.9, 0.8]), 0.3).tolist() == [0]
    assert nms_3d(shifted, torch.tensor([0.9, 0.8]), 1 / 3).tolist() == [0, 1]
    assert nms_3d(torch.zeros(0, 7), torch.zeros(0), 0.25).tolist() == []
    with pytest.raises(ValueError, match=r"scores must be a tensor of shape \(4,\)"):
        nms_3d(boxes, scores[:3], 0.5)
    with pytest.raises(ValueError, match="size <= 0"):
        nms_3d(torch.tensor([[0, 0, 0, 1.0, -1.0, 1.0]]), torch.ones(1), 0.5)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor"):
        nms_3d(boxes, scores, 0.5, labels=torch.ones(4))
