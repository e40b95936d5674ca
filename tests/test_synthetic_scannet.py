"""Synthetic ScanNet-format scenes: real ray-cast RGB-D frames, ScanNet files, determinism."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.scannet.sens import SensReader
from data_prep.synthetic import (SensorModel, camera_trajectory, generate_scene, generate_scenes,
                                 make_room, scannet_scene)
from mink_ssl.geometry import backproject

SEED = 3
SIZE = (160, 120)  # small frames keep the tests quick; geometry does not depend on the size
N = 60
INVALID = (7, 41)


@pytest.fixture(scope="module")
def ideal(tmp_path_factory):
    """A scene rendered by a perfect sensor, lossless colour."""
    return generate_scene(tmp_path_factory.mktemp("ideal"), "scene0003_00", SEED, n_frames=N,
                          image_size=SIZE, sensor=SensorModel.ideal(), color_compression="png")


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """The default (mildly Kinect-like) sensor, with two lost-tracking frames."""
    return generate_scene(tmp_path_factory.mktemp("noisy"), "scene0003_00", SEED, n_frames=N,
                          image_size=SIZE, invalid_pose_frames=INVALID)


def read_frames(scene_dir, indices=None):
    """[(pose, depth, color)] and the header of the scene's .sens."""
    with SensReader(scene_dir / f"{scene_dir.name}.sens") as sens:
        h = sens.header
        return h, [(f.camera_to_world, f.depth(h), f.color(h)) for f in sens.frames(indices)]


def mesh_scene(ply_path):
    """An Open3D RaycastingScene of a written ply (read back with plyfile)."""
    import open3d as o3d
    from plyfile import PlyData

    ply = PlyData.read(str(ply_path))
    v = np.stack([ply["vertex"][k] for k in "xyz"], 1).astype(np.float32)
    f = np.stack(ply["face"]["vertex_indices"]).astype(np.uint32)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(v), o3d.core.Tensor(f))
    return scene


def distance_to_mesh(scene, points):
    import open3d as o3d

    return scene.compute_distance(o3d.core.Tensor(points.astype(np.float32))).numpy()


def world_points(h, pose, depth, stride=1):
    return backproject(depth, h.intrinsic_depth, h.depth_shift, pose, stride=stride)


# -- the .sens ------------------------------------------------------------------------------
def test_sens_header(noisy):
    h, frames = read_frames(noisy, [0])
    assert (h.version, h.num_frames, h.depth_shift) == (4, N, 1000.0)
    assert (h.depth_width, h.depth_height, h.color_width, h.color_height) == (*SIZE, *SIZE)
    assert (h.color_compression, h.depth_compression) == ("jpeg", "zlib_ushort")
    f = 577.870605 * SIZE[0] / 640
    np.testing.assert_allclose(h.intrinsic_depth, [[f, 0, 79.5, 0], [0, f, 59.5, 0],
                                                   [0, 0, 1, 0], [0, 0, 0, 1]], rtol=1e-6)
    np.testing.assert_array_equal(h.intrinsic_color, h.intrinsic_depth)
    np.testing.assert_array_equal(h.extrinsic_depth, np.eye(4))
    pose, depth, color = frames[0]
    assert depth.shape == SIZE[::-1] and depth.dtype == np.uint16
    assert color.shape == (*SIZE[::-1], 3) and color.dtype == np.uint8
    R = pose[:3, :3].astype(np.float64)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-5)
    assert np.linalg.det(R) > 0.99
    assert R[2, 2] < -0.3, "camera z (forward) should point downward-ish (pitch 22-36 deg)"
    assert R[2, 1] < -0.6, "camera y (down) should have a negative world z component"


def test_color_size_with_its_own_intrinsics(tmp_path):
    scene = generate_scene(tmp_path, "scene0000_00", 0, n_frames=2, image_size=(80, 60),
                           color_size=(160, 120))
    h, frames = read_frames(scene)
    assert (h.color_width, h.color_height, h.depth_width, h.depth_height) == (160, 120, 80, 60)
    np.testing.assert_allclose(h.intrinsic_color[0, 0], 2 * h.intrinsic_depth[0, 0], rtol=1e-6)
    np.testing.assert_allclose(h.intrinsic_color[:2, 2], [79.5, 59.5])
    assert frames[0][2].shape == (120, 160, 3) and frames[0][1].shape == (60, 80)


def test_invalid_pose_frames_are_minus_inf(noisy):
    _, frames = read_frames(noisy)
    for i, (pose, depth, _) in enumerate(frames):
        if i in INVALID:
            assert np.isneginf(pose).all(), f"frame {i}: {pose}"
        else:
            assert np.isfinite(pose).all(), f"frame {i}: {pose}"
        assert (depth > 0).mean() > 0.5, f"frame {i} has images even where tracking is lost"
    with pytest.raises(ValueError, match="invalid_pose_frames"):
        generate_scene(noisy.parent, "bad", SEED, n_frames=5, invalid_pose_frames=(5,))


# -- ray casting is real --------------------------------------------------------------------
def test_ideal_depth_lies_on_the_mesh(ideal):
    scene = mesh_scene(ideal / f"{ideal.name}_vh_clean_2.ply")
    h, frames = read_frames(ideal, [0, 30, 59])
    for pose, depth, _ in frames:
        assert (depth > 0).mean() > 0.7
        pts, _ = world_points(h, pose, depth)
        d = distance_to_mesh(scene, pts)
        # depth is z (not ray length) and pixels follow backproject's convention: a wrong
        # convention puts image corners centimetres off the surface
        assert np.median(d) < 0.002, np.median(d)
        assert np.quantile(d, 0.99) < 0.005, np.quantile(d, 0.99)


def test_noisy_depth_is_near_the_mesh_with_holes(noisy, ideal):
    scene = mesh_scene(noisy / f"{noisy.name}_vh_clean_2.ply")
    h, frames = read_frames(noisy, [0, 30])
    _, clean = read_frames(ideal, [0, 30])
    for (pose, depth, _), (_, depth_ideal, _) in zip(frames, clean):
        pts, _ = world_points(h, pose, depth)
        d = distance_to_mesh(scene, pts)
        assert 0.0005 < np.median(d) < 0.02, np.median(d)
        missing = (depth == 0).mean() - (depth_ideal == 0).mean()
        assert 0.0 < missing < 0.4, f"sensor model dropped {missing:.1%} of the pixels"
        both = (depth > 0) & (depth_ideal > 0)
        assert (depth[both] != depth_ideal[both]).mean() > 0.5, "no depth noise"
        assert depth.max() <= 4500, "beyond the 4.5 m range there is no depth"


def test_overlap_of_frames_25_apart(noisy):
    from scipy.spatial import cKDTree

    h, frames = read_frames(noisy)
    ratios = []
    for i in range(0, N - 25, 5):
        (pa, da, _), (pb, db, _) = frames[i], frames[i + 25]
        if not (np.isfinite(pa).all() and np.isfinite(pb).all()):
            continue  # lost tracking: skipped as downstream does
        a, _ = world_points(h, pa, da, stride=2)
        b, _ = world_points(h, pb, db, stride=2)
        dist, _ = cKDTree(a).query(b, distance_upper_bound=0.075)
        ratios.append(np.isfinite(dist).mean())
    assert len(ratios) >= 5
    assert min(ratios) > 0.3 and np.mean(ratios) > 0.45, np.round(ratios, 2)


def test_colour_is_a_property_of_the_surface(ideal):
    """The same surface point has the same colour in two views; colour varies within a class."""
    from scipy.spatial import cKDTree

    h, frames = read_frames(ideal, [0, 10])
    (p0, d0, c0), (p1, d1, c1) = frames
    a, ia = world_points(h, p0, d0)
    b, ib = world_points(h, p1, d1)
    dist, j = cKDTree(a).query(b, distance_upper_bound=0.004)
    ok = np.isfinite(dist)
    assert ok.sum() > 1000, ok.sum()
    col_a = c0.reshape(-1, 3)[ia[j[ok]]].astype(int)
    col_b = c1.reshape(-1, 3)[ib[ok]].astype(int)
    assert np.median(np.abs(col_a - col_b)) <= 4
    assert c0.reshape(-1, 3).std(0).mean() > 10, "colour carries no information"


# -- mesh files -----------------------------------------------------------------------------
def test_ply_files_have_scannet_properties(ideal):
    from plyfile import PlyData

    mesh = PlyData.read(str(ideal / f"{ideal.name}_vh_clean_2.ply"))
    labels = PlyData.read(str(ideal / f"{ideal.name}_vh_clean_2.labels.ply"))
    for ply in (mesh, labels):
        assert ply.byte_order == "<" and not ply.text
        assert [e.name for e in ply.elements] == ["vertex", "face"]
        face = ply["face"].properties[0]
        assert (face.name, face.len_dtype, face.val_dtype) == ("vertex_indices", "u1", "i4")
    names = ["x", "y", "z", "red", "green", "blue", "alpha"]
    assert [p.name for p in mesh["vertex"].properties] == names
    assert [p.name for p in labels["vertex"].properties] == names + ["label"]
    vd, ld = mesh["vertex"].data, labels["vertex"].data
    assert vd.dtype["x"] == np.float32 and vd.dtype["red"] == np.uint8
    assert ld.dtype["label"] == np.uint16
    for k in "xyz":
        np.testing.assert_array_equal(vd[k], ld[k])
    faces = np.stack(mesh["face"]["vertex_indices"])
    np.testing.assert_array_equal(faces, np.stack(labels["face"]["vertex_indices"]))
    assert faces.min() == 0 and faces.max() < len(vd)
    assert len(vd) > 5000, "faces are subdivided so vertex labels are dense"
    room = make_room(SEED)
    assert set(np.unique(ld["label"])) == set(room.labels.tolist())
    assert {1, 2} <= set(np.unique(ld["label"])) and len(np.unique(ld["label"])) > 3
    lo = np.array([vd[k].min() for k in "xyz"])
    np.testing.assert_allclose(lo, [-0.1, -0.1, -0.1], atol=1e-6)  # walls/floor 10 cm thick
    # floor vertices (label 2) are at z in [-0.1, 0]; furniture stands on the floor
    z = ld["z"][ld["label"] == 2]
    assert z.min() >= -0.1 - 1e-6 and z.max() <= 1e-6


def test_segments_and_aggregation(ideal):
    from plyfile import PlyData

    sid = ideal.name
    segs = json.loads((ideal / f"{sid}_vh_clean_2.0.010000.segs.json").read_text())
    agg = json.loads((ideal / f"{sid}.aggregation.json").read_text())
    labels = PlyData.read(str(ideal / f"{sid}_vh_clean_2.labels.ply"))["vertex"]["label"]
    seg = np.array(segs["segIndices"])
    assert len(seg) == len(labels) and segs["sceneId"] == sid
    room = make_room(SEED)
    assert len(agg["segGroups"]) == len(np.unique(room.instances))
    names = {"wall": 1, "floor": 2, "cabinet": 3, "bed": 4, "chair": 5, "sofa": 6, "table": 7,
             "bookshelf": 10, "desk": 14}
    covered = np.zeros(len(seg), bool)
    for g in agg["segGroups"]:
        on = np.isin(seg, g["segments"])
        assert on.any() and (labels[on] == names[g["label"]]).all(), g["label"]
        assert not (covered & on).any(), "instances overlap"
        covered |= on
    assert covered.all()


def test_meta_text(noisy):
    meta = dict(line.split(" = ", 1)
                for line in (noisy / f"{noisy.name}.txt").read_text().splitlines())
    assert np.fromstring(meta["axisAlignment"], sep=" ").reshape(4, 4).tolist() == \
        np.eye(4).tolist()
    assert int(meta["numColorFrames"]) == int(meta["numDepthFrames"]) == N
    assert (int(meta["colorWidth"]), int(meta["colorHeight"])) == SIZE
    assert (int(meta["depthWidth"]), int(meta["depthHeight"])) == SIZE
    assert float(meta["fx_depth"]) == pytest.approx(577.870605 * SIZE[0] / 640, rel=1e-6)
    assert float(meta["mx_depth"]) == 79.5 and float(meta["my_color"]) == 59.5


def test_random_alignment(tmp_path):
    scene = generate_scene(tmp_path, "scene0001_00", 1, n_frames=3, image_size=(80, 60),
                           random_alignment=True, sensor=SensorModel.ideal())
    from plyfile import PlyData

    meta = dict(line.split(" = ", 1) for line in (scene / "scene0001_00.txt").read_text()
                .splitlines())
    A = np.fromstring(meta["axisAlignment"], sep=" ").reshape(4, 4)
    assert not np.allclose(A, np.eye(4))
    v = PlyData.read(str(scene / "scene0001_00_vh_clean_2.ply"))["vertex"]
    xyz = np.stack([v[k] for k in "xyz"], 1).astype(np.float64)
    aligned = xyz @ A[:3, :3].T + A[:3, 3]
    size = make_room(1).size
    np.testing.assert_allclose(aligned.min(0), [-0.1, -0.1, -0.1], atol=1e-4)
    np.testing.assert_allclose(aligned.max(0), [size[0] + 0.1, size[1] + 0.1, size[2]], atol=1e-4)
    # poses are in the mesh's (unaligned) frame: depth still lands on the written mesh
    h, frames = read_frames(scene, [1])
    pts, _ = world_points(h, frames[0][0], frames[0][1])
    d = distance_to_mesh(mesh_scene(scene / "scene0001_00_vh_clean_2.ply"), pts)
    assert np.median(d) < 0.002


# -- camera path, determinism, atomic writes -----------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_cameras_stay_inside_the_room_and_out_of_furniture(seed):
    room = make_room(seed)
    poses = camera_trajectory(room, 360, seed)
    pos = poses[:, :3, 3]
    assert (pos[:, :2] > 0.4).all() and (pos[:, :2] < room.size[:2] - 0.4).all()
    assert (pos[:, 2] > 1.1).all() and (pos[:, 2] < 1.7).all()
    lo, hi = room.boxes[None, :, 0], room.boxes[None, :, 1]
    dist = np.linalg.norm(np.maximum(np.maximum(lo - pos[:, None], pos[:, None] - hi), 0), axis=2)
    assert dist.min() > 0.15
    step = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    assert step.max() < 0.05, "smooth, handheld-speed motion (< 1.5 m/s at 30 fps)"
    np.testing.assert_array_equal(poses, camera_trajectory(room, 360, seed))


def test_deterministic_in_the_seed(noisy, tmp_path):
    again = generate_scene(tmp_path, "scene0003_00", SEED, n_frames=N, image_size=SIZE,
                           invalid_pose_frames=INVALID, workers=1)
    other = generate_scene(tmp_path, "scene0004_00", SEED + 1, n_frames=3, image_size=SIZE)
    with SensReader(noisy / "scene0003_00.sens") as a, \
            SensReader(again / "scene0003_00.sens") as b, \
            SensReader(other / "scene0004_00.sens") as c:
        for i in range(N):
            fa, fb = a.frame(i), b.frame(i)
            assert fa.depth_bytes == fb.depth_bytes, f"frame {i} depth differs"
            assert fa.color_bytes == fb.color_bytes, f"frame {i} colour differs"
            np.testing.assert_array_equal(fa.camera_to_world, fb.camera_to_world)
        assert a.frame(0).depth_bytes != c.frame(0).depth_bytes
        assert not np.array_equal(a.frame(0).camera_to_world, c.frame(0).camera_to_world)
    for name in ("_vh_clean_2.ply", "_vh_clean_2.labels.ply", ".txt"):
        assert (noisy / f"scene0003_00{name}").read_bytes() == \
            (again / f"scene0003_00{name}").read_bytes()
    assert (noisy / "scene0003_00_vh_clean_2.ply").read_bytes() != \
        (other / "scene0004_00_vh_clean_2.ply").read_bytes()


def test_a_crash_leaves_no_partial_files(tmp_path, monkeypatch):
    real = scannet_scene._sensor_color
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash while rendering")
        return real(*args)

    monkeypatch.setattr(scannet_scene, "_sensor_color", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_scene(tmp_path, "scene0000_00", 0, n_frames=10, image_size=(80, 60), workers=1)
    files = sorted(p.name for p in (tmp_path / "scene0000_00").iterdir())
    assert not [f for f in files if f.startswith(".") or f.endswith(".tmp")], files
    assert "scene0000_00.sens" not in files and "scene0000_00.txt" not in files, files


def test_generate_scenes_names_and_seeds(tmp_path):
    paths = generate_scenes(tmp_path, 2, seed=5, n_frames=2, image_size=(40, 30))
    assert [p.name for p in paths] == ["scene0000_00", "scene0001_00"]
    meta = (paths[1] / "scene0001_00.txt").read_text()
    assert "seed = 6" in meta
    assert all((p / f"{p.name}.sens").is_file() for p in paths)
