"""Soft clustering with equal-partition pseudo-labels and neural rendering of predicted colours
(CluRender, Mei et al., IJCV 2024), at point level on the scene fragments of a pair batch.

CluRender trains a point encoder on *single objects* with two heads, usable together or apart:

- **soft clustering** (Sec. 4): a cluster head phi_alpha gives scores S = softmax(logits), N x J;
  prototypes are score-weighted means of the points, ``c_j = sum_i s_ij p_i / sum_i s_ij``
  (eq. 2); the stop-gradient costs ``D_ij = |p_i - c_j|^2`` (eq. 4) define an entropic optimal
  transport problem with equal-partition marginals, ``Gamma 1_J = 1_N / N``,
  ``Gamma^T 1_N = 1_J / J`` (eqs. 10-11), solved by Sinkhorn-Knopp (eq. 12, Algorithm 2); the
  soft labels ``gamma = N Gamma`` are the targets of a cross-entropy
  ``L_soft = -1/N sum_ij gamma_ij log s_ij`` (eq. 13), plus the orthogonality regulariser
  ``L_orth = |C*^T C* - E|_F`` of the normalised prototypes, ``L_c = L_soft + omega L_orth``
  with omega = 0.01 (eq. 14);
- **neural rendering** (Sec. 5): a colour head phi_beta predicts an RGB colour per point; a
  differentiable point-splatting renderer (:mod:`mink_ssl.objectives.render`, eq. 15) renders the points
  into the cameras of the RGB frames, and a fitting loss compares the rendering with the real
  frame (eqs. 17-18): an entropic-OT (Sinkhorn) distance between the two images as point sets
  over pixel position and colour with cost ``lambda |x - y|^2 + (1 - lambda) |c - c'|^2``,
  lambda = 0.5.

Adaptation here:

- point level on scenes: both heads are per-voxel MLPs on the sparse UNet's output features of
  each view; the paper's cluster head (three linear layers, LayerNorm + ReLU between them) is
  kept; its colour network (a point-transformer UNet) becomes a two-layer MLP, since the
  backbone already is a UNet. Every (view, scene) of the batch is clustered separately, and
  losses are means over points of each (view, scene), averaged, so they do not depend on the
  batch size (the paper sums over views, eq. 17; we average over rendered images);
- points are the voxels' world coordinates (metres), centred per scene; at most ``max_points``
  voxels per view are clustered per step (uniform sample, seeded);
- **cost scale of Sinkhorn-Knopp.** The paper runs eps = 1e-3 and 20 iterations on raw squared
  distances of objects normalised to the unit sphere (Algorithm 2; its ``exp(D / eps)`` is a sign
  slip for ``exp(-D / eps)``). At that scale the plan is nearly hard and 20 iterations are far
  from converged: on unit-scale scenes with J = 64 we measured equal-partition errors of the
  cluster masses of 50-160 % after 20 iterations. We keep eps = 1e-3 (log space, so nothing
  overflows) but make the cost dimensionless: each (view, scene)'s costs are divided by their
  mean and multiplied by ``cost_scale`` (0.05), i.e. an effective temperature
  eps / cost_scale = 0.02 mean costs, and run 100 iterations. The temperature decides whether
  clustering learns at all: uniform scores make every prototype the scene's centroid, every
  point's costs equal, the labels uniform and the loss's gradient zero, a stationary point
  (tested), and a freshly initialised head is close to it (its scores vary across clusters by a
  logit std of about 0.4). Only a low temperature turns the prototypes' small initial
  separation into labels sharper than the scores. Measured on the synthetic transfer
  benchmark's pairs (Res16UNet14S, SGD 0.1, batch 4; clustering only): the earlier 0.5 mean
  costs (``cost_scale`` 2e-3) gave labels whose largest entry averaged 0.018 (uniform
  1/64 = 0.016) at initialisation and 0.016-0.017 over the benchmark's first 224 steps, with
  ``loss_cluster_soft`` at ln 64 = 4.16 throughout; 0.02 mean costs gave 0.057 at initialisation, 0.26 after 70 steps
  and a loss of 3.69; the paper's sharpness (about 0.0025 mean costs for unit-sphere objects,
  ``cost_scale`` 0.4) made labels nearly hard at once but, unbalanced after 20 iterations,
  let the argmax collapse onto 3-10 of the 64 clusters. At 0.02 mean costs the cluster masses
  are within about 6 % of N/J after 100 iterations (tested; 33 % after 20), the labels' largest
  entry averages about 0.5 on well-separated prototypes, and the result does not depend on the
  scene's size or units.
  The iterations end with the row update, so every point's soft label sums to exactly 1;
- rendering: each view's voxels (with their predicted colours) are rendered into the view's own
  camera and, with ``render_other_view``, into the other view's camera (the pair is two frames of
  one scene), using the frames, intrinsics and poses the dataset adds with ``data.frame_size``.
  The renderer composites over black; the loss compares the coverage-normalised colour
  ``image / coverage`` with the real frame on pixels with coverage >= ``min_coverage`` only
  (pixels without depth, or outside the other view, have nothing to render);
- fitting loss ``'sinkhorn'`` (default): the Sinkhorn divergence of geomloss (debiased entropic
  OT, squared Euclidean cost / 2, ``blur`` in image units) between the rendered and the real
  image, each as ``sinkhorn_pixels`` covered pixels sampled at the same positions (positions
  scaled by 1 / max(h, w), features ``(sqrt(lambda) x, sqrt(1 - lambda) c)`` so the cost is eq.
  18's); ``'l1'``: the mean absolute colour error over covered pixels, a cheaper option.

Returns ``loss_cluster_soft`` (eq. 13), ``loss_cluster_orth`` (omega L_orth), ``loss_render``
(render_weight x fitting loss) and diagnostics ``stat_cluster_max_label``, ``stat_cluster_used``,
``stat_render_coverage``, ``stat_render_l1``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mink_ssl.objectives.args import objective_args
from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.defaults import ClusterRenderArgs
from mink_ssl.objectives.registry import OBJECTIVES
from mink_ssl.objectives.render import splat_points
from mink_ssl.objectives.matches import SeededGenerator, random_subset, zero_loss

# --- soft clustering --------------------------------------------------------------------------


def segment_counts(segment: torch.Tensor, num_segments: int, like: torch.Tensor) -> torch.Tensor:
    """(S,) number of rows of each segment, in ``like``'s dtype and device."""
    return torch.zeros(num_segments, dtype=like.dtype, device=like.device).index_add_(
        0, segment, torch.ones(len(segment), dtype=like.dtype, device=like.device))


def segment_logsumexp(x: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """log sum_{i in segment s} exp(x_ij): (N, J) rows grouped by ``segment`` (N,) -> (S, J)."""
    index = segment[:, None].expand_as(x)
    top = torch.full((num_segments, x.shape[1]), -math.inf, dtype=x.dtype, device=x.device)
    top = top.scatter_reduce(0, index, x, reduce="amax", include_self=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # empty segments
    total = torch.zeros_like(top).index_add_(0, segment, (x - top[segment]).exp())
    return total.log() + top


def prototypes(scores: torch.Tensor, x: torch.Tensor, segment: torch.Tensor,
               num_segments: int) -> torch.Tensor:
    """Score-weighted means of the points per segment, eq. 2: scores (N, J), x (N, D) ->
    (S, J, D). Differentiable w.r.t. ``scores``."""
    mass = torch.zeros(num_segments, scores.shape[1], dtype=scores.dtype,
                       device=scores.device).index_add_(0, segment, scores)  # (S, J)
    first = torch.zeros(num_segments, scores.shape[1], x.shape[1], dtype=scores.dtype,
                        device=scores.device).index_add_(
        0, segment, scores[:, :, None] * x.to(scores.dtype)[:, None, :])  # (S, J, D)
    return first / mass.clamp_min(1e-12)[:, :, None]


@torch.no_grad()
def sinkhorn_soft_labels(cost: torch.Tensor, segment: torch.Tensor, num_segments: int, *,
                         epsilon: float = 1e-3, iterations: int = 100, cost_scale: float = 0.05
                         ) -> torch.Tensor:
    """Equal-partition soft labels by log-space Sinkhorn-Knopp, per segment (eqs. 10-12).

    Each segment's costs are divided by their mean and multiplied by ``cost_scale`` (see the
    module docstring); the plan ``Gamma = diag(u) exp(-cost / epsilon) diag(v)`` is fitted to
    row marginals 1/N_s and column marginals 1/J, ``iterations`` times (columns, then rows).

    Args:
        cost: (N, J) non-negative costs (squared distances to the prototypes).
        segment: (N,) int64 segment of each row (a scene of a view), in ``[0, num_segments)``.

    Returns:
        (N, J) soft labels ``gamma = N_s Gamma``: each row sums to 1, each segment's columns
        sum to N_s / J (up to the convergence of the iterations).
    """
    n, j = cost.shape
    counts = segment_counts(segment, num_segments, cost)  # (S,)
    mean = torch.zeros_like(counts).index_add_(0, segment, cost.sum(1)) / (counts * j).clamp_min(1)
    log_k = -cost / mean.clamp_min(1e-12)[segment, None] * (cost_scale / epsilon)  # (N, J)
    log_rows = -counts.clamp_min(1).log()[segment]  # (N,) log 1/N_s
    log_u = torch.zeros(n, dtype=cost.dtype, device=cost.device)
    log_v = torch.zeros(num_segments, j, dtype=cost.dtype, device=cost.device)
    for _ in range(iterations):
        log_v = -math.log(j) - segment_logsumexp(log_k + log_u[:, None], segment, num_segments)
        log_u = log_rows - torch.logsumexp(log_k + log_v[segment], dim=1)
    log_plan = log_k + log_u[:, None] + log_v[segment]  # (N, J) log Gamma
    return (log_plan - log_rows[:, None]).exp()  # gamma = N_s Gamma


def clustering_loss(logits: torch.Tensor, x: torch.Tensor, segment: torch.Tensor, *,
                    epsilon: float = 1e-3, iterations: int = 100, cost_scale: float = 0.05,
                    orth_weight: float = 0.01) -> dict[str, torch.Tensor]:
    """CluRender's clustering loss L_c = L_soft + omega L_orth (eqs. 2, 4, 12-14), per segment.

    Args:
        logits: (N, J) cluster-head outputs (S = softmax(logits)).
        x: (N, D) point coordinates (centred per segment by the caller or not: D_ij and the
            soft labels do not change; L_orth uses prototypes relative to the segment centroid).
        segment: (N,) int64 segment (scene of a view) of each point.

    Returns ``loss_cluster_soft`` (mean over segments of eq. 13), ``loss_cluster_orth``
    (omega x mean over segments of |C*^T C* - E|_F), ``stat_cluster_max_label`` (mean largest
    soft label) and ``stat_cluster_used`` (clusters that are the argmax of >= 1 point, mean
    over segments).
    """
    if logits.ndim != 2 or x.ndim != 2 or len(logits) != len(x) or segment.shape != (len(x),):
        raise ValueError(f"expected logits (N, J), x (N, D), segment (N,); got "
                         f"{tuple(logits.shape)}, {tuple(x.shape)}, {tuple(segment.shape)}")
    segment = segment.long()
    num_segments = int(segment.max()) + 1
    j = logits.shape[1]
    x = x.to(logits.dtype)
    counts = segment_counts(segment, num_segments, x)  # (S,)
    centroid = torch.zeros(num_segments, x.shape[1], dtype=x.dtype, device=x.device).index_add_(
        0, segment, x) / counts.clamp_min(1)[:, None]
    x = x - centroid[segment]  # constants: the centroid carries no gradient
    log_s = F.log_softmax(logits, dim=1)  # (N, J)
    centres = prototypes(log_s.exp(), x, segment, num_segments)  # (S, J, D), eq. 2
    cost = (x[:, None, :] - centres.detach()[segment]).square().sum(-1)  # (N, J), eq. 4
    gamma = sinkhorn_soft_labels(cost, segment, num_segments, epsilon=epsilon,
                                 iterations=iterations, cost_scale=cost_scale)  # (N, J)
    present = counts > 0
    per_segment = torch.zeros_like(counts).index_add_(0, segment, -(gamma * log_s).sum(1))
    soft = (per_segment[present] / counts[present]).mean()  # eq. 13
    unit = F.normalize(centres[present], dim=2)  # (S', J, D) C*
    gram = unit @ unit.transpose(1, 2)  # (S', J, J)
    eye = torch.eye(j, dtype=gram.dtype, device=gram.device)
    orth = torch.linalg.matrix_norm(gram - eye).mean()  # Frobenius, eq. 14
    hits = torch.zeros(num_segments, j, dtype=torch.bool, device=x.device)
    hits[segment, logits.detach().argmax(1)] = True
    return {"loss_cluster_soft": soft, "loss_cluster_orth": orth_weight * orth,
            "stat_cluster_max_label": gamma.max(1).values.mean(),
            "stat_cluster_used": hits[present].sum(1).float().mean()}


# --- rendering and fitting ---------------------------------------------------------------------


def fitting_l1(rgb: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(I,) mean absolute colour error of rgb vs target (I, h, w, 3) over ``mask`` (I, h, w)."""
    err = (rgb - target).abs().mean(-1) * mask  # (I, h, w)
    return err.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def fitting_sinkhorn(rgb: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                     num_pixels: int = 512, fit_lambda: float = 0.5, blur: float = 0.05,
                     scaling: float = 0.5, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """(I,) Sinkhorn divergence (geomloss) between rendered and real images as point sets of
    ``num_pixels`` pixels sampled in ``mask`` (I, h, w) (with replacement, the same positions in
    both), features ``(sqrt(lambda) (u, v) / max(h, w), sqrt(1 - lambda) rgb)`` (eq. 18's cost).
    Every image needs at least one masked pixel."""
    try:
        from geomloss import SamplesLoss
    except ImportError as e:  # pragma: no cover - geomloss is a dependency of mink-ssl
        raise ImportError("the 'sinkhorn' fitting loss needs geomloss: `pip install geomloss`, "
                          "or use fitting_loss='l1'") from e
    h, w = mask.shape[1:]
    pick = torch.multinomial(mask.flatten(1).float(), num_pixels, replacement=True,
                             generator=generator)  # (I, S) flat pixel indices
    pos = torch.stack([pick % w, torch.div(pick, w, rounding_mode="floor")], -1)  # (I, S, 2)
    pos = pos.to(rgb.dtype) / max(h, w) * math.sqrt(fit_lambda)
    take = pick[:, :, None].expand(-1, -1, 3)
    a = torch.cat([pos, rgb.flatten(1, 2).gather(1, take) * math.sqrt(1 - fit_lambda)], -1)
    b = torch.cat([pos, target.flatten(1, 2).gather(1, take) * math.sqrt(1 - fit_lambda)], -1)
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, backend="tensorized")
    return loss(a, b)  # (I,)


# --- the objective -----------------------------------------------------------------------------


def _mlp(in_channels: int | None, hidden: int, out: int, layers: int) -> nn.Sequential:
    """``layers`` linear layers, LayerNorm + ReLU after all but the last (paper's phi_alpha)."""
    mods: list[nn.Module] = []
    width = in_channels
    for _ in range(layers - 1):
        mods += [nn.LazyLinear(hidden) if width is None else nn.Linear(width, hidden),
                 nn.LayerNorm(hidden), nn.ReLU(inplace=True)]
        width = hidden
    mods.append(nn.LazyLinear(out) if width is None else nn.Linear(width, out))
    return nn.Sequential(*mods)


@OBJECTIVES.register("cluster_render")
@objective_args(ClusterRenderArgs)
class ClusterRender(Objective):
    """CluRender's soft clustering and neural rendering of both views (see the module docstring);
    its arguments, keywords of the constructor:
    :class:`~mink_ssl.objectives.defaults.ClusterRenderArgs` (``in_channels`` ``None``: inferred
    at the first step, lazy layers that DDP needs given, as a run does; ``radius``, ``sigma``,
    ``k``, ``eta``: see :func:`mink_ssl.objectives.render.splat_points`; ``cost_scale``: the
    module docstring says why not softer).
    """

    def __init__(self, args: ClusterRenderArgs):
        super().__init__()
        a = args
        in_channels, clustering, rendering = a.in_channels, a.clustering, a.rendering
        num_clusters, hidden_channels, epsilon = a.num_clusters, a.hidden_channels, a.epsilon
        sinkhorn_iterations, cost_scale = a.sinkhorn_iterations, a.cost_scale
        orth_weight, max_points, views = a.orth_weight, a.max_points, a.views
        render_other_view, radius, sigma, k, eta = (a.render_other_view, a.radius, a.sigma, a.k,
                                                    a.eta)
        fitting_loss, render_weight, fit_lambda = a.fitting_loss, a.render_weight, a.fit_lambda
        sinkhorn_pixels, sinkhorn_blur = a.sinkhorn_pixels, a.sinkhorn_blur
        sinkhorn_scaling, min_coverage, seed = a.sinkhorn_scaling, a.min_coverage, a.seed
        views = tuple(int(v) for v in views)
        # each value's type and range: ClusterRenderArgs (checked before this runs); here what
        # involves more than one value
        if not (clustering or rendering):
            raise ValueError(f"cluster_render: clustering or rendering must be True for at least "
                             f"one part, got {(clustering, rendering)!r}")
        if not views or len(set(views)) != len(views):
            raise ValueError(f"cluster_render: views must be distinct view indices among (0, 1), "
                             f"got {list(views)!r}")
        self.clustering, self.rendering = clustering, rendering
        self.num_clusters, self.epsilon = num_clusters, epsilon
        self.iterations = sinkhorn_iterations
        self.cost_scale, self.orth_weight = cost_scale, orth_weight
        self.max_points, self.views = max_points or None, views
        self.render_other_view = render_other_view
        self.radius, self.sigma, self.k, self.eta = radius, sigma, k, eta
        self.fitting_loss, self.render_weight = fitting_loss, render_weight
        self.fit_lambda = fit_lambda
        self.sinkhorn_pixels, self.sinkhorn_blur = sinkhorn_pixels, sinkhorn_blur
        self.sinkhorn_scaling, self.min_coverage = sinkhorn_scaling, min_coverage
        self.generator = SeededGenerator(seed)
        if clustering:
            self.cluster_head = _mlp(in_channels, hidden_channels, num_clusters, layers=3)
        if rendering:
            self.color_head = _mlp(in_channels, hidden_channels, 3, layers=2)

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.rendering:  # check the batch before any work
            self._check_frames(ctx.batch)
        if self.clustering:
            out.update(self._cluster(ctx))
        if self.rendering:
            out.update(self._render(ctx))
        return out

    def _cluster(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        logits, world, segment = [], [], []
        num_scenes = max(int(ctx.batch.views[v].batch_index.max()) + 1 for v in self.views)
        for block, v in enumerate(self.views):
            features = ctx.features(v)  # (N_v, C)
            view = ctx.batch.views[v]
            x, index = view.world.to(features.device), view.batch_index.to(features.device)
            if self.max_points is not None and len(features) > self.max_points:
                keep = random_subset(len(features), self.max_points,
                                     self.generator(features.device), features.device)
                features, x, index = features[keep], x[keep], index[keep]
            logits.append(self.cluster_head(features))  # (K_v, J)
            world.append(x)
            segment.append(index + block * num_scenes)  # (view, scene) segments
        return clustering_loss(torch.cat(logits), torch.cat(world), torch.cat(segment),
                               epsilon=self.epsilon, iterations=self.iterations,
                               cost_scale=self.cost_scale, orth_weight=self.orth_weight)

    @staticmethod
    def _check_frames(batch) -> None:
        missing = [v for v, view in enumerate(batch.views) if not view.has_frames]
        if missing:
            raise ValueError(
                f"cluster_render renders into the RGB frames of the views, but view(s) {missing} "
                "of the batch carry no frames, intrinsics and poses: set data.frame_size "
                "(e.g. data.frame_size=[60,80]; PairDataset(frame_size=(60, 80))), or turn "
                "rendering off with objectives.cluster_render.rendering=false")

    def _render(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        views = ctx.batch.views
        frames0 = views[0].frames
        num_scenes, h, w = frames0.shape[0], frames0.shape[1], frames0.shape[2]
        points, colors, image, cams = [], [], [], []
        for v in self.views:
            features = ctx.features(v)  # (N_v, C)
            device = features.device
            rgb = torch.sigmoid(self.color_head(features))  # (N_v, 3) in [0, 1]
            index = views[v].batch_index.to(device)
            if len(index) and int(index.max()) >= num_scenes:
                raise ValueError(f"view {v} has scenes up to {int(index.max())} but the batch "
                                 f"carries {num_scenes} frames")
            for cam in ((v, 1 - v) if self.render_other_view else (v,)):
                points.append(views[v].world.to(device))
                colors.append(rgb)
                image.append(index + len(cams) * num_scenes)  # image = (block, scene)
                cams.append(cam)
        device = colors[0].device
        world_to_camera = torch.cat([torch.linalg.inv(views[c].poses.to(device).float())
                                     for c in cams])  # (I, 4, 4)
        intrinsics = torch.cat([views[c].intrinsics.to(device).float() for c in cams])
        target = torch.cat([views[c].frames.to(device) for c in cams]).float() / 255  # (I,h,w,3)
        rendering = splat_points(torch.cat(points), torch.cat(colors), torch.cat(image),
                                  world_to_camera, intrinsics, (h, w), radius=self.radius,
                                  sigma=self.sigma, k=self.k, eta=self.eta)
        coverage = rendering.coverage  # (I, h, w)
        mask = coverage.detach() >= self.min_coverage
        rgb = rendering.images / coverage.clamp_min(1e-6)[..., None]  # un-premultiplied colour
        used = mask.flatten(1).any(1)  # images with something to compare
        l1 = fitting_l1(rgb, target, mask)  # (I,)
        if not bool(used.any()):
            fit = zero_loss(*colors)
        elif self.fitting_loss == "l1":
            fit = l1[used].mean()
        else:
            fit = fitting_sinkhorn(rgb[used], target[used], mask[used],
                                   num_pixels=self.sinkhorn_pixels, fit_lambda=self.fit_lambda,
                                   blur=self.sinkhorn_blur, scaling=self.sinkhorn_scaling,
                                   generator=self.generator(device)).mean()
        stat_l1 = l1[used].detach().mean() if bool(used.any()) else l1.new_zeros(())
        return {"loss_render": self.render_weight * fit,
                "stat_render_coverage": mask.float().mean(),
                "stat_render_l1": stat_l1}

    def extra_repr(self) -> str:
        return (f"clustering={self.clustering}, rendering={self.rendering}, "
                f"num_clusters={self.num_clusters}, epsilon={self.epsilon}, "
                f"cost_scale={self.cost_scale}, fitting_loss={self.fitting_loss!r}, "
                f"views={self.views}, render_other_view={self.render_other_view}, "
                f"seed={self.generator.seed}")

