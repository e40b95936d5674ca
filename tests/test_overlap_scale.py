"""Overlap at real extents, against brute force pair for pair, and the prep's self-check.

Real ScanNet / 7-Scenes scenes reach 1e8-1e9 cells of 7.5 cm once far depth readings (65.5 m
sentinels) are back-projected; with a few hundred fragments, "fragments x cells" passes 2^31,
which is where int32 index arithmetic silently dropped pairs. Everything here is compared with the
definition computed independently: one KD-tree per cloud, every point of every other cloud.
"""
import json

import numpy as np
import pytest
from scipy.spatial import cKDTree

from data_prep.cli import main as prep_main
from data_prep.pairs import overlap as overlap_mod
from data_prep.pairs.overlap import (OverlapExtentError, direct_overlap, overlap_matrix,
                                       sample_pairs, verify_overlap)
from data_prep.pairs.prep import PrepParams, run

R = 0.075


def brute_directional(clouds: list[np.ndarray], radius: float = R) -> np.ndarray:
    """``d[i, j]``: fraction of cloud i's points with a point of cloud j within radius."""
    F = len(clouds)
    sizes = np.array([len(c) for c in clouds], dtype=np.int64)
    points = np.concatenate(clouds)
    owner = np.repeat(np.arange(F, dtype=np.int64), sizes)
    d = np.zeros((F, F))
    for j, c in enumerate(clouds):
        dist, _ = cKDTree(c).query(points, k=1, distance_upper_bound=radius)
        d[:, j] = np.bincount(owner[dist <= radius], minlength=F) / np.maximum(sizes, 1)
    np.fill_diagonal(d, 0.0)
    return d


def walk_clouds(rng, F: int, n: int, step: float, outliers_every: int = 0,
                outlier_range: float = 65.0, origin=(0.0, 0.0, 0.0)) -> list[np.ndarray]:
    """F views along a winding path (consecutive views overlap), each n points on a 2 m x 2 m
    patch of surface (as a depth frame sees a floor), every ``outliers_every``-th view with a
    few far points (depth sentinels at ~65 m)."""
    clouds = []
    for f in range(F):
        centre = np.asarray(origin) + [f * step, 4.0 * np.sin(f / 15.0), 1.5 * np.cos(f / 9.0)]
        patch = np.concatenate([rng.uniform(-1.0, 1.0, (n, 2)), rng.normal(0, 0.01, (n, 1))], 1)
        pts = centre * [1, 1, 0] + [0, 0, origin[2]] + patch
        if outliers_every and f % outliers_every == 0:
            far = rng.normal(size=(8, 3))
            far *= outlier_range / np.linalg.norm(far, axis=1, keepdims=True)
            pts = np.concatenate([pts, centre + far])
        clouds.append(pts)
    return clouds


def assert_equal_to_brute_force(clouds):
    res = overlap_matrix(clouds, R)
    np.testing.assert_array_equal(res.directional, brute_directional(clouds))
    return res


def test_extent_of_the_real_failure_equals_brute_force():
    """About 75 m x 27 m x 41 m (2e8 coarse cells) with 100 fragments: F x cells is ~1e10, far
    past int32, as on the 7-Scenes sequence that lost three quarters of its pairs."""
    rng = np.random.default_rng(0)
    clouds = walk_clouds(rng, 100, 400, 0.4, outliers_every=10, outlier_range=20.0)
    clouds[3] = np.concatenate([clouds[3], [[75.0, 0.0, 0.0], [0.0, 27.0, 0.0], [0.0, 0.0, 41.0]]])
    span = np.ptp(np.concatenate(clouds), axis=0)
    cells = np.prod(np.floor(span / R) + 3)
    assert cells > 1.5e8 and 100 * cells > 2**31  # the regime that overflowed
    res = assert_equal_to_brute_force(clouds)
    assert (res.overlap >= 0.3).sum() > 100  # consecutive views overlap: pairs were kept


def test_300_fragments_over_100_m_with_65_m_outliers_negative_coordinates():
    rng = np.random.default_rng(1)
    clouds = walk_clouds(rng, 300, 120, 0.4, outliers_every=7, origin=(-60.0, -5000.0, -20.0))
    assert np.ptp(np.concatenate(clouds)[:, 0]) > 100
    res = assert_equal_to_brute_force(clouds)
    assert res.n_candidates < res.n_pairs / 4  # far views are pruned, not computed


def test_huge_coordinates_far_apart():
    """Two rooms 2 km apart at 1e5 m from the origin (georeferenced scans): exact, both rooms."""
    rng = np.random.default_rng(2)
    clouds = (walk_clouds(rng, 10, 200, 0.3, origin=(1e5, -1e5, 50.0))
              + walk_clouds(rng, 10, 200, 0.3, origin=(1e5 + 2000.0, -1e5, 50.0)))
    res = assert_equal_to_brute_force(clouds)
    assert res.overlap[:10, 10:].max() == 0 and res.overlap[:10, :10].max() > 0.3


def test_extent_beyond_int64_keys_is_refused_with_the_extent():
    clouds = [np.zeros((5, 3)), np.full((5, 3), 1e6), np.full((5, 3), -1e6)]
    with pytest.raises(OverlapExtentError, match=r"spans 2e\+06 m x 2e\+06 m x 2e\+06 m.*"
                                                 r"absurd pose or far outlier"):
        overlap_matrix(clouds, R)


def test_direct_overlap_is_the_definition():
    a = np.array([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0]])
    b = np.array([[0.0, 0.07, 0], [1.0, 0.076, 0]])  # 7 cm (match), 7.6 cm (no match)
    assert direct_overlap(a, b, R) == (0.25, 0.5)
    assert direct_overlap(a, np.zeros((0, 3)), R) == (0.0, 0.0)


def test_sample_pairs_covers_every_group_and_is_seeded():
    rng = np.random.default_rng(3)
    clouds = walk_clouds(rng, 40, 150, 0.5)
    ov = overlap_matrix(clouds, R).overlap
    pairs, groups = sample_pairs(clouds, ov, 32, 0.3, seed=7)
    assert len(pairs) == 32 and len({tuple(p) for p in pairs.tolist()}) == 32
    assert (pairs[:, 0] < pairs[:, 1]).all() and pairs.dtype == np.int64
    assert all(groups[g] >= 1 for g in ("most_distant", "kept", "rejected", "zero")), groups
    far = np.argmax(np.linalg.norm(clouds[0].mean(0) - np.stack([c.mean(0) for c in clouds]),
                                   axis=1))
    assert [0, far] in pairs.tolist()  # the most distant pair is always checked
    np.testing.assert_array_equal(pairs, sample_pairs(clouds, ov, 32, 0.3, seed=7)[0])


def test_self_check_passes_on_the_fast_path_and_catches_a_planted_drop():
    rng = np.random.default_rng(4)
    clouds = walk_clouds(rng, 40, 150, 0.5)
    res = overlap_matrix(clouds, R)
    ok = verify_overlap(clouds, res, 32, 0.3, R)
    assert ok.ok() and ok.pairs_checked == 32 and ok.max_abs_diff == 0.0
    i, j = map(int, np.argwhere(np.triu(res.overlap) >= 0.3)[0])
    res.directional[i, j] = res.directional[j, i] = 0.0  # a kept pair silently dropped
    bad = verify_overlap(clouds, res, len(clouds) ** 2, 0.3, R)  # every pair sampled
    assert not bad.ok() and bad.worst_pair == (i, j) and bad.fast == (0.0, 0.0)
    assert max(bad.direct) >= 0.3


@pytest.fixture()
def kitchen_raw(kitchen, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "redkitchen").symlink_to(kitchen)
    return raw


def test_prep_records_and_prints_the_self_check(kitchen_raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert prep_main(["scannet", "--raw", str(kitchen_raw), "--out", str(out),
                      "--frame-skip", "25", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "redkitchen: 20 fragments" in printed
    assert "self-check: 32 pairs against the definition, max |diff| 0.0e+00" in printed
    scene = json.loads((out / "redkitchen" / "scene.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    for record in (scene["self_check"], manifest["scenes"]["redkitchen"]["self_check"]):
        assert record["pairs_checked"] == 32 and record["max_abs_diff"] <= 1e-6
        assert record["groups"]["kept"] >= 1 and record["groups"]["most_distant"] >= 1
    assert manifest["self_check"]["pairs_checked"] == 32
    assert manifest["failed_scenes"] == {}


def test_prep_fails_a_scene_whose_fast_path_drops_pairs(kitchen_raw, tmp_path, monkeypatch,
                                                        capsys):
    """An overflow-like bug (every pair of the second half of the fragments lost) is caught by
    the default sample: the scene is not written, the manifest names the pair and both values,
    and the command fails."""
    real = overlap_mod.overlap_matrix

    def dropping(clouds, radius):
        res = real(clouds, radius)
        half = len(clouds) // 2
        res.directional[:, half:] = 0.0
        res.directional[half:, :] = 0.0
        return res

    monkeypatch.setattr("data_prep.pairs.scene.overlap_matrix", dropping)
    out = tmp_path / "out"
    assert prep_main(["scannet", "--raw", str(kitchen_raw), "--out", str(out),
                      "--frame-skip", "25", "--no-progress"]) == 1
    assert "FAILED redkitchen: overlap self-check failed" in capsys.readouterr().out
    assert not (out / "redkitchen").exists()
    failed = json.loads((out / "manifest.json").read_text())["failed_scenes"]["redkitchen"]
    check = failed["self_check"]
    i, j = check["worst_pair"]
    assert j >= 10 or i >= 10
    assert check["fast"] == [0.0, 0.0] and max(check["direct"]) > 1e-6
    assert "fragments" in failed["reason"] and "by the definition" in failed["reason"]
    assert (out / "pairs.txt").read_text() == ""


def test_verify_pairs_flag(kitchen_raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert prep_main(["scannet", "--raw", str(kitchen_raw), "--out", str(out), "--frame-skip",
                      "50", "--no-progress", "--verify-pairs", "0"]) == 0
    assert "self-check off" in capsys.readouterr().out
    assert json.loads((out / "redkitchen" / "scene.json").read_text())["self_check"] == {}
    assert prep_main(["scannet", "--raw", str(kitchen_raw), "--out", str(tmp_path / "o2"),
                      "--verify-pairs", "-1"]) == 2
    assert "--verify-pairs must be >= 0" in capsys.readouterr().err
    # every one of the 45 pairs of 10 fragments
    manifest = run(kitchen_raw, tmp_path / "o3", PrepParams(frame_skip=50), progress=False,
                   verify_pairs=1000, log=lambda s: None)
    assert manifest["scenes"]["redkitchen"]["self_check"]["pairs_checked"] == 45


@pytest.mark.slow
def test_invalid_depth_sentinel(kitchen, tmp_path):
    """7-Scenes-style exports mark missing depth with 65535 (65.5 m once back-projected). By
    default it is kept, as the published pipeline does; --invalid-depth 65535 drops it from the
    overlap clouds and stores it as 0 in the fragments."""
    import shutil

    from PIL import Image

    from mink_ssl.formats.fragments import FragmentStore

    scene = tmp_path / "raw" / "kitchen65535"
    for sub in ("color", "pose", "intrinsic"):
        shutil.copytree(kitchen / sub, scene / sub)
    (scene / "depth").mkdir()
    for i in range(0, 500, 5):
        d = np.asarray(Image.open(kitchen / "depth" / f"{i}.png")).astype(np.uint16)
        d[:40, :40] = 65535  # a corner of sentinel readings
        Image.fromarray(d).save(scene / "depth" / f"{i}.png")
    far = {}
    for flag in (None, 65535):
        out = tmp_path / f"out{flag}"
        run(tmp_path / "raw", out, PrepParams(frame_skip=250, invalid_depth=flag),
            progress=False, log=lambda s: None)
        frag = FragmentStore(out / "kitchen65535").by_frame(0, color=False)
        far[flag] = int((frag.depth == 65535).sum()), float(frag.points()[0][:, 2].max())
    assert far[None][0] == 1600 and far[None][1] > 30  # the sentinel back-projected far away
    assert far[65535][0] == 0 and far[65535][1] < 10
    with pytest.raises(ValueError, match="invalid_depth must be a raw uint16 depth value"):
        PrepParams(invalid_depth=70000)
