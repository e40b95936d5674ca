"""Probes on a frozen backbone: what pretraining learned, measured without fine-tuning.

Three probes (``FinetuneSegConfig.probe``), each on a Res16UNet whose weights never change:

- ``linear``: one linear layer (``nn.Linear``, bias) on the backbone's output features, i.e. its
  pretrained ``final`` layer included (``out_channels`` wide, 32 for PointContrast backbones).
- ``linear_multiscale``: one linear layer on the concatenated features of every decoder stage
  (the "hypercolumn" of Sonata's linear probe, which concatenates its encoder stages): the
  outputs of ``block5`` (tensor stride 8), ``block6`` (4), ``block7`` (2) and ``block8`` (1),
  each coarse voxel's features copied to every finest voxel inside it (nearest upsampling, as
  Sonata's unpooling does). Width ``(PLANES[4] + PLANES[5] + PLANES[6] + PLANES[7]) x
  expansion``: 576 for Res16UNet34C, 448 for Res16UNet14A, 224 for Res16UNet14S
  (:func:`multiscale_width`). The ``final`` layer is not part of it.
- both linear probes put a batch norm without affine parameters before the layer (MAE's linear
  probing, He et al. 2022, App. A.1): features of different backbones, stages and objectives
  come at different scales, and a random initialisation's frozen batch norms (running mean 0,
  variance 1) pass activations through at whatever scale they have; the normalisation makes one
  learning rate fit them all. It is part of the head (its statistics are the training split's)
  and at evaluation an affine map, so the probe stays linear in the features;
- ``knn``: no training; every evaluation voxel takes the classes of its ``k`` nearest labelled
  training voxels in the space of the backbone's output features under cosine similarity (a
  plain vote: the logits are the neighbour counts per class, ties to the lower class index).

Frozen means: every backbone parameter has ``requires_grad=False``, the backbone runs under
``torch.no_grad()`` and stays in eval mode (batch norm uses and keeps its running statistics)
whatever ``train()`` is called with, so the backbone's state dict after probing equals the
pretrained one bit for bit.

A probe model has the interface of :class:`~mink_ssl.models.heads.SegmentationModel`
(``backbone``, ``head`` with ``config()``, ``num_classes``, ``task_layers``, ``forward``:
sparse tensor -> sparse logits on the same coordinates), so fine-tuning's checkpoints, model
files, evaluation and ``evaluate_only`` take it unchanged; its head config carries ``probe``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mink_ssl.sparse import SparseVoxels

PROBES = ("linear", "linear_multiscale", "knn")
#: the decoder stages of the multi-scale probe and their tensor strides
DECODER_STAGES = (("block5", 8), ("block6", 4), ("block7", 2), ("block8", 1))


def check_probe(probe: str) -> str:
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES} or null (fine-tune everything), got "
                         f"{probe!r}")
    return probe


def multiscale_width(backbone: nn.Module) -> int:
    """Channels of the multi-scale probe's features: the four decoder stages' widths summed."""
    return sum(backbone.PLANES[4:8]) * backbone.BLOCK.expansion


def row_index(query: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(Nq,) int64: for each row of ``query`` (Nq, D) the index of the equal row of ``table``
    (Nt, D) (integer coordinates, rows of ``table`` unique). Rows are packed into int64 keys
    over the joint bounding box, ``table`` keys sorted and searched; a query row absent from
    ``table`` is an error."""
    q, t = query.to(torch.int64), table.to(torch.int64)
    lo = torch.minimum(q.min(0).values, t.min(0).values)
    span = torch.maximum(q.max(0).values, t.max(0).values) - lo + 1  # (D,) int64
    if float(torch.prod(span.double())) >= 2.0 ** 62:
        raise ValueError(f"coordinates span {span.tolist()} do not pack into int64 keys")
    mult = torch.ones_like(span)  # (D,) int64 place values, last column fastest
    for d in range(len(span) - 2, -1, -1):
        mult[d] = mult[d + 1] * span[d + 1]
    qk, tk = ((q - lo) * mult).sum(1), ((t - lo) * mult).sum(1)  # (Nq,), (Nt,) int64
    order = torch.argsort(tk)
    pos = torch.searchsorted(tk[order], qk).clamp(max=len(tk) - 1)
    found = tk[order][pos] == qk
    if not bool(found.all()):
        bad = q[~found][0].tolist()
        raise ValueError(f"{int((~found).sum())} coordinate row(s) have no match in the coarser "
                         f"tensor, e.g. {bad}")
    return order[pos]


def parent_coordinates(coords: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, 4) int64: the coordinates at tensor ``stride`` of the voxels containing the stride-1
    voxels ``coords`` (N, 4) (batch index first): ``floor(c / stride) x stride`` per axis, the
    rule MinkowskiEngine's strided convolutions follow (negative coordinates included)."""
    c = coords.to(torch.int64)
    out = c.clone()
    out[:, 1:] = torch.div(c[:, 1:], stride, rounding_mode="floor") * stride
    return out


class LinearProbeHead(nn.Module):
    """One linear layer on dense features (N, in_channels) -> logits (N, num_classes), after a
    batch norm without affine parameters (``norm``; model files made before it have none)."""

    def __init__(self, in_channels: int, num_classes: int, probe: str, norm: bool = True):
        super().__init__()
        self.in_channels, self.num_classes, self.probe = in_channels, num_classes, probe
        self.norm = nn.BatchNorm1d(in_channels, affine=False) if norm else None
        self.linear = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def config(self) -> dict:
        return {"probe": self.probe, "in_channels": self.in_channels,
                "num_classes": self.num_classes, "norm": self.norm is not None}

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(feats if self.norm is None else self.norm(feats))


class KnnHead(nn.Module):
    """k-nearest-neighbour vote under cosine similarity against a bank of labelled features
    (:meth:`fit`); no weights (the bank is not part of the state dict)."""

    def __init__(self, num_classes: int, k: int = 20, chunk_elements: int = 1 << 24):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"knn_k must be an int >= 1, got {k!r}")
        self.num_classes, self.k, self.chunk_elements = num_classes, k, chunk_elements
        self.bank: torch.Tensor | None = None  # (B, W) L2-normalised
        self.bank_labels: torch.Tensor | None = None  # (B,) int64

    def config(self) -> dict:
        return {"probe": "knn", "k": self.k, "num_classes": self.num_classes}

    def fit(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        if len(feats) == 0:
            raise ValueError("the kNN probe has no labelled training voxel to compare with; "
                             "check data.train_split and the limited-label settings")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"bank labels must be in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        self.bank = nn.functional.normalize(feats.float(), dim=1)
        self.bank_labels = labels.to(torch.int64)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.bank is None:
            raise RuntimeError("KnnHead.fit(features, labels) must come before predictions")
        bank, labels = self.bank.to(feats.device), self.bank_labels.to(feats.device)
        k = min(self.k, len(bank))
        q = nn.functional.normalize(feats.float(), dim=1)  # (N, W)
        votes = torch.zeros(len(q), self.num_classes, device=q.device)
        step = max(1, self.chunk_elements // len(bank))
        for i in range(0, len(q), step):  # chunks of queries: (step, B) similarities at a time
            nearest = (q[i:i + step] @ bank.T).topk(k, dim=1).indices  # (n, k)
            votes[i:i + step].scatter_add_(1, labels[nearest], torch.ones(nearest.shape,
                                                                          device=q.device))
        return votes  # (N, C) neighbour counts


class FrozenProbe(nn.Module):
    """A frozen backbone and a probe head (see the module docstring).

    ``forward(x)``: sparse tensor (N, in_channels) at stride 1 -> sparse logits (N, C) on the
    same coordinates; ``features(x)``: the probe's input (N, W) as a dense tensor.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, probe: str, knn_k: int = 20,
                 norm: bool = True):
        super().__init__()
        self.probe = check_probe(probe)
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        if probe == "knn":
            self.head = KnnHead(num_classes, knn_k)
        else:
            width = multiscale_width(backbone) if probe == "linear_multiscale" else \
                backbone.out_channels
            self.head = LinearProbeHead(width, num_classes, probe, norm)
        self.backbone.eval()

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def task_layers(self) -> tuple[str, ...]:
        return ("head.",)

    def train(self, mode: bool = True) -> "FrozenProbe":
        super().train(mode)
        self.backbone.eval()  # frozen: batch norm keeps its running statistics
        return self

    @torch.no_grad()
    def features_and_output(self, x: SparseVoxels) -> tuple[torch.Tensor, SparseVoxels]:
        """(probe features (N, W), the backbone's output)."""
        if self.probe != "linear_multiscale":
            out = self.backbone(x)
            return out.feats, out
        out, stages = self.backbone.forward_stages(x, [name for name, _ in DECODER_STAGES])
        fine = out.coords  # (N, 4) int32, the input's coordinates in the input's order
        parts = []
        for name, stride in DECODER_STAGES:
            stage = stages[name]
            if torch.equal(stage.coords, fine):  # stride 1: the input's voxels, in its order
                parts.append(stage.feats)
                continue
            # each voxel takes the features of the stage's voxel containing it; the engines
            # order a coarse stage's rows differently, so rows are found by coordinates
            rows = row_index(parent_coordinates(fine, stride), stage.coords)  # (N,)
            parts.append(stage.feats[rows])
        return torch.cat(parts, 1), out  # (N, multiscale_width)

    def features(self, x: SparseVoxels) -> torch.Tensor:
        return self.features_and_output(x)[0]

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        feats, out = self.features_and_output(x)
        return out.replace(self.head(feats))
