"""cluster_render objective (CluRender): Sinkhorn-Knopp equal partitions, the clustering loss and
its gradient, the splatting renderer against hand-computed pixels and on a real 7-Scenes frame,
the fitting losses, gradients through a real network, and real trainer runs."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mink_ssl.data.batch import PairBatch, View
from mink_ssl.objectives import OBJECTIVES, StepContext
from mink_ssl.objectives.cluster_render import (ClusterRender, clustering_loss, fitting_l1,
                                                fitting_sinkhorn, prototypes,
                                                sinkhorn_soft_labels)
from mink_ssl.objectives.render import splat_points
from mink_ssl.sparse import batched_coordinates

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --- Sinkhorn-Knopp and the clustering loss ----------------------------------------------------

def scene_costs(seed, sizes, j=64, sharpness=(0.0, 3.0, 30.0, 300.0)):
    """Squared distances of each scene's points (a box with a floor plane) to J prototypes that
    are score-weighted means (eq. 2) for scores from uniform to nearly hard."""
    rng = np.random.default_rng(seed)
    costs, segs = [], []
    for s, n in enumerate(sizes):
        x = rng.uniform(0, 1, (n, 3)) * rng.uniform(0.5, 4, 3)
        x[: n // 2, 2] = 0.0  # a floor
        centres = x[rng.choice(n, j, replace=False)]
        d = ((x[:, None] - centres[None]) ** 2).sum(-1)
        scores = np.exp(-d * sharpness[s % len(sharpness)])
        scores /= scores.sum(1, keepdims=True)
        protos = scores.T @ x / scores.sum(0)[:, None]
        costs.append(((x[:, None] - protos[None]) ** 2).sum(-1))
        segs.append(np.full(n, s))
    return torch.from_numpy(np.concatenate(costs)).float(), torch.from_numpy(np.concatenate(segs))


def test_sinkhorn_labels_are_sharp_and_nearly_balanced_for_the_defaults():
    sizes = (300, 2500, 800, 4096, 1200, 64)
    cost, seg = scene_costs(0, sizes)
    gamma = sinkhorn_soft_labels(cost, seg, len(sizes))  # eps 1e-3, cost_scale 0.05, 100 its
    assert torch.isfinite(gamma).all() and (gamma >= 0).all()
    # rows sum to 1 (the last update is the rows'), up to float32 rounding of log-kernels ~50
    torch.testing.assert_close(gamma.sum(1), torch.ones(len(gamma)), atol=5e-5, rtol=0)
    for s, n in enumerate(sizes):
        mass = gamma[seg == s].sum(0) * 64 / n  # (J,) cluster sizes relative to N/J
        assert (mass - 1).abs().max() < 0.08, (s, (mass - 1).abs().max())
    # prototypes from non-uniform scores: labels far sharper than uniform (1/64)
    assert gamma[seg % 4 != 0].max(1).values.mean() > 0.45
    # the earlier temperature (0.5 mean costs): balanced to 1e-3 after 20 iterations, but soft
    soft = sinkhorn_soft_labels(cost, seg, len(sizes), cost_scale=2e-3, iterations=20)
    assert (soft[seg == 1].sum(0) * 64 / 2500 - 1).abs().max() < 1e-3
    assert soft[seg % 4 != 0].max(1).values.mean() < 0.1
    # costs of unit-scale objects (mean 1) with eps 1e-3, as in the paper: the plan is nearly
    # hard and 20 iterations do not balance the clusters; in log space nothing overflows
    hard = sinkhorn_soft_labels(cost, seg, len(sizes), cost_scale=1.0, iterations=20)
    assert torch.isfinite(hard).all() and hard[seg % 4 != 0].max(1).values.mean() > 0.9
    assert (hard[seg == 1].sum(0) * 64 / 2500 - 1).abs().max() > 1e-2


def test_uniform_scores_are_a_stationary_point_that_the_default_temperature_leaves():
    """Uniform scores: every prototype is the scene's centroid, the labels are uniform and the
    loss's gradient is zero at any temperature. A head near it (logits with a std of 0.4, as a
    fresh cluster head gives) on real-scene-like points gets labels sharper than its scores at
    the default temperature, so the gradient leads away; at the earlier 0.5 mean costs the
    labels were as flat as the scores and clustering stayed at the uniform point."""
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.uniform(0, 1, (2000, 3)) * [6.0, 4.0, 2.5])
    seg = torch.zeros(2000, dtype=torch.long)
    flat = torch.zeros(2000, 64, dtype=torch.float64, requires_grad=True)
    out = clustering_loss(flat, x, seg)
    assert out["stat_cluster_max_label"].item() == pytest.approx(1 / 64, rel=1e-9)
    out["loss_cluster_soft"].backward()
    assert flat.grad.abs().max().item() < 1e-12
    # near the point: spatially smooth logits, as a head on a UNet's features gives
    w = torch.from_numpy(rng.normal(size=(3, 64)))
    logits = (x @ w) / (x @ w).std() * 0.4
    score_max = logits.softmax(1).max(1).values.mean().item()
    sharp = clustering_loss(logits, x, seg)["stat_cluster_max_label"].item()
    earlier = clustering_loss(logits, x, seg, cost_scale=2e-3,
                              iterations=20)["stat_cluster_max_label"].item()
    assert sharp > 1.5 * score_max > earlier, (sharp, score_max, earlier)


def test_sinkhorn_equals_the_multiplicative_algorithm_and_balances_clusters():
    cost, seg = scene_costs(1, (500,), j=8)
    gamma = sinkhorn_soft_labels(cost.double(), seg, 1, cost_scale=2e-3, iterations=20)
    # Algorithm 2 (with exp(-D / eps)), same scaled cost, same update order, float64
    K = torch.exp(-cost.double() / cost.double().mean() * 2.0)  # cost_scale / eps = 2
    u, v = torch.ones(500, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    for _ in range(20):
        v = (1 / 8) / (K.T @ u)
        u = (1 / 500) / (K @ v)
    torch.testing.assert_close(gamma, 500 * u[:, None] * K * v[None], rtol=1e-9, atol=1e-12)
    # four blobs of 30 points: the soft labels pick each point's own blob; with one blob of 90
    # and three of 10 the equal-partition constraint moves labels out of the big blob
    rng = np.random.default_rng(2)
    centres = np.array([[0, 0, 0], [3, 0, 0], [0, 3, 0], [0, 0, 3.0]])
    for sizes in ((30, 30, 30, 30), (90, 10, 10, 10)):
        x = np.concatenate([c + rng.normal(size=(n, 3)) * 0.1 for c, n in zip(centres, sizes)])
        blob = torch.from_numpy(np.repeat(np.arange(4), sizes))
        d = torch.from_numpy(((x[:, None] - centres[None]) ** 2).sum(-1)).float()
        g = sinkhorn_soft_labels(d, torch.zeros(120, dtype=torch.long), 1, cost_scale=1e-2)
        torch.testing.assert_close(g.sum(0), torch.full((4,), 30.0), rtol=1e-3, atol=0)
        if sizes[1] == 30:
            assert (g.argmax(1) == blob).all() and g.max(1).values.min() > 0.99
        else:  # only 30 of the big blob's 90 labels stay in its own cluster
            assert g[blob == 0, 0].sum().item() == pytest.approx(30, abs=0.5)


def test_clustering_loss_equals_equations_and_its_gradient_stops_at_the_labels():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.uniform(0, 2, (90, 3))).double()
    seg = torch.from_numpy(np.repeat([0, 1], [50, 40]))
    logits = torch.from_numpy(rng.normal(size=(90, 6)) * 2).requires_grad_(True)
    out = clustering_loss(logits, x, seg, orth_weight=0.5)
    s = logits.detach().softmax(1).numpy()
    xs = x.numpy()
    soft, orth = [], []
    gamma = []
    for k in range(2):
        rows = (seg == k).numpy()
        xc = xs[rows] - xs[rows].mean(0)
        c = s[rows].T @ xc / s[rows].sum(0)[:, None]  # eq. 2
        np.testing.assert_allclose(prototypes(torch.from_numpy(s[rows]), torch.from_numpy(xc),
                                              torch.zeros(rows.sum(), dtype=torch.long), 1)[0],
                                   c, rtol=1e-10)
        d = ((xc[:, None] - c[None]) ** 2).sum(-1)
        g = sinkhorn_soft_labels(torch.from_numpy(d), torch.zeros(len(d), dtype=torch.long), 1)
        gamma.append(g.numpy())
        soft.append(-(g.numpy() * np.log(s[rows])).sum(1).mean())  # eq. 13
        cn = c / np.linalg.norm(c, axis=1, keepdims=True)
        orth.append(np.linalg.norm(cn @ cn.T - np.eye(6)))  # eq. 14
    assert out["loss_cluster_soft"].item() == pytest.approx(np.mean(soft), rel=1e-9)
    assert out["loss_cluster_orth"].item() == pytest.approx(0.5 * np.mean(orth), rel=1e-9)
    # stop-gradient costs: d L_soft / d logits = (softmax - gamma) / N_scene / #scenes exactly
    out["loss_cluster_soft"].backward()
    expected = np.concatenate([(s[(seg == k).numpy()] - gamma[k]) / n / 2
                               for k, n in enumerate((50, 40))])
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match=r"logits \(N, J\)"):
        clustering_loss(torch.zeros(5, 4), torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


# --- the renderer -------------------------------------------------------------------------------

RED, GREEN, BLUE = torch.eye(3, dtype=torch.float64)


def two_points(depth_b=2.0):
    """A (0, 0, 1): red, opacity 0.5, projects to pixel (u, v) = (2, 2). B: green, opacity 1,
    projects to (2.5, 2) at depth ``depth_b``. Camera: identity pose, f = 10, c = (2, 2), 5x5."""
    points = torch.tensor([[0.0, 0.0, 1.0], [0.05 * depth_b, 0.0, depth_b]], dtype=torch.float64)
    K = torch.tensor([[[10.0, 0, 2], [0, 10, 2], [0, 0, 1]]], dtype=torch.float64)
    return points, torch.stack([RED, GREEN]), torch.tensor([0.5, 1.0], dtype=torch.float64), K


def test_renderer_reproduces_hand_computed_pixels_of_two_points():
    points, colors, opacity, K = two_points()
    eye = torch.eye(4, dtype=torch.float64)[None]
    zero = torch.zeros(2, dtype=torch.long)
    kw = dict(radius=1.0, sigma=1.0, opacity=opacity)
    r = splat_points(points, colors, zero, eye, K, (5, 5), k=2, **kw)
    img, cov = r.images[0], r.coverage[0]  # (5, 5, 3) rows v, columns u
    a0, a1 = 0.5, 0.5 * math.exp(-0.5)  # A at distance 0 and 1 (opacity 0.5)
    b = math.exp(-0.125)  # B at distance 0.5 (pixels (2, 2) and (2, 3))
    expected = torch.zeros(5, 5, 3, dtype=torch.float64)
    expected[2, 2] = a0 * RED + (1 - a0) * b * GREEN  # A in front of B
    expected[2, 3] = a1 * RED + (1 - a1) * b * GREEN
    expected[2, 1] = expected[1, 2] = expected[3, 2] = a1 * RED  # B is 1.5 / 1.12 px away
    torch.testing.assert_close(img, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, expected.sum(-1))  # single-colour points: coverage = sum
    # k = 1 keeps only the nearest splat per pixel
    one = splat_points(points, colors, zero, eye, K, (5, 5), k=1, **kw).images[0]
    torch.testing.assert_close(one[2, 3], a1 * RED)
    # B moved in front of A (same pixel position): the order of composition flips
    front = splat_points(*two_points(depth_b=0.5)[:2], zero, eye, K, (5, 5), k=2, **kw)
    torch.testing.assert_close(front.images[0, 2, 2], b * GREEN + (1 - b) * a0 * RED)
    # eta sharpens alpha = opacity * rho^eta; a background fills the uncovered remainder
    sharp = splat_points(points, colors, zero, eye, K, (5, 5), k=2, eta=2.0, **kw).images[0]
    torch.testing.assert_close(sharp[2, 1], 0.5 * math.exp(-1.0) * RED)
    bg = splat_points(points, colors, zero, eye, K, (5, 5), k=2, background=BLUE, **kw)
    torch.testing.assert_close(bg.images[0, 2, 2], expected[2, 2] + (1 - cov[2, 2]) * BLUE)
    torch.testing.assert_close(bg.images[0, 0, 0], BLUE)
    # two images in one call: the second camera is moved 10 cm left, A lands on column 3;
    # a point behind the camera is culled
    shifted = eye.clone()
    shifted[0, 0, 3] = 0.1
    both = splat_points(torch.cat([points[:1], points[:1] * -1]), colors,
                         torch.tensor([1, 1]), torch.cat([eye, shifted]), K.expand(2, 3, 3),
                         (5, 5), k=2, **kw)
    assert both.coverage[0].sum() == 0
    torch.testing.assert_close(both.images[1, 2, 3], a0 * RED)
    with pytest.raises(ValueError, match="image_index spans"):
        splat_points(points, colors, torch.tensor([0, 3]), eye, K, (5, 5))


def test_renderer_gradients_reach_colours_and_opacities():
    torch.manual_seed(0)
    points = torch.rand(12, 3, dtype=torch.float64) * torch.tensor([0.6, 0.6, 0.5]) + \
        torch.tensor([-0.3, -0.3, 1.0])
    K = torch.tensor([[[8.0, 0, 3.5], [0, 8, 3.5], [0, 0, 1]]], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)[None]
    colors = torch.rand(12, 3, dtype=torch.float64, requires_grad=True)
    opacity = (torch.rand(12, dtype=torch.float64) * 0.6 + 0.2).requires_grad_(True)

    def render(c, o):
        return splat_points(points, c, torch.zeros(12, dtype=torch.long), eye, K, (8, 8),
                             radius=1.5, k=4, opacity=o).images

    assert torch.autograd.gradcheck(render, (colors, opacity))
    render(colors, opacity).sum().backward()
    assert (colors.grad.abs().sum(1) > 0).sum() >= 10 and (opacity.grad != 0).sum() >= 10


@pytest.fixture(scope="module")
def kitchen_pairs(kitchen, tmp_path_factory):
    from data_prep.pairs.prep import PrepParams, run

    raw = tmp_path_factory.mktemp("raw")
    (raw / "redkitchen").symlink_to(kitchen)
    out = tmp_path_factory.mktemp("pairs")
    run(raw, out, PrepParams(frame_skip=50), progress=False)
    return out


def test_real_fragment_rendered_into_its_camera_reproduces_the_real_frame(kitchen_pairs):
    """A real 7-Scenes fragment with its true colours, through PairDataset(frame_size) and the
    renderer, reproduces its own RGB frame and the overlapping part of the other view's frame:
    projection, poses and the scaled intrinsics are right."""
    from mink_ssl.data.pairs import PairDataset, collate_pairs

    ds = PairDataset(kitchen_pairs, voxel_size=0.025, seed=0, frame_size=(60, 80))
    batch = collate_pairs([ds[(0, 0)]])

    def mae(view, cam, pose=None):
        v, c = batch.views[view], batch.views[cam]
        pose = c.poses if pose is None else pose
        r = splat_points(v.world, v.feats + 0.5, v.batch_index, torch.linalg.inv(pose),
                          c.intrinsics, (60, 80), k=8)  # feats + 0.5: the true colours
        mask = r.coverage[0] > 0.5
        rgb = r.images[0] / r.coverage[0, ..., None].clamp_min(1e-6)
        target = c.frames[0].float() / 255
        constant = (target[mask] - target[mask].mean(0)).abs().mean().item()
        return (rgb - target).abs().mean(-1)[mask].mean().item(), constant, mask.float().mean()

    own, constant, coverage = mae(0, 0)
    assert coverage > 0.8 and own < 0.3 * constant, (own, constant, coverage)
    other, constant, coverage = mae(1, 0)  # view 1's voxels seen from view 0's camera
    assert coverage > 0.3 and other < 0.4 * constant, (other, constant, coverage)
    moved = batch.views[0].poses.clone()
    moved[0, :3, 3] += moved[0, :3, 0] * 0.1  # the camera 10 cm to its right: misaligned
    wrong, _, _ = mae(0, 0, moved)
    assert wrong > 2 * own, (wrong, own)


# --- fitting losses -----------------------------------------------------------------------------

def test_fitting_losses():
    torch.manual_seed(0)
    target = torch.rand(2, 6, 8, 3)
    mask = torch.zeros(2, 6, 8, dtype=torch.bool)
    mask[0, :3] = True
    mask[1] = True
    rgb = target.clone()
    rgb[0, :3, :, 0] += 0.3  # masked pixels of image 0 off by 0.3 in red
    rgb[1, 0, 0] += 0.6  # one pixel of image 1 off by 0.6 in every channel
    rgb[0, 4:] = 5.0  # outside the mask: ignored
    torch.testing.assert_close(fitting_l1(rgb, target, mask), torch.tensor([0.1, 0.6 / 48]))
    g = torch.Generator().manual_seed(0)
    same = fitting_sinkhorn(target, target, mask, num_pixels=64, generator=g)
    assert same.abs().max() < 1e-4  # a Sinkhorn divergence vanishes on identical images
    losses = [fitting_sinkhorn((target + shift).requires_grad_(True), target, mask,
                               num_pixels=64, generator=torch.Generator().manual_seed(0))
              for shift in (0.1, 0.2, 0.4)]
    assert losses[0][0] > 1e-3 and (losses[0] < losses[1]).all() and (losses[1] < losses[2]).all()
    # misplaced colours (the image mirrored) cost more than nothing but less than pure noise
    mirrored = fitting_sinkhorn(target.flip(2), target, mask[[1, 1]], num_pixels=64)
    assert (mirrored > 1e-3).all()


# --- through the registry, with a real network -------------------------------------------------

def make_frame_batch(num_scenes=2, n=300, size=(24, 32), seed=0, frames=True) -> PairBatch:
    """Each scene: ``n`` random voxels of a 14^3 grid (5 cm) per view, 1-1.7 m in front of
    camera 0 (identity pose); camera 1 is 5 cm to the right. Frames are smooth colour ramps."""
    rng = np.random.default_rng(seed)
    h, w = size
    K = torch.tensor([[30.0, 0, (w - 1) / 2], [0, 30, (h - 1) / 2], [0, 0, 1]])
    views = []
    for v in range(2):
        coords, world = [], []
        for _ in range(num_scenes):
            grid = np.stack(np.unravel_index(rng.choice(14 ** 3, n, replace=False),
                                             (14, 14, 14)), 1).astype(np.int32)
            coords.append(grid)
            world.append(grid * 0.05 + [-0.35, -0.35, 1.0])
        view = View(batched_coordinates(coords), torch.ones(num_scenes * n, 1),
                    torch.from_numpy(np.concatenate(world)).float())
        if frames:
            yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
            ramps = [np.stack([xx, yy, rng.uniform(0, 1) * np.ones_like(xx)], -1)
                     for _ in range(num_scenes)]
            view.frames = torch.from_numpy((np.stack(ramps) * 255).astype(np.uint8))
            view.intrinsics = K.expand(num_scenes, 3, 3).clone()
            view.poses = torch.eye(4).expand(num_scenes, 4, 4).clone()
            view.poses[:, 0, 3] = 0.05 * v
        views.append(view)
    return PairBatch(tuple(views), torch.zeros(0, 2, dtype=torch.long),
                     names=[("a", "b")] * num_scenes)


def tiny_net(in_channels=1):
    from mink_ssl.models import build_model

    torch.manual_seed(0)
    return build_model("Res16UNet14A", in_channels=in_channels, out_channels=16).train()


@pytest.mark.parametrize("fitting_loss", ["sinkhorn", "l1"])
def test_gradients_reach_every_backbone_parameter_and_both_heads(fitting_loss):
    net = tiny_net()
    objective = OBJECTIVES.get("cluster_render")(in_channels=16, num_clusters=16,
                                                 fitting_loss=fitting_loss,
                                                 sinkhorn_pixels=128, seed=0)
    batch = make_frame_batch()
    out = objective(StepContext(batch.to("cpu"), net))
    assert set(out) == {"loss_cluster_soft", "loss_cluster_orth", "loss_render",
                        "stat_cluster_max_label", "stat_cluster_used",
                        "stat_render_coverage", "stat_render_l1"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert not any(v.requires_grad for k, v in out.items() if k.startswith("stat_"))
    assert 0.2 < out["stat_render_coverage"].item() <= 1  # the views see the voxels
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for name, p in objective.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the rendering loss alone reaches the colour head through the renderer
    net.zero_grad()
    objective.zero_grad()
    objective(StepContext(batch, net))["loss_render"].backward()
    assert objective.color_head[-1].weight.grad.abs().sum() > 0
    assert objective.cluster_head[-1].weight.grad is None or \
        objective.cluster_head[-1].weight.grad.abs().sum() == 0


def test_parts_run_apart_and_a_batch_without_frames_is_refused():
    net = tiny_net()
    bare = make_frame_batch(frames=False)
    with pytest.raises(ValueError, match=r"data\.frame_size.*rendering=false"):
        ClusterRender(in_channels=16, num_clusters=8)(StepContext(bare, net))
    only_clusters = ClusterRender(in_channels=16, num_clusters=8, rendering=False)
    assert set(only_clusters(StepContext(bare, net))) == {
        "loss_cluster_soft", "loss_cluster_orth", "stat_cluster_max_label", "stat_cluster_used"}
    assert not hasattr(only_clusters, "color_head")
    only_render = ClusterRender(in_channels=16, clustering=False, fitting_loss="l1",
                                render_other_view=False, views=[1])
    out = only_render(StepContext(make_frame_batch(), net))
    assert set(out) == {"loss_render", "stat_render_coverage", "stat_render_l1"}
    assert not hasattr(only_render, "cluster_head")
    for kw, match in [({"clustering": False, "rendering": False}, "at least one part"),
                      ({"fitting_loss": "l2"}, "fitting_loss must be one of"),
                      ({"views": [0, 2]}, "views must be"), ({"radius": 0}, "radius"),
                      ({"num_clusters": 1}, "num_clusters"), ({"epsilon": 0}, "epsilon")]:
        with pytest.raises(ValueError, match=match):
            ClusterRender(**kw)


# --- configs and the real trainer --------------------------------------------------------------

def test_hydra_config_turns_on_frames_and_passes_the_backbone_channels():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mink_ssl.cli.pretrain import _register_schema
    from mink_ssl.tasks.pretrain import build_objectives

    _register_schema()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=[
            "data.root=/x", "model=res16unet14a", "model.out_channels=24",
            "objective=[point_info_nce,cluster_render]", "objectives.cluster_render.weight=0.1"])
        plain = compose(config_name="pretrain", overrides=["data.root=/x"])
        smaller = compose(config_name="pretrain", overrides=[
            "data.root=/x", "objective=[cluster_render]", "data.frame_size=[30,40]"])
    cfg = OmegaConf.to_object(cfg)
    assert cfg.data.frame_size == [60, 80] and plain.data.frame_size is None
    assert smaller.data.frame_size == [30, 40]
    spec = cfg.objectives["cluster_render"]
    # in_channels null: the run fills in the backbone's out_channels
    assert spec["in_channels"] is None and spec["weight"] == 0.1 and spec["num_clusters"] == 64
    objectives, weights = build_objectives(cfg.objectives, cfg.model.out_channels)
    assert weights["cluster_render"] == 0.1
    assert objectives["cluster_render"].cluster_head[0].in_features == 24
    assert objectives["cluster_render"].color_head[0].in_features == 24


@pytest.fixture(scope="module")
def synthetic_pairs(tmp_path_factory):
    from data_prep.pairs.prep import PrepParams, run as run_prep
    from data_prep.synthetic import generate_scene

    root = tmp_path_factory.mktemp("clurender_synthetic")
    generate_scene(root / "raw", "scene0000_00", 0, n_frames=51, image_size=(160, 120))
    run_prep(root / "raw", root / "pairs", PrepParams(frame_skip=25), progress=False)
    return root / "pairs"


@pytest.mark.slow
def test_pretrain_runs_the_objective_and_lowers_its_loss(synthetic_pairs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mink_ssl.engine.config import ModelConfig, OptimConfig
    from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig, build_dataset, pretrain

    data = DataConfig(root=str(synthetic_pairs), voxel_size=0.1, num_workers=0,
                      max_matches=1000, frame_size=[24, 32], features="rgb")
    assert build_dataset(data, 0).frame_size == (24, 32)
    cfg = PretrainConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16), data=data,
        optim=OptimConfig(name="adam", lr=1e-2, weight_decay=0.0),
        objectives={"cluster_render": {"num_clusters": 16, "sinkhorn_pixels": 128,
                                       "max_points": 2000, "seed": 0}},
        max_iterations=10, batch_size=2, device="cpu", checkpoint_every=0, log_every=1,
        progress=False)
    logs = []
    backbone = pretrain(cfg, tmp_path / "run", print_fn=logs.append)
    assert "10 iterations" in logs[-1]
    state = torch.load(backbone, weights_only=True)["state_dict"]
    assert not any("head" in k for k in state)  # both heads are dropped on export
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    render = [e.value for e in events.Scalars("loss/loss_render")]
    total = [e.value for e in events.Scalars("loss/loss")]
    assert len(render) == 10 and np.isfinite(total).all()
    print("loss_render", np.round(render, 4).tolist(), "loss", np.round(total, 4).tolist())
    assert np.mean(render[-3:]) < 0.8 * np.mean(render[:3]), render
    assert np.mean(total[-3:]) < np.mean(total[:3]), total
    # clustering leaves the uniform stationary point: labels sharper than uniform (1/16),
    # sharpening, and the scores follow them below the uniform loss ln 16
    from mink_ssl.engine.hooks import read_metrics

    rows = list(read_metrics(tmp_path / "run").values())
    label = [r["stat_cluster_render/cluster_max_label"] for r in rows]
    soft = [r["loss_cluster_soft"] for r in rows]
    print("max label", np.round(label, 3).tolist(), "soft", np.round(soft, 3).tolist())
    assert label[0] > 1.5 / 16 and np.mean(label[-3:]) > np.mean(label[:3]), label
    assert np.mean(soft[-3:]) < np.log(16) - 0.05, soft
    coverage = [e.value for e in events.Scalars("stat/stat_cluster_render/render_coverage")]
    assert min(coverage) > 0.1  # real synthetic frames are covered by their fragments
