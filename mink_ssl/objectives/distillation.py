"""Self-distillation between crops with an EMA teacher (DCGLR, Fu et al. 2022, Sec. 3.2; after
DINO, Caron et al. 2021), at point level on the scene fragments of a pair batch.

DCGLR trains a point network on *single objects* with one global feature per cloud. From a
cloud P it cuts I global crops P_g^i = crop(P, rand(r_g1, r_g2)) and J local crops
P_l^j = crop(P, rand(r_l1, r_l2)) (eqs. 4-5); the teacher f_t sees the global crops, the
student f_s all of them, and both end in a projector to K dimensions (eqs. 6-7). The teacher's
output is centred, o_hat = o_t - c (eq. 8), with the centre an EMA of the teacher outputs
c <- q c + (1 - q) mean(o_t) (eq. 9), and sharpened by a low softmax temperature. The student
minimises cross-entropies H(a, b) = -a . log b, global-to-global over i != j (eq. 10) and
local-to-global (eq. 11), weighted as loss = w_g loss_g + w_l loss_l (eq. 12); the teacher is
not trained but follows the student, theta_t <- lambda theta_t + (1 - lambda) theta_s (eq. 13),
with lambda rising from 0.996 to 1. The teacher's backbone is the one used downstream.

Adaptation here:

- point level: the backbone is a sparse UNet with one feature per voxel, so a crop has no single
  feature; instead every voxel of view 0 that lies in two crops is a positive pair between
  them. Crops keep the view-0 row of each of their voxels, so shared points are matched exactly
  through these original indices. Eqs. 10-11 become means over the shared points of each
  (teacher global crop i, student crop j) pair, then over pairs; pairs sharing no point are
  left out of the mean;
- crops of a scene: ``crop(P, r)`` keeps the round(r N) voxels of the scene nearest, in the
  horizontal plane, to a random voxel of the scene (a vertical cylinder: indoor scenes are
  gravity aligned), so r is exactly the fraction of the scene's voxels kept. Each crop is then
  rotated about the vertical through its centre by its own random angle and re-quantised on the
  voxel grid (several voxels falling into one cell keep the lowest view-0 row), so that no two
  crops are the same input, not even two global crops with r = 1;
- the projector is DINO's head: MLP (C -> H -> H -> D, GELU), L2-normalised, then cosine
  similarity to K unit prototypes, i.e. logits in [-1, 1] (DINO's weight-normalised last layer
  with its norm fixed at 1). The teacher's copy of it follows the student's by eq. 13 too.
  Its input is the backbone feature times sqrt(C) (``input_scale``, default ``"unit_rms"``):
  DINO's head reads LayerNorm'ed ViT tokens (about unit RMS per channel) while our backbones
  give unit-norm rows (RMS 1/sqrt(C)), so without it the head's biases dominate its output and
  every voxel gets nearly the same embedding. Measured on the synthetic transfer benchmark's
  pairs (Res16UNet14S, C = 32, K = 512, at initialisation): embedding cosine between random
  voxels 0.964 (their backbone features: 0.33), teacher logits varying across voxels by a std
  of 0.023, below tau_t = 0.04, so once the centre has absorbed the shared part the targets are
  uniform (entropy 6.07, ln K = 6.24) whatever the student learns; with the scaling, cosine 0.54,
  std 0.083, entropy 4.36. ``input_scale="none"`` is the earlier projector;
- sharpening is softmax((o_t - c) / tau_t) with tau_t = 0.04 (paper) and the student's
  distribution softmax(o_s / tau_s) with tau_s = 0.1 (DINO); q = 0.9 (DINO; the paper gives
  no value). The centre is the mean of the teacher outputs used in the step's loss, summed and
  counted over all ranks when torch.distributed is initialised;
- lambda follows DINO's cosine schedule over the run, 1 - (1 - lambda_0)(1 + cos(pi s / S)) / 2
  at step s of S, applied by a trainer hook after every optimizer step;
- the teacher starts as a copy of the student (DINO), its parameters never require gradients,
  its batch-norm layers run in training mode on the global crops and keep their own running
  statistics; it is exported as the pretrained backbone;
- defaults are CPU-affordable: 2 global crops (paper: 2), 4 local crops (paper: 8, plus 2
  half-resolution FPS copies not used here), at most 2048 sampled points per crop pair, and a
  narrower head than DINO's (H = 256, D = 64 instead of 2048 and 256). The student then sees
  about 2 x 0.85 + 4 x 0.35 = 3.1 times the voxels of view 0 per step, the teacher 1.7 times.

Everything is vectorised over voxels, crops and scenes: crops by sorting distances, matching by
a (global crops x view-0 rows) lookup table, per-pair means with ``index_add``.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mink_ssl.engine.trainer import Hook
from mink_ssl.objectives.args import objective_args
from mink_ssl.objectives.base import Objective, StepContext
from mink_ssl.objectives.crops import cap_per_group, check_scales, make_crops, match_shared_points
from mink_ssl.objectives.defaults import INPUT_SCALES, DistillationArgs
from mink_ssl.objectives.registry import OBJECTIVES
from mink_ssl.objectives.matches import SeededGenerator, zero_loss
from mink_ssl.sparse import sparse_tensor


# --- losses, centre and EMA -------------------------------------------------------------------

def distillation_cross_entropy(teacher_out: torch.Tensor, student_out: torch.Tensor,
                               center: torch.Tensor, teacher_temperature: float,
                               student_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row H(P_t, P_s) = -sum_k P_t log P_s with centring and sharpening (eq. 8 + DINO).

    P_t = softmax((o_t - c) / tau_t) (no gradient), P_s = softmax(o_s / tau_s).
    Args: teacher_out (P, K), student_out (P, K), center (K,).
    Returns: (cross-entropy (P,), teacher probabilities P_t (P, K)).
    """
    with torch.no_grad():
        p_t = F.softmax((teacher_out - center) / teacher_temperature, dim=1)  # (P, K)
    log_p_s = F.log_softmax(student_out / student_temperature, dim=1)  # (P, K)
    return -(p_t * log_p_s).sum(dim=1), p_t


def pair_losses(ce: torch.Tensor, teacher_crop: torch.Tensor, student_crop: torch.Tensor,
                num_global: int, num_crops: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss_g (eq. 10) and loss_l (eq. 11) from per-point cross-entropies.

    Each (teacher crop i, student crop j) pair contributes the mean of ``ce`` over its points;
    loss_g averages the pairs with j a global crop (j != i), loss_l those with j local. Pairs
    without points are left out; a term with no pair at all is a zero connected to ``ce``.

    Args: ce (P,), teacher_crop (P,) in [0, I), student_crop (P,) in [0, C).
    Returns: (loss_g, loss_l, points per pair (I, C)).
    """
    pair = teacher_crop * num_crops + student_crop  # (P,)
    n = num_global * num_crops
    total = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add(0, pair, ce)  # (I*C,)
    count = torch.bincount(pair, minlength=n)  # (I*C,)
    mean = total / count.clamp(min=1)
    present = (count > 0).view(num_global, num_crops)  # (I, C)
    is_global = torch.arange(num_crops, device=ce.device) < num_global  # (C,)
    zero = ce[:0].sum()
    terms = []
    for selected in (present & is_global, present & ~is_global):
        picked = mean.view(num_global, num_crops)[selected]
        terms.append(picked.mean() if len(picked) else zero)
    return terms[0], terms[1], count.view(num_global, num_crops)


@torch.no_grad()
def update_center_(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> None:
    """c <- q c + (1 - q) mean(teacher_out) in place (eq. 9); the mean is over all ranks when
    torch.distributed is initialised (rows summed and counted across ranks). (K,), (P, K)."""
    import torch.distributed as dist

    stats = torch.cat([teacher_out.double().sum(0),
                       teacher_out.new_tensor([len(teacher_out)], dtype=torch.float64)])  # (K+1,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    if stats[-1] > 0:
        mean = (stats[:-1] / stats[-1]).to(center.dtype)  # (K,)
        center.mul_(momentum).add_(mean, alpha=1 - momentum)


def momentum_schedule(step: int, total: int, base: float = 0.996, final: float = 1.0) -> float:
    """DINO's cosine schedule of the teacher momentum: ``base`` at step 0, ``final`` at
    step ``total``."""
    s = min(max(step, 0), max(total, 1))
    return final - (final - base) * (1 + math.cos(math.pi * s / max(total, 1))) / 2


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- lambda theta_t + (1 - lambda) theta_s for every parameter, in place (eq. 13).

    Parameters are paired by name; buffers (batch-norm statistics) are left alone.
    """
    t, s = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t.keys() != s.keys():
        raise ValueError(f"teacher and student parameters differ: {sorted(t.keys() ^ s.keys())[:5]}"
                         "; the teacher must be a copy of the student")
    for name, p in t.items():
        p.mul_(momentum).add_(s[name].detach(), alpha=1 - momentum)


def clone_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that keeps attributes stored in ``__slots__``.

    ``copy.deepcopy`` of an ``nn.Module`` copies only its ``__dict__`` (``Module.__getstate__``),
    but MinkowskiEngine's layers keep ``dimension``, ``kernel_generator`` and more in slots, so
    a plain deep copy of a sparse network fails at its first forward. Slots are copied here
    with the same memo, so objects shared between layers stay shared in the copy.
    """
    memo: dict = {}
    clone = copy.deepcopy(module, memo)
    for src, dst in zip(module.modules(), clone.modules()):
        for cls in type(src).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            for name in (slots,) if isinstance(slots, str) else slots:
                descriptor = cls.__dict__.get(name)
                if descriptor is None or not hasattr(descriptor, "__set__"):
                    continue
                try:
                    value = descriptor.__get__(src, cls)
                except AttributeError:  # slot never set (e.g. a parameter kept in _parameters)
                    continue
                descriptor.__set__(dst, copy.deepcopy(value, memo))
    return clone


# --- heads and the objective ------------------------------------------------------------------

#: projector input scalings: x sqrt(C) (unit RMS per channel, as DINO's LayerNorm'ed input) | none
def check_input_scale(input_scale: str) -> str:
    if input_scale not in INPUT_SCALES:
        raise ValueError(f"input_scale must be one of {INPUT_SCALES}, got {input_scale!r}")
    return input_scale


class PrototypeProjector(nn.Module):
    """DINO's head: MLP (C -> H -> H -> D, GELU), L2-normalise, cosine to K unit prototypes.

    (P, C) features -> (P, K) logits in [-1, 1].
    """

    def __init__(self, in_channels: int, num_prototypes: int, hidden_channels: int,
                 bottleneck_channels: int, input_scale: str = "unit_rms"):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden_channels), nn.GELU(),
            nn.Linear(hidden_channels, hidden_channels), nn.GELU(),
            nn.Linear(hidden_channels, bottleneck_channels))
        # PyTorch's default init, not DINO's N(0, 0.02): with unit-norm point features of a
        # few dozen channels, DINO's init leaves the bottleneck ~1e-3 before normalisation,
        # where the first steps' biases swamp it and a 0.4% EMA step reshuffles the teacher
        self.input_scale = input_scale
        self.scale = in_channels ** 0.5 if check_input_scale(input_scale) == "unit_rms" else 1.0
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, bottleneck_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x * self.scale), dim=1)  # (P, D)
        return z @ F.normalize(self.prototypes, dim=1).t()  # (P, K)


class TeacherUpdateHook(Hook):
    """Trainer hook: after every optimizer step, the EMA update of the objective's teacher with
    the momentum of the step just taken, ``momentum_schedule(iteration - 1, max_iterations)``.
    """

    def __init__(self, objective: "Distillation"):
        self.objective = objective

    def after_step(self, trainer) -> None:
        o = self.objective
        o.update_teacher(momentum_schedule(trainer.state.iteration - 1, trainer.max_iterations,
                                           o.momentum, o.final_momentum))


@OBJECTIVES.register("distillation")
@objective_args(DistillationArgs)
class Distillation(Objective):
    """DCGLR self-distillation between crops of view 0, point level (see the module docstring);
    its arguments, keywords of the constructor:
    :class:`~mink_ssl.objectives.defaults.DistillationArgs` (``in_channels`` ``None``: the
    backbone's ``out_channels``, read in :meth:`attach`; ``input_scale``: see the module
    docstring).
    """

    def __init__(self, args: DistillationArgs):
        super().__init__()
        a = args
        in_channels, num_prototypes, voxel_size = a.in_channels, a.num_prototypes, a.voxel_size
        hidden_channels, bottleneck_channels = a.hidden_channels, a.bottleneck_channels
        num_global_crops, num_local_crops = a.num_global_crops, a.num_local_crops
        global_crop_scale, local_crop_scale = a.global_crop_scale, a.local_crop_scale
        teacher_temperature, student_temperature = a.teacher_temperature, a.student_temperature
        center_momentum, momentum, final_momentum = (a.center_momentum, a.momentum,
                                                     a.final_momentum)
        global_weight, local_weight = a.global_weight, a.local_weight
        max_points, seed, input_scale = a.max_points, a.seed, a.input_scale
        self.scales = [tuple(global_crop_scale)] * num_global_crops + \
            [tuple(local_crop_scale)] * num_local_crops
        check_scales(self.scales)
        self.num_global_crops, self.num_local_crops = num_global_crops, num_local_crops
        self.num_prototypes, self.hidden_channels = num_prototypes, hidden_channels
        self.bottleneck_channels, self.voxel_size = bottleneck_channels, voxel_size
        self.teacher_temperature = teacher_temperature
        self.student_temperature = student_temperature
        self.center_momentum, self.momentum, self.final_momentum = (center_momentum, momentum,
                                                                    final_momentum)
        self.global_weight, self.local_weight = global_weight, local_weight
        self.max_points = max_points or None
        self.generator = SeededGenerator(seed)
        self.in_channels, self.input_scale = in_channels, check_input_scale(input_scale)
        self.projector = (None if in_channels is None else PrototypeProjector(
            in_channels, num_prototypes, hidden_channels, bottleneck_channels, input_scale))
        self.register_buffer("center", torch.zeros(num_prototypes))
        self.teacher_backbone: nn.Module | None = None
        self.teacher_projector: nn.Module | None = None
        self._student: tuple[nn.Module, ...] = ()  # a plain reference: not a submodule

    # --- the three plug-in methods --------------------------------------------------------

    def attach(self, backbone: nn.Module) -> None:
        """Build the teacher: frozen copies of ``backbone`` and of the projector (submodules)."""
        width = getattr(backbone, "out_channels", None)
        if self.projector is None:
            if not isinstance(width, int):
                raise ValueError("in_channels is None and the backbone has no int out_channels;"
                                 " pass in_channels (the backbone's feature width)")
            self.in_channels = width
            self.projector = PrototypeProjector(width, self.num_prototypes,
                                                self.hidden_channels, self.bottleneck_channels,
                                                self.input_scale)
        elif isinstance(width, int) and width != self.in_channels:
            raise ValueError(f"in_channels={self.in_channels} but the backbone outputs {width} "
                             "channels; set in_channels to the backbone's out_channels")
        self.teacher_backbone = clone_module(backbone)
        self.teacher_projector = clone_module(self.projector)
        for p in [*self.teacher_backbone.parameters(), *self.teacher_projector.parameters()]:
            p.requires_grad_(False)
            p.grad = None
        self._student = (backbone,)

    def hooks(self) -> list:
        return [TeacherUpdateHook(self)]

    def export_backbone(self) -> nn.Module | None:
        return self.teacher_backbone

    # --- teacher ---------------------------------------------------------------------------

    def _check_attached(self, backbone: nn.Module | None = None) -> nn.Module:
        if not self._student:
            raise RuntimeError("the distillation objective has no teacher yet: call "
                               "attach(backbone) first (PretrainModule does)")
        if backbone is not None and backbone is not self._student[0]:
            raise ValueError("the step's backbone is not the one the objective was attached to;"
                             " attach(backbone) with the network being trained")
        return self._student[0]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the student's backbone and projector into the teacher's (eq. 13)."""
        student = self._check_attached()
        ema_update_(self.teacher_backbone, student, momentum)
        ema_update_(self.teacher_projector, self.projector, momentum)

    # --- the step --------------------------------------------------------------------------

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        self._check_attached(ctx.backbone)
        view = ctx.batch.views[0]
        feats = view.feats
        device = feats.device
        generator = self.generator(device)
        i, c = self.num_global_crops, len(self.scales)
        voxel_size = self.voxel_size or ctx.batch.voxel_size
        if voxel_size is None:
            raise ValueError("distillation: the batch carries no voxel_size (a PairBatch made "
                             "without one); pass voxel_size=<metres of the data's grid>")
        crops = make_crops(view.world.to(device), view.batch_index.to(device), self.scales,
                           voxel_size, generator)
        crop_feats = feats[crops.origin]  # (M, C_in)
        student = ctx.backbone(sparse_tensor(crops.coords, crop_feats)).F  # (M, C)
        n_teacher = int((crops.crop < i).sum())  # the global crops' rows come first
        with torch.no_grad():
            teacher = self.teacher_backbone(sparse_tensor(crops.coords[:n_teacher],
                                                          crop_feats[:n_teacher])).F  # (M_t, C)

        t_rows, s_rows = match_shared_points(crops.origin, crops.crop, i, len(feats))  # (P,)
        if self.max_points is not None:
            keep = cap_per_group(crops.crop[t_rows] * c + crops.crop[s_rows], self.max_points,
                                 generator)
            t_rows, s_rows = t_rows[keep], s_rows[keep]
        with torch.no_grad():
            t_out = self.teacher_projector(teacher[t_rows])  # (P, K)
        s_out = self.projector(student[s_rows])  # (P, K)
        ce, p_t = distillation_cross_entropy(t_out, s_out, self.center,
                                             self.teacher_temperature, self.student_temperature)
        loss_g, loss_l, _ = pair_losses(ce, crops.crop[t_rows], crops.crop[s_rows], i, c)
        loss = self.global_weight * loss_g + self.local_weight * loss_l + zero_loss(student)
        if self.training:
            update_center_(self.center, t_out, self.center_momentum)
        entropy = -(p_t * p_t.clamp_min(1e-12).log()).sum(1)  # (P,) H(P_t)
        mean = (lambda x: x.mean()) if len(ce) else (lambda x: x.sum())  # noqa: E731
        return {"loss_distillation": loss,
                "stat_distillation_global": loss_g.detach(),
                "stat_distillation_local": loss_l.detach(),
                "stat_distillation_teacher_entropy": mean(entropy),
                "stat_distillation_kl": mean(ce.detach() - entropy),
                "stat_distillation_shared_points": torch.tensor(float(len(ce)), device=device)}

    def extra_repr(self) -> str:
        return (f"crops={self.num_global_crops}+{self.num_local_crops}, "
                f"K={self.num_prototypes}, tau_t={self.teacher_temperature}, "
                f"tau_s={self.student_temperature}, momentum={self.momentum}->"
                f"{self.final_momentum}, max_points={self.max_points}, seed={self.generator.seed}")
