"""Feature-matching recall: how often a voxel's nearest neighbour in feature space is its
true correspondence, the standard check that pretrained point features are discriminative."""
from __future__ import annotations

import torch

from mink_ssl.sparse import sparse_tensor


@torch.no_grad()
def feature_match_recall(backbone, batch, radius: float, chunk: int = 4096) -> float:
    """Fraction of matched view-0 voxels whose nearest view-1 voxel in feature space (same
    scene) lies within ``radius`` metres of it in world coordinates."""
    v0, v1 = batch.views
    f0 = backbone(sparse_tensor(v0.coords, v0.feats)).F
    f1 = backbone(sparse_tensor(v1.coords, v1.feats)).F
    f0, f1 = torch.nn.functional.normalize(f0, dim=1), torch.nn.functional.normalize(f1, dim=1)
    rows = torch.unique(batch.matches[:, 0])  # (Q,) view-0 voxels with a correspondence
    b0, b1 = v0.batch_index, v1.batch_index
    correct = 0
    for start in range(0, len(rows), chunk):
        q = rows[start:start + chunk]
        d = torch.cdist(f0[q], f1)  # (q, N1)
        d[b0[q][:, None] != b1[None, :]] = float("inf")  # only the same scene
        nn = d.argmin(dim=1)
        correct += int(((v0.world[q] - v1.world[nn]).norm(dim=1) <= radius).sum())
    return correct / max(len(rows), 1)
