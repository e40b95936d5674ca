"""ScanNet .sens reader/writer and exported-folder reader: round trips, streaming, real Kinect
frames, and every kind of damaged input."""
from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.scannet.exported import ExportedFrames, export_to_sens
from data_prep.scannet.sens import SensFormatError, SensHeader, SensReader
from data_prep.scannet.sens_writer import write_sens
from mink_ssl.errors import BadInput

NAME = "StructureSensor"
HEADER_LEN = 4 + 8 + len(NAME) + 4 * 64 + 36  # version, name length, name, 4 matrices, tail
TAIL_AT = HEADER_LEN - 36  # compression codes, sizes, depth_shift, num_frames


# -- synthetic data ----------------------------------------------------------------------------
def make_header(cw=40, ch=30, dw=32, dh=24, num_frames=0) -> SensHeader:
    rng = np.random.default_rng(7)
    K = lambda w, h: np.array([[w * 1.1, 0, w / 2, 0], [0, w * 1.1, h / 2, 0], [0, 0, 1, 0],
                               [0, 0, 0, 1]])  # noqa: E731
    ext = np.eye(4)
    ext[:3, 3] = rng.normal(size=3)
    return SensHeader(4, NAME, K(cw, ch), ext, K(dw, dh), np.eye(4), "unknown", "unknown",
                      cw, ch, dw, dh, 1000.0, num_frames)


def random_pose(rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    pose = np.eye(4)
    pose[:3, :3] = q * np.sign(np.linalg.det(q))
    pose[:3, 3] = rng.uniform(-5, 5, size=3)
    return pose


def make_frames(n, h: SensHeader, seed=0, smooth=False):
    """n tuples (pose (4,4), color (H,W,3) u8, depth (h,w) u16 with zeros, ts_color, ts_depth)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if smooth:  # JPEG-friendly: gradients plus a little noise
            y, x = np.mgrid[0:h.color_height, 0:h.color_width]
            base = np.stack([x * 4, y * 6, (x + y) * 3], axis=-1) + 20 * i  # (H, W, 3)
            color = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
        else:
            color = rng.integers(0, 256, (h.color_height, h.color_width, 3), dtype=np.uint8)
        depth = rng.integers(1, 65536, (h.depth_height, h.depth_width)).astype(np.uint16)
        depth[rng.random(depth.shape) < 0.2] = 0  # invalid measurements
        out.append((random_pose(rng), color, depth, 1_000_000 + 33_366 * i, 1_000_123 + 33_366 * i))
    return out


def handmade_sens(h: SensHeader, payloads, color_code=0, depth_code=0) -> bytes:
    """A .sens built straight from the format description, independently of write_sens.

    payloads: (pose, ts_color, ts_depth, color_bytes, depth_bytes) per frame.
    """
    name = h.sensor_name.encode()
    out = struct.pack("<IQ", 4, len(name)) + name
    for m in (h.intrinsic_color, h.extrinsic_color, h.intrinsic_depth, h.extrinsic_depth):
        out += struct.pack("<16f", *np.asarray(m, np.float32).ravel())
    out += struct.pack("<iiIIIIfQ", color_code, depth_code, h.color_width, h.color_height,
                       h.depth_width, h.depth_height, h.depth_shift, len(payloads))
    for pose, tsc, tsd, cb, db in payloads:
        out += struct.pack("<16fQQQQ", *np.asarray(pose, np.float32).ravel(), tsc, tsd,
                           len(cb), len(db)) + cb + db
    return out + struct.pack("<Q", 0)  # IMU count


def frame_offsets(data: bytes) -> list[int]:
    """Byte offsets of every frame header, found with struct alone (not with the reader)."""
    (name_len,) = struct.unpack_from("<Q", data, 4)
    off = 4 + 8 + name_len + 4 * 64 + 36  # end of the header
    (n,) = struct.unpack_from("<Q", data, off - 8)
    offs = []
    for _ in range(n):
        offs.append(off)
        csize, dsize = struct.unpack_from("<QQ", data, off + 80)
        off += 96 + csize + dsize
    return offs + [off]


def assert_same_frame(a, b):
    assert a.index == b.index
    np.testing.assert_array_equal(a.camera_to_world, b.camera_to_world)
    assert (a.timestamp_color, a.timestamp_depth) == (b.timestamp_color, b.timestamp_depth)
    assert a.color_bytes == b.color_bytes and a.depth_bytes == b.depth_bytes


@pytest.fixture
def written(tmp_path):
    """(path, header, frames) of a 6-frame .sens with png colour and zlib depth."""
    h = make_header()
    frames = make_frames(6, h)
    path = write_sens(tmp_path / "scene.sens", h, (f for f in frames), color_compression="png")
    return path, h, frames


# -- round trips -------------------------------------------------------------------------------
def test_round_trip_png_zlib_is_exact(written):
    path, h, frames = written
    with SensReader(path) as r:
        g = r.header
        assert (g.version, g.sensor_name, g.depth_shift) == (4, NAME, 1000.0)
        assert (g.color_compression, g.depth_compression) == ("png", "zlib_ushort")
        assert (g.color_width, g.color_height, g.depth_width, g.depth_height) == (40, 30, 32, 24)
        assert g.num_frames == len(r) == 6  # counted from a generator, header patched
        for name in ("intrinsic_color", "extrinsic_color", "intrinsic_depth", "extrinsic_depth"):
            assert getattr(g, name).dtype == np.float32 and getattr(g, name).shape == (4, 4)
            np.testing.assert_array_equal(getattr(g, name), getattr(h, name))
        got = list(r.frames())
    assert [f.index for f in got] == list(range(6))
    for f, (pose, color, depth, tsc, tsd) in zip(got, frames):
        assert f.camera_to_world.dtype == np.float32
        np.testing.assert_array_equal(f.camera_to_world, pose.astype(np.float32))
        assert (f.timestamp_color, f.timestamp_depth) == (tsc, tsd)
        c, d = f.color(g), f.depth(g)
        assert c.dtype == np.uint8 and d.dtype == np.uint16 and d.shape == (24, 32)
        np.testing.assert_array_equal(c, color)
        np.testing.assert_array_equal(d, depth)
        d[0, 0] = 1  # decoded arrays are writable copies


def test_round_trip_jpeg_colour_is_close(tmp_path):
    h = make_header(cw=64, ch=48)
    frames = make_frames(3, h, smooth=True)
    path = write_sens(tmp_path / "j.sens", h, frames, jpeg_quality=95)
    with SensReader(path) as r:
        assert r.header.color_compression == "jpeg"
        for f, (_, color, depth, _, _) in zip(r.frames(), frames):
            assert f.color_bytes[:2] == b"\xff\xd8"  # a JPEG stream
            err = np.abs(f.color(r.header).astype(int) - color)
            assert err.mean() < 2.5 and err.max() < 40, (err.mean(), err.max())
            np.testing.assert_array_equal(f.depth(r.header), depth)


def test_raw_raw_writer_matches_the_format_byte_for_byte(tmp_path):
    h = make_header()
    frames = make_frames(4, h)
    path = write_sens(tmp_path / "raw.sens", h, frames, color_compression="raw",
                      depth_compression="raw_ushort")
    expected = handmade_sens(h, [(p, tsc, tsd, c.tobytes(), d.astype("<u2").tobytes())
                                 for p, c, d, tsc, tsd in frames])
    assert path.read_bytes() == expected
    with SensReader(path) as r:
        assert (r.header.color_compression, r.header.depth_compression) == ("raw", "raw_ushort")
        for f, (_, color, depth, _, _) in zip(r.frames(), frames):
            np.testing.assert_array_equal(f.color(r.header), color)
            np.testing.assert_array_equal(f.depth(r.header), depth)


def test_handmade_zlib_file_reads_and_trailing_bytes_are_ignored(tmp_path):
    h = make_header()
    frames = make_frames(3, h)
    data = handmade_sens(h, [(p, a, b, c.tobytes(), zlib.compress(d.astype("<u2").tobytes()))
                             for p, c, d, a, b in frames], color_code=0, depth_code=1)
    path = tmp_path / "hand.sens"
    path.write_bytes(data + struct.pack("<Q", 2) + b"\x01" * 80)  # IMU records after frames
    with SensReader(path) as r:
        r.check()
        assert len(r) == 3
        for f, (pose, color, depth, _, _) in zip(r.frames(), frames):
            np.testing.assert_array_equal(f.depth(r.header), depth)
            np.testing.assert_array_equal(f.color(r.header), color)


def test_minus_inf_poses_are_read_back(tmp_path):
    h = make_header()
    frames = make_frames(3, h)
    lost = np.full((4, 4), -np.inf)
    frames[1] = (lost,) + frames[1][1:]
    path = write_sens(tmp_path / "inf.sens", h, frames, color_compression="raw")
    with SensReader(path) as r:
        poses = [f.camera_to_world for f in r.frames(color=False, depth=False)]
    assert np.isneginf(poses[1]).all()
    assert np.isfinite(poses[0]).all() and np.isfinite(poses[2]).all()


# -- streaming ---------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [1, 2, 3, 5, 7])
def test_frames_step_yields_exactly_those_indices(written, step):
    path, h, frames = written
    with SensReader(path) as r:
        got = list(r.frames(step=step))
        assert [f.index for f in got] == list(range(0, 6, step))
        for f in got:
            np.testing.assert_array_equal(f.depth(r.header), frames[f.index][2])
        assert [f.index for f in r.frames([4, 1, 5, 2], step=2)] == [4, 5]


def test_random_access_in_any_order_equals_sequential(written):
    path, _, _ = written
    with SensReader(path) as r:
        sequential = list(r.frames())
    for order in ([5, 0, 3, 3, 1, 4, 2], [2, 0, 4, 3, 3, 1, 5], [1, 1, 0, 5]):
        with SensReader(path) as r:  # fresh reader: the offset index is built by the jumps
            for i in order:
                assert_same_frame(r.frame(i), sequential[i])


def test_only_requested_payloads_are_read(written):
    path, h, frames = written
    with SensReader(path) as r:
        f = r.frame(3, color=False)
        assert f.color_bytes is None and f.depth_bytes is not None
        np.testing.assert_array_equal(f.depth(r.header), frames[3][2])
        with pytest.raises(ValueError, match="color=False"):
            f.color(r.header)
        f = r.frame(2, depth=False)
        assert f.depth_bytes is None
        np.testing.assert_array_equal(f.color(r.header), frames[2][1])


@pytest.mark.skipif(not hasattr(os, "pread"), reason="counts os.pread calls")
def test_jumping_reads_only_frame_headers(written, monkeypatch):
    path, _, _ = written
    reads = []
    real = os.pread

    def counting(fd, n, off):
        reads.append((off, n))
        return real(fd, n, off)

    with SensReader(path) as r:
        monkeypatch.setattr(os, "pread", counting)
        r.frame(5, color=False, depth=False)
    assert sum(n for _, n in reads) == 6 * 96  # six 96-byte frame headers, no payload
    assert [off for off, _ in reads] == frame_offsets(path.read_bytes())[:6]


def test_skipped_frames_are_not_decoded(written, tmp_path):
    path, h, frames = written
    data = bytearray(path.read_bytes())
    offs = frame_offsets(bytes(data))
    csize, dsize = struct.unpack_from("<QQ", data, offs[1] + 80)
    dstart = offs[1] + 96 + csize
    data[dstart:dstart + dsize] = b"\x00" * dsize  # frame 1's depth: no longer zlib
    bad = tmp_path / "bad1.sens"
    bad.write_bytes(bytes(data))
    with SensReader(bad) as r:
        for f in r.frames(step=2):
            np.testing.assert_array_equal(f.depth(r.header), frames[f.index][2])
        with pytest.raises(SensFormatError, match=rf"frame 1, byte offset {offs[1]}.*zlib"):
            r.frame(1).depth(r.header)


def test_reader_pickles_for_worker_processes(written):
    import pickle

    path, h, frames = written
    with SensReader(path) as r:
        r.frame(2)
        r2 = pickle.loads(pickle.dumps(r))
    with r2:
        np.testing.assert_array_equal(r2.frame(4).depth(r2.header), frames[4][2])


# -- real Kinect frames (7-Scenes RedKitchen, exported layout) --------------------------------
def test_kitchen_export_to_sens_round_trip(kitchen, tmp_path):
    ex = ExportedFrames(kitchen)
    ids = sorted(int(p.stem) for p in (kitchen / "depth").glob("*.png"))
    assert ex.frame_ids == ids and len(ex) == 100 and ids[:3] == [0, 5, 10]
    path = export_to_sens(kitchen, tmp_path / "kitchen.sens")
    K = np.loadtxt(kitchen / "intrinsic" / "intrinsic_depth.txt").astype(np.float32)
    with SensReader(path) as r:
        h = r.header
        assert len(r) == 100
        assert (h.color_width, h.color_height) == (h.depth_width, h.depth_height) == (640, 480)
        assert (h.depth_shift, h.color_compression, h.depth_compression) == \
            (1000.0, "jpeg", "zlib_ushort")
        np.testing.assert_array_equal(h.intrinsic_depth, K)
        np.testing.assert_array_equal(
            h.intrinsic_color,
            np.loadtxt(kitchen / "intrinsic" / "intrinsic_color.txt").astype(np.float32))
        for f, fid in zip(r.frames(), ids):
            depth_png = np.array(Image.open(kitchen / "depth" / f"{fid}.png"))
            assert depth_png.dtype == np.uint16
            depth = f.depth(h)
            np.testing.assert_array_equal(depth, depth_png)
            np.testing.assert_array_equal(
                f.camera_to_world, np.loadtxt(kitchen / "pose" / f"{fid}.txt").astype(np.float32))
            jpg = kitchen / "color" / f"{fid}.jpg"
            assert f.color_bytes == jpg.read_bytes()  # JPEG passed through, no re-encoding
            np.testing.assert_array_equal(f.color(h), np.array(Image.open(jpg).convert("RGB")))
        assert 0 < (depth == 0).mean() < 0.5  # real depth: mostly valid, some holes


def copy_subset(src: Path, dst: Path, ids) -> Path:
    for sub in ("color", "depth", "pose"):
        (dst / sub).mkdir(parents=True)
    shutil.copytree(src / "intrinsic", dst / "intrinsic")
    for i in ids:
        for sub, ext in (("color", "jpg"), ("depth", "png"), ("pose", "txt")):
            shutil.copy(src / sub / f"{i}.{ext}", dst / sub / f"{i}.{ext}")
    return dst


def test_kitchen_reencoded_colour(kitchen, tmp_path):
    sub = copy_subset(kitchen, tmp_path / "sub", [0, 50, 495])
    ex = ExportedFrames(sub)
    originals = [np.array(Image.open(sub / "color" / f"{i}.jpg").convert("RGB"))
                 for i in ex.frame_ids]
    png = export_to_sens(sub, tmp_path / "png.sens", color_compression="png")
    with SensReader(png) as r:  # lossless: the decoded JPEGs exactly
        for f, orig in zip(r.frames(), originals):
            np.testing.assert_array_equal(f.color(r.header), orig)
    items = ((f.camera_to_world, f.color(ex.header), f.depth(ex.header)) for f in ex.frames())
    jpg = write_sens(tmp_path / "jpg.sens", ex.header, items, jpeg_quality=95)
    with SensReader(jpg) as r:  # a second lossy encoding: close
        for f, orig in zip(r.frames(), originals):
            err = np.abs(f.color(r.header).astype(int) - orig)
            assert err.mean() < 3.0, err.mean()


def test_kitchen_truncated_payload_is_found_by_check(kitchen, tmp_path):
    sub = copy_subset(kitchen, tmp_path / "sub", [0, 5, 10, 15])
    data = export_to_sens(sub, tmp_path / "k.sens").read_bytes()
    offs = frame_offsets(data)
    cut = tmp_path / "cut.sens"
    cut.write_bytes(data[:offs[2] + 96 + 1000])  # inside frame 2's colour payload
    with SensReader(cut) as r:
        r.frame(1).depth(r.header)  # frames before the damage still read
        with pytest.raises(SensFormatError, match=rf"cut.sens: frame 2, byte offset {offs[2]}"):
            r.check()


# -- exported folders --------------------------------------------------------------------------
def make_exported(root: Path, ids, h: SensHeader):
    frames = make_frames(len(ids), h, smooth=True)
    for sub in ("color", "depth", "pose", "intrinsic"):
        (root / sub).mkdir(parents=True)
    for name in ("intrinsic_color", "intrinsic_depth", "extrinsic_color"):
        np.savetxt(root / "intrinsic" / f"{name}.txt", getattr(h, name))
    for i, (pose, color, depth, _, _) in zip(ids, frames):
        Image.fromarray(color).save(root / "color" / f"{i}.jpg", quality=95)
        Image.fromarray(depth).save(root / "depth" / f"{i}.png")
        np.savetxt(root / "pose" / f"{i}.txt", pose)
    return frames


def test_exported_folder_with_sparse_ids(tmp_path):
    h = make_header(cw=48, ch=36, dw=24, dh=18)
    ids = [0, 5, 10, 20, 100]
    frames = make_exported(tmp_path / "ex", ids, h)
    ex = ExportedFrames(tmp_path / "ex")
    assert ex.frame_ids == ids  # numeric, not lexicographic, order
    g = ex.header
    assert (g.color_width, g.color_height, g.depth_width, g.depth_height) == (48, 36, 24, 18)
    assert (g.depth_shift, g.num_frames, g.depth_compression) == (1000.0, 5, "png")
    np.testing.assert_array_equal(g.extrinsic_color, h.extrinsic_color)
    np.testing.assert_array_equal(g.extrinsic_depth, np.eye(4))  # absent: identity
    f = ex.frame(10)
    assert f.index == 10
    np.testing.assert_array_equal(f.depth(g), frames[2][2])
    np.testing.assert_array_equal(f.camera_to_world, frames[2][0].astype(np.float32))
    assert np.abs(f.color(g).astype(int) - frames[2][1]).mean() < 2.5
    assert [f.index for f in ex.frames(step=2)] == [0, 10, 100]
    with pytest.raises(IndexError, match="frame id 7"):
        ex.frame(7)

    path = export_to_sens(tmp_path / "ex", tmp_path / "out" / "ex.sens")
    with SensReader(path) as r:
        assert len(r) == 5
        for f, (pose, _, depth, _, _) in zip(r.frames(), frames):
            np.testing.assert_array_equal(f.depth(r.header), depth)
            np.testing.assert_array_equal(f.camera_to_world, pose.astype(np.float32))


def test_exported_folder_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(BadInput, match=r"nope.*color.*reader\.py"):
        ExportedFrames(tmp_path / "nope")

    h = make_header(cw=16, ch=12, dw=16, dh=12)
    make_exported(tmp_path / "a", [0, 5, 10], h)
    (tmp_path / "a" / "pose" / "5.txt").unlink()
    with pytest.raises(BadInput, match=r"pose/5\.txt missing.*reader\.py"):
        ExportedFrames(tmp_path / "a")

    make_exported(tmp_path / "b", [0, 5, 10], h)
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(tmp_path / "b" / "depth" / "10.png")
    ex = ExportedFrames(tmp_path / "b")  # the first frame is fine
    with pytest.raises(SensFormatError, match=r"b/depth/10\.png: depth PNG has mode 'L'.*16-bit"):
        ex.frame(10)
    ex.frame(10, depth=False)
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(tmp_path / "b" / "depth" / "0.png")
    with pytest.raises(SensFormatError, match=r"b/depth/0\.png.*16-bit"):
        ExportedFrames(tmp_path / "b")


# -- damaged .sens input -----------------------------------------------------------------------
def damaged(path: Path, data: bytes, name: str) -> Path:
    out = path.parent / name
    out.write_bytes(data)
    return out


@pytest.mark.parametrize("where", ["empty", "in version", "in name", "in matrices", "in tail"])
def test_truncated_header(written, where):
    path, _, _ = written
    cut = {"empty": 0, "in version": 2, "in name": 15, "in matrices": 100,
           "in tail": HEADER_LEN - 5}[where]
    bad = damaged(path, path.read_bytes()[:cut], "cut.sens")
    with pytest.raises(SensFormatError, match=r"cut\.sens: header, byte offset \d+: truncated"):
        SensReader(bad)


def test_truncated_frames(written):
    path, h, _ = written
    data = path.read_bytes()
    offs = frame_offsets(data)
    # inside frame 0's header: the frame count no longer fits, found when opening
    bad = damaged(path, data[:HEADER_LEN + 50], "cut0.sens")
    with pytest.raises(SensFormatError, match=rf"frame 0, byte offset {HEADER_LEN}: truncated"):
        SensReader(bad)
    # inside frame 2's header and inside frame 3's payload: found when reached
    for k, cut in [(2, offs[2] + 40), (3, offs[3] + 96 + 30), (5, offs[6] - 1)]:
        bad = damaged(path, data[:cut], f"cut{k}.sens")
        with SensReader(bad) as r:
            for i in range(k):
                r.frame(i).depth(r.header)
            with pytest.raises(SensFormatError, match=rf"cut{k}\.sens: frame {k}, "
                                                      rf"byte offset {offs[k]}"):
                r.frame(k)
            with pytest.raises(SensFormatError, match=rf"frame {k}"):
                r.check()


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize("offset, fmt, value, match", [
    (0, "<I", 3, r"header, byte offset 0: version 3, expected 4"),
    (4, "<Q", 2 ** 40, r"byte offset 4: sensor name length"),
    (TAIL_AT, "<i", 7, rf"byte offset {TAIL_AT}: unknown color compression type 7"),
    (TAIL_AT + 4, "<i", -3, rf"byte offset {TAIL_AT + 4}: unknown depth compression type -3"),
    (TAIL_AT + 8, "<I", 0, rf"byte offset {TAIL_AT + 8}: color_width = 0, expected 1..20000"),
    (TAIL_AT + 20, "<I", 20001, r"depth_height = 20001"),
    (TAIL_AT + 24, "<f", 0.0, r"depth_shift = 0.0"),
    (TAIL_AT + 28, "<Q", 2 ** 62, r"header counts 4611686018427387904 frames but the file "
                                  r"holds 6 complete frames"),
])
def test_bad_header_fields(written, offset, fmt, value, match):
    path, _, _ = written
    bad = damaged(path, patched(path.read_bytes(), offset, fmt, value), "bad.sens")
    with pytest.raises(SensFormatError, match=r"bad\.sens: .*" + match):
        SensReader(bad)


def test_not_a_sens_file(tmp_path):
    bad = tmp_path / "noise.sens"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(SensFormatError, match=r"noise\.sens: header, byte offset 0: version"):
        SensReader(bad)


def test_payload_size_beyond_end_of_file(written):
    path, _, _ = written
    data = path.read_bytes()
    offs = frame_offsets(data)
    bad = damaged(path, patched(data, offs[1] + 88, "<Q", 10 ** 12), "huge.sens")
    with SensReader(bad) as r:
        r.frame(0)
        with pytest.raises(SensFormatError, match=rf"frame 1, byte offset {offs[1]}: .*exceed"):
            r.frame(4)


def test_undecodable_payloads(written):
    path, h, frames = written
    data = bytearray(path.read_bytes())
    offs = frame_offsets(bytes(data))
    data[offs[0] + 96:offs[0] + 104] = b"\x00" * 8  # PNG signature of frame 0's colour
    csize, dsize = struct.unpack_from("<QQ", data, offs[2] + 80)
    mid = offs[2] + 96 + csize + dsize // 2
    data[mid:mid + 8] = bytes(255 - x for x in data[mid:mid + 8])  # frame 2's zlib stream
    bad = damaged(path, bytes(data), "rot.sens")
    with SensReader(bad) as r:
        f0 = r.frame(0)
        np.testing.assert_array_equal(f0.depth(r.header), frames[0][2])
        with pytest.raises(SensFormatError, match=rf"frame 0, byte offset {offs[0]}: colour "
                                                  r"payload does not decode as png"):
            f0.color(r.header)
        with pytest.raises(SensFormatError, match=rf"frame 2, byte offset {offs[2]}: .*zlib"):
            r.frame(2).depth(r.header)


def test_depth_of_the_wrong_size_and_occi(tmp_path):
    h = make_header()
    (pose, color, depth, _, _), = make_frames(1, h)
    short = zlib.compress(depth.astype("<u2").tobytes()[:-2])
    path = tmp_path / "short.sens"
    path.write_bytes(handmade_sens(h, [(pose, 0, 0, color.tobytes(), short)], depth_code=1))
    with SensReader(path) as r:
        with pytest.raises(SensFormatError, match=r"short\.sens: frame 0, byte offset "
                                                  rf"{HEADER_LEN}: .*expected 24\*32\*2 = 1536"):
            r.frame(0).depth(r.header)
    path.write_bytes(handmade_sens(h, [(pose, 0, 0, color.tobytes(), b"\x00" * 99)],
                                   depth_code=0))
    with SensReader(path) as r:
        with pytest.raises(SensFormatError, match=r"raw depth has 99 bytes"):
            r.frame(0).depth(r.header)
    path.write_bytes(handmade_sens(h, [(pose, 0, 0, color.tobytes(), b"\x00" * 99)],
                                   depth_code=2))
    with SensReader(path) as r:
        assert r.header.depth_compression == "occi_ushort"
        with pytest.raises(SensFormatError, match=r"frame 0.*occi_ushort.*not supported"):
            r.frame(0).depth(r.header)


def test_index_out_of_range(written):
    path, _, _ = written
    with SensReader(path) as r:
        for i in (6, 100, -1):
            with pytest.raises(IndexError, match=rf"frame index {i} out of range.*6 frames"):
                r.frame(i)
        with pytest.raises(IndexError):
            list(r.frames([0, 9]))


# -- failed writes -----------------------------------------------------------------------------
def test_failed_write_leaves_nothing_behind(tmp_path):
    h = make_header()
    frames = make_frames(3, h)

    def dies():
        yield frames[0]
        yield frames[1]
        raise RuntimeError("camera unplugged")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="unplugged"):
        write_sens(out / "a.sens", h, dies())
    assert list(out.iterdir()) == []

    bad_depth = frames[1][:2] + (frames[1][2].astype(np.int32),) + frames[1][3:]
    with pytest.raises(ValueError, match=r"frame 1: depth must be \(24, 32\) uint16"):
        write_sens(out / "a.sens", h, [frames[0], bad_depth])
    with pytest.raises(ValueError, match=r"frame 0: colour must be \(30, 40, 3\) uint8"):
        write_sens(out / "a.sens", h, [(np.eye(4), frames[0][1][:, :-1], frames[0][2])])
    with pytest.raises(ValueError, match="color_compression 'webp'"):
        write_sens(out / "a.sens", h, frames, color_compression="webp")
    assert list(out.iterdir()) == []

    # a failed rewrite keeps the previous complete file
    good = write_sens(out / "a.sens", h, frames, color_compression="raw")
    before = good.read_bytes()
    with pytest.raises(RuntimeError):
        write_sens(out / "a.sens", h, dies())
    assert good.read_bytes() == before and [p.name for p in out.iterdir()] == ["a.sens"]


def test_write_accepts_encoded_colour_bytes(tmp_path):
    h = make_header()
    (pose, color, depth, _, _), = make_frames(1, h, smooth=True)
    buf = io.BytesIO()
    Image.fromarray(color).save(buf, "JPEG", quality=90)
    path = write_sens(tmp_path / "b.sens", h, [(pose, buf.getvalue(), depth)])
    with SensReader(path) as r:
        f = r.frame(0)
        assert f.color_bytes == buf.getvalue() and (f.timestamp_color, f.timestamp_depth) == (0, 0)
    with pytest.raises(ValueError, match=r"frame 0: colour bytes are not a png image"):
        write_sens(tmp_path / "c.sens", h, [(pose, buf.getvalue(), depth)],
                   color_compression="png")


def test_zero_frames(tmp_path):
    h = make_header()
    path = write_sens(tmp_path / "empty.sens", h, iter([]))
    assert path.stat().st_size == HEADER_LEN + 8  # header and the empty IMU count
    with SensReader(path) as r:
        r.check()
        assert len(r) == 0 and list(r.frames()) == []
        with pytest.raises(IndexError, match="frame index 0 out of range.*0 frames"):
            r.frame(0)


def test_a_wrong_frame_count_in_the_header_is_named(written):
    """More frames counted than the file holds (it ends between frames), or fewer (complete
    frames follow the counted ones): named as a wrong count, not as a truncated frame, and
    never read silently. An IMU section after the frames is the format's and stays fine."""
    path, _, frames = written
    data = path.read_bytes()
    n = len(frames)
    more = damaged(path, patched(data, TAIL_AT + 28, "<Q", n + 3), "more.sens")
    with SensReader(more) as r, pytest.raises(
            SensFormatError, match=rf"more\.sens: .*header counts {n + 3} frames but the file "
                                   rf"holds {n} complete frames"):
        r.check()
    fewer = damaged(path, patched(data, TAIL_AT + 28, "<Q", n - 2), "fewer.sens")
    with SensReader(fewer) as r:  # opening reads no frame; the up-front check (prep's) finds it
        with pytest.raises(SensFormatError, match=rf"header counts {n - 2} frames but 2 more "
                                                  r"complete frame\(s\) follow them"):
            r.check()
    imu = damaged(path, data + struct.pack("<Q", 1) + b"\x00" * 128, "imu.sens")
    with SensReader(imu) as r:
        r.check()
        assert len(r) == n
