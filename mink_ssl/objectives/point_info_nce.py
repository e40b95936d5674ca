"""PointInfoNCE (PointContrast, Xie et al. ECCV 2020, Sec. 3.3), and the match-sampling helpers
the other point-level contrastive objectives share.

For a set P of matched voxel pairs (i, j) between view 0 and view 1, the query is the view-0
feature q_i = f0_i and its positive key the view-1 feature k_j = f1_j; the keys of the *other*
sampled matches are the negatives (no unmatched points are used). PointContrast's equation:

    L = - 1/|P| sum_{(i,j) in P} log( exp(f0_i . f1_j / tau)
                                     / sum_{(., k) in P} exp(f0_i . f1_k / tau) )

i.e. a cross-entropy over the (M, M) logits ``q k^T / tau`` with labels ``arange(M)``. Features
are L2-normalised here (so ``q . k`` is a cosine), whether or not the backbone already does it.

Defaults and their source:

- ``num_matches = 4096``: "we sample a subset of 4096 matched pairs from P" (paper, Sec. 3.3);
- ``temperature = 0.4``: the paper gives no value; 0.4 is ``misc.nceT`` in the PointContrast and
  Contrastive Scene Contexts pretraining scripts.

Sampling: the released code keeps one random match per view-0 voxel before sampling, so no query
appears twice. We also keep one per view-1 voxel, so no negative key is a copy of the positive
(with matches "within 1.5 voxels" a view-1 voxel can match several view-0 voxels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mink_ssl.objectives.args import objective_args
from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.defaults import PointInfoNCEArgs
from mink_ssl.objectives.registry import OBJECTIVES
from mink_ssl.objectives.matches import (SeededGenerator, check_match_rows, check_nce_args,
                                         sample_matches, zero_loss)


# --- helpers shared by the point-level contrastive objectives -------------------------------

def info_nce_loss(q: torch.Tensor, k: torch.Tensor,
                  temperature: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of queries ``q`` (M, C) against keys ``k`` (M, C); row m of ``k`` is the positive.

    Returns (loss, top-1 accuracy of the logits). Rows are L2-normalised here. M must be >= 1.
    """
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.t() / temperature  # (M, M)
    labels = torch.arange(len(q), device=q.device)  # (M,)
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, accuracy


def point_info_nce_loss(f0: torch.Tensor, f1: torch.Tensor, matches: torch.Tensor, *,
                        num_matches: int = 4096, temperature: float = 0.4,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """PointInfoNCE on backbone features ``f0`` (N0, C), ``f1`` (N1, C) and ``matches`` (M, 2).

    Returns ``loss_point_info_nce``, ``stat_accuracy`` and ``stat_num_matches`` (matches used;
    0 means nothing to contrast and the loss is a zero connected to the features).
    """
    matches = check_match_rows(matches.to(f0.device), len(f0), len(f1))
    sample = sample_matches(matches, num_matches, generator)  # (K, 2)
    n = torch.tensor(float(len(sample)), device=f0.device)
    if len(sample) == 0:
        zero = zero_loss(f0, f1)
        return {"loss_point_info_nce": zero, "stat_accuracy": zero.detach(), "stat_num_matches": n}
    loss, accuracy = info_nce_loss(f0[sample[:, 0]], f1[sample[:, 1]], temperature)
    return {"loss_point_info_nce": loss, "stat_accuracy": accuracy, "stat_num_matches": n}


@OBJECTIVES.register("point_info_nce")
@objective_args(PointInfoNCEArgs)
class PointInfoNCE(Objective):
    """PointInfoNCE between the two views of a :class:`~mink_ssl.data.batch.PairBatch`; its
    arguments, keywords of the constructor: :class:`~mink_ssl.objectives.defaults.PointInfoNCEArgs`.
    """

    def __init__(self, args: PointInfoNCEArgs):
        super().__init__()
        num_matches, temperature, seed = args.num_matches, args.temperature, args.seed
        check_nce_args(num_matches, temperature)
        self.num_matches, self.temperature = num_matches, temperature
        self.generator = SeededGenerator(seed)

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        f0, f1 = ctx.features(0), ctx.features(1)
        return point_info_nce_loss(f0, f1, ctx.batch.matches, num_matches=self.num_matches,
                                   temperature=self.temperature,
                                   generator=self.generator(f0.device))

    def extra_repr(self) -> str:
        return (f"num_matches={self.num_matches}, temperature={self.temperature}, "
                f"seed={self.generator.seed}")
