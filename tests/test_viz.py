"""mink-ssl-viz: pair and feature PLY/PNG files on a real (synthetic ScanNet) prep output, the
software renderer's z-buffer, PCA colours, and the CLI's errors."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mink_ssl.cli.viz import main
from mink_ssl.tools.viz import (Camera, backbone_features, layout_pair, load_fragment, open_pairs,
                          pca_colors, draw_points, write_ply)

o3d = pytest.importorskip("open3d")


@pytest.fixture(scope="module")
def prepped(tmp_path_factory) -> Path:
    from data_prep.pairs.prep import PrepParams, run
    from data_prep.synthetic import generate_scene

    root = tmp_path_factory.mktemp("viz")
    generate_scene(root / "raw", "scene0000_00", 0, n_frames=51)
    manifest = run(root / "raw", root / "pairs", PrepParams(frame_skip=25), progress=False)
    assert manifest["counts"]["pairs_kept"] >= 1
    return root / "pairs"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    from mink_ssl.models import build_model, save_model

    torch.manual_seed(0)
    return save_model(build_model("Res16UNet14A", in_channels=3, out_channels=16),
                      tmp_path_factory.mktemp("model") / "backbone.pth")


def read_ply(path):
    pc = o3d.io.read_point_cloud(str(path))
    return np.asarray(pc.points), np.rint(np.asarray(pc.colors) * 255).astype(int)


def png_stats(path, size=(800, 600)):
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (size[1], size[0], 3)
    colours = np.unique(img.reshape(-1, 3), axis=0)
    covered = (img != 255).any(2).mean()  # background is white
    return len(colours), covered


# ------------------------------------------------------------------------------------ pairs

@pytest.mark.slow
def test_pair_ply_holds_both_views_and_matched_lines(prepped, tmp_path, capsys):
    assert main(["pair", "--data", str(prepped), "--index", "0", "--max-lines", "200",
                 "--out", str(tmp_path)]) == 0
    assert "pair_0.ply" in capsys.readouterr().out
    ds = open_pairs(prepped, 0.025, augment=True, seed=0)  # what the CLI used by default
    sample = ds[0]
    (v0, v1), matches, vs = sample.views, sample.matches.numpy(), 0.025
    n0, n1 = len(v0.coords), len(v1.coords)

    pts, cols = read_ply(tmp_path / "pair_0.ply")
    assert len(pts) == n0 + n1
    # vertices are the voxel centres of each view's network frame, view 1 shifted along x
    np.testing.assert_allclose(pts[:n0], (v0.coords.numpy() + 0.5) * vs, atol=1e-5)
    shift = pts[n0:] - (v1.coords.numpy() + 0.5) * vs
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-4)
    assert shift[0, 0] > 0 and pts[n0:, 0].min() > pts[:n0, 0].max()  # side by side
    np.testing.assert_array_equal(cols[:n0], np.rint((v0.feats.numpy() + 0.5) * 255))

    lines = np.asarray(o3d.io.read_line_set(str(tmp_path / "pair_0.ply")).lines)
    assert len(matches) > 200 and len(lines) == min(200, len(matches))
    a, b = lines[:, 0], lines[:, 1] - n0
    assert (a >= 0).all() and (a < n0).all() and (b >= 0).all() and (b < n1).all()
    dist = np.linalg.norm(v0.world.numpy()[a] - v1.world.numpy()[b], axis=1)
    assert dist.max() <= 1.5 * vs + 1e-5  # every line joins a true correspondence
    assert len({tuple(r) for r in lines}) == len(lines)
    assert {(int(x), int(y)) for x, y in zip(a, b)} <= {tuple(m) for m in matches.tolist()}

    n_colours, covered = png_stats(tmp_path / "pair_0.png")
    assert n_colours > 50 and covered > 0.05


def test_pair_layout_draws_all_lines_when_fewer_than_max(prepped):
    ds = open_pairs(prepped, 0.05, augment=True, seed=1)
    scene = layout_pair(ds, 0, max_lines=10**9)
    assert len(scene.edges) == scene.n_matches == len(ds[0].matches) > 0
    assert len(layout_pair(ds, 0, max_lines=0).edges) == 0


def test_pair_no_augment_only_translates_the_views(prepped, tmp_path):
    assert main(["pair", "--data", str(prepped), "--index", "0", "--no-augment",
                 "--color", "tint", "--out", str(tmp_path)]) == 0
    sample = open_pairs(prepped, 0.025, augment=False)[0]
    n0 = len(sample.views[0].coords)
    pts, cols = read_ply(tmp_path / "pair_0.ply")
    offset = pts[:n0] - sample.views[0].world.numpy()  # constant up to quantisation
    assert np.abs(offset - offset.mean(0)).max() <= 0.025 * np.sqrt(3)
    assert cols[:n0, 0].mean() > cols[:n0, 2].mean()  # view 0 tinted orange ...
    assert cols[n0:, 2].mean() > cols[n0:, 0].mean()  # ... view 1 blue
    # with augmentation the views are rotated: the same offset is far from constant
    aug = open_pairs(prepped, 0.025, augment=True)[0]
    moved = (aug.views[0].coords.numpy() + 0.5) * 0.025 - aug.views[0].world.numpy()
    assert np.abs(moved - moved.mean(0)).max() > 0.2


# --------------------------------------------------------------------------------- features

def test_features_ply_is_one_pca_coloured_point_per_voxel(prepped, model_file, tmp_path):
    from mink_ssl.sparse import quantize

    frag_name, vs = "scene0000_00/000025", 0.05
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(["features", "--model", str(model_file), "--data", str(prepped),
                     "--fragment", frag_name, "--voxel-size", str(vs), "--device", "cpu",
                     "--out", str(out)]) == 0
    ply = "features_scene0000_00_000025.ply"
    points, _ = load_fragment(prepped, frag_name).points()
    n_vox = len(quantize(points, vs).coords)
    pts, cols = read_ply(outs[0] / ply)
    assert len(pts) == n_vox
    vox = np.floor(pts / vs).astype(np.int64)  # centres in world coordinates
    assert len(np.unique(vox, axis=0)) == n_vox
    np.testing.assert_allclose(pts, (vox + 0.5) * vs, atol=1e-5)
    assert (pts.min(0) >= points.min(0) - vs).all() and (pts.max(0) <= points.max(0) + vs).all()
    assert (cols.std(0) > 20).all() and len(np.unique(cols, axis=0)) > 100
    # the same model on the same fragment gives the same points and colours; MinkowskiEngine's
    # multi-threaded CPU kernels are not bitwise reproducible (features differ by ~1e-7), so a
    # colour may move by one level where it sits on a rounding boundary
    pts2, cols2 = read_ply(outs[1] / ply)
    np.testing.assert_array_equal(pts2, pts)
    assert np.abs(cols2 - cols).max() <= 1 and (cols2 == cols).all(1).mean() > 0.99
    # the RGB fragment beside it has the same points
    rgb_pts, rgb_cols = read_ply(outs[0] / "rgb_scene0000_00_000025.ply")
    np.testing.assert_array_equal(rgb_pts, pts)
    assert not np.array_equal(rgb_cols, cols)
    for kind in ("features", "rgb"):
        n_colours, covered = png_stats(outs[0] / f"{kind}_scene0000_00_000025.png")
        assert n_colours > 50 and covered > 0.05


def test_features_with_random_init_and_ones_input(prepped, tmp_path):
    assert main(["features", "--random-init", "Res16UNet14A", "--in-channels", "1",
                 "--out-channels", "8", "--data", str(prepped), "--fragment",
                 "scene0000_00/000050", "--voxel-size", "0.05", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    pts, cols = read_ply(tmp_path / "features_scene0000_00_000050.ply")
    assert len(pts) > 1000 and (cols.std(0) > 10).all()


def test_backbone_features_follow_the_input_row_order(prepped):
    from mink_ssl.data.features import input_features
    from mink_ssl.models import build_model
    from mink_ssl.tools.viz import fragment_voxels

    torch.manual_seed(0)
    model = build_model("Res16UNet14A", in_channels=3, out_channels=8)
    coords, _, rgb = fragment_voxels(load_fragment(prepped, "scene0000_00/000000"), 0.1)
    feats = input_features(rgb, 3)
    base = backbone_features(model, coords, feats)
    perm = torch.randperm(len(coords), generator=torch.Generator().manual_seed(0))
    permuted = backbone_features(model, coords[perm], feats[perm])
    assert base.shape == (len(coords), 8)
    torch.testing.assert_close(permuted, base[perm], atol=1e-4, rtol=1e-4)


def test_pca_colors_are_a_deterministic_function_of_the_features():
    rng = np.random.default_rng(0)
    t = rng.uniform(-1, 1, 500)
    direction = np.array([0.2, 0.9, -0.3, 0.1])
    F = t[:, None] * direction + 0.01 * rng.normal(size=(500, 4))  # (500, 4), one main axis
    c = pca_colors(F)
    assert c.shape == (500, 3) and c.dtype == np.uint8
    assert np.all(np.diff(c[np.argsort(t), 0].astype(int)) >= -40)  # red follows t
    assert c[t.argmax(), 0] == 255 and c[t.argmin(), 0] == 0  # robust min/max: full range
    # invariant to shift, positive scale and row order; signs fixed by the loadings
    np.testing.assert_array_equal(pca_colors(3 * F + 7), c)
    np.testing.assert_array_equal(pca_colors(F), c)  # same features, same colours
    assert np.abs(pca_colors(-F)[:, 0].astype(int) - (255 - c[:, 0])).max() <= 1  # inverted
    perm = rng.permutation(500)
    np.testing.assert_array_equal(pca_colors(F[perm]), c[perm])
    assert (pca_colors(F[:, :2])[:, 2] == 128).all()  # fewer than 3 channels: grey rest


# --------------------------------------------------------------------------------- renderer

def test_renderer_z_buffer_keeps_the_nearest_point():
    eye, target = np.array([0.0, -4.0, 3.0]), np.zeros(3)
    cam = Camera.look_at(eye, target, size=(64, 48))
    red_pt, blue_pt = eye + 0.5 * (target - eye), eye + 0.8 * (target - eye)  # same ray
    behind = eye - 0.5 * (target - eye)  # behind the camera: not drawn
    red, blue, green = [255, 0, 0], [0, 0, 255], [0, 255, 0]
    for pts, cols in (([red_pt, blue_pt], [red, blue]), ([blue_pt, red_pt], [blue, red])):
        img = draw_points(np.array(pts + [behind]), np.array(cols + [green], np.uint8),
                            camera=cam, point_size=1)
        arr = np.asarray(img)
        assert tuple(arr[24, 32]) == (255, 0, 0)  # the principal point, v=24, u=32
        assert (arr.reshape(-1, 3) != 255).any(1).sum() == 1  # one pixel; green not drawn
    arr = np.asarray(draw_points(np.array([blue_pt]), np.array([blue], np.uint8),
                                   camera=cam, point_size=3))
    assert (arr[23:26, 31:34] == [0, 0, 255]).all() and (arr != 255).any(2).sum() == 9
    # lines are drawn over the points
    seg = np.array([[eye + 0.5 * (np.array([-1.0, 0, 0]) - eye), red_pt]])
    arr = np.asarray(draw_points(np.array([blue_pt]), np.array([blue], np.uint8), camera=cam,
                                   lines=seg, line_colors=np.array([green], np.uint8)))
    assert (arr.reshape(-1, 3) == green).all(1).sum() > 5


def test_fitted_camera_frames_the_whole_cloud():
    pts = np.random.default_rng(0).uniform([0, 0, 0], [4, 3, 2.5], (2000, 3))
    cam = Camera.fit(pts, (800, 600))
    u, v, d = cam.project(pts)
    assert (d > 0).all() and u.min() >= 0 and v.min() >= 0 and u.max() < 800 and v.max() < 600
    assert np.ptp(u) > 600 or np.ptp(v) > 450  # fills the frame


def test_write_ply_round_trips_with_open3d(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(50, 3)).astype(np.float32)
    cols = rng.integers(0, 256, (50, 3), dtype=np.uint8)
    write_ply(tmp_path / "x.ply", pts, cols, np.array([[0, 1], [2, 49]]))
    p, c = read_ply(tmp_path / "x.ply")
    np.testing.assert_allclose(p, pts, rtol=1e-6)
    np.testing.assert_array_equal(c, cols)
    ls = o3d.io.read_line_set(str(tmp_path / "x.ply"))
    np.testing.assert_array_equal(np.asarray(ls.lines), [[0, 1], [2, 49]])
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        write_ply(tmp_path / "y.ply", pts, cols, np.array([[0, 50]]))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.ply"]  # no partial file left


# -------------------------------------------------------------------------------------- CLI

def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_cli_errors_name_the_value_and_the_fix(prepped, model_file, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere"
    rc, err = run_cli(capsys, "pair", "--data", missing, "--index", 0, "--out", out)
    assert rc == 2 and str(missing) in err and "mink-ssl-prep scannet" in err
    rc, err = run_cli(capsys, "features", "--model", model_file, "--data", missing,
                      "--fragment", "scene0000_00/000025", "--out", out)
    assert rc == 2 and str(missing) in err

    rc, err = run_cli(capsys, "pair", "--data", prepped, "--index", 99, "--out", out)
    n = len(open_pairs(prepped))
    assert rc == 2 and "99" in err and f"0..{n - 1}" in err
    rc, err = run_cli(capsys, "pair", "--data", prepped, "--index", -1, "--out", out)
    assert rc == 2 and "-1" in err

    base = ["features", "--model", model_file, "--data", prepped, "--out", out, "--fragment"]
    rc, err = run_cli(capsys, *base, "scene0000_00/000999")
    assert rc == 2 and "000999" in err and "scene0000_00/000025" in err  # lists valid ones
    rc, err = run_cli(capsys, *base, "scene0042_00/000000")
    assert rc == 2 and "scene0042_00" in err and "scene0000_00" in err
    rc, err = run_cli(capsys, *base, "scene0000_00")
    assert rc == 2 and "scene/frame" in err

    rc, err = run_cli(capsys, "features", "--model", tmp_path / "none.pth", "--data", prepped,
                      "--fragment", "scene0000_00/000025", "--out", out)
    assert rc == 2 and "none.pth" in err and "--random-init" in err
    rc, err = run_cli(capsys, "features", "--random-init", "Res16UNet99", "--data", prepped,
                      "--fragment", "scene0000_00/000025", "--out", out)
    assert rc == 2 and "valid choices" in err
    if not torch.cuda.is_available():
        rc, err = run_cli(capsys, *base, "scene0000_00/000025", "--device", "cuda")
        assert rc == 2 and "CUDA is not available" in err and "--device cpu" in err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_backbone_features_realign_rows_a_model_returns_in_another_order():
    from types import SimpleNamespace

    class Shuffling(torch.nn.Module):  # returns its input's rows reversed, with their coords
        def forward(self, x):
            return SimpleNamespace(F=x.F.flip(0) * 2, C=x.C.flip(0))

    coords = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 5, 2], [3, 3, 3]], dtype=torch.int32)
    feats = torch.arange(4, dtype=torch.float32)[:, None]
    torch.testing.assert_close(backbone_features(Shuffling(), coords, feats), feats * 2)
