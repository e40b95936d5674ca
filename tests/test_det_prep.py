"""Detection prep: ScanNet on generated scenes in the real annotation formats (mesh PLY, segs /
aggregation JSON, axisAlignment, label-map TSV), SUN RGB-D on a hand-made ``sunrgbd_trainval``
layout in the real file formats (MATLAB .mat, VoteNet label / calib text, split files)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main as prep_main
from data_prep.detection import scannet_det, sunrgbd
from data_prep.detection.writer import first_box
from data_prep.synthetic import make_room
from data_prep.synthetic.scannet_scene import generate_scenes
from mink_ssl.geometry import points_in_boxes

# VoteNet's ScanNet classes (model_util_scannet.py): NYU40 id -> class id
# golden: facebookresearch/votenet scannet/model_util_scannet.py ScannetDatasetConfig.nyu40ids;
# how: copied from the file (PointContrast @47e8682's votenet_det_new copy holds the same list)
VOTENET_NYU40 = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39]
TSV = "scannetv2-labels.combined.tsv"
SEED = 10


def rotz(t):
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


# -- ScanNet ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scannet_raw(tmp_path_factory):
    """Two generated scans in a random (yaw + shift) raw frame, and the label map."""
    raw = tmp_path_factory.mktemp("scans")
    generate_scenes(raw, 2, seed=SEED, n_frames=1, image_size=(40, 30), workers=1,
                    random_alignment=True)
    return raw


def clone(raw: Path, src: str, dst: str) -> Path:
    """Copy scene ``src`` to ``dst``, renaming its files (ScanNet names files by scene)."""
    (raw / dst).mkdir()
    for f in (raw / src).iterdir():
        shutil.copy(f, raw / dst / f.name.replace(src, dst))
    return raw / dst


def read_ply(path):
    from plyfile import PlyData

    return PlyData.read(str(path))["vertex"].data


def expected_boxes(seed):
    """Per furniture instance of the generated room: (min corner, max corner, NYU40 id)."""
    room = make_room(seed)
    out = []
    for inst in np.unique(room.instances):
        parts = room.instances == inst
        nyu = int(room.labels[parts][0])
        if nyu in VOTENET_NYU40:
            out.append((room.boxes[parts, 0].min(0), room.boxes[parts, 1].max(0), nyu))
    return out


def test_label_map_has_scannet_columns(scannet_raw):
    header = (scannet_raw / TSV).read_text().splitlines()[0].split("\t")
    assert header[:5] == ["id", "raw_category", "category", "count", "nyu40id"]
    assert header[-2:] == ["mpcat40", "mpcat40index"] and len(header) == 17
    m = scannet_det.read_label_map(scannet_raw / TSV)
    assert m == {"wall": 1, "floor": 2, "cabinet": 3, "bed": 4, "chair": 5, "sofa": 6,
                 "table": 7, "bookshelf": 10, "desk": 14}


def test_boxes_are_the_aligned_objects_of_the_generated_rooms(scannet_raw, tmp_path):
    m = scannet_det.run(scannet_raw, tmp_path, scannet_raw / TSV, progress=False, log=str)
    assert m["schema"] == "mink_ssl.det_scenes/1" and m["benchmark"] == "scannet"
    assert m["classes"][:5] == ["cabinet", "bed", "chair", "sofa", "table"]
    assert m["classes"][13] == "showercurtrain" and len(m["classes"]) == 18
    assert m["splits"] == {"train": ["scene0000_00", "scene0001_00"], "val": []}
    assert m["skipped_scenes"] == {} and m["notes"] == []
    for k, name in enumerate(["scene0000_00", "scene0001_00"]):
        d = np.load(tmp_path / m["scenes"][name]["file"])
        assert {f: d[f].dtype for f in d.files} == {
            "coords": np.float32, "colors": np.uint8, "boxes": np.float32,
            "box_labels": np.int16, "instance": np.int32}
        want = expected_boxes(SEED + k)
        assert m["scenes"][name] == {"file": f"scenes/{name}.npz", "points": len(d["coords"]),
                                     "boxes": len(want)}
        # axis alignment undid the random raw frame: boxes are the room's, in the room frame
        lo = np.stack([w[0] for w in want])
        hi = np.stack([w[1] for w in want])
        np.testing.assert_allclose(d["boxes"][:, :3], (lo + hi) / 2, atol=2e-4)
        np.testing.assert_allclose(d["boxes"][:, 3:6], hi - lo, atol=2e-4)
        assert (d["boxes"][:, 6] == 0).all()
        assert d["box_labels"].tolist() == [VOTENET_NYU40.index(w[2]) for w in want]
        # the raw mesh really was in another frame, and colours are the mesh's
        v = read_ply(scannet_raw / name / f"{name}_vh_clean_2.ply")
        raw_xyz = np.stack([v["x"], v["y"], v["z"]], 1)
        assert np.abs(raw_xyz - d["coords"]).max() > 0.5
        np.testing.assert_array_equal(d["colors"], np.stack([v["red"], v["green"], v["blue"]], 1))
        np.testing.assert_allclose(d["coords"].min(0), [-0.1, -0.1, -0.1], atol=1e-4)


def test_instances_follow_segments_and_aggregation(scannet_raw, tmp_path):
    m = scannet_det.run(scannet_raw, tmp_path, scannet_raw / TSV, progress=False, log=str)
    name = "scene0001_00"
    d = np.load(tmp_path / m["scenes"][name]["file"])
    inst, boxes = d["instance"], d["boxes"]
    # reference, VoteNet's way: vertices of each group's segments, groups in file order
    seg = np.array(json.loads((scannet_raw / name / f"{name}_vh_clean_2.0.010000.segs.json")
                              .read_text())["segIndices"])
    groups = json.loads((scannet_raw / name / f"{name}.aggregation.json").read_text())["segGroups"]
    ref = np.full(len(seg), -1)
    k = 0
    for g in groups:
        if g["label"] in ("wall", "floor"):
            continue
        ref[np.isin(seg, g["segments"])] = k
        k += 1
    np.testing.assert_array_equal(inst, ref)
    # the labels mesh agrees: wall / floor vertices are in no box, the others in one of their class
    nyu = read_ply(scannet_raw / name / f"{name}_vh_clean_2.labels.ply")["label"]
    assert (inst[np.isin(nyu, [1, 2])] == -1).all()
    obj = inst >= 0
    assert obj.sum() > 1000
    lut = np.full(41, -1)
    lut[VOTENET_NYU40] = np.arange(18)
    np.testing.assert_array_equal(d["box_labels"][inst[obj]], lut[nyu[obj]])
    # every object vertex lies in its box
    c, half = boxes[inst[obj], :3], boxes[inst[obj], 3:6] / 2
    assert (np.abs(d["coords"][obj] - c) <= half + 1e-5).all()


def test_label_map_decides_which_objects_get_boxes(scannet_raw, tmp_path):
    tsv = (scannet_raw / TSV).read_text().replace("\ttable\ttable\t1\t7\t",
                                                  "\ttable\ttable\t1\t40\t")
    (tmp_path / "map.tsv").write_text(tsv)
    m = scannet_det.run(scannet_raw, tmp_path / "out", tmp_path / "map.tsv", progress=False,
                        log=str)
    want = [w for w in expected_boxes(SEED) if w[2] != 7]  # tables are now 'otherprop' (40)
    d = np.load(tmp_path / "out" / m["scenes"]["scene0000_00"]["file"])
    assert d["box_labels"].tolist() == [VOTENET_NYU40.index(w[2]) for w in want]
    assert VOTENET_NYU40.index(7) not in d["box_labels"].tolist()
    # another label map is another processing: a rerun into the same folder is refused
    with pytest.raises(ValueError, match="other parameters.*label_map_sha256"):
        scannet_det.run(scannet_raw, tmp_path / "out", scannet_raw / TSV, progress=False, log=str)


def test_vertex_groups_later_group_wins_and_bounds_per_group():
    seg = np.array([5, 5, 7, 9, 7, 12])  # segment of each vertex (ids need not be contiguous)
    groups = [np.array([5, 7]), np.array([7]), np.array([12]), np.array([], np.int64)]
    vg = scannet_det.vertex_groups(seg, groups)
    assert vg.tolist() == [0, 0, 1, -1, 1, 2]  # segment 7 is in groups 0 and 1: the later wins
    with pytest.raises(ValueError, match=r"group 1 lists segments \[8\]"):
        scannet_det.vertex_groups(seg, [np.array([5]), np.array([7, 8])])
    pts = np.arange(18, dtype=np.float64).reshape(6, 3) ** 1.5
    count, lo, hi = scannet_det.group_bounds(pts, vg, 4)
    assert count.tolist() == [2, 2, 1, 0]
    for g in range(3):
        np.testing.assert_array_equal(lo[g], pts[vg == g].min(0))
        np.testing.assert_array_equal(hi[g], pts[vg == g].max(0))
    assert np.isinf(lo[3]).all() and np.isinf(hi[3]).all()


def test_bad_annotations_are_reported_and_skipped(scannet_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(scannet_raw / "scene0000_00", raw / "scene0000_00")
    src = "scene0000_00"

    def damage(dst, suffix, edit):
        path = clone(raw, src, dst) / f"{dst}{suffix}"
        if edit is None:
            path.unlink()
        else:
            path.write_text(edit(path.read_text()))

    def agg_edit(fn):
        def edit(text):
            agg = json.loads(text)
            fn(agg["segGroups"])
            return json.dumps(agg)
        return edit

    segs, agg = "_vh_clean_2.0.010000.segs.json", ".aggregation.json"
    damage("scene0100_00", agg, None)
    damage("scene0101_00", segs, lambda t: t[: len(t) // 2])
    damage("scene0102_00", segs, lambda t: json.dumps(
        {**json.loads(t), "segIndices": json.loads(t)["segIndices"][:-1]}))
    damage("scene0103_00", agg, agg_edit(lambda g: g[6]["segments"].append(10**9)))
    damage("scene0104_00", ".txt", lambda t: "".join(
        ln + "\n" for ln in t.splitlines() if not ln.startswith("axisAlignment")))
    damage("scene0105_00", agg, agg_edit(lambda g: g[5].update(label="spaceship")))
    damage("scene0106_00", agg, agg_edit(lambda g: g[6].update(objectId=g[5]["objectId"])))
    ply = clone(raw, src, "scene0107_00") / "scene0107_00_vh_clean_2.ply"
    ply.write_bytes(ply.read_bytes()[:50_000])  # a truncated download
    damage("scene0108_00", ".txt", lambda t: t.replace("axisAlignment = ", "axisAlignment = 1 "))

    m = scannet_det.run(raw, tmp_path / "out", scannet_raw / TSV, progress=False, log=str)
    assert list(m["scenes"]) == [src]
    reasons = m["skipped_scenes"]
    expect = {"scene0100_00": "missing scene0100_00.aggregation.json",
              "scene0101_00": "segs.json is not valid JSON",
              "scene0102_00": "segIndices but scene0102_00_vh_clean_2.ply has",
              "scene0103_00": "segments [1000000000] that no vertex has",
              "scene0104_00": "has no 'axisAlignment = ...' line",
              "scene0105_00": "labels ['spaceship'] are not in the label map",
              "scene0106_00": "appears twice",
              "scene0107_00": "is truncated: the header declares",
              "scene0108_00": "axisAlignment must be 16 finite numbers"}
    assert sorted(reasons) == sorted(expect)
    for scene, text in expect.items():
        assert text in reasons[scene], (scene, reasons[scene])
    left = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert left == ["manifest.json", "params.json", f"{src}.json", f"{src}.npz"]


def test_splits_resume_and_cli(scannet_raw, tmp_path, capsys):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "scannetv2_train.txt").write_text("scene0000_00\nscene0707_00\n")
    (splits / "scannetv2_val.txt").write_text("scene0001_00\n")
    out = tmp_path / "out"
    args = ["scannet-det", "--raw", str(scannet_raw), "--label-map", str(scannet_raw / TSV),
            "--out", str(out), "--splits-dir", str(splits), "--no-progress"]
    assert prep_main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"] == {"train": ["scene0000_00"], "val": ["scene0001_00"]}
    assert m["skipped_scenes"] == {"scene0707_00":
                                   f"listed in scannetv2_train.txt but not in {scannet_raw}"}
    assert m["parameters"]["splits_dir"] == str(splits.resolve())
    # a killed run left a temp file and lost one scene file: the rerun cleans and redoes only it
    npz0 = out / "scenes" / "scene0000_00.npz"
    stamp = npz0.stat().st_mtime_ns
    (out / "scenes" / "scene0001_00.npz").unlink()
    (out / "scenes" / ".scene0001_00.npz.abc.tmp").write_bytes(b"partial")
    assert prep_main(args) == 0
    assert "2/2 scenes done (1 already done)" in capsys.readouterr().out
    assert npz0.stat().st_mtime_ns == stamp
    assert sorted(os.listdir(out / "scenes")) == ["scene0000_00.npz", "scene0001_00.npz"]
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["scenes"] == m["scenes"] and m2["splits"] == m["splits"]
    # bad arguments name the value
    bad = args[:4] + [str(tmp_path / "nope.tsv")] + args[5:]
    assert prep_main(bad) == 2
    assert "--label-map" in capsys.readouterr().err
    (splits / "scannetv2_val.txt").write_text("scene0000_00\n")
    assert prep_main(args) == 2
    assert "scene0000_00 is listed in both" in capsys.readouterr().err


# -- SUN RGB-D ----------------------------------------------------------------------------------
TILT = np.array([[1, 0, 0], [0, np.cos(0.1), -np.sin(0.1)], [0, np.sin(0.1), np.cos(0.1)]])
K = np.array([[529.5, 0, 365.0], [0, 529.5, 265.0], [0, 0, 1]])


def votenet_corners_frame(obj):
    """(centre, R, half extents along the rotated x / y / z) of a label row, written the way
    VoteNet's SUNObject3d / my_compute_box_3d read it: w = c1, l = c2, h = c3,
    heading_angle = -atan2(o2, o1), corners = rotz(-heading_angle) @ (+-l, +-w, +-h) + centre."""
    centre, (w, l, h), (o1, o2) = np.array(obj[1:4]), obj[4:7], obj[7:9]
    heading_angle = -1 * np.arctan2(o2, o1)
    return centre, rotz(-1 * heading_angle), np.array([l, w, h])


def sample_box(rng, obj, n, scale):
    """``n`` points in the box's own frame scaled by ``scale`` (per axis), in world coords."""
    centre, R, half = votenet_corners_frame(obj)
    local = rng.uniform(-1, 1, (n, 3)) * half * scale
    return local @ R.T + centre


def write_image(root, idx, points, rgb, objects, calib=True, mat_key="instance"):
    from PIL import Image
    from scipy.io import savemat

    name = f"{idx:06d}"
    for sub in ("depth", "label_v1", "calib", "image"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    savemat(root / "depth" / f"{name}.mat", {mat_key: np.concatenate([points, rgb], 1)})
    lines = [f"{o[0]} 10 20 100 80 " + " ".join(f"{x:f}" for x in o[1:]) for o in objects]
    (root / "label_v1" / f"{name}.txt").write_text("".join(ln + "\n" for ln in lines))
    if calib:  # MATLAB's dlmwrite of Rtilt(:)' and K(:)': column-major
        (root / "calib" / f"{name}.txt").write_text(
            " ".join(f"{x:f}" for x in TILT.ravel(order="F")) + "\n"
            + " ".join(f"{x:g}" for x in K.ravel(order="F")) + "\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "image" / f"{name}.jpg")


def row(name, *numbers):
    """A label row: class, cx cy cz, c1 c2 c3 (w, l, h half extents), o1 o2; rounded as the
    export's %f writes them."""
    return (name, *(round(float(x), 6) for x in numbers))


BED = row("bed", 1.0, 3.0, 0.3, 0.8, 1.0, 0.3, np.cos(0.5), np.sin(0.5))
FLAT = row("table", 0.0, 2.0, 0.4, 0.5, 0.5, 0.0, 1.0, 0.0)  # zero height: left out
CHAIR = row("chair", 1.9, 3.7, 0.45, 0.3, 0.3, 0.45, np.cos(-1.2), np.sin(-1.2))  # overlaps bed
LAMP = row("lamp", -1.0, 2.5, 0.8, 0.1, 0.1, 0.8, 1.0, 0.0)


@pytest.fixture(scope="module")
def sun_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("sunrgbd_trainval")
    rng = np.random.default_rng(0)
    floor = np.c_[rng.uniform(-2, 3, (400, 2)) + [0, 1], np.full(400, -0.05)]
    pts = np.concatenate([floor, sample_box(rng, BED, 300, 0.97), sample_box(rng, CHAIR, 200, 0.97),
                          sample_box(rng, LAMP, 50, 0.9)])
    rgb = rng.uniform(0, 1, (len(pts), 3))
    write_image(root, 1, pts, rgb, [BED, FLAT, CHAIR, LAMP])
    write_image(root, 2, floor, rgb[:400], [LAMP])
    write_image(root, 3, floor, rgb[:400], [BED])
    (root / "depth" / "000003.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage" * 3)
    write_image(root, 4, floor, rgb[:400], [BED, CHAIR])
    lines = (root / "label_v1" / "000004.txt").read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0]  # the chair loses its last number
    (root / "label_v1" / "000004.txt").write_text("\n".join(lines) + "\n")
    write_image(root, 6, floor, rgb[:400], [BED], calib=False)
    write_image(root, 7, floor, rgb[:400], [BED], mat_key="points")
    write_image(root, 8, floor, rgb[:400] * 255, [BED])
    (root / "train_data_idx.txt").write_text("1\n3\n4\n7\n")
    (root / "val_data_idx.txt").write_text("2\n5\n6\n8\n")
    return root, pts, rgb


def test_points_in_boxes_is_the_rotated_box_test():
    rng = np.random.default_rng(1)
    pts = rng.uniform(-3, 3, (2000, 3))
    boxes = np.c_[rng.uniform(-2, 2, (6, 3)), rng.uniform(0.5, 3, (6, 3)),
                  rng.uniform(-np.pi, np.pi, 6)]
    ref = np.stack([(np.abs((pts - b[:3]) @ rotz(b[6])) <= b[3:6] / 2).all(1) for b in boxes], 1)
    got = points_in_boxes(pts, boxes)
    np.testing.assert_array_equal(got, ref)
    assert 50 < got.sum() < got.size - 50
    np.testing.assert_array_equal(first_box(pts, boxes),
                                  np.where(ref.any(1), ref.argmax(1), -1))
    assert first_box(pts, np.zeros((0, 7))).tolist() == [-1] * len(pts)


def test_sunrgbd_boxes_instances_and_calibration(sun_raw, tmp_path):
    root, pts, rgb = sun_raw
    m = sunrgbd.run(root, tmp_path, progress=False, log=str)
    assert m["classes"] == ["bed", "table", "sofa", "chair", "toilet", "desk", "dresser",
                            "night_stand", "bookshelf", "bathtub"]
    assert m["benchmark"] == "sunrgbd" and m["splits"] == {"train": ["000001"], "val": ["000002"]}
    d = np.load(tmp_path / m["scenes"]["000001"]["file"])
    assert m["scenes"]["000001"] == {"file": "scenes/000001.npz", "points": len(pts), "boxes": 2}
    np.testing.assert_allclose(d["coords"], pts, atol=1e-6)
    np.testing.assert_array_equal(d["colors"], np.round(rgb * 255))
    # (cx, cy, cz, 2 l, 2 w, 2 h, heading): l = c2 along the orientation vector
    np.testing.assert_allclose(d["boxes"], [[1.0, 3.0, 0.3, 2.0, 1.6, 0.6, 0.5],
                                            [1.9, 3.7, 0.45, 0.6, 0.6, 0.9, -1.2]], atol=2e-6)
    assert d["box_labels"].tolist() == [0, 3]
    # instance: the first box whose VoteNet corners contain the point
    inside = []
    for obj in (BED, CHAIR):
        centre, R, half = votenet_corners_frame(obj)
        inside.append((np.abs((pts - centre) @ R) <= half).all(1))
    inside = np.stack(inside, 1)
    want = np.where(inside.any(1), inside.argmax(1), -1)
    np.testing.assert_array_equal(d["instance"], want)
    assert (want[:400] == -1).all() and (want[400:700] == 0).all()  # floor, bed
    assert (inside[:, 0] & inside[:, 1]).sum() > 10 and (want[700:900] == 1).sum() > 50
    assert (want[900:] == -1).all()  # the lamp is not a benchmark class
    # the heading's sign matters: the mirrored boxes hold other points
    mirrored = d["boxes"] * [1, 1, 1, 1, 1, 1, -1]
    assert (first_box(d["coords"], mirrored) != want).sum() > 20
    np.testing.assert_allclose(d["calib_rtilt"], TILT, atol=1e-6)
    np.testing.assert_allclose(d["calib_k"], K)
    notes = [n["what"] for n in m["notes"] if n["scene"] == "000001"]
    assert notes == ["1 objects of other classes left out: ['lamp']",
                     "table box with size [1.0, 1.0, 0.0] left out"]
    empty = np.load(tmp_path / m["scenes"]["000002"]["file"])
    assert empty["boxes"].shape == (0, 7) and (empty["instance"] == -1).all()


def test_sunrgbd_bad_images_are_reported_and_skipped(sun_raw, tmp_path):
    root, _, _ = sun_raw
    m = sunrgbd.run(root, tmp_path, workers=2, progress=False, log=str)
    reasons = m["skipped_scenes"]
    expect = {"000003": "depth/000003.mat is not a readable MATLAB file",
              "000004": "label_v1/000004.txt line 2: expected a class name and 12 numbers, "
                        "got 12 fields",
              "000005": "missing depth/000005.mat",
              "000006": "missing calib/000006.txt",
              "000007": "has no variable 'instance' (it has ['points'])",
              "000008": "colours must be in 0..1"}
    assert sorted(reasons) == sorted(expect)
    for scene, text in expect.items():
        assert text in reasons[scene], (scene, reasons[scene])
    assert sorted(os.listdir(tmp_path / "scenes")) == ["000001.npz", "000002.npz"]


def test_sunrgbd_cli(sun_raw, tmp_path, capsys):
    root, _, _ = sun_raw
    out = tmp_path / "out"
    assert prep_main(["sunrgbd", "--raw", str(root), "--out", str(out), "--ids", "2",
                      "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["scenes"]) == ["000002"] and m["parameters"]["label_dir"] == "label_v1"
    assert prep_main(["sunrgbd", "--raw", str(root), "--out", str(out), "--ids", "9",
                      "--no-progress"]) == 2
    assert "--ids [9] are not in train_data_idx.txt" in capsys.readouterr().err
    assert prep_main(["sunrgbd", "--raw", str(root), "--out", str(out), "--labels", "label",
                      "--no-progress"]) == 2
    assert "has no label/ folder" in capsys.readouterr().err
    assert prep_main(["sunrgbd", "--raw", str(root / "depth"), "--out", str(out)]) == 2
    assert "train_data_idx.txt is missing" in capsys.readouterr().err
