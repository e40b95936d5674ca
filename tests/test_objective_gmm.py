"""GMM likelihood objective (ParAE): parameters and likelihood against NumPy/SciPy, the loss
prefers a correct partition, gradients reach a real network, and real trainer runs."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_pair_batch as make_pair_batch, tiny_net
from scipy.stats import multivariate_normal

from mink_ssl.objectives import OBJECTIVES, StepContext
from mink_ssl.objectives.gmm_likelihood import (GMMLikelihood, gmm_likelihood_loss,
                                                gmm_log_likelihood, gmm_parameters)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def np_gmm(gamma, x, eps):
    """Eqs. 5-7 for one scene, written out per component."""
    n, j = gamma.shape
    pi = gamma.mean(0)
    mu = np.stack([np.average(x, axis=0, weights=gamma[:, k]) for k in range(j)])
    sigma = np.stack([np.cov(x.T, aweights=gamma[:, k], bias=True) + eps * np.eye(3)
                      for k in range(j)])
    return pi, mu, sigma


def np_log_likelihood(x, pi, mu, sigma):
    dens = np.stack([multivariate_normal.logpdf(x, mu[k], sigma[k]) for k in range(len(pi))], 1)
    top = (dens + np.log(pi)).max(1, keepdims=True)
    return top[:, 0] + np.log(np.exp(dens + np.log(pi) - top).sum(1))


def random_case(seed=0, n=(50, 50), j=3):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=(k, 3)) * [1.0, 0.5, 0.2] + rng.uniform(-3, 3, 3)
                        for k in n])
    logits = rng.normal(size=(len(x), j)) * 2
    gamma = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    batch = np.repeat(np.arange(len(n)), n)
    return gamma, x, batch


def test_parameters_and_log_likelihood_equal_numpy_scipy():
    gamma, x, batch = random_case(n=(50, 30))
    eps = 1e-3
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    log_pi, mu, sigma, counts = gmm_parameters(t(gamma), t(x), t(batch), eps=eps)
    log_p, logdet = gmm_log_likelihood(t(x), t(batch), log_pi, mu, sigma)
    assert counts.tolist() == [50, 30]
    expected_loss = []
    for s in range(2):
        rows = batch == s
        pi_e, mu_e, sigma_e = np_gmm(gamma[rows], x[rows], eps)
        np.testing.assert_allclose(log_pi[s].exp().numpy(), pi_e, rtol=1e-10)
        np.testing.assert_allclose(mu[s].numpy(), mu_e, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sigma[s].numpy(), sigma_e, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(logdet[s].numpy(), np.linalg.slogdet(sigma_e)[1], rtol=1e-10)
        ll = np_log_likelihood(x[rows], pi_e, mu_e, sigma_e)
        np.testing.assert_allclose(log_p[t(rows)].numpy(), ll, rtol=1e-10)
        expected_loss.append(-ll.mean())
    for center in (False, True):  # centring per scene does not change the likelihood
        out = gmm_likelihood_loss(t(gamma), t(x), t(batch), eps=eps, center=center)
        assert out["loss_gmm_likelihood"].item() == pytest.approx(np.mean(expected_loss),
                                                                  rel=1e-9)
    # the regulariser enters: another eps gives another loss
    other = gmm_likelihood_loss(t(gamma), t(x), t(batch), eps=0.5)["loss_gmm_likelihood"]
    assert abs(other.item() - np.mean(expected_loss)) > 1e-2


def test_scenes_get_separate_mixtures():
    # scene 1 is scene 0 shifted by 100 m: with separate mixtures the two losses are equal;
    # one mixture over both would be much wider and have a higher loss
    gamma, x, _ = random_case(n=(40,))
    g2, x2 = np.concatenate([gamma, gamma]), np.concatenate([x, x + 100])
    b2 = np.repeat([0, 1], 40)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    single = gmm_likelihood_loss(t(gamma), t(x), t(np.zeros(40, np.int64)))
    both = gmm_likelihood_loss(t(g2), t(x2), t(b2))
    merged = gmm_likelihood_loss(t(g2), t(x2), t(np.zeros(80, np.int64)))
    assert both["loss_gmm_likelihood"].item() == pytest.approx(
        single["loss_gmm_likelihood"].item(), rel=1e-9)
    assert merged["loss_gmm_likelihood"].item() > both["loss_gmm_likelihood"].item() + 1


def test_correct_partition_of_two_blobs_beats_uniform():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(60, 3)) * 0.1
    b = rng.normal(size=(60, 3)) * 0.1 + [2.0, 0.0, 0.0]
    x = torch.from_numpy(np.concatenate([a, b])).float()
    batch = torch.zeros(120, dtype=torch.long)
    correct = torch.zeros(120, 2)
    correct[:60, 0] = correct[60:, 1] = 1
    soft = correct * 0.9 + 0.05
    uniform = torch.full((120, 2), 0.5)
    wrong = torch.zeros(120, 2)
    wrong[::2, 0] = wrong[1::2, 1] = 1  # each component straddles both blobs
    loss = {name: gmm_likelihood_loss(g, x, batch)["loss_gmm_likelihood"].item()
            for name, g in (("correct", correct), ("soft", soft), ("uniform", uniform),
                            ("wrong", wrong))}
    assert loss["correct"] < loss["soft"] < loss["uniform"]
    assert loss["correct"] < loss["wrong"] - 1
    stats = gmm_likelihood_loss(correct, x, batch)
    assert stats["stat_gmm_active_components"].item() == 2
    one = torch.zeros(120, 2)
    one[:, 0] = 1
    assert gmm_likelihood_loss(one, x, batch)["stat_gmm_active_components"].item() == 1


def test_empty_component_stays_finite_with_gradients():
    x = torch.randn(30, 3)
    logits = torch.zeros(30, 4)
    logits[:, 3] = -200.0  # softmax underflows to exactly 0 for component 3
    logits.requires_grad_(True)
    out = gmm_likelihood_loss(logits.softmax(1), x, torch.zeros(30, dtype=torch.long))
    assert torch.isfinite(out["loss_gmm_likelihood"])
    out["loss_gmm_likelihood"].backward()
    assert torch.isfinite(logits.grad).all()


def test_gain_is_the_one_gaussian_nll_minus_the_loss():
    gamma, x, batch = random_case(n=(50, 30))
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    out = gmm_likelihood_loss(t(gamma), t(x), t(batch))
    one = np.mean([-np_log_likelihood(x[batch == s], *np_gmm(np.ones((n, 1)), x[batch == s],
                                                                 1e-4)).mean()
                   for s, n in ((0, 50), (1, 30))])
    assert out["stat_gmm_gain"].item() == pytest.approx(one - out["loss_gmm_likelihood"].item(),
                                                        rel=1e-9)
    uniform = gmm_likelihood_loss(torch.full((80, 3), 1 / 3, dtype=torch.float64), t(x), t(batch))
    assert abs(uniform["stat_gmm_gain"].item()) < 1e-9


def test_uniform_posteriors_are_a_stationary_point():
    """With gamma = 1/J every component is the scene's one Gaussian and no logit has a
    gradient: a head whose logits start near zero starts (almost) there."""
    _, x, batch = random_case(n=(50, 30))
    logits = torch.zeros(80, 4, dtype=torch.float64, requires_grad=True)
    gmm_likelihood_loss(logits.softmax(1), torch.from_numpy(x), torch.from_numpy(batch))[
        "loss_gmm_likelihood"].backward()
    assert logits.grad.abs().max() < 1e-12


def blob_scenes(seed=0, scenes=2, blobs=4, n=80, channels=32):
    """Points of ``blobs`` separated Gaussian blobs per scene (metres) and unit-norm features
    that say which blob a point is in (as an L2-normalised backbone output could)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(scenes, blobs, 3, generator=g) * 4
    dirs = torch.randn(blobs, channels, generator=g)
    x = (centres[:, :, None, :] + 0.1 * torch.randn(scenes, blobs, n, 3, generator=g))
    f = dirs[None, :, None, :] + 0.3 * torch.randn(scenes, blobs, n, channels, generator=g)
    batch = torch.arange(scenes).repeat_interleave(blobs * n)
    return (x.reshape(-1, 3), torch.nn.functional.normalize(f.reshape(-1, channels), dim=1),
            batch)


@pytest.mark.parametrize("head_norm", [True, False])
def test_the_head_leaves_the_uniform_point_under_the_pretraining_optimizer(head_norm):
    """The pretraining optimizer (SGD 0.1, momentum 0.8, weight decay 1e-4) on unit-norm
    features that separate 4 blobs per scene: the default head (batch norm) learns the
    partition, the gain over one Gaussian grows past 1 nat; the head without it stays at
    uniform posteriors (gain ~0), as in the synthetic transfer benchmark before the fix."""
    x, f, batch = blob_scenes()
    torch.manual_seed(0)
    objective = GMMLikelihood(in_channels=32, num_components=8, head_norm=head_norm)
    opt = torch.optim.SGD(objective.parameters(), lr=0.1, momentum=0.8, weight_decay=1e-4)
    gains = []
    for _ in range(40):
        out = gmm_likelihood_loss(objective.head(f).softmax(1), x, batch, eps=1e-4)
        opt.zero_grad()
        out["loss_gmm_likelihood"].backward()
        opt.step()
        gains.append(out["stat_gmm_gain"].item())
    if head_norm:
        assert np.mean(gains[-5:]) > 1.0, gains
    else:
        assert max(gains) < 0.01, gains


# --- through the registry, with a real network -----------------------------------------------


@pytest.mark.parametrize("in_channels", [16, None])
def test_registered_objective_trains_a_real_network(in_channels):
    net = tiny_net()
    objective = OBJECTIVES.get("gmm_likelihood")(in_channels=in_channels, num_components=8,
                                                 max_points=500, seed=0)
    out = objective(StepContext(make_pair_batch(), net))
    assert set(out) == {"loss_gmm_likelihood", "stat_gmm_active_components", "stat_gmm_logdet",
                        "stat_gmm_gain"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert not any(v.requires_grad for k, v in out.items() if k.startswith("stat_"))
    assert 1 <= out["stat_gmm_active_components"].item() <= 8
    out["loss_gmm_likelihood"].backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.get_parameter("final.kernel").grad.abs().sum() > 0
    assert net.get_parameter("conv0p1s1.kernel").grad.abs().sum() > 0  # reaches the stem
    for name, p in objective.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_subsampling_is_seeded_and_capped():
    torch.manual_seed(0)
    f = torch.randn(600, 16)
    batch = make_pair_batch()

    class Fixed(StepContext):  # features without a network
        def features(self, view):
            return f

    def losses(seed):
        torch.manual_seed(1)  # same head weights
        objective = GMMLikelihood(in_channels=16, num_components=4, max_points=100, seed=seed)
        return [objective(Fixed(batch, None))["loss_gmm_likelihood"].item() for _ in range(2)]

    first = losses(3)
    assert first == losses(3)  # same seed, same samples
    assert first[0] != first[1]  # the generator moves on between steps
    torch.manual_seed(1)
    full = GMMLikelihood(in_channels=16, num_components=4, max_points=None)
    torch.manual_seed(1)
    capped_above = GMMLikelihood(in_channels=16, num_components=4, max_points=10_000, seed=3)
    ctx = Fixed(batch, None)
    assert full(ctx)["loss_gmm_likelihood"].item() == pytest.approx(
        capped_above(ctx)["loss_gmm_likelihood"].item(), rel=1e-6)  # all points: no sampling


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="eps must be a number > 0, got 0.0"):
        GMMLikelihood(eps=0.0)
    with pytest.raises(ValueError, match="num_components"):
        GMMLikelihood(num_components=1)
    with pytest.raises(ValueError, match=r"gamma \(N, J\)"):
        gmm_likelihood_loss(torch.rand(5, 3), torch.rand(4, 3), torch.zeros(5, dtype=torch.long))


def test_loss_goes_down_on_a_fixed_batch():
    net = tiny_net()
    objective = GMMLikelihood(in_channels=16, num_components=8, max_points=None)
    batch = make_pair_batch(seed=2, n=120)
    opt = torch.optim.Adam(list(net.parameters()) + list(objective.parameters()), lr=2e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = objective(StepContext(batch, net))["loss_gmm_likelihood"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.04, losses


# --- configs and the real trainer ------------------------------------------------------------

def test_hydra_config_passes_the_backbone_channels():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mink_ssl.cli.pretrain import _register_schema
    from mink_ssl.tasks.pretrain import build_objectives

    _register_schema()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=[
            "data.root=/x", "model=res16unet14a", "model.out_channels=24",
            "objective=[point_info_nce,gmm_likelihood]", "objectives.gmm_likelihood.weight=0.1"])
    cfg = OmegaConf.to_object(cfg)
    spec = cfg.objectives["gmm_likelihood"]
    # in_channels null: the run fills in the backbone's out_channels (one rule, one place)
    assert spec["in_channels"] is None and spec["weight"] == 0.1 and spec["num_components"] == 32
    objectives, weights = build_objectives(cfg.objectives, cfg.model.out_channels)
    assert weights["point_info_nce"] == 1.0 and weights["gmm_likelihood"] == 0.1
    assert objectives["gmm_likelihood"].head[0].in_features == 24


def tiny_config(root, **kw):
    from mink_ssl.engine.config import ModelConfig, OptimConfig
    from mink_ssl.tasks.pretrain import DataConfig, PretrainConfig

    cfg = PretrainConfig(
        model=ModelConfig(name="Res16UNet14A", out_channels=16),
        data=DataConfig(root=str(root), voxel_size=0.1, num_workers=0, max_matches=1000),
        optim=OptimConfig(lr=0.05), objectives={"gmm_likelihood": {}}, max_iterations=4,
        batch_size=2, device="cpu", checkpoint_every=0, log_every=1, progress=False)
    return replace(cfg, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("objectives", [
    {"gmm_likelihood": {}},
    {"point_info_nce": {"num_matches": 256}, "gmm_likelihood": {"weight": 0.1}},
], ids=["alone", "with_point_info_nce"])
def test_pretrain_runs_with_the_objective(synthetic_pairs, tmp_path, objectives):
    from mink_ssl.models import load_model
    from mink_ssl.tasks.pretrain import pretrain

    logs = []
    backbone = pretrain(tiny_config(synthetic_pairs, objectives=objectives), tmp_path / "run",
                        print_fn=logs.append)
    assert backbone.exists() and backbone.name == "backbone.pth"
    state = torch.load(backbone, weights_only=True)["state_dict"]
    assert not any("head" in k for k in state)  # the GMM head is dropped on export
    assert load_model(backbone).config()["out_channels"] == 16
    assert "4 iterations" in logs[-1]
