"""Perturbed-patch denoising (SeRP, Garg & Chaudhary 2022, Sec. 3.1-3.2 and 3.3.5), at point
level on the voxelised scene fragments of a pair batch.

SeRP corrupts a *single object* of 1024 points: 20 random centres, the 20 nearest points of each
form a patch, and every patch point gets Gaussian noise N(0, 0.03^2 I) (Sec. 3.1). A PointNet
autoencoder then (a) classifies which points were perturbed (cross-entropy, l_cls) and
(b) reconstructs them, either by regressing delta = original - perturbed with an MSE
("delta-learning") or by predicting coordinates under the l2 Chamfer distance (eq. 11,
"cd-learning"). The total loss is

    L = alpha_cls * l_cls + alpha_rec * l_rec,   alpha_cls = 0.001, alpha_rec = 1.5     (1)

Adaptation here (the sparse UNet sees voxels, not points; scenes, not unit-scale shapes):

- the cloud is one view's voxel grid (``view``, default 0; integer coordinates in the view's
  transformed frame, voxel units); each scene of the batch gets ``round(centre_fraction *
  N_scene)`` (at least 1) centres drawn uniformly without replacement among its voxels (the
  paper's random sampling; the default fraction 20/1024 keeps its density of patches), and a
  patch is the ``patch_size`` (20) voxels nearest its centre in the same scene (ties broken by
  the lower voxel index, so patches are a deterministic function of the centres);
- every voxel of a patch (one draw per voxel, however many patches hold it) moves by Gaussian
  noise of ``noise_std`` voxels and is re-voxelised: voxel q goes to v = q + floor(eps + 1/2)
  (the voxel of its perturbed centre). Voxels that land together collapse into one (their input
  features are averaged);
- labels are defined on the *output* voxels: a voxel is "perturbed" (class 1) when every input
  voxel in it was displaced (v != q); a voxel that still holds an unmoved input voxel is
  indistinguishable from the clean cloud and is class 0. A patch voxel whose noise rounds to 0
  does not move and is class 0 too, so the labels are learnable from the input;
- delta target of a perturbed output voxel u: the mean over its input voxels of q - v_u (voxel
  units; exact, one integer vector when a single voxel landed there);
- the heads are one linear layer each on the backbone's per-voxel features, as in SeRP-PointNet:
  a classifier (2 logits) and a regressor (3 values, the predicted delta);
- units and weights: deltas and positions enter the reconstruction loss divided by
  ``delta_unit`` voxels, by default the noise standard deviation, so targets have variance ~1
  and the regressor outputs O(1) numbers. In the paper the deltas have standard deviation 0.03
  (shape units), so its l_rec is 0.03^2 times ours; to keep eq. 1's balance between the two
  terms, the default alpha_cls is 0.001 / 0.03^2 (1.11) with alpha_rec = 1.5: L here is the
  paper's L divided by 0.03^2. The overall scale matters under SGD (the paper's AdamW ignores
  it): at O(1) the loss trains at the learning rates of the contrastive objectives and can be
  combined with them at weights near 1;
- delta-learning: MSE (mean over perturbed output voxels and the 3 coordinates) between the
  predicted and target delta;
- cd-learning: absolute coordinates cannot be predicted by a translation-equivariant network,
  so a perturbed voxel's reconstruction is its position plus the predicted delta; eq. 11 is
  applied per patch, between the reconstructions of the perturbed output voxels holding the
  patch's displaced voxels and those voxels' original positions, and averaged over patches
  (the paper applies it to the whole shape; scenes are too large for all-pairs distances).

Default noise: ``noise_std = 1`` voxel (2.5 cm at the pretraining voxel size). SeRP's 0.03 is
1.5% of the diameter of a shape normalised to the unit sphere (the usual ShapeNet
normalisation; the paper says "unit-scale"); indoor objects are 1-2 m across, giving 1.5-3 cm,
i.e. 0.6-1.2 voxels. Quantisation sets the floor: a patch voxel is displaced with
probability 1 - erf(1/(2 sqrt(2) sigma))^3, which is 26% at sigma = 0.3, 68% at 0.5, 94% at 1.0
voxels; below about half a voxel most of the noise is rounded away.

Everything is vectorised: centres by one random permutation per batch, exact nearest neighbours
by hashed lookups in a 7^3 cube around each centre (falling back, for the few centres whose k-th
neighbour is farther, to integer distances to every voxel of the scene in chunks of at most
``max_pairs`` pairs: a loop over scenes and chunks, never over points), collapse by
``unique_voxels``, targets by ``index_add``, Chamfer on (patches, k, k) distance blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mink_ssl.objectives.args import objective_args
from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.defaults import PerturbationArgs
from mink_ssl.objectives.registry import OBJECTIVES
from mink_ssl.objectives.matches import SeededGenerator, zero_loss
from mink_ssl.sparse import pack_keys, sparse_tensor, unique_voxels

def sample_centres(batch_index: torch.Tensor, fraction: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Patch centres: ``max(1, round(fraction * N_s))`` distinct voxels of every scene s.

    Args:
        batch_index: (N,) int64 scene of each voxel.
        fraction: centres per voxel, in (0, 1].
        generator: random source (``None``: torch's global RNG).

    Returns:
        (P,) int64 voxel indices, grouped by scene in ascending scene order, random within a scene.
    """
    batch_index = batch_index.long()
    n = len(batch_index)
    device = batch_index.device
    counts = torch.bincount(batch_index, minlength=int(batch_index.max()) + 1 if n else 0)  # (B,)
    wanted = torch.minimum(torch.round(counts.double() * fraction).long().clamp_min(1), counts)
    perm = torch.randperm(n, generator=generator, device=device)  # (N,)
    order = perm[torch.sort(batch_index[perm], stable=True).indices]  # by scene, random within
    starts = torch.cumsum(counts, 0) - counts  # (B,)
    scene = batch_index[order]
    rank = torch.arange(n, device=device) - starts[scene]  # position within the scene
    return order[rank < wanted[scene]]


def knn_patches(points: torch.Tensor, batch_index: torch.Tensor, centres: torch.Tensor, k: int,
                max_pairs: int = 1 << 22, window: int = 3) -> torch.Tensor:
    """The ``k`` voxels of each centre's scene nearest to it (the centre itself first).

    Distances are exact integer squared distances; ties go to the lower voxel index. Each centre
    first looks up the occupied voxels of the cube of half-width ``window`` around it (hashed
    keys, linear in the number of centres); the answer is exact when its k-th voxel lies within
    distance ``window``, since the cube holds every voxel that close. The other centres (sparse
    regions, tiny scenes) fall back to all the voxels of their scene, in chunks.

    Args:
        points: (N, 3) integer voxel coordinates.
        batch_index: (N,) scene of each voxel.
        centres: (P,) voxel indices of the patch centres.
        k: patch size; a scene with fewer voxels fills its rows with all of them.
        max_pairs: centre-voxel distances held at once by the fallback (a chunk size only).
        window: half-width of the lookup cube in voxels (0: always the fallback).

    Returns:
        (P, k) int64 voxel indices, nearest first; -1 pads rows of scenes with fewer than k voxels.
    """
    if points.is_floating_point() or points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be integer voxel coordinates (N, 3), got shape "
                         f"{tuple(points.shape)}, dtype {points.dtype}")
    batch_index, centres = batch_index.long(), centres.long()
    out = torch.full((len(centres), k), -1, dtype=torch.long, device=points.device)
    if len(centres) == 0:
        return out
    nearest, exact = _knn_window(points.long(), batch_index, centres, k, window)
    out[exact] = nearest[exact]
    rest = (~exact).nonzero()[:, 0]
    if len(rest):
        _knn_scene(points.long(), batch_index, centres, rest, k, max_pairs, out)
    return out


def _knn_window(points: torch.Tensor, batch_index: torch.Tensor, centres: torch.Tensor, k: int,
                window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest among the occupied voxels of each centre's cube: (P, k) indices, (P,) exact."""
    device, n = points.device, len(points)
    if window < 1 or (2 * window + 1) ** 3 < k:
        return centres.new_full((len(centres), k), -1), torch.zeros_like(centres, dtype=torch.bool)
    coords = torch.cat([batch_index[:, None], points], 1)  # (N, 4)
    margin = torch.tensor([0, window, window, window], device=device)
    lo = coords.min(0).values - margin
    extent = coords.max(0).values + margin - lo + 1
    if float(torch.prod(extent.double())) >= 2.0 ** 62:
        raise ValueError(f"voxel coordinates span {extent[1:].tolist()} voxels: too large to "
                         "hash; is the voxel size far too small?")
    keys, order = torch.sort(pack_keys(coords, lo, extent))  # (N,)
    r = torch.arange(-window, window + 1, device=device)
    offsets = torch.cartesian_prod(r, r, r)  # (O, 3)
    cand = coords[centres][:, None, :].repeat(1, len(offsets), 1)  # (P, O, 4)
    cand[:, :, 1:] += offsets
    cand_keys = pack_keys(cand.reshape(-1, 4), lo, extent).view(len(centres), -1)  # (P, O)
    pos = torch.searchsorted(keys, cand_keys).clamp_max(n - 1)
    found = keys[pos] == cand_keys
    d2 = offsets.square().sum(1)  # (O,)
    key = torch.where(found, d2 * n + order[pos], torch.iinfo(torch.long).max)  # (P, O)
    best = key.topk(k, dim=1, largest=False, sorted=True).values  # (P, k)
    exact = (best[:, -1] < torch.iinfo(torch.long).max) & (best[:, -1] // n <= window ** 2)
    return best % n, exact


def _knn_scene(points: torch.Tensor, batch_index: torch.Tensor, centres: torch.Tensor,
               rows: torch.Tensor, k: int, max_pairs: int, out: torch.Tensor) -> None:
    """Fallback: ``out[rows]`` from all voxels of each centre's scene, chunks of centres."""
    device = points.device
    order = torch.sort(batch_index, stable=True).indices  # (N,) by scene, ascending index within
    counts = torch.bincount(batch_index)
    starts = torch.cumsum(counts, 0) - counts
    row_scene = batch_index[centres[rows]]
    for s in torch.unique(row_scene).tolist():  # loop over scenes
        n_s, start = int(counts[s]), int(starts[s])
        members = order[start:start + n_s]  # (n_s,) global indices of the scene's voxels
        pts = points[members]  # (n_s, 3)
        extent = pts.max(0).values - pts.min(0).values
        if float(extent.double().square().sum()) * n_s >= 2.0 ** 62:
            raise ValueError(f"scene {s} spans {extent.tolist()} voxels over {n_s} voxels: too "
                             "large for exact distance keys; is the voxel size far too small?")
        scene_rows = rows[row_scene == s]  # (P_s,)
        kk = min(k, n_s)
        tie = torch.arange(n_s, device=device)  # (n_s,)
        chunk = max(1, max_pairs // n_s)
        for a in range(0, len(scene_rows), chunk):  # loop over chunks of centres
            r = scene_rows[a:a + chunk]
            c = points[centres[r]]  # (R, 3)
            d2 = torch.zeros(len(r), n_s, dtype=torch.long, device=device)
            for axis in range(3):
                d2 += (c[:, None, axis] - pts[None, :, axis]).square()  # (R, n_s)
            key = d2 * n_s + tie  # unique per row: distance first, then index
            nearest = key.topk(kk, dim=1, largest=False, sorted=True).indices  # (R, kk)
            out[r, :kk] = members[nearest]


@dataclass
class PerturbedCloud:
    """The perturbed, re-voxelised cloud and its targets (N input voxels, M output voxels).

    coords:    (M, 4) int32 batched voxel coordinates of the perturbed cloud, batch index first
    feats:     (M, C) mean input features of the voxels that landed in each output voxel
    inverse:   (N,) int64 output voxel of each input voxel
    displaced: (N,) bool, the input voxel moved to another voxel
    labels:    (M,) int64, 1 = perturbed (every input voxel in it was displaced), 0 = clean
    delta:     (M, 3) float, mean of (original - perturbed position) over its input voxels, in
               voxels, for perturbed output voxels; 0 for clean ones
    """

    coords: torch.Tensor
    feats: torch.Tensor
    inverse: torch.Tensor
    displaced: torch.Tensor
    labels: torch.Tensor
    delta: torch.Tensor


def perturb_voxels(coords: torch.Tensor, feats: torch.Tensor, members: torch.Tensor,
                   noise: torch.Tensor) -> PerturbedCloud:
    """Move the patch voxels by ``noise`` and re-voxelise (v = q + floor(noise + 1/2)).

    Args:
        coords: (N, 4) integer batched voxel coordinates (batch index first), unique rows.
        feats: (N, C) input features.
        members: (P, k) voxel indices of the patches (-1: padding); a voxel may be in several.
        noise: (N, 3) displacement of every voxel in voxels; only patch members use theirs.
    """
    n = len(coords)
    if coords.ndim != 2 or coords.shape[1] != 4 or feats.shape[0] != n or noise.shape != (n, 3):
        raise ValueError(f"expected coords (N, 4), feats (N, C), noise (N, 3); got "
                         f"{tuple(coords.shape)}, {tuple(feats.shape)}, {tuple(noise.shape)}")
    in_patch = torch.zeros(n, dtype=torch.bool, device=coords.device)
    in_patch[members[members >= 0]] = True
    step = torch.floor(noise + 0.5).long() * in_patch[:, None]  # (N, 3) whole voxels
    moved = coords.long().clone()
    moved[:, 1:] += step
    displaced = (step != 0).any(dim=1)  # (N,)
    q = unique_voxels(moved)
    inverse, counts = q.inverse, q.counts  # (N,), (M,)
    m = len(counts)
    stayed = torch.zeros(m, dtype=torch.long, device=coords.device).index_add_(
        0, inverse, (~displaced).long())  # (M,) unmoved input voxels per output voxel
    labels = (stayed == 0).long()
    dtype = feats.dtype if feats.is_floating_point() else torch.float32
    back = torch.zeros(m, 3, dtype=dtype, device=coords.device).index_add_(
        0, inverse, -step.to(dtype))  # (M, 3) sum of q - v
    delta = back / counts[:, None] * labels[:, None]
    out_feats = torch.zeros(m, feats.shape[1], dtype=dtype, device=feats.device).index_add_(
        0, inverse, feats.to(dtype)) / counts[:, None]
    return PerturbedCloud(q.coords, out_feats, inverse, displaced, labels, delta)


def chamfer_l2(pred: torch.Tensor, pred_mask: torch.Tensor, target: torch.Tensor,
               target_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 11 per set, on padded sets: mean over valid x in P_hat of min_y |x - y|^2 plus mean
    over valid y in P of min_x |x - y|^2.

    Args: pred (S, A, D) with pred_mask (S, A) bool, target (S, B, D) with target_mask (S, B).
    Returns: (S,) Chamfer distances; rows need at least one valid entry on each side.
    """
    d2 = (pred[:, :, None, :] - target[:, None, :, :]).square().sum(-1)  # (S, A, B)
    big = torch.finfo(d2.dtype).max
    d2 = d2.masked_fill(~(pred_mask[:, :, None] & target_mask[:, None, :]), big)
    to_target = d2.min(dim=2).values  # (S, A)
    to_pred = d2.min(dim=1).values  # (S, B)
    pm, tm = pred_mask.to(d2.dtype), target_mask.to(d2.dtype)
    return ((to_target * pm).sum(1) / pm.sum(1).clamp_min(1)
            + (to_pred * tm).sum(1) / tm.sum(1).clamp_min(1))


def patch_chamfer(pred_delta: torch.Tensor, cloud: PerturbedCloud, coords: torch.Tensor,
                  members: torch.Tensor, unit: float) -> torch.Tensor:
    """Per-patch eq. 11 between reconstructions v_u / unit + pred_delta_u of the perturbed
    output voxels u holding the patch's displaced voxels, and those voxels' originals q / unit
    (both relative to the patch centre; ``unit`` in voxels).

    Args: pred_delta (M, 3) in units of ``unit``, coords (N, 4) original voxels, members (P, k).
    Returns: (P',) Chamfer distances of the patches with at least one such voxel.
    """
    valid = members >= 0
    idx = members.clamp_min(0)  # (P, k)
    u = cloud.inverse[idx]  # (P, k) output voxel of each member
    valid = valid & cloud.displaced[idx] & (cloud.labels[u] == 1)
    centre = coords[members[:, 0], 1:].long()  # (P, 3): the patch's centre voxel (origin)
    dtype = pred_delta.dtype
    target = (coords[idx, 1:].long() - centre[:, None]).to(dtype) / unit  # (P, k, 3)
    pred = ((cloud.coords[u, 1:].long() - centre[:, None]).to(dtype) / unit
            + pred_delta[u])  # (P, k, 3)
    k = members.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=u.device).tril(-1)  # (k, k) j' < j
    repeat = ((u[:, :, None] == u[:, None, :]) & valid[:, None, :] & earlier).any(2)  # (P, k)
    pred_mask = valid & ~repeat  # each output voxel once per patch
    keep = valid.any(1)
    return chamfer_l2(pred[keep], pred_mask[keep], target[keep], valid[keep])


@OBJECTIVES.register("perturbation")
@objective_args(PerturbationArgs)
class Perturbation(Objective):
    """SeRP's perturbed-patch classification and reconstruction, on the voxels of one view; its
    arguments, keywords of the constructor: :class:`~mink_ssl.objectives.defaults.PerturbationArgs`
    (``in_channels`` ``None``: inferred at the first step; units and weights: the module
    docstring).
    """

    def __init__(self, args: PerturbationArgs):
        super().__init__()
        in_channels, centre_fraction = args.in_channels, args.centre_fraction
        patch_size, noise_std, delta_unit = args.patch_size, args.noise_std, args.delta_unit
        alpha_cls, alpha_rec, reconstruction = args.alpha_cls, args.alpha_rec, args.reconstruction
        view, max_pairs, seed = args.view, args.max_pairs, args.seed
        if alpha_cls < 0 or alpha_rec < 0 or alpha_cls + alpha_rec == 0:
            raise ValueError(f"alpha_cls and alpha_rec must be >= 0 and not both 0, got "
                             f"{alpha_cls}, {alpha_rec}")
        linear = (lambda o: nn.LazyLinear(o)) if in_channels is None else (
            lambda o: nn.Linear(in_channels, o))
        self.classifier, self.regressor = linear(2), linear(3)
        self.centre_fraction, self.patch_size = centre_fraction, patch_size
        self.noise_std = noise_std
        self.delta_unit = float(delta_unit if delta_unit is not None else noise_std)
        self.alpha_cls, self.alpha_rec, self.reconstruction = alpha_cls, alpha_rec, reconstruction
        self.view, self.max_pairs = view, max_pairs
        self.generator = SeededGenerator(seed)

    def perturb(self, coords: torch.Tensor, feats: torch.Tensor
                ) -> tuple[PerturbedCloud, torch.Tensor]:
        """Sample patches and noise for ``coords`` (N, 4); returns the cloud and members (P, k)."""
        generator = self.generator(coords.device)
        batch_index = coords[:, 0].long()
        centres = sample_centres(batch_index, self.centre_fraction, generator)  # (P,)
        members = knn_patches(coords[:, 1:], batch_index, centres, self.patch_size,
                              self.max_pairs)  # (P, k)
        noise = torch.randn(len(coords), 3, generator=generator, device=coords.device)
        return perturb_voxels(coords, feats, members, noise * self.noise_std), members

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        view = ctx.batch.views[self.view]
        coords = view.coords.to(view.feats.device)
        if len(coords) == 0:
            raise ValueError("perturbation got a view with no voxels; skip empty batches upstream")
        cloud, members = self.perturb(coords, view.feats)
        features = ctx.backbone(sparse_tensor(cloud.coords, cloud.feats)).F  # (M, C)
        logits = self.classifier(features)  # (M, 2)
        pred_delta = self.regressor(features)  # (M, 3), in delta_unit
        return self.losses(logits, pred_delta, cloud, coords, members)

    def losses(self, logits: torch.Tensor, pred_delta: torch.Tensor, cloud: PerturbedCloud,
               coords: torch.Tensor, members: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 1 from head outputs: logits (M, 2), pred_delta (M, 3) in ``delta_unit`` voxels."""
        l_cls = F.cross_entropy(logits, cloud.labels)
        perturbed = cloud.labels == 1
        target = cloud.delta.to(pred_delta.dtype) / self.delta_unit  # (M, 3)
        if self.reconstruction == "delta":
            l_rec = (F.mse_loss(pred_delta[perturbed], target[perturbed]) if perturbed.any()
                     else zero_loss(pred_delta))
        else:
            per_patch = patch_chamfer(pred_delta, cloud, coords, members, self.delta_unit)
            l_rec = per_patch.mean() if len(per_patch) else zero_loss(pred_delta)
        with torch.no_grad():
            accuracy = (logits.argmax(1) == cloud.labels).float().mean()
            err = (pred_delta[perturbed] - target[perturbed]) * self.delta_unit  # voxels
            rmse = err.square().sum(1).mean().sqrt() if perturbed.any() else err.sum()
        return {"loss_perturb_cls": self.alpha_cls * l_cls,
                "loss_perturb_rec": self.alpha_rec * l_rec,
                "stat_perturb_cls": l_cls.detach(), "stat_perturb_rec": l_rec.detach(),
                "stat_perturb_accuracy": accuracy,
                "stat_perturb_fraction": perturbed.float().mean(),
                "stat_perturb_delta_rmse_voxels": rmse}

    def extra_repr(self) -> str:
        return (f"centre_fraction={self.centre_fraction:.4g}, patch_size={self.patch_size}, "
                f"noise_std={self.noise_std}, delta_unit={self.delta_unit:g}, "
                f"alpha_cls={self.alpha_cls}, alpha_rec={self.alpha_rec}, "
                f"reconstruction={self.reconstruction!r}, view={self.view}, "
                f"seed={self.generator.seed}")
