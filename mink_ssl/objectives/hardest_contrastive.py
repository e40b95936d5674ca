"""Hardest-contrastive loss (FCGF, Choy et al. ICCV 2019; PointContrast, Xie et al. ECCV 2020,
Sec. 3.3): a margin contrastive loss whose negative for each anchor is the hardest one among a
random set of candidates.

With P the sampled matches (i, j), N0 / N1 random candidate rows of view 0 / view 1, d the
Euclidean distance of L2-normalised features, [x]_+ = max(0, x) (PointContrast's equation):

    L = 1/|P| sum_{(i,j) in P} [ d(f0_i, f1_j) - m_p ]_+^2
        + 0.5/|P| sum_{(i,j) in P} [ m_n - min_{k in N1, (i,k) not in M} d(f0_i, f1_k) ]_+^2
        + 0.5/|P| sum_{(i,j) in P} [ m_n - min_{k in N0, (k,j) not in M} d(f1_j, f0_k) ]_+^2

weighted ``pos_weight * pos + neg_weight * neg``. A candidate that is a true match of the anchor
(its (row0, row1) pair is anywhere in ``matches``, not only in the sample) is removed *before*
the minimum is taken, so the next-closest candidate is used; FCGF's code instead drops the
anchor's term when its closest candidate is a match. Anchors left with no candidate are left out
of the mean. Candidates may come from any scene of the batch, as in FCGF.

Distances are ``sqrt(|a - b|^2 + 1e-7)`` (FCGF's pdist, whose eps keeps the gradient finite at
zero distance): identical features have distance 3e-4, under ``m_p``, so zero positive loss.

Defaults and their source: ``pos_margin = 0.1`` and ``neg_margin = 1.4`` (PointContrast Sec. 3.3,
FCGF's ``pos_thresh`` / ``neg_thresh``); ``num_pos = 4096`` and ``num_hn_samples = 1024`` are
FCGF's per-scene ``num_pos_per_batch = 1024`` and ``num_hn_samples_per_batch = 256`` times its
batch of 4 scenes; here they are totals per step, whatever the batch size;
``pos_weight = neg_weight = 1`` (FCGF's ``neg_weight``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.registry import OBJECTIVES
from mink_ssl.objectives.sampling import SeededGenerator, check_matches, random_subset, zero_loss

_EPS = 1e-7


def feature_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise distances (A, B) between the rows of ``a`` (A, C) and ``b`` (B, C)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.t()  # (A, B)
    return torch.sqrt(d2.clamp(min=0) + _EPS)


def match_mask(anchor_rows: torch.Tensor, cand_rows: torch.Tensor, match_anchor: torch.Tensor,
               match_cand: torch.Tensor, n_cand: int) -> torch.Tensor:
    """(A, K) bool: is (anchor_rows[a], cand_rows[k]) one of the matches?

    ``match_anchor``/``match_cand`` (M,) are the matches' rows in the anchors' and the
    candidates' views; candidate rows are distinct (sampled without replacement), anchor rows
    may repeat. Cost O(M + A + K + hits): only matches that land on a candidate are expanded.
    """
    A, K, dev = len(anchor_rows), len(cand_rows), anchor_rows.device
    slot = torch.full((n_cand,), -1, dtype=torch.long, device=dev)
    slot[cand_rows] = torch.arange(K, device=dev)
    k = slot[match_cand]  # (M,) candidate slot of each match, -1 if not a candidate
    keep = k >= 0
    rows, k = match_anchor[keep], k[keep]
    order = torch.argsort(anchor_rows)
    sorted_rows = anchor_rows[order]
    lo = torch.searchsorted(sorted_rows, rows)
    count = torch.searchsorted(sorted_rows, rows, right=True) - lo  # anchors with that row
    which = torch.repeat_interleave(torch.arange(len(rows), device=dev), count)
    first = torch.cumsum(count, 0) - count  # start of each match's run in `which`
    a = order[lo[which] + torch.arange(len(which), device=dev) - first[which]]
    mask = torch.zeros(A, K, dtype=torch.bool, device=dev)
    mask[a, k[which]] = True
    return mask


def hardest_negative_distance(anchor_feats: torch.Tensor, anchor_rows: torch.Tensor,
                              cand_feats: torch.Tensor, cand_rows: torch.Tensor,
                              match_anchor: torch.Tensor, match_cand: torch.Tensor,
                              n_cand: int) -> torch.Tensor:
    """Distance (A,) from each anchor to its closest candidate that is not one of its matches.

    ``match_anchor``/``match_cand`` are the rows of every match in the anchors' and the
    candidates' views; an anchor whose candidates are all its matches gets ``inf``.
    """
    dist = feature_distance(anchor_feats, cand_feats)  # (A, K)
    is_match = match_mask(anchor_rows, cand_rows, match_anchor, match_cand, n_cand)  # (A, K)
    return dist.masked_fill(is_match, float("inf")).min(dim=1).values  # (A,)


def hardest_contrastive_loss(f0: torch.Tensor, f1: torch.Tensor, matches: torch.Tensor, *,
                             num_pos: int = 4096, num_hn_samples: int = 1024,
                             pos_margin: float = 0.1, neg_margin: float = 1.4,
                             pos_weight: float = 1.0, neg_weight: float = 1.0,
                             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Hardest-contrastive loss on features ``f0`` (N0, C), ``f1`` (N1, C), ``matches`` (M, 2).

    Returns ``loss_hardest_contrastive`` and the detached stats ``stat_pos_loss``,
    ``stat_neg_loss``, ``stat_pos_dist`` (mean matched distance), ``stat_neg_dist`` (mean hardest
    negative distance, both directions) and ``stat_num_matches`` (matches used; 0 means nothing
    to contrast and the loss is a zero connected to the features).
    """
    n0, n1 = len(f0), len(f1)
    device = f0.device
    matches = check_matches(matches.to(device), n0, n1)
    pos = matches[random_subset(len(matches), num_pos, generator, device)]  # (P, 2)
    num = torch.tensor(float(len(pos)), device=device)
    if len(pos) == 0:
        zero = zero_loss(f0, f1)
        stat = zero.detach()
        return {"loss_hardest_contrastive": zero, "stat_pos_loss": stat, "stat_neg_loss": stat,
                "stat_pos_dist": stat, "stat_neg_dist": stat, "stat_num_matches": num}

    f0, f1 = F.normalize(f0, dim=1), F.normalize(f1, dim=1)
    i, j = pos[:, 0], pos[:, 1]  # (P,), (P,)
    cand0 = random_subset(n0, num_hn_samples, generator, device)  # (K0,)
    cand1 = random_subset(n1, num_hn_samples, generator, device)  # (K1,)

    # positives: [d(f0_i, f1_j) - m_p]_+^2
    pos_dist = torch.sqrt(((f0[i] - f1[j]) ** 2).sum(1) + _EPS)  # (P,)
    pos_loss = F.relu(pos_dist - pos_margin).pow(2).mean()

    # negatives: hardest non-matching candidate of the other view, each direction
    m0, m1 = matches[:, 0], matches[:, 1]
    hard01 = hardest_negative_distance(f0[i], i, f1[cand1], cand1, m0, m1, len(f1))  # (P,)
    hard10 = hardest_negative_distance(f1[j], j, f0[cand0], cand0, m1, m0, len(f0))  # (P,)
    neg_terms = []
    for hard in (hard01, hard10):
        valid = torch.isfinite(hard)  # (P,) anchors that have a non-matching candidate
        term = F.relu(neg_margin - hard.masked_fill(~valid, neg_margin)).pow(2)  # (P,)
        neg_terms.append(term.sum() / valid.sum().clamp(min=1))
    neg_loss = 0.5 * (neg_terms[0] + neg_terms[1])

    hard = torch.cat([hard01, hard10]).detach()
    finite = hard[torch.isfinite(hard)]
    neg_dist = finite.mean() if len(finite) else hard.new_zeros(())
    return {
        "loss_hardest_contrastive": pos_weight * pos_loss + neg_weight * neg_loss,
        "stat_pos_loss": pos_loss.detach(),
        "stat_neg_loss": neg_loss.detach(),
        "stat_pos_dist": pos_dist.detach().mean(),
        "stat_neg_dist": neg_dist,
        "stat_num_matches": num,
    }


@OBJECTIVES.register("hardest_contrastive")
class HardestContrastive(Objective):
    """Hardest-contrastive loss between the two views of a :class:`~mink_ssl.data.batch.PairBatch`.

    Args:
        num_pos: matched pairs sampled per step (over the whole batch); all when fewer.
        num_hn_samples: negative candidates sampled from each view; all rows when fewer.
        pos_margin, neg_margin: m_p and m_n.
        pos_weight, neg_weight: weights of the positive and negative terms.
        seed: seed of the sampling generator; ``None`` uses torch's global RNG.
    """

    def __init__(self, num_pos: int = 4096, num_hn_samples: int = 1024, pos_margin: float = 0.1,
                 neg_margin: float = 1.4, pos_weight: float = 1.0, neg_weight: float = 1.0,
                 seed: int | None = None):
        super().__init__()
        if num_pos < 1 or num_hn_samples < 1:
            raise ValueError(f"num_pos and num_hn_samples must be >= 1, got {num_pos} and "
                             f"{num_hn_samples}")
        if not 0 <= pos_margin < neg_margin:
            raise ValueError(f"need 0 <= pos_margin < neg_margin, got {pos_margin} and "
                             f"{neg_margin}")
        self.num_pos, self.num_hn_samples = num_pos, num_hn_samples
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.pos_weight, self.neg_weight = pos_weight, neg_weight
        self.generator = SeededGenerator(seed)

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        f0, f1 = ctx.features(0), ctx.features(1)
        return hardest_contrastive_loss(
            f0, f1, ctx.batch.matches, num_pos=self.num_pos, num_hn_samples=self.num_hn_samples,
            pos_margin=self.pos_margin, neg_margin=self.neg_margin, pos_weight=self.pos_weight,
            neg_weight=self.neg_weight, generator=self.generator(f0.device))

    def extra_repr(self) -> str:
        return (f"num_pos={self.num_pos}, num_hn_samples={self.num_hn_samples}, "
                f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, "
                f"seed={self.generator.seed}")
