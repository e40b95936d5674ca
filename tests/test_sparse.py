import numpy as np
import pytest
import torch

from mink_ssl.sparse import (batched_coordinates, check_batched_coordinates, quantize,
                             sparse_tensor, unique_voxels)


def test_quantize_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1.3, 2.1, (5000, 3)).astype(np.float32)
    q = quantize(pts, 0.1)
    vox = np.floor(pts / 0.1).astype(np.int64)
    expected, first, inv, counts = np.unique(vox, axis=0, return_index=True,
                                             return_inverse=True, return_counts=True)
    assert q.coords.dtype == torch.int32
    # same set of voxels, each point mapped to the voxel that contains it
    assert len(q.coords) == len(expected)
    np.testing.assert_array_equal(q.coords[q.inverse].numpy(), vox)
    # representative = first point of its voxel
    np.testing.assert_array_equal(np.sort(q.index.numpy()), np.sort(first))
    np.testing.assert_array_equal(vox[q.index.numpy()], q.coords.numpy())
    assert int(q.counts.sum()) == len(pts)
    assert sorted(q.counts.tolist()) == sorted(counts.tolist())


def test_quantize_negative_and_boundaries():
    pts = np.array([[-0.01, 0, 0], [0.0, 0, 0], [0.0999, 0, 0], [0.1, 0, 0]], np.float32)
    q = quantize(pts, 0.1)
    assert q.coords[q.inverse][:, 0].tolist() == [-1, 0, 0, 1]


def test_unique_voxels_keeps_device_and_handles_4d():
    c = torch.tensor([[0, 1, 2, 3], [1, 1, 2, 3], [0, 1, 2, 3]])
    u = unique_voxels(c)
    assert len(u.coords) == 2 and u.inverse.tolist()[0] == u.inverse.tolist()[2]


def test_batched_coordinates():
    a = torch.zeros((3, 3), dtype=torch.int32)
    b = torch.ones((2, 3), dtype=torch.int64)
    bc = batched_coordinates([a, b.numpy()])
    assert bc.shape == (5, 4) and bc.dtype == torch.int32
    assert bc[:, 0].tolist() == [0, 0, 0, 1, 1]
    assert bc[3:, 1:].tolist() == [[1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("coords, match", [
    (torch.zeros((4, 4)), "integer voxel indices"),
    (torch.zeros((4, 3), dtype=torch.int32), r"batch index missing"),
    (torch.zeros((4,), dtype=torch.int32), r"shape \(N, 4\)"),
    (torch.tensor([[-1, 0, 0, 0]], dtype=torch.int32), "negative batch index"),
    ([[0, 0, 0, 0]], "torch.Tensor or numpy array"),
])
def test_bad_coordinates_name_the_problem(coords, match):
    with pytest.raises(ValueError, match=match):
        check_batched_coordinates(coords)


def test_bad_helper_inputs():
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        quantize(np.zeros((5, 2), np.float32), 0.05)
    with pytest.raises(ValueError, match="floating point"):
        quantize(np.zeros((5, 3), np.int32), 0.05)
    with pytest.raises(ValueError, match="voxel_size must be a positive number of metres, got 0.0"):
        quantize(np.zeros((5, 3), np.float32), 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([[0, 0, np.nan]], np.float32), 0.05)
    with pytest.raises(ValueError, match="empty point cloud"):
        quantize(np.zeros((0, 3), np.float32), 0.05)
    with pytest.raises(ValueError, match=r"coords_list\[1\]"):
        batched_coordinates([np.zeros((2, 3), np.int32), np.zeros((2, 3), np.float32)])
    with pytest.raises(ValueError, match="at least one"):
        batched_coordinates([])


def test_sparse_tensor_checks_lengths_and_shapes():
    coords = batched_coordinates([torch.tensor([[0, 0, 0], [1, 0, 0]])])
    with pytest.raises(ValueError, match="features have 3 rows but coordinates have 2"):
        sparse_tensor(coords, torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"features must have shape \(N, C\)"):
        sparse_tensor(coords, torch.zeros(2))
    x = sparse_tensor(coords, torch.ones(2, 1, dtype=torch.int64))
    assert x.F.dtype == torch.float32 and x.F.shape == (2, 1)


def test_keys_of_int32_coordinates_at_scene_extents_are_exact():
    """ME coordinates are int32, and int32 x int stays int32: keys must be computed in int64.
    Coordinates over a 300 m x 300 m x 60 m scene at 2 cm (15000 x 15000 x 3000 voxels, 6.75e11
    cells) with negative values: unique voxels agree with NumPy's row-wise unique."""
    from mink_ssl.sparse import pack_keys

    rng = np.random.default_rng(0)
    c = np.concatenate([rng.integers(-7500, 7500, (4000, 2)), rng.integers(-1500, 1500, (4000, 1))],
                       1).astype(np.int32)
    c = np.concatenate([c, c[:500]])  # duplicates
    q = unique_voxels(torch.from_numpy(c))
    assert len(q.coords) == len(np.unique(c, axis=0))
    np.testing.assert_array_equal(q.coords[q.inverse].numpy(), c)
    lo = torch.tensor(c.min(0), dtype=torch.int32)
    ext = torch.tensor(c.max(0) - c.min(0) + 1, dtype=torch.int32)
    keys = pack_keys(torch.from_numpy(c), lo, ext)
    assert keys.dtype == torch.int64 and int(keys.min()) >= 0
    expected = ((c[:, 0].astype(object) - int(lo[0])) * int(ext[1]) + (c[:, 1] - int(lo[1]))) \
        * int(ext[2]) + (c[:, 2] - int(lo[2]))  # Python ints: no wrap
    assert keys.tolist() == expected.tolist()


def test_extents_beyond_int64_keys_are_refused_with_the_extent():
    from mink_ssl.sparse import pack_keys

    pts = np.array([[0, 0, 0], [3e4, 3e4, 3e4]], np.float64)  # 3e6 voxels per axis at 1 cm
    with pytest.raises(ValueError, match=r"points span 3e\+04 m x 3e\+04 m x 3e\+04 m at voxel "
                                         r"size 0.01 m: coordinate extent .* too large for int64"):
        quantize(pts, 0.01)
    with pytest.raises(ValueError, match="points reach 1e\\+30 m"):
        quantize(np.array([[0, 0, 0], [1e30, 0, 0]]), 0.05)
    c = torch.zeros((1, 3), dtype=torch.int64)
    with pytest.raises(ValueError, match="too large for int64 keys"):
        pack_keys(c, c[0], torch.tensor([2**21, 2**21, 2**21]))
