"""Shape-context PointInfoNCE (Contrastive Scene Contexts, Hou et al. CVPR 2021).

PointInfoNCE (see ``point_info_nce.py``) contrasts each anchor against every other sampled
match. Contrastive Scene Contexts splits the space around each anchor into shape-context
partitions and runs one InfoNCE per partition, so each anchor is contrasted separately with the
points of every region around it instead of a softmax dominated by wherever most points lie.

What the released code does (facebookresearch/ContrastiveSceneContexts,
``pretrain/contrastive_scene_contexts/lib/shape_context.py``, ``PartitionPointNCELossTrainer`` in
``lib/ddp_trainer.py`` and ``scripts/pretrain_sparseconv.sh``), our default:

- anchors: one random match per view-0 voxel, then up to ``npos = 4096`` of them **per scene**
  (the trainer loops over the scenes of the batch); negatives come from the anchor's scene only;
- positions: view 0's voxel coordinates with the view's augmentation undone (``world_space``),
  in voxel units; we read ``views[0].world`` (metres, the frame before the view's transform);
- partitions of point j around anchor i, from ``xyz[j] - xyz[i]`` and its length d, with the
  script's ``r1 = 2`` and ``r2 = 20`` **voxels** (2.5 cm voxels: 0.05 m and 0.5 m, our
  ``inner_radius`` / ``outer_radius`` in metres; scale them with the voxel size):

  - ``"csc4"`` (the script: ``fast_partition=True``, ``compute_partitions_fast``): 2 rings
    (r1 < d <= r2, d > r2) x {dz > 0, dz < 0} = 4 partitions; dz == 0 (the same height) and
    d <= r1 are in no partition; nothing depends on the direction in the xy-plane;
  - ``"csc8"`` (``compute_partitions``, the released ``partition8`` checkpoints): 2 rings
    (r1 <= d < r2, d >= r2) x 2 bins of atan2(dy, dx) in [0, 2 pi) x 2 bins of atan2(dy, dz)
    mod pi, i.e. the octants of sign(dy) x sign(dz); d < r1 is in no partition;
- loss: for each scene s and partition p, the cross-entropy of the positive against the
  negatives in p, averaged over *all* the scene's anchors (an anchor with no negative in p has
  only its positive in the softmax and counts 0), then ``sum_s sum_p CE_sp / (P * B)`` with B
  the pairs in the batch;
- temperature 0.4 (the script's ``nceT``); features L2-normalised (the released network's
  ``normalize_feature``).

Named options (ours):

- ``partitions="sectors"``: ``n_radial`` rings (edges geometric between the radii) x
  ``n_angular`` sectors of atan2(dy, dx) around gravity z, so a point's height never changes
  its sector. Why: indoor scenes are laid out around the vertical axis; csc4 ignores the
  horizontal direction altogether and drops every point at the anchor's height.
- ``reduction="nonempty"``: per partition, the mean over the anchors that have a negative there,
  then the mean over the non-empty partitions of the batch. Why: anchors with nothing to
  contrast do not dilute the loss, and empty partitions do not shrink it.

Still different from the released code: the sampled matches are one-to-one in view 1 as well
(see ``sampling.one_to_one_matches``); CSC keeps one per view-0 voxel only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mink_ssl.objectives.args import objective_args
from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.defaults import PARTITION_MODES, REDUCTIONS, ShapeContextNCEArgs
from mink_ssl.objectives.registry import OBJECTIVES
from mink_ssl.objectives.matches import (SeededGenerator, check_match_rows, check_nce_args,
                                         one_to_one_matches, zero_loss)

def radial_edges(n_radial: int, inner_radius: float, outer_radius: float,
                 device: torch.device | None = None) -> torch.Tensor:
    """Lower edges (n_radial,) of the radial bins in metres; the last bin is open."""
    if n_radial == 1:
        return torch.tensor([inner_radius], device=device)
    ratio = outer_radius / inner_radius
    return torch.tensor([inner_radius * ratio ** (b / (n_radial - 1)) for b in range(n_radial)],
                        device=device)


def _relative(xyz: torch.Tensor, inner_radius: float, outer_radius: float):
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape (K, 3), got {tuple(xyz.shape)}")
    if not 0 < inner_radius < outer_radius:
        raise ValueError(f"need 0 < inner_radius < outer_radius, got {inner_radius}, "
                         f"{outer_radius}")
    xyz = xyz.float()
    rel = xyz[None, :, :] - xyz[:, None, :]  # (K, K, 3): xyz[j] - xyz[i]
    dist = torch.sqrt((rel * rel).sum(2))  # (K, K)
    return rel[..., 0], rel[..., 1], rel[..., 2], dist


def _finish(partition: torch.Tensor, invalid: torch.Tensor,
            batch_index: torch.Tensor | None) -> torch.Tensor:
    invalid = invalid | torch.eye(len(partition), dtype=torch.bool, device=partition.device)
    if batch_index is not None:
        invalid |= batch_index[None, :] != batch_index[:, None]
    return partition.masked_fill(invalid, -1)


def csc_partition(xyz: torch.Tensor, batch_index: torch.Tensor | None = None, *,
                  mode: str = "csc4", inner_radius: float = 0.05,
                  outer_radius: float = 0.5) -> torch.Tensor:
    """The released code's partitions (K, K) int64 of every point j around every anchor i.

    ``mode="csc4"``: ``2 * ring + (0 if dz > 0 else 1)``, rings r1 < d <= r2 and d > r2;
    ``mode="csc8"``: ``4 * ring + 2 * bin(atan2(dy, dx)) + bin(atan2(dy, dz) mod pi)``, rings
    r1 <= d < r2 and d >= r2. -1 where j is not a negative of i (see the module docstring),
    j == i, or another scene (``batch_index`` (K,)).
    """
    dx, dy, dz, dist = _relative(xyz, inner_radius, outer_radius)
    if mode == "csc4":
        ring = (dist > outer_radius).long()  # (K, K)
        partition = 2 * ring + (dz < 0).long()
        invalid = (dist <= inner_radius) | (dz == 0)
    elif mode == "csc8":
        ring = (dist >= outer_radius).long()
        two_pi = 2 * math.pi
        angle_xy = torch.fmod(torch.atan2(dy, dx) + two_pi, two_pi)  # [0, 2 pi)
        angle_zy = torch.fmod(torch.atan2(dy, dz) + two_pi, math.pi)  # [0, pi)
        bin_xy = torch.floor(angle_xy / math.pi).long().clamp(0, 1)
        bin_zy = torch.floor(angle_zy / (math.pi / 2)).long().clamp(0, 1)
        partition = 4 * ring + 2 * bin_xy + bin_zy
        invalid = dist < inner_radius
    else:
        raise ValueError(f"mode must be 'csc4' or 'csc8', got {mode!r}")
    return _finish(partition, invalid, batch_index)


def shape_context_partition(xyz: torch.Tensor, batch_index: torch.Tensor | None = None, *,
                            n_radial: int = 2, n_angular: int = 4, inner_radius: float = 0.05,
                            outer_radius: float = 0.5) -> torch.Tensor:
    """Our ``sectors`` partition (K, K) int64 of every point j relative to every anchor i.

    ``xyz`` (K, 3): world coordinates (metres, z up) of the sampled anchors. Entry [i, j] is
    ``radial_bin * n_angular + angular_bin`` of ``xyz[j] - xyz[i]``, or -1 where j is not a
    negative of i: j == i, closer than ``inner_radius``, or another scene (``batch_index`` (K,)).

    angular bin: floor(atan2(dy, dx) mod 2 pi / (2 pi / n_angular)), i.e. sectors around z
    starting at +x; radial bin: number of edges of :func:`radial_edges` <= |xyz[j] - xyz[i]|,
    minus one.
    """
    dx, dy, _, dist = _relative(xyz, inner_radius, outer_radius)
    angle = torch.remainder(torch.atan2(dy, dx), 2 * math.pi)  # (K, K) in [0, 2 pi]
    angular_bin = torch.floor(angle / (2 * math.pi / n_angular)).long().clamp(0, n_angular - 1)
    edges = radial_edges(n_radial, inner_radius, outer_radius, xyz.device)  # (R,)
    radial_bin = torch.searchsorted(edges, dist, right=True) - 1  # (K, K), -1 below inner_radius
    return _finish(radial_bin * n_angular + angular_bin, radial_bin < 0, batch_index)


def partition_cross_entropy(q: torch.Tensor, k: torch.Tensor, partition: torch.Tensor,
                            n_partitions: int, temperature: float = 0.4
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (anchor, partition) InfoNCE for queries ``q`` (K, C) and keys ``k`` (K, C).

    ``partition`` (K, K) int64: partition of key j for anchor i, -1 if j is never its negative;
    row m's positive is key m. Returns ``loss`` (K, P) (-log softmax of the positive among it
    and the partition's negatives; 0 where there is no negative), ``count`` (K, P) negatives,
    and ``correct`` (K, P) bool (the positive beats every negative). One scatter over the valid
    entries of the (K, K) logits, no loop over partitions.
    """
    K, P = len(q), n_partitions
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.t() / temperature  # (K, K)
    pos = logits.diagonal()  # (K,)

    valid = partition >= 0  # (K, K)
    rows = torch.arange(K, device=q.device)[:, None].expand(K, K)[valid]  # (V,)
    seg = rows * P + partition[valid]  # (V,) index of (anchor, partition) in a flat (K * P)
    neg = logits[valid]  # (V,)

    # log(exp(pos) + sum exp(neg)) per (anchor, partition), shifted by its max for stability
    pos_kp = pos[:, None].expand(K, P).reshape(-1)  # (K * P,)
    shift = pos_kp.detach().scatter_reduce(0, seg, neg.detach(), reduce="amax", include_self=True)
    neg_sum = torch.zeros(K * P, dtype=logits.dtype, device=q.device)
    neg_sum = neg_sum.index_add(0, seg, torch.exp(neg - shift[seg]))  # (K * P,)
    log_denominator = torch.log(torch.exp(pos_kp - shift) + neg_sum) + shift  # (K * P,)
    count = torch.bincount(seg, minlength=K * P).view(K, P)  # negatives per (anchor, partition)
    loss = torch.where(count > 0, (log_denominator - pos_kp).view(K, P), 0)  # (K, P)

    hardest = torch.full((K * P,), -math.inf, dtype=logits.dtype, device=q.device)
    hardest = hardest.scatter_reduce(0, seg, neg.detach(), reduce="amax").view(K, P)
    correct = (pos.detach()[:, None] > hardest) & (count > 0)
    return loss, count, correct


def reduce_partitions(loss: torch.Tensor, count: torch.Tensor, scene: torch.Tensor,
                      num_scenes: int, reduction: str = "csc") -> torch.Tensor:
    """Scalar loss from the per (anchor, partition) terms ``loss``/``count`` (K, P).

    ``"csc"``: ``sum_s sum_p mean_{anchors i of scene s} loss[i, p] / (P * num_scenes)`` (anchors
    without negatives count 0); ``"nonempty"``: per partition, the mean over anchors with
    negatives, then the mean over non-empty partitions. ``scene`` (K,) int64: anchor's scene.
    """
    K, P = loss.shape
    if reduction == "csc":
        per_scene = torch.bincount(scene, minlength=num_scenes).to(loss.dtype)  # (B,)
        weight = 1.0 / per_scene[scene]  # (K,)
        return (loss.sum(1) * weight).sum() / (P * num_scenes)
    has = count > 0  # (K, P)
    anchors = has.sum(0)  # (P,)
    per_partition = loss.sum(0) / anchors.clamp(min=1)  # (P,)
    used = anchors > 0
    return per_partition[used].mean() if bool(used.any()) else loss.sum() * 0


def partitioned_info_nce_loss(q: torch.Tensor, k: torch.Tensor, partition: torch.Tensor,
                              n_partitions: int, temperature: float = 0.4,
                              reduction: str = "csc", scene: torch.Tensor | None = None,
                              num_scenes: int = 1
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One InfoNCE per partition (see :func:`partition_cross_entropy`) reduced with
    :func:`reduce_partitions` (``scene`` defaults to one scene). Returns (loss, detached stats)."""
    loss_kp, count, correct = partition_cross_entropy(q, k, partition, n_partitions, temperature)
    if scene is None:
        scene = torch.zeros(len(q), dtype=torch.long, device=q.device)
    loss = reduce_partitions(loss_kp, count, scene, num_scenes, reduction)
    return loss, _stats(count, correct)


def _stats(count: torch.Tensor, correct: torch.Tensor) -> dict[str, torch.Tensor]:
    has = count > 0
    return {
        "stat_accuracy": correct.sum() / has.sum().clamp(min=1),
        "stat_partitions_used": (has.sum(0) > 0).sum().float(),
        "stat_negatives_per_partition": count[has].float().mean() if bool(has.any())
        else count.new_zeros((), dtype=torch.float),
    }


def sample_per_scene(matches: torch.Tensor, scene: torch.Tensor, num: int,
                     generator: torch.Generator | None) -> torch.Tensor:
    """Up to ``num`` one-to-one matches (K, 2) per scene, grouped by scene.

    ``scene`` (N0,) int64: the scene of each view-0 row. Shuffle the one-to-one matches, sort
    them stably by scene and keep the first ``num`` of each scene.
    """
    unique = one_to_one_matches(matches, generator)  # (U, 2)
    unique = unique[torch.randperm(len(unique), generator=generator, device=matches.device)]
    s = scene[unique[:, 0]]  # (U,)
    order = torch.sort(s, stable=True).indices
    unique, s = unique[order], s[order]
    first = torch.searchsorted(s, s)  # (U,) start of each match's scene run
    rank = torch.arange(len(s), device=s.device) - first
    return unique[rank < num]


def shape_context_nce_loss(f0: torch.Tensor, f1: torch.Tensor, matches: torch.Tensor,
                           world0: torch.Tensor, batch_index0: torch.Tensor, *,
                           num_matches_per_scene: int = 4096, temperature: float = 0.4,
                           partitions: str = "csc4", reduction: str = "csc", n_radial: int = 2,
                           n_angular: int = 4, inner_radius: float = 0.05,
                           outer_radius: float = 0.5,
                           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Shape-context PointInfoNCE on features ``f0`` (N0, C), ``f1`` (N1, C), ``matches`` (M, 2),
    with view 0's world coordinates ``world0`` (N0, 3) and scene of each row ``batch_index0`` (N0,).

    The scenes (pairs) of the batch are ``batch_index0.max() + 1``. Returns
    ``loss_shape_context_nce``, ``stat_accuracy`` (fraction of (anchor, partition) pairs with
    negatives whose positive beats them all), ``stat_partitions_used``,
    ``stat_negatives_per_partition`` and ``stat_num_matches`` (0: nothing to contrast, the loss
    is a zero connected to the features).
    """
    check_shape_context_args(partitions, reduction, n_radial, n_angular, inner_radius,
                             outer_radius)
    device = f0.device
    matches = check_match_rows(matches.to(device), len(f0), len(f1))
    batch_index0 = batch_index0.to(device).long()
    sample = sample_per_scene(matches, batch_index0, num_matches_per_scene, generator)  # (K, 2)
    num = torch.tensor(float(len(sample)), device=device)
    if len(sample) == 0:
        zero = zero_loss(f0, f1)
        stat = zero.detach()
        return {"loss_shape_context_nce": zero, "stat_accuracy": stat,
                "stat_partitions_used": stat, "stat_negatives_per_partition": stat,
                "stat_num_matches": num}
    P = {"csc4": 4, "csc8": 8}.get(partitions, n_radial * n_angular)
    i, j = sample[:, 0], sample[:, 1]
    scene = batch_index0[i]  # (K,) sorted
    xyz = world0.to(device)[i]
    losses, counts, corrects = [], [], []
    for s in torch.unique_consecutive(scene).tolist():  # (K_s, K_s) per scene, as CSC loops
        rows = (scene == s).nonzero()[:, 0]
        if partitions == "sectors":
            part = shape_context_partition(xyz[rows], n_radial=n_radial, n_angular=n_angular,
                                           inner_radius=inner_radius, outer_radius=outer_radius)
        else:
            part = csc_partition(xyz[rows], mode=partitions, inner_radius=inner_radius,
                                 outer_radius=outer_radius)
        out = partition_cross_entropy(f0[i[rows]], f1[j[rows]], part, P, temperature)
        for acc, value in zip((losses, counts, corrects), out):
            acc.append(value)
    loss_kp, count, correct = (torch.cat(v) for v in (losses, counts, corrects))
    num_scenes = int(batch_index0.max()) + 1
    loss = reduce_partitions(loss_kp, count, scene, num_scenes, reduction)
    return {"loss_shape_context_nce": loss, **_stats(count, correct), "stat_num_matches": num}


def check_shape_context_args(partitions: str, reduction: str, n_radial: int, n_angular: int,
                             inner_radius: float, outer_radius: float) -> None:
    """``ValueError`` naming the bad argument and its valid choices."""
    if partitions not in PARTITION_MODES:
        raise ValueError(f"partitions must be one of {PARTITION_MODES}, got {partitions!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if n_radial < 1 or n_angular < 1:
        raise ValueError(f"n_radial and n_angular must be >= 1, got {n_radial}, {n_angular}")
    if not 0 < inner_radius < outer_radius:
        raise ValueError(f"need 0 < inner_radius < outer_radius, got {inner_radius}, "
                         f"{outer_radius}")


@OBJECTIVES.register("shape_context_nce")
@objective_args(ShapeContextNCEArgs)
class ShapeContextNCE(Objective):
    """Contrastive Scene Contexts' partitioned PointInfoNCE on a :class:`PairBatch`; its
    arguments, keywords of the constructor:
    :class:`~mink_ssl.objectives.defaults.ShapeContextNCEArgs` (``reduction``: see
    :func:`reduce_partitions`).
    """

    def __init__(self, args: ShapeContextNCEArgs):
        super().__init__()
        num_matches_per_scene, temperature = args.num_matches_per_scene, args.temperature
        partitions, reduction = args.partitions, args.reduction
        n_radial, n_angular = args.n_radial, args.n_angular
        inner_radius, outer_radius, seed = args.inner_radius, args.outer_radius, args.seed
        check_nce_args(num_matches_per_scene, temperature)
        check_shape_context_args(partitions, reduction, n_radial, n_angular, inner_radius,
                                 outer_radius)
        self.num_matches_per_scene, self.temperature = num_matches_per_scene, temperature
        self.partitions, self.reduction = partitions, reduction
        self.n_radial, self.n_angular = n_radial, n_angular
        self.inner_radius, self.outer_radius = inner_radius, outer_radius
        self.generator = SeededGenerator(seed)

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        f0, f1 = ctx.features(0), ctx.features(1)
        view0 = ctx.batch.views[0]
        return shape_context_nce_loss(
            f0, f1, ctx.batch.matches, view0.world, view0.batch_index,
            num_matches_per_scene=self.num_matches_per_scene, temperature=self.temperature,
            partitions=self.partitions, reduction=self.reduction, n_radial=self.n_radial,
            n_angular=self.n_angular, inner_radius=self.inner_radius,
            outer_radius=self.outer_radius, generator=self.generator(f0.device))

    def extra_repr(self) -> str:
        return (f"num_matches_per_scene={self.num_matches_per_scene}, "
                f"temperature={self.temperature}, partitions={self.partitions!r}, "
                f"reduction={self.reduction!r}, n_radial={self.n_radial}, "
                f"n_angular={self.n_angular}, inner_radius={self.inner_radius}, "
                f"outer_radius={self.outer_radius}, seed={self.generator.seed}")
