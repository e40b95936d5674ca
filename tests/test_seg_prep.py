"""Segmentation prep (S3DIS, Synthia4D, ScanNet v2) on generated files in the real formats:
every point against the generator's truth, the release's defects repaired and reported at the
right lines, bad files reported and skipped, reruns resuming."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main as prep_main
from data_prep.segmentation import writer as seg_writer
from data_prep.segmentation.s3dis import S3DISParams, parse_xyzrgb, run as run_s3dis
from data_prep.synthetic.s3dis_rooms import generate_s3dis_rooms
from data_prep.synthetic.synthia_frames import (SYNTHIA_CLASSES, generate_synthia_frames,
                                                write_frame_ply)

S3DIS_13 = ["ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair",
            "sofa", "bookcase", "board", "clutter"]
# ScanNet's NYU40 ids of the benchmark's 20 classes and their names (benchmark spelling)
SCANNET_20 = {1: "wall", 2: "floor", 3: "cabinet", 4: "bed", 5: "chair", 6: "sofa", 7: "table",
              8: "door", 9: "window", 10: "bookshelf", 11: "picture", 12: "counter", 14: "desk",
              16: "curtain", 24: "refrigerator", 28: "shower curtain", 33: "toilet", 34: "sink",
              36: "bathtub", 39: "otherfurniture"}


def load(out: Path, manifest: dict, name: str):
    with np.load(out / manifest["scenes"][name]["file"]) as d:
        assert sorted(d.files) == ["colors", "coords", "labels"]
        return d["coords"], d["colors"], d["labels"]


def names_of(manifest: dict, labels: np.ndarray) -> np.ndarray:
    """Class name of each label, '<ignore>' for -1."""
    return np.array(list(manifest["classes"]) + ["<ignore>"])[labels]


def check_contract(out: Path, m: dict, benchmark: str, voxel: float):
    assert m["schema"] == "mink_ssl.seg_scenes/1" and m["benchmark"] == benchmark
    assert m["ignore_label"] == -1 and m["voxel_size"] == voxel
    assert set(m["splits"]) == {"train", "val", "test"}
    assert sorted(n for s in m["splits"].values() for n in s) == sorted(m["scenes"])
    for name, entry in m["scenes"].items():
        assert entry["file"] == "scenes/" + name.replace("/", "__") + ".npz"
        coords, colors, labels = load(out, m, name)
        assert coords.dtype == np.float32 and coords.shape == (entry["points"], 3)
        assert colors.dtype == np.uint8 and colors.shape == (entry["points"], 3)
        assert labels.dtype == np.int16 and labels.shape == (entry["points"],)
    for key in ("skipped_scenes", "repairs", "parameters", "created", "versions"):
        assert key in m
    assert not list(out.glob("scenes/.*")) and not list(out.glob("reports/.*"))


# -- S3DIS ------------------------------------------------------------------------------------
def test_parse_repairs_the_release_defects_and_reports_their_lines():
    text = (b"1.000 2.000 3.000 10 20 30\n"
            b"22.350 6.692 3.048 185\x10187 182\n"  # a space became 0x10 (hallway_6)
            b"1.5 2.5 3.5 167.\x1000000 1 2\n"  # '0' lost bit 5 (auditorium_1)
            b"19.302 -9.1\x160 1.785 146 137 106\n"  # '6' lost bit 5 (hallway_2)
            b"\n"
            b"4 5 6 7 8 9\r\n"
            b"2.5\x7f00 1 2 3 4 5\n"  # a stray DEL inside a number
            b"1 2 \x10\x10 x 3\n"  # not 6 numbers in any reading: dropped
            b"0.5 0.5 0.5 0 0 255")  # no final newline
    rows, repairs = parse_xyzrgb(text, "t.txt")
    np.testing.assert_array_equal(rows, [[1, 2, 3, 10, 20, 30],
                                         [22.35, 6.692, 3.048, 185, 187, 182],
                                         [1.5, 2.5, 3.5, 167, 1, 2],
                                         [19.302, -9.16, 1.785, 146, 137, 106],
                                         [4, 5, 6, 7, 8, 9], [2.5, 1, 2, 3, 4, 5],
                                         [0.5, 0.5, 0.5, 0, 0, 255]])
    assert [line for line, _ in repairs] == [2, 3, 4, 7, 8]
    assert "0x10 read as a field separator" in repairs[0][1] and "185 187" in repairs[0][1]
    assert "0x10 read as the digit it was" in repairs[1][1] and "167.000000" in repairs[1][1]
    assert "0x16 read as the digit it was" in repairs[2][1] and "-9.160" in repairs[2][1]
    assert "0x7f inside a number removed" in repairs[3][1] and "'2.500 1" in repairs[3][1]
    assert "line dropped" in repairs[4][1]
    clean, none = parse_xyzrgb(b"1 2 3 4 5 6\n7 8 9 10 11 12\n")
    assert none == [] and clean.shape == (2, 6)
    with pytest.raises(ValueError, match=r"bad\.txt: line 2 is not 6 numbers.*'1 2 3 4 5'"):
        parse_xyzrgb(b"1 2 3 4 5 6\n1 2 3 4 5\n", "bad.txt")
    with pytest.raises(ValueError, match=r"bad\.txt: line 3 is not 6 numbers.*abc"):
        parse_xyzrgb(b"1 2 3 4 5 6\n\n1 2 abc 4 5 6\n", "bad.txt")
    with pytest.raises(ValueError, match=r"bin\.txt: 2001 lines hold bytes .* damaged or binary"):
        parse_xyzrgb(bytes(range(256)) * 2000, "bin.txt")


@pytest.fixture(scope="module")
def s3dis_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("s3dis") / "Stanford3dDataset_v1.2_Aligned_Version"
    return raw, generate_s3dis_rooms(raw, rooms_per_area=1, seed=3)


def test_s3dis_every_point_and_every_known_defect(s3dis_raw, tmp_path):
    raw, truth = s3dis_raw
    out = tmp_path / "out"
    assert prep_main(["s3dis", "--raw", str(raw), "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    check_contract(out, m, "s3dis", 0.05)
    assert m["classes"] == S3DIS_13 and m["skipped_scenes"] == {}
    assert set(m["scenes"]) == set(truth.rooms) and len(truth.rooms) == 10
    assert set(m["splits"]["test"]) == {n for n in truth.rooms if n.startswith("Area_5/")}
    assert set(m["splits"]["train"]) == {n for n in truth.rooms if not n.startswith("Area_5/")}
    assert m["splits"]["val"] == [] and m["parameters"]["stairs"] == "ignore"
    stairs = 0
    for name, room in truth.rooms.items():
        coords, colors, labels = load(out, m, name)
        np.testing.assert_array_equal(coords, room.coords)
        np.testing.assert_array_equal(colors, room.colors)
        expected = np.where(room.classes == "stairs", "<ignore>", room.classes)
        np.testing.assert_array_equal(names_of(m, labels), expected, err_msg=name)
        stairs += int((room.classes == "stairs").sum())
    assert stairs > 0  # the ignore mapping was exercised
    # exactly the generator's defects, at their lines; the repaired rows equal the truth above,
    # and each room file agreed with its annotations (no "different points" report)
    assert sorted((r["scene"], r["file"], r["line"]) for r in m["repairs"]) == \
        sorted((d["scene"], d["file"], d["line"]) for d in truth.defects)
    assert len(truth.defects) == 4
    what = {r["file"]: r["what"] for r in m["repairs"]}
    assert "read as a field separator" in what["Area_5/hallway_6/Annotations/ceiling_1.txt"]
    assert "0x10 read as the digit it was" in what["Area_2/auditorium_1/auditorium_1.txt"]
    assert "read as the digit it was" in what["Area_3/hallway_2/hallway_2.txt"]
    assert "named copy_Room_1.txt, expected copyRoom_1.txt" in \
        what["Area_6/copyRoom_1/copy_Room_1.txt"]


def test_s3dis_stairs_as_clutter_without_room_check(s3dis_raw, tmp_path):
    raw, truth = s3dis_raw
    m = run_s3dis(raw, tmp_path / "out", S3DISParams(stairs="clutter", check_room_file=False),
                  rooms=["Area_3/hallway_2"], progress=False, log=lambda s: None)
    room = truth.rooms["Area_3/hallway_2"]
    _, _, labels = load(tmp_path / "out", m, "Area_3/hallway_2")
    assert (room.classes == "stairs").any()
    np.testing.assert_array_equal(names_of(m, labels),
                                  np.where(room.classes == "stairs", "clutter", room.classes))
    assert m["repairs"] == []  # the room file (which holds the defect) was not read


def test_s3dis_bad_rooms_are_reported_and_a_rerun_resumes(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    truth = generate_s3dis_rooms(raw, areas=(1, 5), rooms_per_area=2, seed=1, defects=False)
    a, b, c, d = sorted(truth.rooms)
    bad_file = raw / a / "Annotations" / truth.rooms[a].files[1]
    good_bytes = bad_file.read_bytes()
    bad_file.write_bytes(good_bytes + b"1.0 2.0 3.0 4 5 six\n")  # text, but not a number
    (raw / b / "Annotations").rename(raw / b / "Annotations.off")
    # an unknown class; its file sorts last, so its points come last
    (raw / c / "Annotations" / "zebra_1.txt").write_bytes(b"1.0 1.0 1.0 1 1 1\n2 2 2 2 2 2\n")
    room_file = raw / c / truth.rooms[c].room_file
    room_file.write_bytes(b"".join(room_file.read_bytes().splitlines(True)[1:]))
    (raw / d / truth.rooms[d].room_file).write_bytes(b"1 2 3\n")  # unreadable: only a check
    logs = []
    m = run_s3dis(raw, out, progress=False, log=logs.append)
    reasons = m["skipped_scenes"]
    assert set(reasons) == {a, b}
    n_lines = len(good_bytes.splitlines()) + 1
    assert f"{a}/Annotations/{truth.rooms[a].files[1]}: line {n_lines} is not 6 numbers" \
        in reasons[a] and "six" in reasons[a]
    assert "has no Annotations/ folder" in reasons[b]
    assert set(m["scenes"]) == {c, d} and not (out / seg_writer.scene_file(a)).exists()
    _, _, labels_c = load(out, m, c)
    assert (labels_c[-2:] == -1).all() and len(labels_c) == len(truth.rooms[c].coords) + 2
    np.testing.assert_array_equal(names_of(m, labels_c[:-2]), np.where(
        truth.rooms[c].classes == "stairs", "<ignore>", truth.rooms[c].classes))
    what = {(r["file"], r["line"]): r["what"] for r in m["repairs"]}
    assert "unknown class 'zebra'" in what[(f"{c}/Annotations/zebra_1.txt", 0)]
    assert "hold different points" in what[(f"{c}/{truth.rooms[c].room_file}", 0)]
    assert "room file not checked" in what[(f"{d}/{truth.rooms[d].room_file}", 0)]
    np.testing.assert_array_equal(load(out, m, d)[0], truth.rooms[d].coords)
    assert any(f"skipped {a}: " in line for line in logs)

    # fix the input, rerun: done rooms are kept as they are, the skipped ones are prepared
    bad_file.write_bytes(good_bytes)
    (raw / b / "Annotations.off").rename(raw / b / "Annotations")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "scenes").iterdir()}
    logs.clear()
    m2 = run_s3dis(raw, out, progress=False, log=logs.append)
    assert "4/4 scenes done (2 already done)" in logs[0]
    assert all((out / "scenes" / k).stat().st_mtime_ns == v for k, v in before.items())
    assert m2["skipped_scenes"] == {} and m2["repairs"] == m["repairs"]  # kept from the first run
    for name in (a, b):
        coords, _, labels = load(out, m2, name)
        np.testing.assert_array_equal(coords, truth.rooms[name].coords)
        np.testing.assert_array_equal(names_of(m2, labels), np.where(
            truth.rooms[name].classes == "stairs", "<ignore>", truth.rooms[name].classes))
    with pytest.raises(ValueError, match="other parameters {'stairs': 'ignore'}"):
        run_s3dis(raw, out, S3DISParams(stairs="clutter"), progress=False)


def test_interrupted_run_leaves_only_complete_scenes(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    generate_s3dis_rooms(raw, areas=(4, 5), rooms_per_area=2, seed=5, defects=False)
    real_write, calls = seg_writer.write_scene, []

    def dying_write(out, name, data, num_classes):  # dies between report and .npz of scene 3
        calls.append(name)
        if len(calls) == 3:
            from mink_ssl.io import atomic_path
            report = out / "reports" / (Path(seg_writer.scene_file(name)).stem + ".json")
            report.write_text(json.dumps({"scene": name, "points": 1, "repairs": []}))
            with atomic_path(out / seg_writer.scene_file(name)) as tmp:
                tmp.write_bytes(b"partial")
                raise KeyboardInterrupt
        return real_write(out, name, data, num_classes)

    monkeypatch.setattr(seg_writer, "write_scene", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_s3dis(raw, tmp_path / "out", progress=False, log=lambda s: None)
    scenes = tmp_path / "out" / "scenes"
    assert sorted(p.name for p in scenes.iterdir()) == sorted(
        seg_writer.scene_file(n)[7:] for n in calls[:2])  # no partial file, no temp file
    assert not (tmp_path / "out" / "manifest.json").exists()
    (scenes / ".Area_9__x.npz.abc.tmp").write_bytes(b"stale")  # as left by a killed process
    monkeypatch.setattr(seg_writer, "write_scene", real_write)
    logs = []
    m = run_s3dis(raw, tmp_path / "out", progress=False, log=logs.append)
    assert "4/4 scenes done (2 already done)" in logs[0]
    clean = run_s3dis(raw, tmp_path / "clean", workers=2, progress=False, log=lambda s: None)
    assert m["scenes"] == clean["scenes"] and m["splits"] == clean["splits"]
    for name in m["scenes"]:
        for x, y in zip(load(tmp_path / "out", m, name), load(tmp_path / "clean", clean, name)):
            np.testing.assert_array_equal(x, y)
    assert not list(scenes.glob(".*"))


def test_cli_errors_name_the_bad_value(tmp_path, capsys):
    assert prep_main(["s3dis", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "Stanford3dDataset_v1.2_Aligned_Version" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert prep_main(["synthia", "--raw", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    assert "no sequence folders" in capsys.readouterr().err
    assert prep_main(["scannet-seg", "--raw", str(tmp_path), "--splits-dir", str(tmp_path),
                      "--out", str(tmp_path / "o")]) == 2
    assert "scannetv2_train.txt not found" in capsys.readouterr().err
    assert prep_main(["synthia", "--raw", str(tmp_path), "--out", str(tmp_path / "o"),
                      "--sequences", "SYNTHIA-SEQS-03-DAWN"]) == 2
    assert "['SYNTHIA-SEQS-03-DAWN'] are in no split" in capsys.readouterr().err


# -- Synthia4D --------------------------------------------------------------------------------
def expected_synthia_names(ids: np.ndarray) -> np.ndarray:
    names = np.array([SYNTHIA_CLASSES[int(i)][0] for i in ids])
    return np.where(np.isin(names, ["void", "sky", "reserved"]), "<ignore>", names)


def test_synthia_frames_split_units_axes_and_labels(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    seqs = ("SYNTHIA-SEQS-01-DAWN", "SYNTHIA-SEQS-05-FOG", "SYNTHIA-SEQS-06-SUNSET",
            "SYNTHIA-SEQS-01-SPRING")  # the last is in no split of the CVPR'19 protocol
    truth = generate_synthia_frames(raw, seqs, frames_per_sequence=2, seed=2)
    pc = raw / "SYNTHIA-SEQS-06-SUNSET" / "point_clouds"
    xyz, rgb, ids = truth.frames["SYNTHIA-SEQS-06-SUNSET/000001"]
    odd = ids.copy()
    odd[:7] = 200  # not a Synthia id
    write_frame_ply(pc / "000001.ply", xyz, rgb, odd)
    good = (pc / "000000.ply").read_bytes()
    (pc / "000002.ply").write_bytes(good[:len(good) - 100])  # truncated frame
    (raw / "SYNTHIA-SEQS-02-DAWN" / "RGB").mkdir(parents=True)  # image release, no clouds
    from plyfile import PlyData  # one frame as ASCII PLY (read through plyfile, not numpy)
    fog = raw / "SYNTHIA-SEQS-05-FOG" / "point_clouds" / "000000.ply"
    ply = PlyData.read(str(fog), mmap=False)
    ply.text = True
    ply.write(str(fog))
    assert fog.read_bytes().startswith(b"ply\nformat ascii")
    assert prep_main(["synthia", "--raw", str(raw), "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    check_contract(out, m, "synthia", 0.15)
    assert m["classes"] == ["building", "road", "sidewalk", "fence", "vegetation", "pole", "car",
                            "traffic sign", "pedestrian", "bicycle", "lanemarking",
                            "traffic light"]
    assert m["splits"] == {"train": ["SYNTHIA-SEQS-01-DAWN/000000", "SYNTHIA-SEQS-01-DAWN/000001"],
                           "val": ["SYNTHIA-SEQS-05-FOG/000000", "SYNTHIA-SEQS-05-FOG/000001"],
                           "test": ["SYNTHIA-SEQS-06-SUNSET/000000",
                                    "SYNTHIA-SEQS-06-SUNSET/000001"]}
    assert m["parameters"]["up_axis"] == "z"
    for name in m["scenes"]:
        xyz, rgb, ids = truth.frames[name]
        coords, colors, labels = load(out, m, name)
        # centimetres -> metres; the release's y up -> z up: (x, y, z) -> (x, -z, y)
        np.testing.assert_allclose(coords, np.stack([xyz[:, 0], -xyz[:, 2], xyz[:, 1]], 1) / 100,
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(colors, rgb)
        if name == "SYNTHIA-SEQS-06-SUNSET/000001":
            ids = odd
        np.testing.assert_array_equal(names_of(m, labels), np.where(
            ids == 200, "<ignore>", expected_synthia_names(np.minimum(ids, 15))))
    road = coords[names_of(m, labels) == "road"]
    assert np.allclose(road[:, 2], -1.6, atol=0.03)  # the road is below the camera along z
    skipped = m["skipped_scenes"]
    assert "truncated" in skipped["SYNTHIA-SEQS-06-SUNSET/000002"]
    assert "no point_clouds/ folder" in skipped["SYNTHIA-SEQS-02-DAWN"]
    assert "of the test split not found" in skipped["SYNTHIA-SEQS-06-SPRING"]
    assert not any("SPRING/0" in n or "_label" in n for n in m["scenes"])
    assert [(r["scene"], r["line"]) for r in m["repairs"]] == [("SYNTHIA-SEQS-06-SUNSET/000001", 0)]
    assert "7 points have Synthia ids outside 0..15 ([200])" in m["repairs"][0]["what"]

    kept = prep_main(["synthia", "--raw", str(raw), "--out", str(tmp_path / "kept"), "--keep-axes",
                      "--sequences", "SYNTHIA-SEQS-05-FOG", "--no-progress"])
    mk = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert kept == 0 and mk["parameters"]["up_axis"] == "y" and len(mk["scenes"]) == 2
    coords, _, _ = load(tmp_path / "kept", mk, "SYNTHIA-SEQS-05-FOG/000001")
    np.testing.assert_allclose(coords, truth.frames["SYNTHIA-SEQS-05-FOG/000001"][0] / 100,
                               rtol=1e-6, atol=1e-6)


# -- ScanNet v2 -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scannet_raw(tmp_path_factory):
    from data_prep.synthetic import generate_scene

    raw = tmp_path_factory.mktemp("scannet") / "scans"
    for k in range(3):
        generate_scene(raw, f"scene000{k}_00", k, n_frames=1, image_size=(16, 12),
                       mesh_resolution=0.3, workers=1)
    return raw


def nyu40_of(scene_dir: Path) -> np.ndarray:
    from plyfile import PlyData

    return np.asarray(PlyData.read(str(scene_dir / f"{scene_dir.name}_vh_clean_2.labels.ply"))
                      ["vertex"]["label"], dtype=np.int64)


def expected_scannet_names(nyu: np.ndarray) -> np.ndarray:
    return np.array([SCANNET_20.get(int(i), "<ignore>") for i in nyu])


def test_scannet_labels_from_ply_aggregation_and_label_map(scannet_raw, tmp_path):
    from plyfile import PlyData

    raw = tmp_path / "scans"
    shutil.copytree(scannet_raw, raw)
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "scannetv2_train.txt").write_text("scene0000_00\nscene0001_00\n")
    (splits / "scannetv2_val.txt").write_text("scene0002_00\nscene0100_00\n")  # 0100: missing
    (splits / "scannetv2_test.txt").write_text("scene0003_00\n")
    test_dir = raw / "scene0003_00"  # a test scan: mesh only, no labels
    test_dir.mkdir()
    shutil.copy(raw / "scene0002_00" / "scene0002_00_vh_clean_2.ply",
                test_dir / "scene0003_00_vh_clean_2.ply")
    # scene0000: NYU40 ids outside the benchmark (blinds 13, otherprop 40, unannotated 0)
    d0 = raw / "scene0000_00"
    nyu0 = nyu40_of(d0)
    nyu0[:30] = np.resize([13, 40, 0], 30)
    ply = PlyData.read(str(d0 / "scene0000_00_vh_clean_2.labels.ply"), mmap=False)
    ply["vertex"]["label"] = nyu0.astype(np.uint16)
    ply.write(str(d0 / "scene0000_00_vh_clean_2.labels.ply"))
    # scene0001: no labels ply -> aggregation; raw categories as in real ScanNet
    d1 = raw / "scene0001_00"
    nyu1 = nyu40_of(d1)
    (d1 / "scene0001_00_vh_clean_2.labels.ply").unlink()
    agg = json.loads((d1 / "scene0001_00.aggregation.json").read_text())
    raw_names = {"floor": "floor", "wall": "wall", "bed": "double bed", "sofa": "couch",
                 "table": "coffee table", "desk": "writing desk", "chair": "office chair",
                 "cabinet": "kitchen cabinets", "bookshelf": "bookshelves"}
    for g in agg["segGroups"]:
        g["label"] = raw_names[g["label"]]
    (d1 / "scene0001_00.aggregation.json").write_text(json.dumps(agg))
    tsv = tmp_path / "scannetv2-labels.combined.tsv"
    nyu_id = {"floor": 2, "wall": 1, "double bed": 4, "couch": 6, "coffee table": 7,
              "writing desk": 14, "office chair": 5, "kitchen cabinets": 3, "bookshelves": 10}
    tsv.write_text("id\traw_category\tcategory\tcount\tnyu40id\tnyu40class\n" + "".join(
        f"{i}\t{k}\t{k}\t1\t{v}\tx\n" for i, (k, v) in enumerate(nyu_id.items())))

    out = tmp_path / "out"
    args = ["scannet-seg", "--raw", str(raw), "--splits-dir", str(splits), "--out", str(out),
            "--label-map", str(tsv), "--no-progress"]
    assert prep_main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    check_contract(out, m, "scannet", 0.02)
    assert m["classes"] == list(SCANNET_20.values())
    assert m["splits"] == {"train": ["scene0000_00", "scene0001_00"], "val": ["scene0002_00"],
                           "test": ["scene0003_00"]}
    assert m["skipped_scenes"] == {"scene0100_00": "listed in scannetv2_val.txt "
                                   f"but not found in {raw}"}
    assert m["repairs"] == []
    for name, nyu in (("scene0000_00", nyu0), ("scene0001_00", nyu1),
                      ("scene0002_00", nyu40_of(raw / "scene0002_00"))):
        coords, colors, labels = load(out, m, name)
        mesh = PlyData.read(str(raw / name / f"{name}_vh_clean_2.ply"))["vertex"]
        np.testing.assert_array_equal(coords, np.stack([mesh["x"], mesh["y"], mesh["z"]], 1))
        np.testing.assert_array_equal(colors, np.stack([mesh["red"], mesh["green"],
                                                        mesh["blue"]], 1))
        np.testing.assert_array_equal(names_of(m, labels), expected_scannet_names(nyu),
                                      err_msg=name)
    assert (load(out, m, "scene0000_00")[2][:30] == -1).all()
    assert (load(out, m, "scene0003_00")[2] == -1).all()

    # without the label map the raw categories are not NYU40 names: reported, ignored
    out2 = tmp_path / "out2"
    m2 = prep_main(["scannet-seg", "--raw", str(raw), "--splits-dir", str(splits), "--out",
                    str(out2), "--scenes", "scene0001_00", "--no-progress"])
    m2 = json.loads((out2 / "manifest.json").read_text())
    (rep,) = m2["repairs"]
    assert rep["file"] == "scene0001_00/scene0001_00.aggregation.json"
    assert "'double bed'" in rep["what"] and "--label-map" in rep["what"]
    labels = load(out2, m2, "scene0001_00")[2]
    np.testing.assert_array_equal(labels == -1, ~np.isin(nyu1, [1, 2]))  # only floor, wall

    # --labels ply: a scene without its labels ply is skipped; a truncated mesh is skipped
    mesh = d0 / "scene0000_00_vh_clean_2.ply"
    mesh.write_bytes(mesh.read_bytes()[:2000])
    logs = []
    from data_prep.segmentation.scannet_seg import ScanNetSegParams, run as run_scannet
    m3 = run_scannet(raw, splits, tmp_path / "out3", ScanNetSegParams("ply"), progress=False,
                     log=logs.append)
    reasons = m3["skipped_scenes"]
    assert "no scene0001_00_vh_clean_2.labels.ply" in reasons["scene0001_00"]
    assert "is truncated" in reasons["scene0000_00"]
    assert set(m3["scenes"]) == {"scene0002_00", "scene0003_00"}

    # a rerun of the first run only rebuilds the manifest
    logs.clear()
    m4 = run_scannet(raw, splits, out, label_map=tsv, progress=False, log=logs.append)
    assert "4/4 scenes done (4 already done)" in logs[0] and m4["scenes"] == m["scenes"]
