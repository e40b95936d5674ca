"""Hardest-contrastive loss (FCGF, Choy et al. ICCV 2019; PointContrast, Xie et al. ECCV 2020,
Sec. 3.3): a margin contrastive loss whose negative for each anchor is the hardest one among a
random set of candidates.

With P the sampled matches (i, j), N0 / N1 random candidate rows of view 0 / view 1, d the
Euclidean distance of L2-normalised features and [x]_+ = max(0, x), the default (``positive =
"code"``, ``negatives = "code"``) is what the released code computes (PointContrast
``pretrain/pointcontrast/lib/ddp_trainer.py`` and FCGF ``lib/trainer.py``,
``contrastive_hardest_negative_loss``):

    L_pos = 1/|P| sum_{(i,j) in P} [ d(f0_i, f1_j)^2 - m_p ]_+        (squared distance, no sqrt)
    k*(i) = argmin_{k in N1} d(f0_i, f1_k)                  (over *all* candidates, matches too)
    L_01  = mean over {(i,j) in P : (i, k*(i)) not a match} of [ m_n - d(f0_i, f1_k*(i)) ]_+^2
    L_10  = the same from f1_j against the candidates N0
    L     = pos_weight * L_pos + neg_weight * (L_01 + L_10) / 2

"Is a match" means the pair is anywhere in the batch's ``matches`` (the released code hashes all
positive pairs, not only the sampled ones); an anchor whose hardest candidate is a match has no
negative term. The released code takes the mean of an empty set (NaN) when every anchor drops;
we return 0 for that direction. Candidates come from any scene of the batch.

Named options (ours):

- ``positive = "paper"``: ``[ d(f0_i, f1_j) - m_p ]_+^2``, PointContrast's written equation.
  Once matches are close, ``d^2 - m_p`` and ``(d - m_p)^2`` differ by ~30x, so the two change
  the balance between the positive and negative terms.
- ``negatives = "exclude_matches"``: the anchor's true matches are removed from its candidates
  *before* the minimum, so every anchor keeps a negative term (the next-closest candidate).
  Why: as training succeeds, a true match among the candidates is the closest one and the
  released rule then drops that anchor's negative term altogether; excluding it keeps the hard
  negative. Anchors left with no candidate are left out of the mean.

Distances in the negative terms (and ``paper``'s positive) are ``sqrt(|a - b|^2 + 1e-7)``
(FCGF's pdist; the eps keeps the gradient finite at zero distance).

Defaults and their source: ``pos_margin = 0.1`` and ``neg_margin = 1.4`` (``pos_thresh`` /
``neg_thresh`` of PointContrast's ``config/defaults.yaml``); the counts are per pair of the batch
and scaled by the number of pairs, as the released trainer does (``num_pos_per_batch = 1024`` and
``num_hn_samples_per_batch = 256`` times its per-GPU batch): :class:`HardestContrastive`'s
``num_pos_per_pair`` and ``num_hn_per_pair``. :func:`hardest_contrastive_loss` takes the totals.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mink_ssl.objectives.args import objective_args
from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.defaults import (NEGATIVE_MODES, POSITIVE_MODES,
                                         HardestContrastiveArgs)
from mink_ssl.objectives.registry import OBJECTIVES
from mink_ssl.objectives.matches import (SeededGenerator, check_match_rows, random_subset,
                                         zero_loss)

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
                              n_cand: int, negatives: str = "code") -> torch.Tensor:
    """Distance (A,) from each anchor to its hardest negative candidate, ``inf`` if it has none.

    ``match_anchor``/``match_cand`` are the rows of every match in the anchors' and the
    candidates' views. ``negatives="code"``: the closest candidate, ``inf`` when that candidate
    is one of the anchor's matches (the anchor is dropped); ``"exclude_matches"``: the closest
    candidate that is not one of its matches, ``inf`` when all are.
    """
    dist = feature_distance(anchor_feats, cand_feats)  # (A, K)
    is_match = match_mask(anchor_rows, cand_rows, match_anchor, match_cand, n_cand)  # (A, K)
    if negatives == "exclude_matches":
        return dist.masked_fill(is_match, float("inf")).min(dim=1).values  # (A,)
    closest, which = dist.min(dim=1)  # (A,)
    hit = is_match.gather(1, which[:, None])[:, 0]  # (A,) the closest candidate is a match
    return closest.masked_fill(hit, float("inf"))


def _check_modes(positive: str, negatives: str) -> None:
    if positive not in POSITIVE_MODES:
        raise ValueError(f"positive must be one of {POSITIVE_MODES}, got {positive!r}")
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"negatives must be one of {NEGATIVE_MODES}, got {negatives!r}")


def hardest_contrastive_loss(f0: torch.Tensor, f1: torch.Tensor, matches: torch.Tensor, *,
                             num_pos: int = 4096, num_hn_samples: int = 1024,
                             pos_margin: float = 0.1, neg_margin: float = 1.4,
                             pos_weight: float = 1.0, neg_weight: float = 1.0,
                             positive: str = "code", negatives: str = "code",
                             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Hardest-contrastive loss on features ``f0`` (N0, C), ``f1`` (N1, C), ``matches`` (M, 2).

    ``num_pos`` matches and ``num_hn_samples`` candidates per view are sampled for the whole
    batch. Returns ``loss_hardest_contrastive`` and the detached stats ``stat_pos_loss``,
    ``stat_neg_loss``, ``stat_pos_dist`` (mean matched distance), ``stat_neg_dist`` (mean hardest
    negative distance, both directions), ``stat_neg_used`` (fraction of anchor terms kept) and
    ``stat_num_matches`` (matches used; 0 means nothing to contrast and the loss is a zero
    connected to the features).
    """
    _check_modes(positive, negatives)
    n0, n1 = len(f0), len(f1)
    device = f0.device
    matches = check_match_rows(matches.to(device), n0, n1)
    pos = matches[random_subset(len(matches), num_pos, generator, device)]  # (P, 2)
    num = torch.tensor(float(len(pos)), device=device)
    if len(pos) == 0:
        zero = zero_loss(f0, f1)
        stat = zero.detach()
        return {"loss_hardest_contrastive": zero, "stat_pos_loss": stat, "stat_neg_loss": stat,
                "stat_pos_dist": stat, "stat_neg_dist": stat, "stat_neg_used": stat,
                "stat_num_matches": num}

    f0, f1 = F.normalize(f0, dim=1), F.normalize(f1, dim=1)
    i, j = pos[:, 0], pos[:, 1]  # (P,), (P,)
    cand0 = random_subset(n0, num_hn_samples, generator, device)  # (K0,)
    cand1 = random_subset(n1, num_hn_samples, generator, device)  # (K1,)

    pos_d2 = ((f0[i] - f1[j]) ** 2).sum(1)  # (P,)
    if positive == "code":  # [d^2 - m_p]_+
        pos_loss = F.relu(pos_d2 - pos_margin).mean()
    else:  # [d - m_p]_+^2
        pos_loss = F.relu(torch.sqrt(pos_d2 + _EPS) - pos_margin).pow(2).mean()

    # negatives: hardest candidate of the other view, each direction
    m0, m1 = matches[:, 0], matches[:, 1]
    hard01 = hardest_negative_distance(f0[i], i, f1[cand1], cand1, m0, m1, n1, negatives)  # (P,)
    hard10 = hardest_negative_distance(f1[j], j, f0[cand0], cand0, m1, m0, n0, negatives)  # (P,)
    neg_terms = []
    for hard in (hard01, hard10):
        valid = torch.isfinite(hard)  # (P,) anchors that keep a negative term
        term = F.relu(neg_margin - hard.masked_fill(~valid, neg_margin)).pow(2)  # (P,)
        neg_terms.append(term.sum() / valid.sum().clamp(min=1))
    neg_loss = 0.5 * (neg_terms[0] + neg_terms[1])

    hard = torch.cat([hard01, hard10]).detach()
    finite = torch.isfinite(hard)
    neg_dist = hard[finite].mean() if bool(finite.any()) else hard.new_zeros(())
    return {
        "loss_hardest_contrastive": pos_weight * pos_loss + neg_weight * neg_loss,
        "stat_pos_loss": pos_loss.detach(),
        "stat_neg_loss": neg_loss.detach(),
        "stat_pos_dist": torch.sqrt(pos_d2.detach()).mean(),
        "stat_neg_dist": neg_dist,
        "stat_neg_used": finite.float().mean(),
        "stat_num_matches": num,
    }


@OBJECTIVES.register("hardest_contrastive")
@objective_args(HardestContrastiveArgs)
class HardestContrastive(Objective):
    """Hardest-contrastive loss between the two views of a :class:`~mink_ssl.data.batch.PairBatch`;
    its arguments, keywords of the constructor:
    :class:`~mink_ssl.objectives.defaults.HardestContrastiveArgs` (``num_pos_per_pair`` and
    ``num_hn_per_pair`` count per pair of the batch; ``positive`` / ``negatives`` choose the
    released code's forms or the paper's / ours).
    """

    def __init__(self, args: HardestContrastiveArgs):
        super().__init__()
        num_pos_per_pair, num_hn_per_pair = args.num_pos_per_pair, args.num_hn_per_pair
        pos_margin, neg_margin = args.pos_margin, args.neg_margin
        pos_weight, neg_weight = args.pos_weight, args.neg_weight
        positive, negatives, seed = args.positive, args.negatives, args.seed
        if not 0 <= pos_margin < neg_margin:
            raise ValueError(f"need 0 <= pos_margin < neg_margin, got {pos_margin} and "
                             f"{neg_margin}")
        _check_modes(positive, negatives)
        self.num_pos_per_pair, self.num_hn_per_pair = num_pos_per_pair, num_hn_per_pair
        self.pos_margin, self.neg_margin = pos_margin, neg_margin
        self.pos_weight, self.neg_weight = pos_weight, neg_weight
        self.positive, self.negatives = positive, negatives
        self.generator = SeededGenerator(seed)

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        f0, f1 = ctx.features(0), ctx.features(1)
        pairs = max(num_pairs(ctx.batch), 1)
        return hardest_contrastive_loss(
            f0, f1, ctx.batch.matches, num_pos=self.num_pos_per_pair * pairs,
            num_hn_samples=self.num_hn_per_pair * pairs, pos_margin=self.pos_margin,
            neg_margin=self.neg_margin, pos_weight=self.pos_weight, neg_weight=self.neg_weight,
            positive=self.positive, negatives=self.negatives,
            generator=self.generator(f0.device))

    def extra_repr(self) -> str:
        return (f"num_pos_per_pair={self.num_pos_per_pair}, "
                f"num_hn_per_pair={self.num_hn_per_pair}, pos_margin={self.pos_margin}, "
                f"neg_margin={self.neg_margin}, positive={self.positive!r}, "
                f"negatives={self.negatives!r}, seed={self.generator.seed}")


def num_pairs(batch) -> int:
    """Pairs (scenes) in a :class:`PairBatch`: the largest batch index of view 0, plus one."""
    index = batch.views[0].coords[:, 0]
    return int(index.max()) + 1 if len(index) else 0
