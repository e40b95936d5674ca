"""VoteNet's training loss on the detector's outputs (the model: :mod:`mink_ssl.models.votenet`).

Loss (VoteNet's ``loss_helper.py``), with ``o`` the objectness label of a proposal:

    L = 10 (L_vote + 0.5 L_obj + L_box + 0.1 L_sem)
    L_box = L_centre + 0.1 L_head_cls + L_head_reg + 0.1 L_size_cls + L_size_reg

- ``L_vote``: per seed in a box, the L1 distance of its vote to the nearest of its ground-truth
  votes, averaged over such seeds;
- ``L_obj``: cross-entropy (class weights 0.2 / 0.8) over proposals whose vote is nearer than
  0.3 m (positive) or farther than 0.6 m (negative) from every ground-truth centre;
- ``L_centre``: chamfer-like, the squared distance of each positive proposal's centre to the
  nearest ground-truth centre (mean over positives) plus that of each ground-truth centre to the
  nearest predicted centre (mean over boxes);
- heading / size classification (cross-entropy) and normalised residual regression (Huber,
  delta 1) and semantic cross-entropy, all against the box nearest to the proposal's vote and
  averaged over positives.

Adapted: ground truth is a variable number of boxes per scene instead of 64 zero-padded rows
(VoteNet's centre loss also matched the padding rows at the origin); seeds come from voxels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mink_ssl.models.votenet import VoteNetOutput, encode_boxes
from mink_ssl.ops import pad_by_scene


NEAR_THRESHOLD = 0.3  # metres: a proposal this near a ground-truth centre is an object


FAR_THRESHOLD = 0.6  # metres: this far from every centre is background; between: ignored


OBJECTNESS_WEIGHTS = (0.2, 0.8)  # cross-entropy weights of background / object


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VoteNet's ``sum(values * mask) / (sum(mask) + 1e-6)``, with masked-out values ignored
    even where they are not finite."""
    mask = mask.to(values.dtype)
    return torch.where(mask > 0, values, torch.zeros_like(values)).sum() / (mask.sum() + 1e-6)


def votenet_loss(out: VoteNetOutput, *, votes: torch.Tensor, vote_mask: torch.Tensor,
                 boxes: torch.Tensor, box_labels: torch.Tensor, box_batch: torch.Tensor,
                 mean_sizes: torch.Tensor, num_heading_bins: int) -> dict[str, torch.Tensor]:
    """VoteNet's losses (see the module docstring) of a batch of B scenes.

    Args:
        out: the head's output.
        votes: (N, V, 3) vote targets of every voxel (box centre minus the voxel's point);
            vote_mask (N,) bool, the voxel belongs to a box.
        boxes: (G, 7) ground truth; box_labels (G,) classes; box_batch (G,) scenes.
        mean_sizes: (NC, 3) size clusters; num_heading_bins: NH.

    Returns:
        ``loss`` (the weighted total) and each term (``loss_vote``, ``loss_objectness``,
        ``loss_center``, ``loss_heading_cls``, ``loss_heading_reg``, ``loss_size_cls``,
        ``loss_size_reg``, ``loss_sem_cls``, ``loss_box``), plus ``stat_pos_ratio``,
        ``stat_neg_ratio`` (proposals labelled object / background) and ``stat_obj_acc``.
    """
    b, p = out.objectness.shape[:2]
    dev = out.center.device
    # vote loss: nearest ground-truth vote of each seed, L1
    seed_votes = votes[out.seed_rows] + out.seed_xyz[:, :, None, :]  # (B, S, V, 3) positions
    vote_dist = (out.vote_xyz[:, :, None, :] - seed_votes).abs().sum(-1).min(-1).values  # (B, S)
    loss_vote = _masked_mean(vote_dist, vote_mask[out.seed_rows])

    # ground truth padded per scene: (B, K, ...) with ``valid`` (B, K)
    targets = encode_boxes(boxes, box_labels, mean_sizes, num_heading_bins)
    packed = torch.cat([boxes[:, :3], targets["heading_residual"][:, None],
                        targets["size_residual"], targets["heading_class"][:, None].to(boxes),
                        box_labels[:, None].to(boxes)], 1)  # (G, 9)
    padded, rows, _ = pad_by_scene(packed, box_batch.long(), b)
    if padded.shape[1] == 0:  # no box in the whole batch: one invalid column
        padded, rows = padded.new_zeros(b, 1, 9), rows.new_full((b, 1), -1)
    valid = rows >= 0  # (B, K)
    gt_centre = padded[..., 0:3]
    inf = torch.tensor(float("inf"), device=dev, dtype=out.center.dtype)

    # objectness: distance of each proposal's vote to the nearest ground-truth centre
    d2 = (out.proposal_xyz[:, :, None, :] - gt_centre[:, None]).square().sum(-1)  # (B, P, K)
    d2 = torch.where(valid[:, None, :], d2, inf)
    nearest, assign = d2.min(dim=2)  # (B, P)
    dist = torch.sqrt(nearest + 1e-6)
    positive = dist < NEAR_THRESHOLD
    counted = positive | (dist > FAR_THRESHOLD)
    ce = F.cross_entropy(out.objectness.reshape(b * p, 2), positive.long().reshape(-1),
                         weight=torch.tensor(OBJECTNESS_WEIGHTS, device=dev,
                                             dtype=out.objectness.dtype),
                         reduction="none").view(b, p)
    loss_obj = _masked_mean(ce, counted)

    # centre: chamfer-like, positives to the nearest box, every box to the nearest proposal
    c2 = (out.center[:, :, None, :] - gt_centre[:, None]).square().sum(-1)  # (B, P, K)
    c2 = torch.where(valid[:, None, :], c2, inf)
    loss_center = (_masked_mean(c2.min(dim=2).values, positive)
                   + _masked_mean(c2.min(dim=1).values, valid))

    # heading, size and class of the box assigned to each proposal (its nearest centre)
    assigned = padded.gather(1, assign[..., None].expand(-1, -1, 9))  # (B, P, 9)
    hc = assigned[..., 7].long()
    label = assigned[..., 8].long()
    nh = num_heading_bins
    loss_hcls = _masked_mean(F.cross_entropy(out.heading_scores.transpose(1, 2), hc,
                                             reduction="none"), positive)
    h_pred = out.heading_residuals.gather(2, hc[..., None])[..., 0]  # (B, P)
    loss_hreg = _masked_mean(F.huber_loss(h_pred, assigned[..., 3] / (math.pi / nh),
                                          reduction="none", delta=1.0), positive)
    loss_scls = _masked_mean(F.cross_entropy(out.size_scores.transpose(1, 2), label,
                                             reduction="none"), positive)
    s_pred = out.size_residuals.gather(2, label[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    s_target = assigned[..., 4:7] / mean_sizes.to(dev)[label]  # (B, P, 3) normalised
    loss_sreg = _masked_mean(F.huber_loss(s_pred, s_target, reduction="none",
                                          delta=1.0).mean(-1), positive)
    loss_sem = _masked_mean(F.cross_entropy(out.sem_scores.transpose(1, 2), label,
                                            reduction="none"), positive)

    loss_box = loss_center + 0.1 * loss_hcls + loss_hreg + 0.1 * loss_scls + loss_sreg
    total = 10 * (loss_vote + 0.5 * loss_obj + loss_box + 0.1 * loss_sem)
    pos = positive.float().mean()
    acc = _masked_mean((out.objectness.argmax(-1) == positive.long()).float(), counted)
    return {"loss": total, "loss_vote": loss_vote, "loss_objectness": loss_obj,
            "loss_center": loss_center, "loss_heading_cls": loss_hcls,
            "loss_heading_reg": loss_hreg, "loss_size_cls": loss_scls, "loss_size_reg": loss_sreg,
            "loss_sem_cls": loss_sem, "loss_box": loss_box, "stat_pos_ratio": pos.detach(),
            "stat_neg_ratio": (counted.float().mean() - pos).detach(),
            "stat_obj_acc": acc.detach()}
