"""What prep's errors mean (#27 item 4): only bad input (``BadInput``, raised by the readers)
is a skipped scene; a bug in our own code stops the run naming the scene and keeps the finished
scenes; an unreadable input file is bad input naming it. One definition of a finished scene and
one manifest shape for pair and segmentation / detection prep, with older manifests still read.
"""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from data_prep.cli import main as prep_main
from data_prep.pairs import scene as pair_scene
from data_prep.pairs.prep import PrepParams, run as run_pairs
from data_prep.runner import SceneFailed
from data_prep.scannet.exported import ExportedFrames
from data_prep.scannet.sens import SensReader
from data_prep.scannet.sens_writer import write_sens
from data_prep.segmentation import s3dis
from data_prep.scene_store import report_file, scene_file
from data_prep.synthetic.s3dis_rooms import generate_s3dis_rooms
from mink_ssl.data.detection import read_det_manifest
from mink_ssl.data.segmentation import SegmentationDataset, read_seg_manifest
from mink_ssl.errors import BadInput
from mink_ssl.formats.manifest import skipped_scenes
from mink_ssl.formats.scene_record import finished_record

FAST = PrepParams(frame_skip=5, min_points=100)


@pytest.fixture()
def real_sens_raw(kitchen, tmp_path):
    """Two scenes of real 7-Scenes frames as ScanNet .sens files (20 frames each)."""
    raw = tmp_path / "raw"
    src = ExportedFrames(kitchen)
    first = raw / "scene0000_00" / "scene0000_00.sens"
    write_sens(first, src.header, ((f.camera_to_world, f.color_bytes, f.depth(src.header))
                                   for f in src.frames(step=5)))
    (raw / "scene0001_00").mkdir()
    shutil.copy(first, raw / "scene0001_00" / "scene0001_00.sens")
    return raw


# -- pair prep ----------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("a bug"),
                                   OSError(errno.EIO, "a bug")])
def test_a_bug_in_pair_prep_stops_the_run_naming_the_scene(real_sens_raw, tmp_path,
                                                            monkeypatch, error):
    out, real = tmp_path / "out", pair_scene.overlap_matrix

    def buggy(clouds, radius):  # our own code fails on the second scene
        if buggy.calls:
            raise error
        buggy.calls += 1
        return real(clouds, radius)
    buggy.calls = 0
    monkeypatch.setattr(pair_scene, "overlap_matrix", buggy)
    with pytest.raises(SceneFailed, match=rf"scene scene0001_00: {type(error).__name__}: .*a "
                       "bug.*not reported as bad input") as info:
        prep_main(["scannet", "--raw", str(real_sens_raw), "--out", str(out), "--frame-skip",
                   "5", "--min-points", "100", "--no-progress"])
    assert info.value.__cause__ is error  # the original error and its traceback, chained
    assert pair_scene.complete_scene(out / "scene0000_00") is not None  # finished: kept
    assert not (out / "scene0001_00").exists() and not (out / "manifest.json").exists()
    assert not list(out.glob(".tmp-*")) and not list((out / ".prep-status").glob("*"))
    monkeypatch.setattr(pair_scene, "overlap_matrix", real)  # fixed: the rerun continues
    m = run_pairs(real_sens_raw, out, FAST, progress=False, log=lambda s: None)
    assert m["counts"]["scenes_done"] == 2 and m["skipped_scenes"] == {}


def test_truncated_real_sens_is_skipped_and_an_unreadable_one_retried(real_sens_raw, tmp_path,
                                                                     monkeypatch):
    raw, out = real_sens_raw, tmp_path / "out"
    cut = raw / "scene0001_00" / "scene0001_00.sens"
    cut.write_bytes(cut.read_bytes()[:-7000])  # a real file cut inside its last frame
    logs = []
    m = run_pairs(raw, out, FAST, progress=False, log=logs.append)
    assert list(m["skipped_scenes"]) == ["scene0001_00"]
    assert f"{cut}: frame 19" in m["skipped_scenes"]["scene0001_00"]
    assert any(line.startswith("  skipped scene0001_00: ") for line in logs)
    record = json.loads((out / ".prep-status" / "scene0001_00.json").read_text())
    assert record["retry"] is False  # damaged: not tried again while the file is unchanged

    # a file the disk cannot read (EIO): bad input naming it, tried again on the next run
    (raw / "scene0002_00").mkdir()
    shutil.copy(raw / "scene0000_00" / "scene0000_00.sens", raw / "scene0002_00")
    os.rename(raw / "scene0002_00" / "scene0000_00.sens",
              raw / "scene0002_00" / "scene0002_00.sens")
    real_pread, eio = os.pread, raw / "scene0002_00" / "scene0002_00.sens"

    def failing_pread(fd, n, offset):
        if os.path.samefile(f"/proc/self/fd/{fd}", eio):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_pread(fd, n, offset)
    monkeypatch.setattr(os, "pread", failing_pread)
    m = run_pairs(raw, out, FAST, progress=False, log=lambda s: None)
    reason = m["skipped_scenes"]["scene0002_00"]
    assert reason.startswith(f"cannot read {eio}: Input/output error") and "readable" in reason
    assert json.loads((out / ".prep-status" / "scene0002_00.json").read_text())["retry"]
    monkeypatch.setattr(os, "pread", real_pread)  # the disk is back: prepared this time
    m = run_pairs(raw, out, FAST, progress=False, log=lambda s: None)
    assert set(m["skipped_scenes"]) == {"scene0001_00"} and "scene0002_00" in m["scenes"]


def test_unreadable_input_is_bad_input_naming_the_file(kitchen, tmp_path, monkeypatch):
    path = tmp_path / "x.sens"
    src = ExportedFrames(kitchen)
    write_sens(path, src.header, ((f.camera_to_world, f.color_bytes, f.depth(src.header))
                                  for f in src.frames(step=50)))

    def eio(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(os, "pread", eio)
    with pytest.raises(BadInput, match=rf"cannot read {path}: Input/output error") as info:
        SensReader(path)
    assert info.value.unreadable and info.value.path == str(path)
    err = pickle_roundtrip(info.value)  # crosses from a worker process intact
    assert (type(err), str(err), err.path, err.unreadable) == \
        (BadInput, str(info.value), str(path), True)


def pickle_roundtrip(e):
    import pickle

    return pickle.loads(pickle.dumps(e))


# -- segmentation / detection prep ------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_a_bug_in_segmentation_prep_stops_the_run_and_keeps_finished_scenes(tmp_path,
                                                                             monkeypatch,
                                                                             workers):
    raw, out = tmp_path / "raw", tmp_path / "out"
    truth = generate_s3dis_rooms(raw, areas=(1, 5), rooms_per_area=2, seed=2, defects=False)
    rooms = sorted(truth.rooms)
    real = s3dis.find_room_file

    def buggy(room_dir):  # our own code fails on one room (forked workers inherit the patch)
        if f"{room_dir.parent.name}/{room_dir.name}" == rooms[2]:
            {}["a bug"]  # noqa: B018 - a KeyError
        return real(room_dir)
    monkeypatch.setattr(s3dis, "find_room_file", buggy)
    with pytest.raises(SceneFailed, match=rf"scene {rooms[2]}: KeyError: .*a bug.*traceback"):
        s3dis.run(raw, out, workers=workers, progress=False, log=lambda s: None)
    assert not (out / "manifest.json").exists()
    done = [r for r in rooms if finished_record(out / report_file(r), out)]
    assert rooms[2] not in done and (workers == 2 or done == rooms[:2])
    monkeypatch.undo()
    logs = []
    m = s3dis.run(raw, out, progress=False, log=logs.append)
    assert m["skipped_scenes"] == {} and sorted(m["scenes"]) == rooms
    assert f"4/4 scenes done ({len(done)} already done)" in logs[0]


def test_a_corrupt_ply_is_skipped_and_a_damaged_scene_file_redone(tmp_path):
    from data_prep.segmentation import synthia
    from data_prep.synthetic.synthia_frames import generate_synthia_frames

    raw, out = tmp_path / "raw", tmp_path / "out"
    generate_synthia_frames(raw, ("SYNTHIA-SEQS-05-FOG",), frames_per_sequence=3, seed=1)
    frames = sorted(p for p in (raw / "SYNTHIA-SEQS-05-FOG" / "point_clouds").glob("*.ply")
                    if not p.stem.endswith("_label"))
    cut = frames[1].read_bytes()
    frames[1].write_bytes(cut[:len(cut) // 2])  # cut inside its vertices
    m = synthia.run(raw, out, sequences=["SYNTHIA-SEQS-05-FOG"], progress=False,
                    log=lambda s: None)
    bad = f"SYNTHIA-SEQS-05-FOG/{frames[1].stem}"
    assert list(m["skipped_scenes"]) == [bad] and "is truncated" in m["skipped_scenes"][bad]
    assert str(frames[1]) in m["skipped_scenes"][bad] and "restore" in m["skipped_scenes"][bad]
    # the record lists the .npz's size: a damaged .npz (its size changed) is redone
    good = f"SYNTHIA-SEQS-05-FOG/{frames[0].stem}"
    record = json.loads((out / report_file(good)).read_text())
    npz = out / scene_file(good)
    assert record["files"] == {scene_file(good): npz.stat().st_size}
    data = npz.read_bytes()
    npz.write_bytes(data[:-10])
    logs = []
    m2 = synthia.run(raw, out, sequences=["SYNTHIA-SEQS-05-FOG"], progress=False,
                     log=logs.append)
    assert "2/3 scenes done (1 already done)" in logs[0] and npz.read_bytes() == data
    assert m2["scenes"] == m["scenes"]


def test_a_report_of_an_older_version_is_not_a_finished_scene(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    truth = generate_s3dis_rooms(raw, areas=(1,), rooms_per_area=2, seed=6, defects=False)
    old, kept = sorted(truth.rooms)
    s3dis.run(raw, out, progress=False, log=lambda s: None)
    report = out / report_file(old)  # as earlier versions wrote it: no sizes
    report.write_text(json.dumps({k: v for k, v in json.loads(report.read_text()).items()
                                  if k != "files"}))
    logs = []
    m = s3dis.run(raw, out, progress=False, log=logs.append)
    assert any("2/2 scenes done (1 already done)" in line for line in logs)
    assert sorted(m["scenes"]) == [old, kept]
    assert json.loads(report.read_text())["files"] == {
        scene_file(old): (out / scene_file(old)).stat().st_size}


def test_finished_record_is_every_listed_file_at_its_size(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345")
    rec = tmp_path / "rec.json"

    def write(d):
        rec.write_text(json.dumps(d))
        return finished_record(rec, tmp_path)
    assert write({"points": 3, "files": {"a.bin": 5}}) == {"points": 3, "files": {"a.bin": 5}}
    assert write({"files": {"a.bin": 4}}) is None  # another size: truncated or replaced
    assert write({"files": {"a.bin": 5, "b.bin": 1}}) is None  # a file missing
    assert write({"points": 3}) is None  # a record of an older version: redone
    assert write({"files": {}}) is None
    assert write({"files": {"../a.bin": 5}}) is None  # outside its folder
    assert write({"files": {"a.bin": True}}) is None
    assert write([1, 2]) is None
    rec.write_bytes(b"\xff{")
    assert finished_record(rec, tmp_path) is None
    assert finished_record(tmp_path / "none.json", tmp_path) is None


# -- one manifest shape, the old one still read -------------------------------------------------
def test_old_manifest_shape_still_loads(rooms, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(rooms, root)
    m = json.loads((root / "manifest.json").read_text())
    m.pop("skipped_scenes", None)
    m["skipped"] = [{"scene": "Area_2/room_9", "reason": "has no Annotations/ folder"}]
    (root / "manifest.json").write_text(json.dumps(m))  # as segmentation prep wrote it before
    got = read_seg_manifest(root)
    assert got["skipped_scenes"] == {"Area_2/room_9": "has no Annotations/ folder"}
    assert "skipped" not in got
    ds = SegmentationDataset(root, "train", voxel_size=0.05)
    assert len(ds) == len(m["splits"]["train"])
    m["skipped"] = "not a list"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest.json: the manifest's skipped must be a list"):
        read_seg_manifest(root)


def test_old_detection_manifest_and_both_shapes(tmp_path):
    old = {"skipped": [{"scene": "a", "reason": "x"}, {"scene": "b", "reason": "y"}]}
    assert skipped_scenes(old) == {"a": "x", "b": "y"}
    assert skipped_scenes({"skipped_scenes": {"a": "x"}}) == {"a": "x"}
    assert skipped_scenes({}) == {}
    with pytest.raises(ValueError, match="must map scene names to reasons"):
        skipped_scenes({"skipped_scenes": [{"scene": "a", "reason": "x"}]})
    root = tmp_path / "det"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({
        "schema": "mink_ssl.det_scenes/1", "benchmark": "scannet", "classes": ["chair"],
        "voxel_size": 0.025, "splits": {"train": ["s0"], "val": []},
        "scenes": {"s0": {"file": "scenes/s0.npz", "points": 3, "boxes": 0}},
        "skipped": [{"scene": "s1", "reason": "missing s1.txt"}], "notes": []}))
    got = read_det_manifest(root)
    assert got["skipped_scenes"] == {"s1": "missing s1.txt"} and "skipped" not in got


def test_pair_and_scene_manifests_write_the_same_shape(real_sens_raw, tmp_path):
    (real_sens_raw / "scene0001_00" / "scene0001_00.sens").write_bytes(b"not a sens file")
    pairs = run_pairs(real_sens_raw, tmp_path / "pairs", FAST, progress=False,
                      log=lambda s: None)
    raw = tmp_path / "s3dis"
    truth = generate_s3dis_rooms(raw, areas=(1,), rooms_per_area=2, seed=4, defects=False)
    first = sorted(truth.rooms)[0]
    shutil.rmtree(raw / first / "Annotations")
    seg = s3dis.run(raw, tmp_path / "seg", progress=False, log=lambda s: None)
    for m, scene in ((pairs, "scene0001_00"), (seg, first)):
        assert "skipped" not in m and list(m["skipped_scenes"]) == [scene]
        assert isinstance(m["skipped_scenes"][scene], str)
        assert skipped_scenes(m) == m["skipped_scenes"]
