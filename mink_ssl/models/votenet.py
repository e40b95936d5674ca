"""A VoteNet-style 3D detector (Qi et al., "Deep Hough Voting for 3D Object Detection in Point
Clouds", ICCV 2019) on the shared Res16UNet backbone, box coding and decoding (its loss:
:mod:`mink_ssl.tasks.detection.loss`).

PointContrast fine-tunes VoteNet with its SR-UNet in place of PointNet++ (``votenet_det_new``:
seeds are 1,024 farthest-point samples of the voxels, the UNet's output their features, the
rest of VoteNet unchanged). Same here, with the facts of VoteNet's code (read, not copied):

- backbone: a Res16UNet on the voxels whose ``final`` layer is rebuilt to give the seeds' 256
  channels directly (``SparseConvBackbone``: ``Res16UNet34C(3, 256)``, 96 -> 256, pretrained
  weights loaded without ``final.*``), the seeds' features going straight to voting. Option
  ``seed_projection=True`` (our earlier variant): the pretrained ``final`` (96 -> 32) is kept and
  a linear layer (+ batch norm, ReLU) lifts the seeds' features to 256 channels;
- seeds: ``num_seeds`` (1,024) farthest point samples of each scene's voxel coordinates, in
  voxel units so that ties are exact (:func:`mink_ssl.ops.farthest_point_sampling`); a scene with
  fewer voxels takes all of them, repeated;
- voting (``VotingModule``): a shared MLP 256-256-256-(3+256) gives each seed an offset and a
  feature residual, ``vote = seed + offset``, ``f_vote = normalise(f_seed + residual)`` (L2);
- aggregation (``PointnetSAModuleVotes`` with ``vote_fps``): ``num_proposals`` (256) farthest
  point samples of the votes, a ball query of radius 0.3 m (16 votes, padded by repetition), a
  shared MLP (3+256)-128-128-128 on ``[(vote - centre) / radius, f_vote]`` and a max-pool;
- proposal (``ProposalModule``): a shared MLP 128-128-128 then a linear layer to
  ``2 + 3 + 2 NH + 4 NS + NC`` outputs: objectness, centre offset from the proposal's vote,
  heading bin scores and normalised residuals (NH), size cluster scores and normalised residuals
  (NS, one cluster per class: the class's mean size on the training set, as VoteNet), semantic
  scores (NC). Every hidden layer has batch norm and ReLU.

Boxes: centre, full extents, heading about +z (:mod:`mink_ssl.ops.boxes`). Heading bin
``c`` of NH covers angles around ``c 2 pi / NH``; the residual is normalised by ``pi / NH``; the
size residual by the cluster's mean size. NH = 1 means axis-aligned boxes (VoteNet's ScanNet):
heading targets are 0 and decoded boxes have no heading column.

Detection (VoteNet's ``parse_predictions`` with its training-time evaluation settings):
proposals with objectness probability above 0.05 go through per-class 3D NMS (IoU 0.25, ranked
by objectness, classes by argmax) and each kept box is reported once per class with score
``p(class) p(object)`` (``per_class_proposal``). NMS uses oriented IoU where VoteNet used the
axis-aligned hull of each box.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mink_ssl.formats.model_files import DET_MODEL_FORMAT, load_tagged
from mink_ssl.io import atomic_torch_save, library_versions
from mink_ssl.models import model_from_config
from mink_ssl.ops import ball_query, farthest_point_sampling, nms_3d
from mink_ssl.sparse import sparse_tensor


# -------------------------------------------------------------------------------- box coding

def _wrap(angle: torch.Tensor) -> torch.Tensor:
    """Angles wrapped to [-pi, pi)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def angle_to_class(angle: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Heading (any shape) -> bin (int64) and residual (radians, in [-pi/NH, pi/NH)) from the
    bin's centre ``bin 2 pi / NH`` (VoteNet's ``angle2class``)."""
    per_bin = 2 * math.pi / num_bins
    shifted = torch.remainder(torch.remainder(angle, 2 * math.pi) + per_bin / 2, 2 * math.pi)
    cls = torch.div(shifted, per_bin, rounding_mode="floor").long().clamp_(0, num_bins - 1)
    return cls, shifted - (cls * per_bin + per_bin / 2)


def class_to_angle(cls: torch.Tensor, residual: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Bin and residual -> heading in [-pi, pi) (VoteNet's ``class2angle``)."""
    return _wrap(cls.to(residual.dtype) * (2 * math.pi / num_bins) + residual)


def encode_boxes(boxes: torch.Tensor, labels: torch.Tensor, mean_sizes: torch.Tensor,
                 num_heading_bins: int) -> dict[str, torch.Tensor]:
    """VoteNet targets of boxes (K, 7) with classes (K,), size clusters = classes.

    Returns heading_class (K,) int64, heading_residual (K,) radians, size_class (K,) int64,
    size_residual (K, 3) metres (size minus the cluster's mean size ``mean_sizes`` (NS, 3)).
    With one heading bin (axis-aligned boxes) the heading targets are 0.
    """
    labels = labels.long()
    if num_heading_bins == 1:
        hc = torch.zeros_like(labels)
        hr = boxes.new_zeros(len(boxes))
    else:
        hc, hr = angle_to_class(boxes[:, 6], num_heading_bins)
    mean = mean_sizes.to(boxes)[labels]  # (K, 3)
    return {"heading_class": hc, "heading_residual": hr, "size_class": labels,
            "size_residual": boxes[:, 3:6] - mean}


def decode_boxes(centre: torch.Tensor, heading_class: torch.Tensor,
                 heading_residual: torch.Tensor, size_class: torch.Tensor,
                 size_residual: torch.Tensor, mean_sizes: torch.Tensor,
                 num_heading_bins: int, min_size: float = 1e-3) -> torch.Tensor:
    """Boxes from centre (..., 3), heading bin (...) and residual (...) radians, size cluster
    (...) and residual (..., 3) metres: (..., 7), or (..., 6) with one heading bin. Sizes are
    clamped to ``min_size`` (a regression can overshoot below zero)."""
    size = (mean_sizes.to(centre)[size_class.long()] + size_residual).clamp_min(min_size)
    if num_heading_bins == 1:
        return torch.cat([centre, size], dim=-1)
    heading = class_to_angle(heading_class, heading_residual, num_heading_bins)
    return torch.cat([centre, size, heading[..., None]], dim=-1)


# ----------------------------------------------------------------------------------- layers

class SharedMLP(nn.Module):
    """Per-row layers ``Linear (no bias) -> BatchNorm -> ReLU`` on the last dimension:
    (..., channels[0]) -> (..., channels[-1]) (PointNet's shared MLP / 1x1 convolutions)."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        layers = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers += [nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout), nn.ReLU(True)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        y = self.layers(x.reshape(-1, x.shape[-1]))  # (rows, C): batch norm over all rows
        return y.view(*shape, y.shape[-1])


@dataclass
class VoteNetOutput:
    """Head outputs for B scenes, S seeds and P proposals each.

    seed_rows:  (B, S) int64 rows of the batch's voxels chosen as seeds
    seed_xyz:   (B, S, 3) seed positions (metres); vote_xyz (B, S, 3) their votes
    proposal_xyz: (B, P, 3) the votes the proposals are grouped around
    objectness: (B, P, 2) logits (background, object)
    center:     (B, P, 3) predicted box centres
    heading_scores: (B, P, NH); heading_residuals: (B, P, NH) normalised by pi / NH
    size_scores: (B, P, NS); size_residuals: (B, P, NS, 3) normalised by the mean sizes
    sem_scores: (B, P, NC) class logits
    """

    seed_rows: torch.Tensor
    seed_xyz: torch.Tensor
    vote_xyz: torch.Tensor
    proposal_xyz: torch.Tensor
    objectness: torch.Tensor
    center: torch.Tensor
    heading_scores: torch.Tensor
    heading_residuals: torch.Tensor
    size_scores: torch.Tensor
    size_residuals: torch.Tensor
    sem_scores: torch.Tensor


def select_seeds(coords: torch.Tensor, num_seeds: int, num_scenes: int) -> torch.Tensor:
    """(B, S) int64 rows of ``coords`` (N, 4) (batch index first): farthest point samples of
    each scene's voxel coordinates; a scene with fewer than S voxels takes all, repeated."""
    scene = coords[:, 0].long()
    counts = torch.bincount(scene, minlength=num_scenes)  # (B,)
    if int(counts.min()) == 0:
        raise ValueError(f"scene {int((counts == 0).nonzero()[0, 0])} of the batch has no voxel")
    xyz = coords[:, 1:].to(torch.float32)  # voxel units: exact distance ties
    if int(counts.min()) >= num_seeds:
        return farthest_point_sampling(xyz, num_seeds, batch_index=scene, num_scenes=num_scenes)
    rows = torch.empty(num_scenes, num_seeds, dtype=torch.long, device=coords.device)
    big = counts >= num_seeds  # (B,)
    if big.any():
        sel = big[scene].nonzero()[:, 0]  # rows of the scenes with enough voxels
        renumber = big.long().cumsum(0) - 1
        idx = farthest_point_sampling(xyz[sel], num_seeds, batch_index=renumber[scene[sel]],
                                      num_scenes=int(big.sum()))
        rows[big] = sel[idx]
    small = (~big).nonzero()[:, 0]  # (s,)
    order = torch.sort(scene, stable=True).indices  # rows grouped by scene
    first = counts.cumsum(0) - counts  # (B,) first position of each scene in ``order``
    pos = torch.arange(num_seeds, device=coords.device)[None, :] % counts[small][:, None]
    rows[small] = order[first[small][:, None] + pos]  # (s, S) every voxel, cyclically
    return rows


class VoteNetHead(nn.Module):
    """Seeds, votes, vote aggregation and proposals on backbone features (see the module
    docstring). ``forward(features (N, C), coords (N, 4), points (N, 3))`` -> VoteNetOutput.

    Args:
        in_channels: backbone output channels C (= ``seed_channels`` without a projection).
        num_classes: NC (also the number of size clusters NS).
        mean_sizes: (NC, 3) mean full extents per class (metres), from the training set.
        num_heading_bins: NH (12 for SUN RGB-D; 1 = axis-aligned, ScanNet).
        num_seeds, seed_channels, num_proposals: S (1024), seed feature width (256), P (256).
        radius, group_size: vote aggregation ball (0.3 m) and votes per ball (16).
        seed_projection: lift the backbone features to ``seed_channels`` with a linear layer,
            batch norm and ReLU (``seed_proj``); False (the released code): the backbone's
            rebuilt final layer already gives ``seed_channels`` = ``in_channels``.
    """

    def __init__(self, in_channels: int, num_classes: int, mean_sizes, *,
                 num_heading_bins: int = 12, num_seeds: int = 1024, seed_channels: int = 256,
                 num_proposals: int = 256, radius: float = 0.3, group_size: int = 16,
                 seed_projection: bool = False):
        super().__init__()
        mean_sizes = torch.as_tensor(mean_sizes, dtype=torch.float32)
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("num_heading_bins", num_heading_bins), ("num_seeds", num_seeds),
                            ("seed_channels", seed_channels), ("num_proposals", num_proposals),
                            ("group_size", group_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_proposals > num_seeds:
            raise ValueError(f"num_proposals ({num_proposals}) cannot exceed num_seeds "
                             f"({num_seeds}): proposals are sampled from the seeds' votes")
        if mean_sizes.shape != (num_classes, 3) or not bool((mean_sizes > 0).all()):
            raise ValueError(f"mean_sizes must be ({num_classes}, 3) positive sizes (one per "
                             f"class), got shape {tuple(mean_sizes.shape)}")
        if not radius > 0:
            raise ValueError(f"radius must be positive metres, got {radius!r}")
        if not seed_projection and in_channels != seed_channels:
            raise ValueError(f"without a seed projection the backbone gives the seed features: "
                             f"build it with out_channels={seed_channels} (seed_channels), got "
                             f"in_channels={in_channels}; or set seed_projection=True")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.num_heading_bins, self.num_seeds = num_heading_bins, num_seeds
        self.seed_channels, self.num_proposals = seed_channels, num_proposals
        self.radius, self.group_size = float(radius), group_size
        self.seed_projection = bool(seed_projection)
        self.register_buffer("mean_sizes", mean_sizes, persistent=False)  # in config() instead
        c = seed_channels
        self.seed_proj = SharedMLP([in_channels, c]) if seed_projection else nn.Identity()
        self.vote_mlp = SharedMLP([c, c, c])
        self.vote_out = nn.Linear(c, 3 + c)  # offset (3), feature residual (c)
        self.aggregation = SharedMLP([3 + c, 128, 128, 128])
        self.proposal_mlp = SharedMLP([128, 128, 128])
        nh, ns = num_heading_bins, num_classes
        self.proposal_out = nn.Linear(128, 2 + 3 + 2 * nh + 4 * ns + num_classes)

    def config(self) -> dict:
        """Constructor arguments as plain data (the mean sizes included)."""
        return {"in_channels": self.in_channels, "num_classes": self.num_classes,
                "mean_sizes": self.mean_sizes.cpu().tolist(),
                "num_heading_bins": self.num_heading_bins, "num_seeds": self.num_seeds,
                "seed_channels": self.seed_channels, "num_proposals": self.num_proposals,
                "radius": self.radius, "group_size": self.group_size,
                "seed_projection": self.seed_projection}

    def forward(self, features: torch.Tensor, coords: torch.Tensor, points: torch.Tensor
                ) -> VoteNetOutput:
        n = len(features)
        if coords.shape != (n, 4) or points.shape != (n, 3) or features.shape[1:] != (
                self.in_channels,):
            raise ValueError(f"expected features (N, {self.in_channels}), coords (N, 4), points "
                             f"(N, 3) for the same N voxels, got {tuple(features.shape)}, "
                             f"{tuple(coords.shape)}, {tuple(points.shape)}")
        b = int(coords[:, 0].max()) + 1
        rows = select_seeds(coords, self.num_seeds, b)  # (B, S)
        seed_xyz = points[rows]  # (B, S, 3)
        seed_f = self.seed_proj(features[rows])  # (B, S, c)

        net = self.vote_out(self.vote_mlp(seed_f))  # (B, S, 3 + c)
        vote_xyz = seed_xyz + net[..., :3]
        vote_f = F.normalize(seed_f + net[..., 3:], p=2, dim=-1)  # (B, S, c)

        centre_idx = farthest_point_sampling(vote_xyz.detach(), self.num_proposals)  # (B, P)
        scenes = torch.arange(b, device=coords.device)[:, None]
        centres = vote_xyz[scenes, centre_idx]  # (B, P, 3)
        idx, _ = ball_query(vote_xyz.detach(), centres.detach(), self.radius, self.group_size)
        # (B, P, k); a ball always holds its centre vote, the fallback only guards the contract
        idx = torch.where(idx >= 0, idx, centre_idx[..., None])
        grouped_xyz = (vote_xyz[scenes[..., None], idx] - centres[:, :, None]) / self.radius
        grouped = torch.cat([grouped_xyz, vote_f[scenes[..., None], idx]], -1)  # (B, P, k, 3+c)
        pooled = self.aggregation(grouped).max(dim=2).values  # (B, P, 128)

        out = self.proposal_out(self.proposal_mlp(pooled))  # (B, P, 5 + 2NH + 4NS + NC)
        nh, ns = self.num_heading_bins, self.num_classes
        p = out.shape[1]
        i = 5 + 2 * nh
        return VoteNetOutput(
            seed_rows=rows, seed_xyz=seed_xyz, vote_xyz=vote_xyz, proposal_xyz=centres,
            objectness=out[..., 0:2], center=centres + out[..., 2:5],
            heading_scores=out[..., 5:5 + nh], heading_residuals=out[..., 5 + nh:i],
            size_scores=out[..., i:i + ns],
            size_residuals=out[..., i + ns:i + 4 * ns].reshape(b, p, ns, 3),
            sem_scores=out[..., i + 4 * ns:])


class VoteNetDetector(nn.Module):
    """``backbone`` (a Res16UNet) and a :class:`VoteNetHead` on its output features.

    ``forward(coords (N, 4) int, feats (N, C_in), points (N, 3))`` -> :class:`VoteNetOutput`.
    State-dict keys: ``backbone.<backbone keys>``, ``head.<head keys>``.
    """

    def __init__(self, backbone: nn.Module, head: VoteNetHead):
        super().__init__()
        if head.in_channels != backbone.out_channels:
            raise ValueError(f"head expects {head.in_channels} channels but the backbone gives "
                             f"{backbone.out_channels}")
        self.backbone, self.head = backbone, head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def task_layers(self) -> tuple[str, ...]:
        """Model key prefixes that start from scratch (never from pretrained weights): the head,
        and the backbone's final layer where it is rebuilt (no seed projection)."""
        return ("head.",) if self.head.seed_projection else ("backbone.final.", "head.")

    def forward(self, coords: torch.Tensor, feats: torch.Tensor, points: torch.Tensor
                ) -> VoteNetOutput:
        features = self.backbone(sparse_tensor(coords, feats)).F  # (N, C), rows of coords
        return self.head(features, coords, points)


def build_votenet(backbone: nn.Module, num_classes: int, mean_sizes, **head_kwargs
                  ) -> VoteNetDetector:
    """A detector whose head reads ``backbone.out_channels`` features."""
    return VoteNetDetector(backbone, VoteNetHead(backbone.out_channels, num_classes, mean_sizes,
                                                 **head_kwargs))


# ------------------------------------------------------------------------------------ losses


# --------------------------------------------------------------------------------- detection

@dataclass
class Detections:
    """Detected boxes of a batch: boxes (D, 7) or (D, 6) (axis-aligned), scores (D,), labels
    (D,) int64 classes, batch (D,) int64 scene of each box."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    batch: torch.Tensor


def decode_proposals(out: VoteNetOutput, mean_sizes: torch.Tensor, num_heading_bins: int
                     ) -> torch.Tensor:
    """Every proposal's box (B, P, 7) (or (B, P, 6) with one heading bin): argmax heading bin
    and size cluster with their residuals (VoteNet's ``parse_predictions``)."""
    nh = num_heading_bins
    hc = out.heading_scores.argmax(-1)  # (B, P)
    hr = out.heading_residuals.gather(2, hc[..., None])[..., 0] * (math.pi / nh)
    sc = out.size_scores.argmax(-1)
    mean = mean_sizes.to(out.center)
    sr = out.size_residuals.gather(2, sc[..., None, None].expand(-1, -1, 1, 3))[:, :, 0]
    return decode_boxes(out.center, hc, hr, sc, sr * mean[sc], mean, nh)


@torch.no_grad()
def detect(out: VoteNetOutput, mean_sizes: torch.Tensor, num_heading_bins: int, *,
           conf_threshold: float = 0.05, nms_iou: float = 0.25,
           per_class_proposal: bool = True, nms: str = "aligned_hull") -> Detections:
    """Boxes of a batch after objectness threshold, per-class 3D NMS (``nms``: ``aligned_hull``,
    VoteNet's IoU of the boxes' axis-aligned hulls, or ``oriented``; see
    :mod:`mink_ssl.ops.nms`) and, with ``per_class_proposal``, one copy of each kept box per
    class scored ``p(c) p(obj)`` (else the argmax class scored ``p(obj)``)."""
    b, p = out.objectness.shape[:2]
    boxes = decode_proposals(out, mean_sizes, num_heading_bins).reshape(b * p, -1)
    obj = out.objectness.softmax(-1)[..., 1].reshape(-1)  # (B*P,)
    sem = out.sem_scores.softmax(-1).reshape(b * p, -1)  # (B*P, NC)
    cls = sem.argmax(-1)
    scene = torch.arange(b, device=boxes.device).repeat_interleave(p)
    keep = (obj > conf_threshold).nonzero()[:, 0]
    keep = keep[nms_3d(boxes[keep], obj[keep], nms_iou, labels=cls[keep],
                       batch_index=scene[keep], mode=nms)]
    if not per_class_proposal:
        return Detections(boxes[keep], obj[keep], cls[keep], scene[keep])
    nc = sem.shape[1]
    return Detections(boxes=boxes[keep].repeat_interleave(nc, 0),
                      scores=(sem[keep] * obj[keep, None]).reshape(-1),
                      labels=torch.arange(nc, device=boxes.device).repeat(len(keep)),
                      batch=scene[keep].repeat_interleave(nc))


# ----------------------------------------------------------------------------- model files

def save_detection_model(model: VoteNetDetector, path: str | os.PathLike, *,
                         classes: list[str], voxel_size: float, features: str) -> Path:
    """Write a self-describing detector (plain containers, atomically): backbone and head
    constructor arguments (mean sizes included) and weights, class names, expected input."""
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a head with {model.num_classes} classes")
    return atomic_torch_save({
        "format": DET_MODEL_FORMAT, "versions": library_versions(),
        "model": model.backbone.config(), "head": model.head.config(),
        "classes": list(classes), "voxel_size": float(voxel_size), "features": features,
        "backbone": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
        "head_state": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
    }, path)


def detector_from_configs(model_cfg: dict, head_cfg: dict, engine: str | None = None
                          ) -> VoteNetDetector:
    """Rebuild an (untrained) detector from ``backbone.config()`` and ``head.config()``, its
    backbone on ``engine`` (default: the config's); a head config without ``seed_projection``
    (written before it existed) had the projection."""
    head = dict(head_cfg)
    head.setdefault("seed_projection", True)
    backbone = model_from_config(model_cfg, engine)
    return VoteNetDetector(backbone, VoteNetHead(head.pop("in_channels"),
                                                 head.pop("num_classes"),
                                                 head.pop("mean_sizes"), **head))


def load_detection_model(path: str | os.PathLike, map_location="cpu", engine: str | None = None
                         ) -> tuple[VoteNetDetector, dict]:
    """Rebuild a detector written by :func:`save_detection_model` (strict keys), on ``engine``
    (default: the file's); returns it and the file's metadata (classes, voxel_size, features)."""
    state = load_tagged(path, [DET_MODEL_FORMAT], "a mink-ssl detection model", map_location)
    model = detector_from_configs(state["model"], state["head"], engine)
    model.backbone.load_state_dict(state["backbone"], strict=True)
    model.head.load_state_dict(state["head_state"], strict=True)
    return model, {k: state[k] for k in ("classes", "voxel_size", "features")}


__all__ = ["DET_MODEL_FORMAT", "Detections", "SharedMLP", "VoteNetDetector", "VoteNetHead",
           "VoteNetOutput", "angle_to_class", "build_votenet", "class_to_angle",
           "decode_boxes", "decode_proposals", "detect", "detector_from_configs",
           "encode_boxes", "load_detection_model", "save_detection_model", "select_seeds"]
