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
