"""GMM likelihood of soft point partitions (ParAE, Eckart et al. CVPR 2021, Sec. 3), at point
level on the scene fragments of a pair batch.

ParAE trains a PointNet-style encoder on *single objects*: a head turns each point's feature into
J logits s_ij whose softmax gamma_ij = exp(s_ij) / sum_j' exp(s_ij') is read as a soft partition
of the object's points p_i. The partition defines a Gaussian mixture in closed form
(maximum-likelihood M-step given the posteriors gamma):

    pi_j    = 1/N sum_i gamma_ij                                                      (5)
    mu_j    = 1/(N pi_j) sum_i gamma_ij p_i                                          (6)
    Sigma_j = 1/(N pi_j) sum_i gamma_ij (p_i - mu_j)(p_i - mu_j)^T                   (7)

and the loss is the negative log-likelihood of the points under that mixture,

    -log p(P; Theta) = -sum_i log sum_j pi_j N(p_i; mu_j, Sigma_j)                  (8)-(10)

so the network learns to cut the shape into compact, Gaussian-like parts.

Adaptation here:

- point level on scenes: the head is a per-voxel MLP (Linear(C, H) + BatchNorm + ReLU +
  Linear(H, J), the layers of PointNet's segmentation head that ParAE trains) on the backbone
  features of view 0, and every *scene* of the batch (``batch_index`` of view 0) gets its
  own mixture; the loss is the *mean* (not sum) negative log-likelihood per point of each scene,
  averaged over scenes, so it does not depend on the number of voxels or on the batch size;
- points are the voxel centres in world coordinates (metres, ScanNet's frame), optionally
  centred per scene (the likelihood is translation invariant; centring only helps float32);
- a covariance regulariser ``eps * I`` (default 1e-4 m^2, i.e. 1 cm standard deviation) is added
  to eq. 7: fragments contain planar and linear patches (walls, edges) whose covariance would be
  singular, and a component on one voxel would drive the likelihood to infinity;
- optionally at most ``max_points`` voxels of the batch are used per step (uniformly sampled),
  which bounds the (N, J, 3, 3) memory of the covariance and likelihood evaluation.

Why the head has batch norm (``head_norm``, default true). Uniform posteriors are a stationary
point of the loss: with gamma_ij = 1/J every component is the scene's single Gaussian, and the
derivative of eq. 10 with respect to every logit is exactly zero (all columns of S get the same
gradient, which the softmax removes). Without batch norm the head reads the backbone's
L2-normalised 32-wide features through default-initialised linear layers, so its logits start
with a spread of about 0.05 and gamma within 1% of uniform: training never left that point. In
the synthetic transfer benchmark (Res16UNet14S, 10 cm voxels, SGD 0.1, batch 4, 2,048 voxels)
the loss equalled the one-Gaussian NLL of the same voxels to 4 digits at every logged step
(2.75 to 3.33 from batch to batch: the recorded "3.01 -> 3.28" was batch noise), mean max_j
gamma 0.037 (uniform: 1/32 = 0.031), gradient norms 1e-4 (head) and 1e-3 (backbone). With the
batch norm, the logits start at unit scale and the same run leaves the saddle: means over
blocks of 50 iterations of a 400-iteration run, loss 2.75, 2.43, 2.47, 2.13, 2.07, 1.98, 1.94,
1.65 against a one-Gaussian NLL of 2.99-3.00 in every block (gain 0.25 rising to 1.35 nats),
with 4 to 31 of 32 components active (commands: experiments/synthetic_transfer/README.md).
``head_norm=False`` is the earlier head. ``stat_gmm_gain`` (the one-Gaussian NLL of the same
points minus the loss, 0 at uniform posteriors) tracks learning independently of how spread out
each batch's scenes are, which moves the loss itself by +-0.3.

Everything is vectorised over points, scenes and components (``index_add`` by batch index);
gradients flow from the loss through pi, mu and Sigma into gamma, the head and the backbone.
The likelihood is evaluated stably: Cholesky factors of Sigma, log-determinant from their
diagonal, Mahalanobis distance by triangular solve, log-sum-exp over components.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from mink_ssl.objectives.args import objective_args
from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.defaults import GMMLikelihoodArgs
from mink_ssl.objectives.registry import OBJECTIVES
from mink_ssl.objectives.matches import SeededGenerator, random_subset

_TINY = 1e-12  # floor of a component's total responsibility (an empty component stays finite)


def gmm_parameters(gamma: torch.Tensor, x: torch.Tensor, batch_index: torch.Tensor,
                   num_scenes: int | None = None, eps: float = 1e-4
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-scene mixture parameters of soft partitions, ParAE eqs. 5-7 (+ ``eps * I``).

    Args:
        gamma: (N, J) responsibilities (rows sum to 1).
        x: (N, D) point coordinates.
        batch_index: (N,) int64 scene of each point, in ``[0, num_scenes)``.
        num_scenes: B; ``batch_index.max() + 1`` when ``None``.
        eps: added to the diagonal of every covariance.

    Returns:
        log_pi (B, J), mu (B, J, D), sigma (B, J, D, D), counts (B,) points per scene. Scenes
        without points have count 0 (their parameters are meaningless; callers skip them).
    """
    n, j = gamma.shape
    d = x.shape[1]
    b = int(batch_index.max()) + 1 if num_scenes is None else num_scenes
    x = x.to(gamma.dtype)
    counts = torch.zeros(b, dtype=gamma.dtype, device=gamma.device).index_add_(
        0, batch_index, torch.ones_like(gamma[:, 0]))  # (B,)
    mass = torch.zeros(b, j, dtype=gamma.dtype, device=gamma.device).index_add_(
        0, batch_index, gamma).clamp_min(_TINY)  # (B, J): N pi_j per scene
    log_pi = mass.log() - counts.clamp_min(1).log()[:, None]  # (B, J), eq. 5
    first = torch.zeros(b, j, d, dtype=gamma.dtype, device=gamma.device).index_add_(
        0, batch_index, gamma[:, :, None] * x[:, None, :])  # (B, J, D)
    mu = first / mass[:, :, None]  # (B, J, D), eq. 6
    diff = x[:, None, :] - mu[batch_index]  # (N, J, D)
    outer = diff[:, :, :, None] * diff[:, :, None, :]  # (N, J, D, D)
    second = torch.zeros(b, j, d, d, dtype=gamma.dtype, device=gamma.device).index_add_(
        0, batch_index, gamma[:, :, None, None] * outer)  # (B, J, D, D)
    eye = torch.eye(d, dtype=gamma.dtype, device=gamma.device)
    sigma = second / mass[:, :, None, None] + eps * eye  # (B, J, D, D), eq. 7 + eps I
    return log_pi, mu, sigma, counts


def gmm_log_likelihood(x: torch.Tensor, batch_index: torch.Tensor, log_pi: torch.Tensor,
                       mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log sum_j pi_j N(x_i | mu_j, Sigma_j) of every point under its scene's mixture (eq. 10).

    Args: x (N, D), batch_index (N,), log_pi (B, J), mu (B, J, D), sigma (B, J, D, D).
    Returns: (log-likelihood (N,), log-determinants of Sigma (B, J)).
    """
    d = x.shape[1]
    chol = torch.linalg.cholesky(sigma)  # (B, J, D, D) lower
    logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (B, J)
    diff = (x.to(mu.dtype)[:, None, :] - mu[batch_index])[..., None]  # (N, J, D, 1)
    z = torch.linalg.solve_triangular(chol[batch_index], diff, upper=False)  # (N, J, D, 1)
    mahalanobis = z.square().sum(dim=(-2, -1))  # (N, J)
    log_normal = -0.5 * (d * math.log(2 * math.pi) + logdet[batch_index] + mahalanobis)
    return torch.logsumexp(log_pi[batch_index] + log_normal, dim=1), logdet  # (N,), (B, J)


def gmm_likelihood_loss(gamma: torch.Tensor, x: torch.Tensor, batch_index: torch.Tensor, *,
                        eps: float = 1e-4, center: bool = True) -> dict[str, torch.Tensor]:
    """Mean over scenes of the mean negative log-likelihood of each scene's points under the
    mixture its soft partition ``gamma`` (N, J) defines; ``x`` (N, D), ``batch_index`` (N,).

    Returns ``loss_gmm_likelihood``, ``stat_gmm_active_components`` (mean per scene of the
    components with pi_j > 1/(10 J)), ``stat_gmm_logdet`` (mean log det Sigma_j) and
    ``stat_gmm_gain`` (the same mean NLL under one Gaussian per scene, i.e. uniform posteriors,
    minus the loss: 0 when the partition has learned nothing).
    """
    if gamma.ndim != 2 or x.ndim != 2 or len(gamma) != len(x) or len(x) != len(batch_index):
        raise ValueError(f"expected gamma (N, J), x (N, D), batch_index (N,); got "
                         f"{tuple(gamma.shape)}, {tuple(x.shape)}, {tuple(batch_index.shape)}")
    batch_index = batch_index.long()
    num_scenes = int(batch_index.max()) + 1
    x = x.to(gamma.dtype)
    if center:  # per-scene centroid (constant: no gradient path through x)
        counts = torch.zeros(num_scenes, dtype=x.dtype, device=x.device).index_add_(
            0, batch_index, torch.ones_like(x[:, 0])).clamp_min(1)
        centroid = torch.zeros(num_scenes, x.shape[1], dtype=x.dtype,
                               device=x.device).index_add_(0, batch_index, x) / counts[:, None]
        x = x - centroid[batch_index]
    log_pi, mu, sigma, counts = gmm_parameters(gamma, x, batch_index, num_scenes, eps)
    log_p, logdet = gmm_log_likelihood(x, batch_index, log_pi, mu, sigma)  # (N,), (B, J)
    per_scene = torch.zeros_like(counts).index_add_(0, batch_index, log_p)  # (B,)
    present = counts > 0
    loss = -(per_scene[present] / counts[present]).mean()
    with torch.no_grad():  # the baseline: one Gaussian per scene (uniform posteriors)
        one = gmm_parameters(torch.ones_like(gamma[:, :1]), x, batch_index, num_scenes, eps)
        log_p1 = gmm_log_likelihood(x, batch_index, *one[:3])[0]  # (N,)
        single = torch.zeros_like(counts).index_add_(0, batch_index, log_p1)  # (B,)
        single_nll = -(single[present] / counts[present]).mean()
    j = gamma.shape[1]
    active = (log_pi[present].detach().exp() > 1 / (10 * j)).sum(1).float().mean()
    return {"loss_gmm_likelihood": loss, "stat_gmm_active_components": active,
            "stat_gmm_logdet": logdet[present].detach().mean(),
            "stat_gmm_gain": single_nll - loss.detach()}


@OBJECTIVES.register("gmm_likelihood")
@objective_args(GMMLikelihoodArgs)
class GMMLikelihood(Objective):
    """ParAE's GMM negative log-likelihood of soft partitions, per scene of view 0; its
    arguments, keywords of the constructor: :class:`~mink_ssl.objectives.defaults.GMMLikelihoodArgs`
    (``in_channels`` ``None``: inferred at the first step, a lazy layer: fine on one process,
    but DDP needs it given, as a run does; ``head_norm``: see the module docstring).
    """

    def __init__(self, args: GMMLikelihoodArgs):
        super().__init__()
        in_channels, num_components = args.in_channels, args.num_components
        hidden_channels, eps, max_points = args.hidden_channels, args.eps, args.max_points
        center, seed, head_norm = args.center, args.seed, args.head_norm
        first = (nn.LazyLinear(hidden_channels) if in_channels is None
                 else nn.Linear(in_channels, hidden_channels))
        norm = [nn.BatchNorm1d(hidden_channels)] if head_norm else []
        self.head = nn.Sequential(first, *norm, nn.ReLU(inplace=True),
                                  nn.Linear(hidden_channels, num_components))
        self.head_norm = head_norm
        self.num_components, self.eps, self.center = num_components, eps, center
        self.max_points = max_points or None
        self.generator = SeededGenerator(seed)

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        features = ctx.features(0)  # (N, C)
        view = ctx.batch.views[0]
        world, batch_index = view.world.to(features.device), view.batch_index.to(features.device)
        if self.max_points is not None and len(features) > self.max_points:
            keep = random_subset(len(features), self.max_points,
                                 self.generator(features.device), features.device)  # (K,)
            features, world, batch_index = features[keep], world[keep], batch_index[keep]
        gamma = self.head(features).softmax(dim=1)  # (K, J)
        return gmm_likelihood_loss(gamma, world, batch_index, eps=self.eps, center=self.center)

    def extra_repr(self) -> str:
        return (f"num_components={self.num_components}, eps={self.eps}, "
                f"max_points={self.max_points}, center={self.center}, seed={self.generator.seed}, "
                f"head_norm={self.head_norm}")
