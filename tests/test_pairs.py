"""Pair dataset and correspondences, on real data (3DMatch pair, 7-Scenes fragments)."""
import numpy as np
import pytest
import torch

from data_prep.pairs.prep import PrepParams, run
from mink_ssl.data.correspondence import find_matches, random_similarity_transform
from mink_ssl.data.pairs import PairDataset, collate_pairs
from mink_ssl.data.samplers import ResumableSampler
from mink_ssl.sparse import quantize


def brute_force_matches(w0, w1, radius):
    out = []
    for start in range(0, len(w0), 512):  # chunks of a dense distance matrix
        d = np.linalg.norm(w0[start:start + 512, None, :] - w1[None, :, :], axis=2)
        a, b = np.nonzero(d <= radius)
        out.append(np.stack([a + start, b], 1))
    m = np.concatenate(out)
    return m[np.lexsort((m[:, 1], m[:, 0]))]


@pytest.mark.slow
def test_matches_on_the_real_3dmatch_pair(realdata):
    root = realdata / "3dmatch_pair_geotransformer" / "data" / "demo"
    src, ref, gt = (np.load(root / f) for f in ("src.npy", "ref.npy", "gt.npy"))
    src_world = src @ gt[:3, :3].T + gt[:3, 3]  # both clouds in the ref frame
    voxel = 0.025
    w0 = src_world[quantize(src_world.astype(np.float32), voxel).index.numpy()]
    w1 = ref[quantize(ref.astype(np.float32), voxel).index.numpy()]
    matches = find_matches(w0, w1, 1.5 * voxel)
    np.testing.assert_array_equal(matches, brute_force_matches(w0, w1, 1.5 * voxel))
    assert len(np.unique(matches[:, 0])) > 0.2 * len(w0)  # the pair overlaps by about 40%
    capped = find_matches(w0, w1, 1.5 * voxel, max_matches=100, rng=np.random.default_rng(0))
    assert len(capped) == 100 and {tuple(r) for r in capped} <= {tuple(r) for r in matches}


def test_random_similarity_transform_is_a_scaled_rotation():
    rng = np.random.default_rng(0)
    for axis in ("random", "z"):
        T = random_similarity_transform(rng, 360.0, axis, translation=0.5)
        R = T[:3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
        if axis == "z":
            np.testing.assert_allclose(R[2], [0, 0, 1], atol=1e-12)
    for _ in range(20):  # with a scale range: s R, s uniform in the range, R a rotation
        A = random_similarity_transform(rng, 360.0, "random", scale=(0.8, 1.2))[:3, :3]
        s = np.cbrt(np.linalg.det(A))
        assert 0.8 <= s <= 1.2
        np.testing.assert_allclose((A / s) @ (A / s).T, np.eye(3), atol=1e-12)
    with pytest.raises(ValueError, match="'random' or 'z'"):
        random_similarity_transform(rng, 10, "x")


@pytest.fixture(scope="module")
def kitchen_pairs(kitchen, tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    (raw / "redkitchen").symlink_to(kitchen)
    out = tmp_path_factory.mktemp("pairs")
    run(raw, out, PrepParams(frame_skip=50), progress=False)
    return out


@pytest.mark.slow
def test_dataset_views_and_matches_on_real_fragments(kitchen_pairs):
    ds = PairDataset(kitchen_pairs, voxel_size=0.025, seed=3)
    assert len(ds) > 0 and ds.in_channels == 3
    s = ds[(0, 0)]
    v0, v1 = s.views
    assert v0.coords.dtype == torch.int32 and v0.coords.shape[1] == 3
    assert v0.feats.shape == (len(v0.coords), 3) and v0.feats.abs().max() <= 0.5
    assert 5_000 < len(v0.coords) < 60_000  # a real 640x480 frame at 2.5 cm
    # the correspondences are exactly the voxel pairs within 1.5 voxels in world space
    np.testing.assert_array_equal(s.matches.numpy(), brute_force_matches(
        v0.world.numpy().astype(np.float64), v1.world.numpy().astype(np.float64), 0.0375))
    # the views were transformed independently: voxel grids differ from the world frame
    assert not torch.allclose(v0.coords.float() * 0.025, v0.world, atol=0.5)
    # deterministic in (seed, epoch, index), different across epochs
    again = ds[(0, 0)]
    assert torch.equal(again.views[0].coords, v0.coords) and torch.equal(again.matches, s.matches)
    assert not torch.equal(ds[(1, 0)].views[0].coords, v0.coords)


def test_collate_offsets_and_skips(kitchen_pairs):
    ds = PairDataset(kitchen_pairs, features="ones", max_matches=500, seed=0)
    a, b = ds[(0, 0)], ds[(0, 1)]
    batch = collate_pairs([a, None, b])
    assert batch.skipped == 1 and len(batch) == 2
    n0 = len(a.views[0].coords)
    assert batch.views[0].coords.shape == (n0 + len(b.views[0].coords), 4)
    assert batch.views[0].coords[:, 0].tolist() == [0] * n0 + [1] * len(b.views[0].coords)
    assert batch.views[0].feats.shape[1] == 3  # every constant mode has 3 channels (row 7)
    m = batch.matches
    assert len(m) == 1000
    torch.testing.assert_close(batch.views[0].world[m[:, 0]], batch.views[1].world[m[:, 1]],
                               atol=0.0375 * 1.01, rtol=0)
    assert collate_pairs([None, None]) is None
    # the voxel grid travels with the batch (objectives that re-quantise read it there)
    assert batch.voxel_size == ds.voxel_size == 0.025 and batch.to("cpu").voxel_size == 0.025


def test_too_few_matches_is_skipped_not_a_crash(kitchen_pairs):
    ds = PairDataset(kitchen_pairs, min_matches=10**9)
    assert ds[(0, 0)] is None


def test_dataset_refuses_unknown_schema_and_bad_arguments(kitchen_pairs, tmp_path):
    import json
    import shutil

    copy = tmp_path / "pairs"
    shutil.copytree(kitchen_pairs, copy, symlinks=True)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema"] = "mink_ssl.scannet_pairs/99"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="scannet_pairs/99"):
        PairDataset(copy)
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        PairDataset(tmp_path)
    with pytest.raises(ValueError, match="unknown input feature mode .normals.; valid: .*ones_jitter"):
        PairDataset(kitchen_pairs, features="normals")


def test_sampler_splits_ranks_and_resumes():
    one = ResumableSampler(10, seed=1)
    it = iter(one)
    first = [next(it) for _ in range(25)]  # crosses two epoch boundaries
    assert sorted(i for e, i in first[:10]) == list(range(10)) and first[10][0] == 1
    ranks = [iter(ResumableSampler(10, seed=1, rank=r, world_size=2)) for r in range(2)]
    two = [next(ranks[r]) for _ in range(5) for r in range(2)]
    assert sorted(two) == sorted(first[:10])  # together the ranks see the same epoch
    resumed = iter(ResumableSampler(10, seed=1, start=13))
    assert [next(resumed) for _ in range(12)] == first[13:]


def test_frames_intrinsics_and_poses_of_the_views(kitchen_pairs):
    from PIL import Image

    from mink_ssl.formats.fragments import FragmentStore

    plain = PairDataset(kitchen_pairs, seed=3)
    ds = PairDataset(kitchen_pairs, seed=3, frame_size=(60, 80))
    s, p = ds[(0, 0)], plain[(0, 0)]
    # the option adds the camera fields and changes nothing else
    assert all(getattr(v, f) is None for v in p.views for f in ("frames", "intrinsics", "poses"))
    assert torch.equal(s.views[0].coords, p.views[0].coords) and torch.equal(s.matches, p.matches)
    scene, fa, _ = ds.pairs[0]
    frag = FragmentStore(kitchen_pairs / scene).by_frame(fa)
    v0 = s.views[0]
    assert v0.frames.shape == (60, 80, 3) and v0.frames.dtype == torch.uint8
    expected = np.asarray(Image.fromarray(frag.color).resize((80, 60), Image.BILINEAR))
    np.testing.assert_array_equal(v0.frames.numpy(), expected)
    np.testing.assert_array_equal(v0.poses.numpy(), frag.pose)
    # 7-Scenes depth camera: fx = fy = 585, c = (320, 240) at 640x480, scaled by 1/8 with pixel
    # centres at integer coordinates: c' = (c + 0.5) / 8 - 0.5
    torch.testing.assert_close(v0.intrinsics, torch.tensor(
        [[73.125, 0, 39.5625], [0, 73.125, 29.5625], [0, 0, 1]]))
    # every voxel's point was measured at an integer pixel of the 640x480 frame: projecting it
    # with the pose and the scaled intrinsics lands where that pixel centre lies in the 80x60 frame
    cam = (v0.world - v0.poses[:3, 3]) @ v0.poses[:3, :3]  # world -> camera (R^T (p - t))
    uv = cam[:, :2] / cam[:, 2:] @ v0.intrinsics[:2, :2].T + v0.intrinsics[:2, 2]
    full = (uv.double() + 0.5) * 8 - 0.5  # back to 640x480 pixel coordinates
    assert (full - full.round()).abs().max() < 0.02
    assert full.min() > -0.5 and full[:, 0].max() < 639.5 and full[:, 1].max() < 479.5
    # at the stored resolution the frame is the stored colour image and K is unchanged
    same = PairDataset(kitchen_pairs, seed=3, frame_size=(480, 640), features="ones")[(0, 0)]
    np.testing.assert_array_equal(same.views[0].frames.numpy(), frag.color)
    np.testing.assert_allclose(same.views[0].intrinsics.numpy(), frag.intrinsics[:3, :3])


def test_collate_stacks_frames_and_moves_them(kitchen_pairs):
    ds = PairDataset(kitchen_pairs, seed=0, frame_size=[30, 40], features="ones")
    a, b = ds[(0, 0)], ds[(0, 1)]
    batch = collate_pairs([a, None, b]).to("cpu")
    for v in range(2):
        view = batch.views[v]
        assert view.has_frames and view.frames.shape == (2, 30, 40, 3)
        assert view.intrinsics.shape == (2, 3, 3) and view.poses.shape == (2, 4, 4)
        assert torch.equal(view.frames[1], b.views[v].frames)
        assert torch.equal(view.poses[0], a.views[v].poses)
    plain = collate_pairs([PairDataset(kitchen_pairs, seed=0)[(0, 0)]]).to("cpu")
    assert not plain.views[0].has_frames and plain.views[1].intrinsics is None


@pytest.mark.parametrize("bad", [(60,), (0, 80), (60.5, 80), "60x80"])
def test_bad_frame_size_is_reported(kitchen_pairs, bad):
    with pytest.raises(ValueError, match="frame_size must be"):
        PairDataset(kitchen_pairs, frame_size=bad)


def test_dataset_build_checks_correspondences_against_brute_force(kitchen_pairs, monkeypatch):
    ds = PairDataset(kitchen_pairs, voxel_size=0.025, seed=3, verify_matches=2)
    assert ds.match_check["pairs_checked"] == 2 and ds.match_check["rows_checked"] == 512
    assert ds.match_check["matches_checked"] > 100
    assert PairDataset(kitchen_pairs, voxel_size=0.025, verify_matches=0).match_check[
        "pairs_checked"] == 0

    def dropping(w0, w1, radius, *args, **kw):  # a fast path that loses every other match
        return find_matches(w0, w1, radius, *args, **kw)[::2]

    monkeypatch.setattr("mink_ssl.data.pairs.find_matches", dropping)
    with pytest.raises(ValueError, match=r"correspondence self-check failed: voxels \d+ \(view 0\)"
                                         r" and \d+ \(view 1\) are 0.0\d+ m apart .* missed"):
        PairDataset(kitchen_pairs, voxel_size=0.025, seed=3)
