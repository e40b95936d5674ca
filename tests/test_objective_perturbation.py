"""Perturbation objective (SeRP): centres, patches, perturbed voxels, labels, deltas and Chamfer
against independent NumPy / Python computations; gradients reach a real network; the real
trainer runs it and its loss goes down."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from mink_ssl.objectives import OBJECTIVES, StepContext
from mink_ssl.objectives.perturbation import (Perturbation, chamfer_l2, knn_patches,
                                              patch_chamfer, perturb_voxels, sample_centres)
from mink_ssl.sparse import batched_coordinates
from helpers import random_pair_batch as make_pair_batch, tiny_net

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def random_scenes(sizes=(150, 90), grid=7, seed=0):
    """Unique random voxels of a ``grid``^3 box per scene (many distance ties): (N, 4) int32."""
    rng = np.random.default_rng(seed)
    parts = [np.stack(np.unravel_index(rng.choice(grid ** 3, n, replace=False), (grid,) * 3), 1)
             for n in sizes]
    return batched_coordinates([p.astype(np.int32) - grid // 2 for p in parts])


# --- centres and patches ---------------------------------------------------------------------

def test_centres_per_scene_are_distinct_grouped_and_seeded():
    batch = torch.repeat_interleave(torch.tensor([0, 1, 3, 4]), torch.tensor([100, 7, 300, 30]))
    batch = batch[torch.randperm(len(batch), generator=torch.Generator().manual_seed(0))]
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    centres = sample_centres(batch, 0.05, gen(1))
    scenes = batch[centres]
    # max(1, round(0.05 n)) per scene; none for the empty scene 2
    assert torch.bincount(scenes, minlength=5).tolist() == [5, 1, 0, 15, 2]
    assert (scenes[1:] >= scenes[:-1]).all()  # grouped by scene
    assert len(set(centres.tolist())) == len(centres)
    assert torch.equal(centres, sample_centres(batch, 0.05, gen(1)))
    assert not torch.equal(centres, sample_centres(batch, 0.05, gen(2)))
    # uniform over the scene: 400 draws of 1 centre among scene 1's 7 voxels hit all of them
    g = gen(3)
    hits = {int(c) for _ in range(400) for c in sample_centres(batch, 0.05, g)[5:6]}
    assert hits == set((batch == 1).nonzero()[:, 0].tolist())


def np_knn(coords, centres, k):
    """Per centre: the k same-scene voxels with smallest squared distance, ties by index."""
    out = np.full((len(centres), k), -1)
    for row, c in enumerate(centres):
        same = np.nonzero(coords[:, 0] == coords[c, 0])[0]
        d2 = ((coords[same, 1:] - coords[c, 1:]) ** 2).sum(1)
        nearest = same[np.lexsort((same, d2))][:k]
        out[row, :len(nearest)] = nearest
    return out


@pytest.mark.parametrize("grid", [7, 12], ids=["dense", "sparse"])
def test_knn_patches_equal_brute_force_with_ties_and_chunks(grid):
    coords = random_scenes(grid=grid)
    batch = coords[:, 0].long()
    centres = sample_centres(batch, 0.1, torch.Generator().manual_seed(0))
    expected = np_knn(coords.numpy().astype(np.int64), centres.numpy(), 12)
    got = knn_patches(coords[:, 1:], batch, centres, 12)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert (got[:, 0] == centres).all()  # the centre is its own nearest voxel
    # every route gives the same answer: the cube lookup for all centres (a window as large as
    # the scene), the per-scene fallback for all (window 0), in chunks of one centre
    for kw in ({"window": grid}, {"window": 0}, {"window": 0, "max_pairs": 1}):
        assert torch.equal(knn_patches(coords[:, 1:], batch, centres, 12, **kw), got), kw
    # the default cube answers exactly the centres whose 12th neighbour is within 3 voxels
    from mink_ssl.objectives.perturbation import _knn_window
    _, exact = _knn_window(coords[:, 1:].long(), batch, centres, 12, 3)
    q = coords[:, 1:].double()
    kth = (q[got[:, -1]] - q[centres]).square().sum(1)
    assert torch.equal(exact, kth <= 9) and (0 < exact.sum() < len(exact)) == (grid == 12)
    # a scene with fewer voxels than k: all of them, nearest first, then -1
    small = random_scenes(sizes=(5, 40), seed=1)
    c = torch.tensor([2, 10])
    got = knn_patches(small[:, 1:], small[:, 0], c, 8)
    np.testing.assert_array_equal(got.numpy(), np_knn(small.numpy().astype(np.int64), c.numpy(), 8))
    assert (got[0, 5:] == -1).all() and (got[1] >= 5).all()


# --- perturbation, labels and deltas ---------------------------------------------------------

def np_perturb(coords, feats, members, noise):
    """Reference: group the moved voxels in a dict; label, mean delta and mean features."""
    in_patch = set(members[members >= 0].tolist())
    groups = {}
    for i, row in enumerate(coords):
        step = (np.floor(noise[i] + np.float32(0.5)).astype(np.int64) if i in in_patch
                else np.zeros(3, np.int64))
        key = (int(row[0]), *(int(a) for a in row[1:] + step))
        groups.setdefault(key, []).append((i, step))
    ref = {}
    for key, items in groups.items():
        displaced = [bool(step.any()) for _, step in items]
        label = int(all(displaced))
        delta = np.mean([-step for _, step in items], 0) if label else np.zeros(3)
        ref[key] = (label, delta, feats[[i for i, _ in items]].mean(0), [i for i, _ in items])
    return ref


def check_against_reference(cloud, coords, feats, members, noise):
    ref = np_perturb(coords.numpy().astype(np.int64), feats.numpy(), members.numpy(),
                     noise.numpy())
    keys = [tuple(r) for r in cloud.coords.tolist()]
    assert sorted(keys) == sorted(ref) and len(set(keys)) == len(keys)
    for u, key in enumerate(keys):
        label, delta, feat, inputs = ref[key]
        assert cloud.labels[u].item() == label, key
        np.testing.assert_array_equal(cloud.delta[u].numpy(), delta)  # exact
        np.testing.assert_allclose(cloud.feats[u].numpy(), feat, rtol=1e-6)
        assert sorted((cloud.inverse == u).nonzero()[:, 0].tolist()) == inputs
    return ref


def test_hand_made_perturbation_has_exact_labels_and_deltas():
    coords = batched_coordinates([np.array([[0, 0, 0], [1, 0, 0], [5, 5, 5], [7, 5, 5],
                                            [3, 3, 3], [9, 9, 9], [9, 9, 8]], np.int32),
                                  np.array([[0, 0, 0]], np.int32)])
    feats = torch.arange(8, dtype=torch.float32)[:, None]
    noise = torch.zeros(8, 3)
    noise[0] = torch.tensor([0.7, 0.2, -0.4])   # 0 -> (1,0,0), where 1 stays: clean voxel
    noise[2] = torch.tensor([1.2, 0.0, 0.0])   # 2 -> (6,5,5) ...
    noise[3] = torch.tensor([-0.6, 0.0, 0.0])  # ... and 3 -> (6,5,5): perturbed, mean delta
    noise[4] = torch.tensor([0.49, -0.49, 0.3])  # rounds to 0: not displaced, clean
    noise[5] = torch.tensor([0.0, 0.0, -1.5])  # 5 -> (9,9,8) (floor(-1.0) = -1), which ...
    noise[6] = torch.tensor([0.0, 0.0, 2.6])   # ... 6 left for (9,9,11): both perturbed
    noise[7] = torch.tensor([5.0, 5.0, 5.0])   # scene 1: not in a patch, stays
    members = torch.tensor([[0, 1, 4, -1], [2, 3, 5, 6]])
    cloud = perturb_voxels(coords, feats, members, noise)
    got = {tuple(c): (int(l), d.tolist(), f.item()) for c, l, d, f in
           zip(cloud.coords.tolist(), cloud.labels, cloud.delta, cloud.feats)}
    assert got == {
        (0, 1, 0, 0): (0, [0.0, 0.0, 0.0], 0.5),     # voxels 0 and 1 collapse, 1 never moved
        (0, 6, 5, 5): (1, [0.0, 0.0, 0.0], 2.5),     # 2 (+1 x) and 3 (-1 x): mean delta 0
        (0, 3, 3, 3): (0, [0.0, 0.0, 0.0], 4.0),
        (0, 9, 9, 8): (1, [0.0, 0.0, 1.0], 5.0),     # 5 moved in: back is +1 z
        (0, 9, 9, 11): (1, [0.0, 0.0, -3.0], 6.0),
        (1, 0, 0, 0): (0, [0.0, 0.0, 0.0], 7.0),
    }
    assert cloud.displaced.tolist() == [True, False, True, True, False, True, True, False]
    assert cloud.coords.dtype == torch.int32
    check_against_reference(cloud, coords, feats, members, noise)


@pytest.mark.parametrize("sigma", [0.6, 1.5])
def test_random_perturbation_equals_reference(sigma):
    coords = random_scenes(sizes=(200, 120), grid=8, seed=2)
    batch = coords[:, 0].long()
    g = torch.Generator().manual_seed(5)
    members = knn_patches(coords[:, 1:], batch, sample_centres(batch, 0.05, g), 10)
    noise = torch.randn(len(coords), 3, generator=g) * sigma
    feats = torch.rand(len(coords), 3, generator=g)
    cloud = perturb_voxels(coords, feats, members, noise)
    ref = check_against_reference(cloud, coords, feats, members, noise)
    labels = np.array([v[0] for v in ref.values()])
    assert 0 < labels.sum() < len(labels)  # both classes present
    assert len(ref) < len(coords)  # some voxels collapsed


# --- Chamfer distance ------------------------------------------------------------------------

def np_chamfer(x, y):
    """Eq. 11 written out: x (A, D), y (B, D)."""
    d = ((x[:, None] - y[None]) ** 2).sum(-1)
    return d.min(1).mean() + d.min(0).mean()


def test_chamfer_l2_equals_eq_11_on_padded_sets():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(4, 6, 3)), rng.normal(size=(4, 5, 3))
    pm, tm = rng.random((4, 6)) < 0.6, rng.random((4, 5)) < 0.6
    pm[:, 0] = tm[:, 0] = True
    got = chamfer_l2(*(torch.from_numpy(a) for a in (pred, pm, target, tm)))
    expected = [np_chamfer(pred[s][pm[s]], target[s][tm[s]]) for s in range(4)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # one point each at distance 2: 4 + 4
    one = chamfer_l2(torch.zeros(1, 1, 3), torch.ones(1, 1, dtype=torch.bool),
                     torch.tensor([[[0.0, 2.0, 0.0]]]), torch.ones(1, 1, dtype=torch.bool))
    assert one.item() == 8.0


def test_patch_chamfer_equals_per_patch_sets():
    coords = random_scenes(sizes=(150, 100), grid=7, seed=3)
    batch = coords[:, 0].long()
    g = torch.Generator().manual_seed(1)
    members = knn_patches(coords[:, 1:], batch, sample_centres(batch, 0.06, g), 9)
    cloud = perturb_voxels(coords, torch.ones(len(coords), 1), members,
                           torch.randn(len(coords), 3, generator=g))
    pred = torch.randn(len(cloud.coords), 3, generator=g, dtype=torch.float64)
    unit = 1.5
    got = patch_chamfer(pred, cloud, coords, members, unit)
    q, v = coords[:, 1:].double().numpy(), cloud.coords[:, 1:].double().numpy()
    expected = []
    for row in members.tolist():
        kept = [i for i in row if i >= 0 and cloud.displaced[i]
                and cloud.labels[cloud.inverse[i]] == 1]
        if not kept:
            continue
        voxels = sorted({int(cloud.inverse[i]) for i in kept})
        c = q[row[0]]
        x = np.stack([(v[u] - c) / unit + pred[u].numpy() for u in voxels])
        y = np.stack([(q[i] - c) / unit for i in kept])
        expected.append(np_chamfer(x, y))
    assert len(expected) > 5
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    # the exact deltas reconstruct every patch whose perturbed voxels hold one input voxel each
    exact = patch_chamfer(cloud.delta.double() / 2, cloud, coords, members, 2.0)  # exact /2
    single = torch.bincount(cloud.inverse, minlength=len(cloud.coords)) == 1
    assert exact.min().item() == 0.0
    used = [[i for i in row if i >= 0 and cloud.displaced[i] and cloud.labels[cloud.inverse[i]]]
            for row in members.tolist()]
    clean_patches = [all(single[cloud.inverse[i]] for i in kept) for kept in used if kept]
    assert (exact[torch.tensor(clean_patches)] == 0).all() and any(clean_patches)


# --- eq. 1 -----------------------------------------------------------------------------------

def np_cross_entropy(logits, labels):
    z = logits - logits.max(1, keepdims=True)
    return -(z[np.arange(len(z)), labels] - np.log(np.exp(z).sum(1))).mean()


@pytest.mark.parametrize("reconstruction", ["delta", "chamfer"])
def test_losses_follow_eq_1(reconstruction):
    coords = random_scenes(seed=4)
    objective = Perturbation(in_channels=4, alpha_cls=0.3, alpha_rec=2.0, noise_std=1.2,
                             reconstruction=reconstruction, centre_fraction=0.05, patch_size=10,
                             seed=0)
    cloud, members = objective.perturb(coords, torch.ones(len(coords), 1))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(cloud.coords), 2, generator=g, dtype=torch.float64)
    pred = torch.randn(len(cloud.coords), 3, generator=g, dtype=torch.float64)
    out = objective.losses(logits, pred, cloud, coords, members)
    labels, delta = cloud.labels.numpy(), cloud.delta.double().numpy()
    l_cls = np_cross_entropy(logits.numpy(), labels)
    hit = labels == 1
    if reconstruction == "delta":
        l_rec = ((pred.numpy()[hit] - delta[hit] / 1.2) ** 2).mean()
    else:
        l_rec = patch_chamfer(pred, cloud, coords, members, 1.2).mean().item()
    assert out["loss_perturb_cls"].item() == pytest.approx(0.3 * l_cls, rel=1e-12)
    assert out["loss_perturb_rec"].item() == pytest.approx(2.0 * l_rec, rel=1e-12)
    assert out["stat_perturb_fraction"].item() == pytest.approx(hit.mean())
    assert out["stat_perturb_accuracy"].item() == pytest.approx(
        (logits.numpy().argmax(1) == labels).mean())
    rmse = np.sqrt(((pred.numpy()[hit] * 1.2 - delta[hit]) ** 2).sum(1).mean())
    assert out["stat_perturb_delta_rmse_voxels"].item() == pytest.approx(rmse, rel=1e-9)


def test_default_weights_are_the_papers_in_noise_units():
    objective = Perturbation(in_channels=4)
    assert objective.alpha_cls == pytest.approx(0.001 / 0.03 ** 2)
    assert objective.alpha_rec == 1.5 and objective.delta_unit == 1.0
    assert objective.patch_size == 20 and objective.centre_fraction == 20 / 1024


# --- with a real network ---------------------------------------------------------------------

class Recorder(nn.Module):
    """The backbone, remembering the coordinates it was given."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x):
        self.seen.append(x.C.clone())
        return self.net(x)


@pytest.mark.parametrize("reconstruction", ["delta", "chamfer"])
def test_gradients_reach_every_backbone_parameter(reconstruction):
    net = Recorder(tiny_net())
    objective = OBJECTIVES.get("perturbation")(in_channels=16, reconstruction=reconstruction,
                                               seed=0)
    batch = make_pair_batch(n=400)
    out = objective(StepContext(batch, net))
    assert set(out) == {"loss_perturb_cls", "loss_perturb_rec", "stat_perturb_cls",
                        "stat_perturb_rec", "stat_perturb_accuracy", "stat_perturb_fraction",
                        "stat_perturb_delta_rmse_voxels"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert not any(v.requires_grad for k, v in out.items() if k.startswith("stat_"))
    assert 0.1 < out["stat_perturb_fraction"].item() < 0.6
    (out["loss_perturb_cls"] + out["loss_perturb_rec"]).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for name, p in objective.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the backbone saw the perturbed cloud, which the same seed reproduces
    twin = Perturbation(in_channels=16, seed=0)
    cloud, _ = twin.perturb(batch.views[0].coords, batch.views[0].feats)
    seen = {tuple(r) for r in net.seen[0].tolist()}
    assert len(net.seen) == 1 and seen == {tuple(r) for r in cloud.coords.tolist()}
    assert seen != {tuple(r) for r in batch.views[0].coords.tolist()}


def test_seeded_steps_repeat_and_move_on():
    net = tiny_net()
    batch = make_pair_batch(n=200)

    def losses(seed):
        torch.manual_seed(1)  # same head weights
        objective = Perturbation(in_channels=16, centre_fraction=0.05, seed=seed)
        with torch.no_grad():
            return [objective(StepContext(batch, net))["loss_perturb_rec"].item() for _ in range(2)]

    first = losses(3)
    assert first == losses(3)
    assert first[0] != first[1]


def test_bad_arguments_are_reported():
    for kwargs, match in [({"centre_fraction": 0.0}, "centre_fraction"),
                          ({"patch_size": 0}, "patch_size"), ({"noise_std": 0}, "noise_std"),
                          ({"delta_unit": -1.0}, "delta_unit"),
                          ({"alpha_cls": 0, "alpha_rec": 0}, "not both 0"),
                          ({"reconstruction": "l1"}, "reconstruction must be one of delta, chamfer"),
                          ({"view": 2}, "view must be an integer >= 0 and <= 1, got 2"), ({"max_pairs": 0}, "max_pairs")]:
        with pytest.raises(ValueError, match=match):
            Perturbation(**kwargs)
    with pytest.raises(ValueError, match=r"noise \(N, 3\)"):
        perturb_voxels(torch.zeros(4, 4, dtype=torch.int32), torch.ones(4, 1),
                       torch.zeros(1, 2, dtype=torch.long), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="integer voxel coordinates"):
        knn_patches(torch.rand(4, 3), torch.zeros(4), torch.zeros(1, dtype=torch.long), 2)


# --- configs and the real trainer ------------------------------------------------------------

def test_hydra_config_builds_the_objective():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mink_ssl.cli.pretrain import _register_schema
    from mink_ssl.tasks.pretrain import build_objectives

    _register_schema()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=[
            "data.root=/x", "model=res16unet14a", "model.out_channels=24",
            "objective=[point_info_nce,perturbation]",
            "objectives.perturbation.reconstruction=chamfer"])
    cfg = OmegaConf.to_object(cfg)
    assert cfg.objectives["perturbation"]["in_channels"] is None  # the run fills it in
    objectives, weights = build_objectives(cfg.objectives, cfg.model.out_channels)
    p = objectives["perturbation"]
    assert weights["perturbation"] == 1.0
    assert p.classifier.in_features == 24 and p.regressor.out_features == 3
    # alpha_cls exactly SeRP's 0.001 / 0.03^2 (the config once held a rounded copy, 1.1111111)
    assert p.reconstruction == "chamfer" and p.alpha_cls == 0.001 / 0.03 ** 2
    assert p.centre_fraction == 20 / 1024 and p.delta_unit == 1.0


def logged(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


@pytest.mark.slow
def test_pretrain_lowers_the_loss(synthetic_pairs, tmp_path):
    from mink_ssl.engine.config import ModelConfig, OptimConfig
    from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig, pretrain

    cfg = PretrainConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16),
        data=DataConfig(root=str(synthetic_pairs), voxel_size=0.1, num_workers=0,
                        max_matches=1000),
        optim=OptimConfig(lr=0.05), objectives={"perturbation": {"seed": 0}},
        max_iterations=12, batch_size=2, device="cpu", checkpoint_every=0, log_every=1,
        progress=False)
    logs = []
    run = tmp_path / "run"
    backbone = pretrain(cfg, run, print_fn=logs.append)
    assert "12 iterations" in logs[-1]
    loss = logged(run, "loss/loss")
    assert len(loss) == 12 and all(np.isfinite(loss))
    assert np.mean(loss[-4:]) < np.mean(loss[:4]) - 0.15, loss  # measured: 2.60 -> 2.32
    cls = logged(run, "loss/loss_perturb_cls")
    assert np.mean(cls[-4:]) < np.mean(cls[:4]) - 0.1, cls  # measured: 0.82 -> 0.62
    state = torch.load(backbone, weights_only=True)["state_dict"]
    assert not any("classifier" in k or "regressor" in k for k in state)  # heads dropped
    ckpt = torch.load(run / "checkpoint_12.pth", weights_only=True)
    # resumable: rank 0's generator state
    assert "objectives.perturbation.generator" in ckpt["ranks"][0]["rng"]["generators"]
