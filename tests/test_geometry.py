import numpy as np
import pytest

from mink_ssl.geometry import backproject


def test_backproject_matches_open3d_on_a_real_kinect_frame(kitchen_frame):
    import open3d as o3d

    depth, K, pose = kitchen_frame
    pts, pixel = backproject(depth, K, 1000.0, pose, max_depth=4.0)
    assert len(pts) == len(pixel) > 100_000
    intr = o3d.camera.PinholeCameraIntrinsic(depth.shape[1], depth.shape[0], K[0, 0], K[1, 1],
                                             K[0, 2], K[1, 2])
    ref = o3d.geometry.PointCloud.create_from_depth_image(
        o3d.geometry.Image(depth), intr, extrinsic=np.linalg.inv(pose), depth_scale=1000.0,
        depth_trunc=4.0)
    ref = np.asarray(ref.points)
    assert len(ref) == len(pts)
    np.testing.assert_allclose(np.sort(pts, axis=0), np.sort(ref, axis=0), atol=1e-4)


def test_backproject_pixels_and_invalid_depth():
    depth = np.zeros((4, 5), np.uint16)
    depth[2, 3] = 2000  # 2 m at pixel (row 2, column 3)
    K = np.array([[100.0, 0, 2], [0, 100.0, 1], [0, 0, 1]])
    pts, pixel = backproject(depth, K, 1000.0)
    assert pixel.tolist() == [2 * 5 + 3]
    np.testing.assert_allclose(pts[0], [(3 - 2) * 2 / 100, (2 - 1) * 2 / 100, 2.0], rtol=1e-6)
    # the header's depth shift is honoured, not a hard-coded 1000
    pts4, _ = backproject(depth, K, 4000.0)
    np.testing.assert_allclose(pts4[0, 2], 0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"depth": np.zeros((4,), np.uint16)}, "2-D image"),
    ({"depth_shift": 0}, "depth_shift must be positive"),
    ({"intrinsics": np.eye(2)}, "3x3 or 4x4"),
    ({"pose": np.full((4, 4), -np.inf)}, "finite 4x4"),
])
def test_backproject_bad_input(kwargs, match):
    args = {"depth": np.ones((4, 4), np.uint16), "intrinsics": np.eye(3), "depth_shift": 1000.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        backproject(**args)
