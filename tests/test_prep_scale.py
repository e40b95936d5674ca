"""What the ScanNet-size prep benchmark (benchmarks/bench_prep_scannet.py) is built from: .sens
depth payloads passed through as bytes, a structured-light sensor's disparity steps in the
generated scenes, and the per-stage clock of a scene's prep (which changes nothing it writes)."""
import zlib

import numpy as np
import pytest

from data_prep.pairs.scene import PrepParams, StageClock, prepare_scene
from data_prep.scannet.sens import SensHeader, SensReader
from data_prep.scannet.sens_writer import write_sens
from data_prep.synthetic import SensorModel, generate_scene


def header(w=32, h=24) -> SensHeader:
    K = np.array([[30.0, 0, w / 2], [0, 30.0, h / 2], [0, 0, 1]])
    return SensHeader(4, "test", K, np.eye(4), K, np.eye(4), "jpeg", "zlib_ushort", w, h, w, h,
                      1000.0, 0)


def test_depth_payload_bytes_are_passed_through_and_checked(tmp_path):
    h = header()
    depth = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 7) % 5000
    payload = zlib.compress(depth.astype("<u2").tobytes(), 9)
    color = np.zeros((24, 32, 3), np.uint8)
    path = write_sens(tmp_path / "a.sens", h, [(np.eye(4), color, payload)])
    with SensReader(path) as r:
        f = r.frame(0)
        assert f.depth_bytes == payload  # as given, not recompressed at the writer's level
        np.testing.assert_array_equal(f.depth(r.header), depth)
    with pytest.raises(ValueError, match=r"frame 0: depth bytes are not a zlib stream "
                                         r"\(header 0102\); pass the \(H, W\) uint16 image"):
        write_sens(tmp_path / "b.sens", h, [(np.eye(4), color, b"\x01\x02\x03")])
    with pytest.raises(ValueError, match=r"frame 0: raw depth bytes 10 != 24\*32\*2"):
        write_sens(tmp_path / "c.sens", h, [(np.eye(4), color, b"\0" * 10)],
                   depth_compression="raw_ushort")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sens"]


@pytest.mark.slow
def test_disparity_steps_quantise_depth_like_a_structured_light_sensor(tmp_path):
    step, baseline = 0.125, 0.075
    sensor = SensorModel(disparity_step=step, baseline=baseline)
    scene = generate_scene(tmp_path, "q", 3, n_frames=2, image_size=(160, 120), sensor=sensor)
    smooth = generate_scene(tmp_path, "c", 3, n_frames=2, image_size=(160, 120))
    with SensReader(scene / "q.sens") as q, SensReader(smooth / "c.sens") as c:
        fb = q.header.intrinsic_depth[0, 0] * baseline  # focal (px) x baseline (m)
        d = q.frame(1).depth(q.header)
        z = d[d > 0].astype(np.float64) / 1000.0
        k = fb / z / step  # each depth is f b / (k step) for an integer k (up to 1 mm rounding)
        tol = fb / step * 0.0005 / z ** 2  # what 0.5 mm of rounding moves k by
        assert np.all(np.abs(k - np.round(k)) <= tol + 1e-9)
        assert len(np.unique(d[d > 0])) < len(np.unique(c.frame(1).depth(c.header)))
        # fewer distinct values: the payload compresses better, as a real sensor's does
        assert len(q.frame(1).depth_bytes) < len(c.frame(1).depth_bytes)
    for bad in (dict(disparity_step=-0.1), dict(baseline=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SensorModel(**bad)


@pytest.mark.slow
def test_stage_clock_times_every_stage_and_changes_no_output(tmp_path):
    scene = generate_scene(tmp_path / "raw", "scene0000_00", 0, n_frames=51,
                           image_size=(160, 120), color_size=(324, 242))
    params = PrepParams(frame_skip=10, min_points=100)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = prepare_scene(scene, tmp_path / "a", params)
    clock = StageClock()
    timed = prepare_scene(scene, tmp_path / "b", params, clock=clock)
    assert plain.status == timed.status == "done" and clock.current is None
    assert all(clock.seconds[s] > 0 and clock.cpu[s] >= 0 for s in StageClock.STAGES)
    for name in ("fragments.bin", "overlap.txt"):
        assert (tmp_path / "a" / "scene0000_00" / name).read_bytes() == \
               (tmp_path / "b" / "scene0000_00" / name).read_bytes()
