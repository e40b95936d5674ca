"""Shape-context PointInfoNCE (Contrastive Scene Contexts, Hou et al. CVPR 2021).

PointInfoNCE (see ``point_info_nce.py``) contrasts each anchor against every other sampled
match. Contrastive Scene Contexts splits the space around each anchor into shape-context
partitions and runs one InfoNCE per partition, so each anchor is contrasted separately with the
points of every region around it (near and far, in every direction) instead of a softmax
dominated by wherever most points happen to lie.

For anchor i with positive key k_i and partition p, let N_p(i) be the other sampled points that
fall in partition p of i (relative position in world coordinates, see
:func:`shape_context_partition`):

    L_p = - 1/|A_p| sum_{i in A_p} log( exp(q_i . k_i / tau)
                      / (exp(q_i . k_i / tau) + sum_{j in N_p(i)} exp(q_i . k_j / tau)) )
    L   = mean of L_p over the partitions p whose A_p is not empty

with A_p the anchors that have at least one negative in partition p, q = f0 and k = f1 of the
sampled matches, features L2-normalised. Negatives come from the anchor's own scene only.

Facts taken from the CSC code (facebookresearch/ContrastiveSceneContexts,
``pretrain/contrastive_scene_contexts/lib/shape_context.py``, ``lib/ddp_trainer.py`` and
``scripts/pretrain_sparseconv.sh``), and how they were adapted:

- radial bins are *fixed radii*, not relative to the distance distribution: a point at 3-D
  distance d from the anchor is in the inner bin for r1 <= d < r2 and in the outer bin for
  d >= r2; points closer than r1 are in no partition (never negatives). The released script
  uses r1 = 2, r2 = 20 in voxel units at a 2.5 cm voxel, i.e. 0.05 m and 0.5 m, our defaults
  ``inner_radius`` and ``outer_radius`` (in metres, on world coordinates). For ``n_radial > 2``
  we add edges spaced geometrically between the two (log-polar, as in the classic shape
  context); ``n_radial = 2`` is exactly CSC's split;
- angles: CSC bins atan2(dy, dx) in [0, 2 pi) into ``nbins_xy`` equal sectors (bin 0 starts at
  +x, counter-clockwise) and, separately, an angle in the zy-plane into ``nbins_zy`` bins (the
  script: 2 x 2 angular x 2 radial = 8 partitions). We keep only the xy sectors, measured
  around the gravity axis z of ScanNet's world frame, with ``n_angular = 4`` (2 radial x 4
  angular = 8 partitions as well), so a point's height never changes its angular bin;
- partition id = radial_bin * n_angular + angular_bin, as CSC hashes (distance bin, angle bin);
- CSC measures positions on view 0's voxel coordinates with the view's augmentation undone; we
  read ``views[0].world`` (metres; also the frame before the view's transform);
- temperature 0.4 and 4096 sampled matches (the script's ``nceT`` and ``npos``);
- CSC keeps one random match per view-0 voxel; we also keep one per view-1 voxel (see
  ``point_info_nce.py``);
- CSC samples ``npos`` anchors *per scene* and loops over scenes; we sample ``num_matches`` over
  the whole batch and mask pairs of different scenes in one (K, K) computation, so the anchors
  per scene are about num_matches / batch size (raise ``num_matches`` to match CSC; memory is
  O(num_matches^2));
- CSC averages each partition's cross-entropy over all anchors, counting anchors with no
  negative in that partition as loss 0; we skip those anchors, and skip empty partitions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.registry import OBJECTIVES
from mink_ssl.objectives.sampling import (SeededGenerator, check_matches, check_nce_args,
                                         sample_matches, zero_loss)


def radial_edges(n_radial: int, inner_radius: float, outer_radius: float,
                 device: torch.device | None = None) -> torch.Tensor:
    """Lower edges (n_radial,) of the radial bins in metres; the last bin is open."""
    if n_radial == 1:
        return torch.tensor([inner_radius], device=device)
    ratio = outer_radius / inner_radius
    return torch.tensor([inner_radius * ratio ** (b / (n_radial - 1)) for b in range(n_radial)],
                        device=device)


def shape_context_partition(xyz: torch.Tensor, batch_index: torch.Tensor | None = None, *,
                            n_radial: int = 2, n_angular: int = 4, inner_radius: float = 0.05,
                            outer_radius: float = 0.5) -> torch.Tensor:
    """Shape-context partition (K, K) int64 of every point j relative to every anchor i.

    ``xyz`` (K, 3): world coordinates (metres, z up) of the sampled anchors. Entry [i, j] is
    ``radial_bin * n_angular + angular_bin`` of ``xyz[j] - xyz[i]``, or -1 where j is not a
    negative of i: j == i, closer than ``inner_radius``, or another scene (``batch_index`` (K,)).

    angular bin: floor(atan2(dy, dx) mod 2 pi / (2 pi / n_angular)), i.e. sectors around z
    starting at +x; radial bin: number of edges of :func:`radial_edges` <= |xyz[j] - xyz[i]|,
    minus one.
    """
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must have shape (K, 3), got {tuple(xyz.shape)}")
    if not 0 < inner_radius < outer_radius:
        raise ValueError(f"need 0 < inner_radius < outer_radius, got {inner_radius}, "
                         f"{outer_radius}")
    xyz = xyz.float()
    dx = xyz[None, :, 0] - xyz[:, None, 0]  # (K, K): x_j - x_i
    dy = xyz[None, :, 1] - xyz[:, None, 1]  # (K, K)
    dz = xyz[None, :, 2] - xyz[:, None, 2]  # (K, K)
    dist = torch.sqrt(dx * dx + dy * dy + dz * dz)  # (K, K)
    angle = torch.remainder(torch.atan2(dy, dx), 2 * math.pi)  # (K, K) in [0, 2 pi]
    angular_bin = torch.floor(angle / (2 * math.pi / n_angular)).long().clamp(0, n_angular - 1)
    edges = radial_edges(n_radial, inner_radius, outer_radius, xyz.device)  # (R,)
    radial_bin = torch.searchsorted(edges, dist, right=True) - 1  # (K, K), -1 below inner_radius
    partition = radial_bin * n_angular + angular_bin  # (K, K)
    invalid = radial_bin < 0
    invalid |= torch.eye(len(xyz), dtype=torch.bool, device=xyz.device)
    if batch_index is not None:
        invalid |= batch_index[None, :] != batch_index[:, None]
    return partition.masked_fill(invalid, -1)


def partitioned_info_nce_loss(q: torch.Tensor, k: torch.Tensor, partition: torch.Tensor,
                              n_partitions: int, temperature: float = 0.4
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One InfoNCE per partition for queries ``q`` (K, C) and keys ``k`` (K, C) (row m positive).

    ``partition`` (K, K) int64: partition of key j for anchor i, -1 if j is never its negative.
    The denominators of all (anchor, partition) pairs come from one scatter over the valid
    entries of the (K, K) logits (no loop over partitions). Returns (loss, detached stats).
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
    loss_kp = (log_denominator - pos_kp).view(K, P)  # (K, P) -log softmax of the positive

    count = torch.bincount(seg, minlength=K * P).view(K, P)  # negatives per (anchor, partition)
    has = count > 0  # (K, P)
    anchors = has.sum(0)  # (P,)
    per_partition = torch.where(has, loss_kp, 0).sum(0) / anchors.clamp(min=1)  # (P,)
    used = anchors > 0  # (P,)
    if not bool(used.any()):
        loss = zero_loss(q, k)
    else:
        loss = per_partition[used].mean()

    # top-1: the positive beats every negative of the partition
    hardest = torch.full((K * P,), -math.inf, dtype=logits.dtype, device=q.device)
    hardest = hardest.scatter_reduce(0, seg, neg.detach(), reduce="amax").view(K, P)
    correct = (pos.detach()[:, None] > hardest) & has
    stats = {
        "stat_accuracy": correct.sum() / has.sum().clamp(min=1),
        "stat_partitions_used": used.sum().float(),
        "stat_negatives_per_partition": count[has].float().mean() if bool(has.any())
        else logits.new_zeros(()),
    }
    return loss, stats


def shape_context_nce_loss(f0: torch.Tensor, f1: torch.Tensor, matches: torch.Tensor,
                           world0: torch.Tensor, batch_index0: torch.Tensor, *,
                           num_matches: int = 4096, temperature: float = 0.4, n_radial: int = 2,
                           n_angular: int = 4, inner_radius: float = 0.05,
                           outer_radius: float = 0.5,
                           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Shape-context PointInfoNCE on features ``f0`` (N0, C), ``f1`` (N1, C), ``matches`` (M, 2),
    with view 0's world coordinates ``world0`` (N0, 3) and scene of each row ``batch_index0`` (N0,).

    Returns ``loss_shape_context_nce``, ``stat_accuracy`` (fraction of (anchor, partition) pairs
    whose positive beats all its negatives), ``stat_partitions_used``,
    ``stat_negatives_per_partition`` and ``stat_num_matches`` (0: nothing to contrast, the loss
    is a zero connected to the features).
    """
    device = f0.device
    matches = check_matches(matches.to(device), len(f0), len(f1))
    sample = sample_matches(matches, num_matches, generator)  # (K, 2)
    num = torch.tensor(float(len(sample)), device=device)
    if len(sample) == 0:
        zero = zero_loss(f0, f1)
        stat = zero.detach()
        return {"loss_shape_context_nce": zero, "stat_accuracy": stat,
                "stat_partitions_used": stat, "stat_negatives_per_partition": stat,
                "stat_num_matches": num}
    i, j = sample[:, 0], sample[:, 1]
    partition = shape_context_partition(
        world0.to(device)[i], batch_index0.to(device)[i], n_radial=n_radial, n_angular=n_angular,
        inner_radius=inner_radius, outer_radius=outer_radius)  # (K, K)
    loss, stats = partitioned_info_nce_loss(f0[i], f1[j], partition, n_radial * n_angular,
                                            temperature)
    return {"loss_shape_context_nce": loss, **stats, "stat_num_matches": num}


@OBJECTIVES.register("shape_context_nce")
class ShapeContextNCE(Objective):
    """Contrastive Scene Contexts' partitioned PointInfoNCE on a :class:`PairBatch`.

    Args:
        num_matches: matched pairs sampled per step over the whole batch; all when fewer.
        temperature: tau of each partition's softmax.
        n_radial, n_angular: shape-context bins (partitions = n_radial * n_angular).
        inner_radius: metres; closer points are never negatives (CSC's r1).
        outer_radius: metres; start of the outermost radial bin (CSC's r2).
        seed: seed of the sampling generator; ``None`` uses torch's global RNG.
    """

    def __init__(self, num_matches: int = 4096, temperature: float = 0.4, n_radial: int = 2,
                 n_angular: int = 4, inner_radius: float = 0.05, outer_radius: float = 0.5,
                 seed: int | None = None):
        super().__init__()
        check_nce_args(num_matches, temperature)
        if n_radial < 1 or n_angular < 1:
            raise ValueError(f"n_radial and n_angular must be >= 1, got {n_radial}, {n_angular}")
        if not 0 < inner_radius < outer_radius:
            raise ValueError(f"need 0 < inner_radius < outer_radius, got {inner_radius}, "
                             f"{outer_radius}")
        self.num_matches, self.temperature = num_matches, temperature
        self.n_radial, self.n_angular = n_radial, n_angular
        self.inner_radius, self.outer_radius = inner_radius, outer_radius
        self.generator = SeededGenerator(seed)

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        f0, f1 = ctx.features(0), ctx.features(1)
        view0 = ctx.batch.views[0]
        return shape_context_nce_loss(
            f0, f1, ctx.batch.matches, view0.world, view0.batch_index,
            num_matches=self.num_matches, temperature=self.temperature, n_radial=self.n_radial,
            n_angular=self.n_angular, inner_radius=self.inner_radius,
            outer_radius=self.outer_radius, generator=self.generator(f0.device))

    def extra_repr(self) -> str:
        return (f"num_matches={self.num_matches}, temperature={self.temperature}, "
                f"n_radial={self.n_radial}, n_angular={self.n_angular}, "
                f"inner_radius={self.inner_radius}, outer_radius={self.outer_radius}, "
                f"seed={self.generator.seed}")
