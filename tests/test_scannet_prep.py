"""ScanNet pair prep on real frames (7-Scenes, as exported frames and as a .sens) and bad input."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from data_prep.cli import main as prep_main
from data_prep.pairs.overlap import overlap_matrix, voxel_downsample
from data_prep.pairs.prep import PrepParams, run
from data_prep.scannet.exported import ExportedFrames
from data_prep.scannet.sens_writer import write_sens
from mink_ssl.formats.fragments import FragmentStore
from mink_ssl.geometry import backproject

REPO = Path(__file__).resolve().parents[1]


def brute_force_overlap(a: np.ndarray, b: np.ndarray, radius=0.075) -> float:
    """The definition, independently: open3d 5 cm downsampling, nearest neighbour both ways."""
    import open3d as o3d

    down = []
    for p in (a, b):
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(p.astype(np.float64)))
        down.append(np.asarray(pcd.voxel_down_sample(0.05).points))
    d01, _ = cKDTree(down[1]).query(down[0])
    d10, _ = cKDTree(down[0]).query(down[1])
    return max((d01 <= radius).mean(), (d10 <= radius).mean())


@pytest.fixture(scope="module")
def kitchen_raw(kitchen, tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    (raw / "redkitchen").symlink_to(kitchen)
    return raw


@pytest.fixture(scope="module")
def kitchen_prepped(kitchen_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    manifest = run(kitchen_raw, out, PrepParams(frame_skip=25), progress=False)
    return out, manifest


def test_voxel_downsample_is_the_centroid_definition(kitchen_frame):
    """Centroid per 5 cm voxel of a grid anchored half a voxel below the cloud's minimum."""
    depth, K, pose = kitchen_frame
    pts = backproject(depth, K, 1000.0, pose)[0].astype(np.float64)
    origin = pts.min(axis=0) - 0.025
    cells = np.floor((pts - origin) / 0.05).astype(np.int64)
    _, inverse, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    expected = np.stack([np.bincount(inverse, pts[:, d]) for d in range(3)], 1) / counts[:, None]
    ours = voxel_downsample(pts, 0.05)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours[np.lexsort(ours.T)], expected[np.lexsort(expected.T)],
                               atol=1e-9)


def test_overlap_matrix_equals_brute_force_on_random_clouds():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, (800, 3))
    # clouds sharing parts of a base set, jittered around the 7.5 cm boundary, plus far ones
    clouds = [base[rng.random(800) < 0.6] + rng.normal(0, 0.04, (1, 3)) for _ in range(6)]
    clouds += [rng.uniform(5, 6, (300, 3)), np.zeros((0, 3))]
    res = overlap_matrix(clouds, 0.075)
    for i, a in enumerate(clouds):
        for j, b in enumerate(clouds):
            if i == j or len(a) == 0:
                continue
            expected = (cKDTree(b).query(a)[0] <= 0.075).mean() if len(b) else 0.0
            assert res.directional[i, j] == pytest.approx(expected, abs=1e-12), (i, j)
    assert res.n_candidates < res.n_pairs  # the far and empty clouds were pruned


def test_prep_real_exported_frames(kitchen_prepped, kitchen):
    out, manifest = kitchen_prepped
    frames = list(range(0, 500, 25))  # ids that are multiples of --frame-skip
    store = FragmentStore(out / "redkitchen")
    assert store.frames.tolist() == frames
    assert manifest["counts"]["fragments"] == 20 and manifest["counts"]["pairs"] == 190
    assert manifest["schema"] == "mink_ssl.scannet_pairs/1"
    lines = (out / "redkitchen" / "overlap.txt").read_text().splitlines()
    assert len(lines) == 190
    values = {tuple(l.split()[:2]): float(l.split()[2]) for l in lines}
    kept = (out / "pairs.txt").read_text().splitlines()
    assert len(kept) == manifest["counts"]["pairs_kept"] > 0
    assert all(float(l.split()[2]) >= 0.3 for l in kept)
    assert kept[0].split()[0] == "redkitchen/000000"
    # pairs against an independent brute-force computation on a subset
    src = ExportedFrames(kitchen)
    clouds = {}
    for f in (0, 75, 150, 300, 475):
        fr = src.frame(f)
        clouds[f] = backproject(fr.depth(src.header), src.header.intrinsic_depth, 1000.0,
                                fr.camera_to_world)[0]
    for a in clouds:
        for b in clouds:
            if a < b:
                ov = values[(f"redkitchen/{a:06d}", f"redkitchen/{b:06d}")]
                assert ov == pytest.approx(brute_force_overlap(clouds[a], clouds[b]), abs=2e-6)


def test_fragments_are_lossless_and_keep_pose_and_intrinsics(kitchen_prepped, kitchen):
    out, _ = kitchen_prepped
    store = FragmentStore(out / "redkitchen")
    frag = store.by_frame(100)
    src = ExportedFrames(kitchen)
    fr = src.frame(100)
    np.testing.assert_array_equal(frag.depth, fr.depth(src.header))
    np.testing.assert_array_equal(frag.pose, fr.camera_to_world)
    np.testing.assert_array_equal(frag.intrinsics, src.header.intrinsic_depth)
    pts, colors = frag.points()
    ref, pixel = backproject(fr.depth(src.header), src.header.intrinsic_depth, 1000.0,
                             fr.camera_to_world)
    np.testing.assert_array_equal(pts, ref)
    assert np.abs(colors.astype(int) - fr.color(src.header).reshape(-1, 3)[pixel]).mean() < 4
    with pytest.raises(KeyError, match="no fragment for frame 101"):
        store.by_frame(101)


def test_sens_scene_with_invalid_poses_and_empty_frames(kitchen, tmp_path):
    """A genuine .sens with -inf poses and an empty depth frame: those frames are skipped."""
    src = ExportedFrames(kitchen)

    def frames():
        for k, f in enumerate(src.frames()):
            pose, depth = f.camera_to_world, f.depth(src.header)
            if k in (5, 10):
                pose = np.full((4, 4), -np.inf, np.float32)
            if k == 15:
                depth = np.zeros_like(depth)
            yield pose, f.color_bytes, depth
    write_sens(tmp_path / "raw" / "scene0001_00" / "scene0001_00.sens", src.header, frames())
    m = run(tmp_path / "raw", tmp_path / "out", PrepParams(frame_skip=5), progress=False)
    scene = m["scenes"]["scene0001_00"]
    assert scene["skipped_frames"] == {"non-finite pose": [5, 10],
                                       "fewer than 1000 valid depth points": [15]}
    assert scene["fragments"] == 17 and m["counts"]["frames_skipped"] == 3
    assert FragmentStore(tmp_path / "out" / "scene0001_00").frames.tolist() == \
        [i for i in range(0, 100, 5) if i not in (5, 10, 15)]


@pytest.fixture()
def sens_scenes(kitchen, tmp_path):
    """Three .sens scenes made from the real frames (20 frames each), plus bad ones."""
    raw = tmp_path / "raw"
    src = ExportedFrames(kitchen)
    good = raw / "scene0000_00" / "scene0000_00.sens"
    write_sens(good, src.header, ((f.camera_to_world, f.color_bytes, f.depth(src.header))
                                  for f in src.frames(step=5)))
    for name in ("scene0000_01", "scene0000_02"):
        (raw / name).mkdir()
        shutil.copy(good, raw / name / f"{name}.sens")
    return raw, good


def test_corrupt_scenes_are_reported_and_skipped(sens_scenes, tmp_path):
    raw, good = sens_scenes
    data = good.read_bytes()
    bad = {"scene0100_00": data[: len(data) - 5000],  # truncated inside the last payload
           "scene0100_01": b"\x05" + data[1:],  # version 5
           "scene0100_02": data[:40]}  # truncated inside the header
    for name, blob in bad.items():
        (raw / name).mkdir()
        (raw / name / f"{name}.sens").write_bytes(blob)
    (raw / "scene0100_03").mkdir()  # neither .sens nor exported frames
    out = tmp_path / "out"
    m = run(raw, out, PrepParams(frame_skip=1), progress=False)
    skipped = m["skipped_scenes"]
    assert set(skipped) == set(bad) | {"scene0100_03"}
    assert "frame 19" in skipped["scene0100_00"] and "byte offset" in skipped["scene0100_00"]
    assert "version" in skipped["scene0100_01"]
    assert "header" in skipped["scene0100_02"]
    assert "neither" in skipped["scene0100_03"]
    assert m["counts"]["scenes_done"] == 3
    # nothing partial: no output folder for a skipped scene, no temp folder, no claim left;
    # each skipped scene has its record (what a --finalize lists)
    assert sorted(p.name for p in out.iterdir()) == [
        ".prep-status", "manifest.json", "pairs.txt", "params.json", "scene0000_00",
        "scene0000_01", "scene0000_02"]
    records = {p.stem: json.loads(p.read_text()) for p in (out / ".prep-status").iterdir()}
    assert {k: r["reason"] for k, r in records.items()} == skipped


def test_scene_with_fewer_than_two_fragments_is_skipped(sens_scenes, tmp_path):
    raw, _ = sens_scenes
    m = run(raw, tmp_path / "out", PrepParams(frame_skip=400), progress=False)
    assert m["counts"]["scenes_done"] == 0
    assert all("fewer than 2 usable fragments (1" in r for r in m["skipped_scenes"].values())


def test_rerun_skips_done_scenes_and_refuses_other_params(sens_scenes, tmp_path):
    raw, _ = sens_scenes
    out = tmp_path / "out"
    run(raw, out, PrepParams(frame_skip=2), progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/fragments.bin")}
    logs = []
    run(raw, out, PrepParams(frame_skip=2), progress=False, log=logs.append)
    assert "(3 already done)" in logs[0]
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*/fragments.bin")}
    with pytest.raises(ValueError, match="other parameters {'frame_skip': 2}"):
        run(raw, out, PrepParams(frame_skip=3), progress=False)


@pytest.mark.slow
def test_killed_run_rerun_gives_identical_output(sens_scenes, tmp_path):
    raw, _ = sens_scenes
    cmd = [sys.executable, "-m", "data_prep.cli", "scannet", "--raw", str(raw), "--frame-skip", "1",
           "--no-progress"]
    clean = tmp_path / "clean"
    subprocess.run(cmd + ["--out", str(clean)], check=True, cwd=REPO, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "scene0000_00" / "scene.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-run: first scene done, the next in progress
    proc.wait()
    assert not (killed / "manifest.json").exists()
    subprocess.run(cmd + ["--out", str(killed)], check=True, cwd=REPO, capture_output=True)

    assert not list(killed.glob(".tmp-*"))
    for rel in ["pairs.txt"] + [f"scene0000_0{i}/{f}" for i in range(3)
                                for f in ("fragments.bin", "overlap.txt")]:
        assert (killed / rel).read_bytes() == (clean / rel).read_bytes(), rel
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (clean, killed))
    assert a["counts"] == b["counts"] and a["scenes"] == b["scenes"]


def test_cli_bad_arguments(tmp_path, capsys):
    assert prep_main(["scannet", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "raw" / "a").mkdir(parents=True)
    assert prep_main(["scannet", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o"),
                      "--scenes", "b"]) == 2
    assert "scenes ['b'] not found" in capsys.readouterr().err
    assert prep_main(["scannet", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o"),
                      "--min-overlap", "1.5"]) == 2
    assert "min_overlap must be in [0, 1], got 1.5" in capsys.readouterr().err


@pytest.mark.slow
def test_prep_on_synthetic_scenes_without_shared_data(tmp_path):
    """The embedded default: generated .sens scenes, one with lost-tracking (-inf) frames."""
    from data_prep.synthetic import generate_scene

    raw = tmp_path / "raw"
    generate_scene(raw, "scene0000_00", 0, n_frames=101, invalid_pose_frames=(25, 26))
    generate_scene(raw, "scene0001_00", 1, n_frames=76)
    m = run(raw, tmp_path / "out", PrepParams(), progress=False)
    assert m["scenes"]["scene0000_00"]["skipped_frames"] == {"non-finite pose": [25]}
    assert FragmentStore(tmp_path / "out" / "scene0000_00").frames.tolist() == [0, 50, 75, 100]
    assert m["scenes"]["scene0001_00"]["fragments"] == 4 and m["counts"]["pairs"] == 12
    # the overlaps agree with the brute-force definition
    store = FragmentStore(tmp_path / "out" / "scene0001_00")
    lines = (tmp_path / "out" / "scene0001_00" / "overlap.txt").read_text().split("\n")
    a, b, value = lines[0].split()
    assert (a, b) == ("scene0001_00/000000", "scene0001_00/000025")
    expected = brute_force_overlap(store[0].points()[0], store[1].points()[0])
    assert float(value) == pytest.approx(expected, abs=2e-6)
