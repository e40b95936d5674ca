"""Point-level contrastive objectives: hardest-contrastive, PointInfoNCE, shape-context NCE.

Each loss is checked against an independent NumPy / hand computation on tiny hand-built cases,
then run through the registry on a real StepContext with a small MinkowskiEngine network.
"""
import math

import numpy as np
import pytest
import torch
from helpers import matched_pair_batch as make_pair_batch

from mink_ssl.objectives import OBJECTIVES, StepContext
from mink_ssl.objectives.hardest_contrastive import hardest_contrastive_loss
from mink_ssl.objectives.point_info_nce import info_nce_loss, point_info_nce_loss
from mink_ssl.objectives.matches import one_to_one_matches, sample_matches
from mink_ssl.objectives.shape_context_nce import (partitioned_info_nce_loss,
                                                   shape_context_nce_loss,
                                                   shape_context_partition)

NAMES = ("hardest_contrastive", "point_info_nce", "shape_context_nce")


def unit2d(*degrees):
    """(len(degrees), 2) float64 unit vectors at the given angles."""
    rad = np.radians(degrees)
    return torch.from_numpy(np.stack([np.cos(rad), np.sin(rad)], 1))


def chord(degrees):
    """Distance between two unit vectors ``degrees`` apart."""
    return 2 * math.sin(math.radians(degrees) / 2)


def np_normalise(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- hardest contrastive ---------------------------------------------------------------------

def np_hardest_contrastive(f0, f1, matches, pos_margin=0.1, neg_margin=1.4):
    """The ``positive="paper"``, ``negatives="exclude_matches"`` variant with every match used
    and every row a candidate, written out with loops."""
    f0, f1 = np_normalise(f0), np_normalise(f1)
    pairs = set(map(tuple, matches.tolist()))
    pos, neg01, neg10 = [], [], []
    for i, j in matches.tolist():
        pos.append(max(np.linalg.norm(f0[i] - f1[j]) - pos_margin, 0) ** 2)
        d01 = [np.linalg.norm(f0[i] - f1[k]) for k in range(len(f1)) if (i, k) not in pairs]
        d10 = [np.linalg.norm(f1[j] - f0[k]) for k in range(len(f0)) if (k, j) not in pairs]
        if d01:
            neg01.append(max(neg_margin - min(d01), 0) ** 2)
        if d10:
            neg10.append(max(neg_margin - min(d10), 0) ** 2)
    mean = lambda v: float(np.mean(v)) if v else 0.0  # noqa: E731
    return mean(pos), 0.5 * (mean(neg01) + mean(neg10))


OURS = {"positive": "paper", "negatives": "exclude_matches"}  # our named variant


def test_hardest_identical_matched_features_have_zero_positive_loss():
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(40, 8, generator=g)
    perm = torch.randperm(40, generator=g)
    f1 = f0[perm]  # view-1 row r holds view-0 row perm[r]
    matches = torch.stack([perm, torch.arange(40)], 1)  # (40, 2)
    out = hardest_contrastive_loss(f0, f1, matches, generator=g)
    assert out["stat_pos_loss"].item() == 0.0
    assert out["stat_pos_dist"].item() < 1e-3
    assert out["stat_num_matches"].item() == 40
    # a wrong match list does have a positive loss (the test can fail)
    shifted = torch.stack([perm, torch.arange(40).roll(1)], 1)
    assert hardest_contrastive_loss(f0, f1, shifted, generator=g)["stat_pos_loss"].item() > 0.1


def test_hardest_negative_is_the_closest_candidate():
    # view 0: anchor at 0 deg plus two others; view 1: its match at 0 deg, then 25, 70, 180 deg
    f0 = unit2d(0, 120, 200)
    f1 = unit2d(0, 25, 70, 180)
    matches = torch.tensor([[0, 0]])
    out = hardest_contrastive_loss(f0, f1, matches, num_hn_samples=100, **OURS)
    # 0 -> 1: closest non-match of the anchor is view-1 row 1 (25 deg);
    # 1 -> 0: closest non-match of view-1 row 0 is view-0 row 1 (120 deg, beyond the margin)
    assert out["stat_neg_dist"].item() == pytest.approx((chord(25) + chord(120)) / 2, abs=1e-6)
    expected = 0.5 * ((1.4 - chord(25)) ** 2 + 0.0)
    assert out["stat_pos_loss"].item() == 0.0
    assert out["loss_hardest_contrastive"].item() == pytest.approx(expected, abs=1e-6)


def test_true_match_is_skipped_for_the_next_closest_candidate():
    # view-1 row 1 (25 deg) is ALSO a match of anchor 0: the hardest negative is then row 2 (70)
    f0 = unit2d(0, 120, 200)
    f1 = unit2d(0, 25, 70, 180)
    matches = torch.tensor([[0, 0], [0, 1]])
    out = hardest_contrastive_loss(f0, f1, matches, num_hn_samples=100, **OURS)
    pos = ((0.0) ** 2 + (chord(25) - 0.1) ** 2) / 2
    # 0 -> 1 for both pairs: anchor 0 -> row 2 at 70 deg;
    # 1 -> 0: row 0 -> view-0 row 1 (120 deg); row 1 (25 deg) -> view-0 row 1 (95 deg), both > 1.4
    neg = 0.5 * ((1.4 - chord(70)) ** 2 + 0.0)
    assert out["stat_pos_loss"].item() == pytest.approx(pos, abs=1e-6)
    assert out["stat_neg_loss"].item() == pytest.approx(neg, abs=1e-6)
    assert out["loss_hardest_contrastive"].item() == pytest.approx(pos + neg, abs=1e-6)
    assert out["stat_neg_dist"].item() == pytest.approx(
        (2 * chord(70) + chord(120) + chord(95)) / 4, abs=1e-6)


def test_hardest_contrastive_value_equals_numpy():
    rng = np.random.default_rng(3)
    f0, f1 = rng.normal(size=(12, 3)), rng.normal(size=(10, 3))
    # several matches per row, and view-0 row 11 matched to every view-1 row (no candidate left)
    matches = np.array([[0, 0], [1, 1], [1, 2], [2, 2], [3, 5], [4, 4], [5, 9], [6, 7],
                        [7, 7], [8, 3]] + [[11, k] for k in range(10)])
    pos, neg = np_hardest_contrastive(f0, f1, matches)
    out = hardest_contrastive_loss(torch.from_numpy(f0), torch.from_numpy(f1),
                                   torch.from_numpy(matches), num_pos=1000, num_hn_samples=1000,
                                   **OURS, generator=torch.Generator().manual_seed(1))
    assert out["stat_pos_loss"].item() == pytest.approx(pos, abs=1e-6)
    assert out["stat_neg_loss"].item() == pytest.approx(neg, abs=1e-6)
    assert out["loss_hardest_contrastive"].item() == pytest.approx(pos + neg, abs=1e-6)
    weighted = hardest_contrastive_loss(torch.from_numpy(f0), torch.from_numpy(f1),
                                        torch.from_numpy(matches), num_pos=1000,
                                        num_hn_samples=1000, pos_weight=2.0, neg_weight=0.5,
                                        **OURS)
    assert weighted["loss_hardest_contrastive"].item() == pytest.approx(2 * pos + 0.5 * neg,
                                                                        abs=1e-6)


def test_hardest_contrastive_samples_at_most_num_pos_and_is_seedable():
    rng = np.random.default_rng(0)
    f0 = torch.from_numpy(rng.normal(size=(300, 8)))
    f1 = torch.from_numpy(rng.normal(size=(300, 8)))
    matches = torch.stack([torch.arange(300), torch.arange(300)], 1)
    a = hardest_contrastive_loss(f0, f1, matches, num_pos=50, num_hn_samples=20,
                                 generator=torch.Generator().manual_seed(5))
    b = hardest_contrastive_loss(f0, f1, matches, num_pos=50, num_hn_samples=20,
                                 generator=torch.Generator().manual_seed(5))
    assert a["stat_num_matches"].item() == 50
    assert a["loss_hardest_contrastive"].item() == b["loss_hardest_contrastive"].item()


# --- PointInfoNCE ----------------------------------------------------------------------------

def np_info_nce(q, k, temperature):
    q, k = np_normalise(q), np_normalise(k)
    logits = q @ k.T / temperature
    top = logits.max(axis=1, keepdims=True)
    log_sum_exp = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(log_sum_exp - np.diag(logits)))


def test_info_nce_equals_numpy():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    loss, _ = info_nce_loss(torch.from_numpy(q), torch.from_numpy(k), temperature=0.4)
    assert loss.item() == pytest.approx(np_info_nce(q, k, 0.4), rel=1e-9)
    # through the matches: view-1 rows are a permutation; the sampled order must not matter
    perm = rng.permutation(7)
    f1 = np.empty_like(k)
    f1[perm] = k  # view-1 row perm[m] is the key of view-0 row m
    matches = torch.from_numpy(np.stack([np.arange(7), perm], 1))
    out = point_info_nce_loss(torch.from_numpy(q), torch.from_numpy(f1), matches,
                              temperature=0.4, generator=torch.Generator().manual_seed(2))
    assert out["loss_point_info_nce"].item() == pytest.approx(np_info_nce(q, k, 0.4), rel=1e-9)
    assert out["stat_num_matches"].item() == 7


def test_info_nce_aligned_orthogonal_features_beat_random_and_temperature_matters():
    m = 6
    eye = torch.eye(m, dtype=torch.float64)
    rng = np.random.default_rng(1)
    rand_q = torch.from_numpy(rng.normal(size=(m, m)))
    rand_k = torch.from_numpy(rng.normal(size=(m, m)))
    for t in (0.07, 0.4, 1.0):
        aligned, acc = info_nce_loss(eye, eye, t)
        random, _ = info_nce_loss(rand_q, rand_k, t)
        assert aligned.item() < random.item()
        assert acc.item() == 1.0
        # diagonal logits 1/t, off-diagonal 0: loss = log(1 + (m - 1) exp(-1/t))
        assert aligned.item() == pytest.approx(math.log(1 + (m - 1) * math.exp(-1 / t)), rel=1e-9)
    # aligned features: a lower temperature sharpens the softmax and lowers the loss
    assert info_nce_loss(eye, eye, 0.07)[0] < info_nce_loss(eye, eye, 0.4)[0] \
        < info_nce_loss(eye, eye, 1.0)[0]
    # a higher temperature flattens the logits: loss tends to log(m) for any features
    assert info_nce_loss(rand_q, rand_k, 1e4)[0].item() == pytest.approx(math.log(m), abs=1e-3)


def test_match_sampling_is_one_to_one_and_capped():
    matches = torch.tensor([[0, 0], [0, 1], [1, 1], [2, 1], [3, 3], [4, 4], [4, 5], [5, 5]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        kept = one_to_one_matches(matches, gen)
        assert len(kept[:, 0].unique()) == len(kept) == len(kept[:, 1].unique())
        assert set(map(tuple, kept.tolist())) <= set(map(tuple, matches.tolist()))
        assert (3, 3) in set(map(tuple, kept.tolist()))  # a match with no rival always stays
    assert len(sample_matches(matches, 2, gen)) == 2
    assert len(sample_matches(matches[:0], 4096, gen)) == 0


# --- shape context ---------------------------------------------------------------------------

def np_partition(xyz, batch, r_in=0.05, r_out=0.5, n_angular=4):
    """Independent shape-context partition with loops and math.atan2 (n_radial = 2)."""
    n = len(xyz)
    part = -np.ones((n, n), np.int64)
    for i in range(n):
        for j in range(n):
            if i == j or batch[i] != batch[j]:
                continue
            d = xyz[j] - xyz[i]
            dist = math.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
            if dist < r_in:
                continue
            radial = 0 if dist < r_out else 1
            angle = math.degrees(math.atan2(d[1], d[0])) % 360
            part[i, j] = radial * n_angular + int(angle // (360 / n_angular))
    return part


def np_partitioned_nce(q, k, part, n_partitions, temperature):
    """Mean over non-empty partitions of the mean over anchors with negatives of -log softmax."""
    q, k = np_normalise(q), np_normalise(k)
    logits = q @ k.T / temperature
    per_partition = []
    for p in range(n_partitions):
        terms = []
        for i in range(len(q)):
            neg = [logits[i, j] for j in range(len(q)) if part[i, j] == p]
            if neg:
                row = np.array([logits[i, i]] + neg)
                terms.append(-(logits[i, i] - np.log(np.exp(row).sum())))
        if terms:
            per_partition.append(np.mean(terms))
    return float(np.mean(per_partition))


def around_anchor(radius, z=0.0):
    """Anchor at the origin, then points at 10, 100, 190, 280 degrees at ``radius`` and height z."""
    rad = np.radians([10, 100, 190, 280])
    pts = np.stack([radius * np.cos(rad), radius * np.sin(rad), np.full(4, z)], 1)
    return np.concatenate([np.zeros((1, 3)), pts])


def test_points_around_an_anchor_land_in_the_expected_bins():
    xyz = np.concatenate([around_anchor(0.2), around_anchor(1.0)[1:],
                          [[0.02, 0.01, 0.0]]])  # 4 inner, 4 outer, 1 closer than inner_radius
    part = shape_context_partition(torch.from_numpy(xyz))
    assert part[0].tolist() == [-1, 0, 1, 2, 3, 4, 5, 6, 7, -1]
    assert part.diagonal().eq(-1).all()
    np.testing.assert_array_equal(part.numpy(), np_partition(xyz, np.zeros(len(xyz))))
    # the radial split follows the radii: the same directions at 0.4 m stay inner, 0.6 m outer
    assert shape_context_partition(torch.from_numpy(around_anchor(0.4)))[0, 1:].tolist() == \
        [0, 1, 2, 3]
    assert shape_context_partition(torch.from_numpy(around_anchor(0.6)))[0, 1:].tolist() == \
        [4, 5, 6, 7]


def test_height_does_not_change_the_angular_bin():
    flat = shape_context_partition(torch.from_numpy(around_anchor(0.2)))
    for z in (0.1, -0.1):  # still within 0.5 m: the same partitions
        assert torch.equal(shape_context_partition(torch.from_numpy(around_anchor(0.2, z))), flat)
    high = shape_context_partition(torch.from_numpy(around_anchor(0.2, z=0.8)))  # now outer
    assert high[0, 1:].tolist() == [4, 5, 6, 7]
    assert torch.equal(high[0, 1:] % 4, flat[0, 1:] % 4)


def test_other_scenes_are_never_negatives():
    rng = np.random.default_rng(4)
    xyz = rng.uniform(-1, 1, size=(14, 3))
    batch = np.array([0] * 7 + [1] * 7)
    part = shape_context_partition(torch.from_numpy(xyz), torch.from_numpy(batch))
    cross = batch[:, None] != batch[None, :]
    assert (part.numpy()[cross] == -1).all()
    np.testing.assert_array_equal(part.numpy(), np_partition(xyz, batch))
    # scene 1 lies on top of scene 0 and its keys equal scene 0's queries: were they used as
    # negatives, the loss would change
    q = rng.normal(size=(14, 4))
    k = q.copy()
    k[7:] = q[:7]
    xyz[7:] = xyz[:7] + 0.01
    part = shape_context_partition(torch.from_numpy(xyz), torch.from_numpy(batch))
    loss, _ = partitioned_info_nce_loss(torch.from_numpy(q), torch.from_numpy(k), part, 8, 0.4,
                                         reduction="nonempty")
    assert loss.item() == pytest.approx(np_partitioned_nce(q, k, np_partition(xyz, batch), 8, 0.4),
                                        rel=1e-9)
    one_scene = shape_context_partition(torch.from_numpy(xyz))
    mixed, _ = partitioned_info_nce_loss(torch.from_numpy(q), torch.from_numpy(k), one_scene, 8,
                                         0.4, reduction="nonempty")
    assert abs(mixed.item() - loss.item()) > 1e-3


SECTORS = {"partitions": "sectors", "reduction": "nonempty"}  # our named variant


def test_shape_context_loss_equals_independent_computation():
    rng = np.random.default_rng(7)
    n = 12
    world = rng.uniform(-0.8, 0.8, size=(n, 3)).astype(np.float32)
    batch = np.array([0] * 6 + [1] * 6)
    f0, f1 = rng.normal(size=(n, 5)), rng.normal(size=(n, 5))
    perm = rng.permutation(n)
    f1_rows = np.empty_like(f1)
    f1_rows[perm] = f1  # view-1 row perm[m] matches view-0 row m
    matches = torch.from_numpy(np.stack([np.arange(n), perm], 1))
    expected = np_partitioned_nce(f0, f1, np_partition(world.astype(np.float64), batch), 8, 0.4)
    out = shape_context_nce_loss(torch.from_numpy(f0), torch.from_numpy(f1_rows), matches,
                                 torch.from_numpy(world), torch.from_numpy(batch), **SECTORS,
                                 generator=torch.Generator().manual_seed(0))
    assert out["loss_shape_context_nce"].item() == pytest.approx(expected, rel=1e-6)
    assert out["stat_num_matches"].item() == n
    assert 0 < out["stat_partitions_used"].item() <= 8
    # temperature enters each partition's softmax
    other = shape_context_nce_loss(torch.from_numpy(f0), torch.from_numpy(f1_rows), matches,
                                   torch.from_numpy(world), torch.from_numpy(batch),
                                   temperature=0.1, **SECTORS)
    assert other["loss_shape_context_nce"].item() == pytest.approx(
        np_partitioned_nce(f0, f1, np_partition(world.astype(np.float64), batch), 8, 0.1),
        rel=1e-6)


def test_anchor_without_negatives_skips_the_partition():
    # two points 1 m apart: each is the other's only negative, in opposite sectors; the other
    # six partitions are empty and must not dilute the mean
    xyz = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    part = shape_context_partition(xyz)
    assert part.tolist() == [[-1, 4], [6, -1]]
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    loss, stats = partitioned_info_nce_loss(q, q, part, 8, 0.5, reduction="nonempty")
    assert stats["stat_partitions_used"].item() == 2
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-9)


# --- through the registry, with a real network -----------------------------------------------


@pytest.fixture(scope="module")
def net():
    from mink_ssl.models import build_model

    torch.manual_seed(0)
    return build_model("Res16UNet14A", in_channels=1, out_channels=16).train()


def test_pair_batch_matches_are_the_same_world_points():
    batch = make_pair_batch()
    m = batch.matches
    assert torch.equal(batch.views[0].world[m[:, 0]], batch.views[1].world[m[:, 1]])
    assert torch.equal(batch.views[0].batch_index[m[:, 0]], batch.views[1].batch_index[m[:, 1]])


@pytest.mark.parametrize("name", NAMES)
def test_registered_objective_trains_a_real_network(net, name):
    objective = OBJECTIVES.get(name)(seed=0)
    net.zero_grad(set_to_none=True)
    ctx = StepContext(make_pair_batch(), net)
    out = objective(ctx)
    losses = {k: v for k, v in out.items() if k.startswith("loss_")}
    assert list(losses) == [f"loss_{name}"]
    assert all(k.startswith(("loss_", "stat_")) for k in out)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert out["stat_num_matches"].item() > 0
    assert not any(v.requires_grad for k, v in out.items() if k.startswith("stat_"))
    losses[f"loss_{name}"].backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["final.kernel"].abs().sum() > 0
    assert grads["conv0p1s1.kernel"].abs().sum() > 0  # the gradient reaches the stem


@pytest.mark.parametrize("name", NAMES)
def test_registered_objective_with_zero_matches_does_not_crash(net, name):
    objective = OBJECTIVES.get(name)(seed=0)
    net.zero_grad(set_to_none=True)
    out = objective(StepContext(make_pair_batch(with_matches=False), net))
    loss = out[f"loss_{name}"]
    assert loss.item() == 0.0 and loss.grad_fn is not None
    assert out["stat_num_matches"].item() == 0
    loss.backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in net.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_seeded_objectives_repeat_and_vary_across_steps(name):
    torch.manual_seed(0)
    f0, f1 = torch.randn(600, 8), torch.randn(600, 8)
    batch = make_pair_batch(num_scenes=2)
    small = {"hardest_contrastive": {"num_pos_per_pair": 25, "num_hn_per_pair": 20},
             "shape_context_nce": {"num_matches_per_scene": 25}}.get(name, {"num_matches": 50})

    class Fixed(StepContext):  # features without a network
        def features(self, view):
            return (f0, f1)[view]

    def losses(seed):
        objective = OBJECTIVES.get(name)(seed=seed, **small)
        return [objective(Fixed(batch, None))[f"loss_{name}"].item() for _ in range(2)]

    first, again = losses(3), losses(3)
    assert first == again  # same seed, same samples
    assert first[0] != first[1]  # the generator moves on between steps


def test_bad_matches_are_reported():
    f = torch.randn(5, 4)
    with pytest.raises(ValueError, match="out of range"):
        point_info_nce_loss(f, f, torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match=r"shape \(M, 2\)"):
        hardest_contrastive_loss(f, f, torch.tensor([0, 1, 2]))
    with pytest.raises(KeyError, match="valid choices: .*point_info_nce"):
        OBJECTIVES.get("point_infonce")


@pytest.mark.slow
def test_match_mask_equals_brute_force_with_repeated_anchor_rows():
    from mink_ssl.objectives.hardest_contrastive import match_mask

    g = torch.Generator().manual_seed(0)
    matches = torch.randint(0, 50, (400, 2), generator=g)
    anchors = torch.randint(0, 50, (64,), generator=g)  # rows repeat
    cands = torch.randperm(50, generator=g)[:20]  # distinct
    expected = torch.tensor([[any((int(a), int(c)) == (int(x), int(y)) for x, y in matches)
                              for c in cands] for a in anchors])
    got = match_mask(anchors, cands, matches[:, 0], matches[:, 1], 50)
    assert torch.equal(got, expected) and expected.any()
